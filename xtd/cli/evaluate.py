"""`xtd evaluate` command (being written)."""
