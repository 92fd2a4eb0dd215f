"""The FUSE front end (installed as lsbd_fuse)."""
