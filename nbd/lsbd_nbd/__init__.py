"""The NBD front end (installed as lsbd_nbd): serves engine volumes to any
NBD client over the fixed newstyle protocol.  See docs/nbd.md."""

from lsbd_nbd.server import DEFAULT_PORT, NBDServer

__all__ = ["DEFAULT_PORT", "NBDServer"]
