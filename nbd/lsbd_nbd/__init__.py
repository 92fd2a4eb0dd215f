"""The NBD front end (installed as lsbd_nbd)."""
