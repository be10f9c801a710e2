"""`xtd align` command (being written)."""
