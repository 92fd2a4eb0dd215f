"""The block map (the only user of LMDB)."""
