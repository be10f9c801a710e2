"""`xtd store` command (being written)."""
