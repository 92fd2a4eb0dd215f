"""The FUSE front end (installed as lsbd_fuse; never as a top-level `fuse`).

A mount shows block devices as image files (``VOLUME.img``; later
``snapshots/NAME.img`` read-only) and translates file operations into
BlockDevice calls.  Modules:

  tree     the paths, directories and inodes of the mount (no FUSE)
  fs       ImageFS: the pyfuse3 operations, translation only
  errmap   engine errors to errno values
  options  the mount options and the cache mode, with the reasons
  serve    mount, serve until unmounted, close the devices
  daemon   `lsbd mount`: foreground or a background process with a readiness pipe
  mounts   pid files, the mount table, unmount-and-wait (no pyfuse3 needed)

pyfuse3 is imported only by the modules that need it, so `lsbd umount`
works without it.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Image", "ImageFS", "MountError", "run", "serve", "unmount"]

_WHERE = {
    "Image": "lsbd_fuse.tree",
    "ImageFS": "lsbd_fuse.fs",
    "MountError": "lsbd_fuse.mounts",
    "unmount": "lsbd_fuse.mounts",
    "serve": "lsbd_fuse.serve",
    "run": "lsbd_fuse.daemon",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'lsbd_fuse' has no attribute {name!r}")
