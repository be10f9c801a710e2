"""`xtd precompute` command (being written)."""
