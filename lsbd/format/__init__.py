"""Byte layouts of what lsbd stores: segments (docs/format.md)."""
