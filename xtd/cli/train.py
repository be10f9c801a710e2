"""`xtd train` command (being written)."""
