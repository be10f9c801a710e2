"""``python -m xtd`` runs the command line."""

from xtd.cli import main

main()
