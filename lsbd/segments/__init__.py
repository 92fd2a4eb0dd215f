"""Segment files and objects: the open journal, the local cache, the store's copies,
the uploader, and checkpoint objects."""
