"""Above the engine: restore, clone, diff, compaction and garbage collection.
The engine never imports this package."""
