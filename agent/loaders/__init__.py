"""Loaders: the programs that run inside worker processes (standard library only)."""
