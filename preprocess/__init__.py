"""Turning user photos into Leffa's model inputs (spec §5)."""
