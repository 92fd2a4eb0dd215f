"""The FUSE front end (installed as lsbd_fuse; never as a top-level `fuse`).

A mount shows block devices as image files (``VOLUME.img``, and read-only
``snapshots/NAME.img``) and translates file operations into BlockDevice
calls.  It speaks the kernel's FUSE protocol on /dev/fuse itself, with no
library.  Modules:

  protocol  the kernel protocol's opcodes and structures (linux/fuse.h)
  tree      the paths, directories and inodes of the mount (no FUSE)
  fs        ImageFS: the file system's operations, translation only
  errmap    engine errors to errno values
  session   read, check and answer requests; worker threads for calls that wait
  workers   the worker threads
  channel   mount(2) or fusermount3, cloned queues, lazy detach
  options   the mount's choices (cache mode, queues), with the reasons
  serve     mount, serve until unmounted, close the devices
  daemon    `lsbd mount`: foreground or a background process with a readiness pipe
  mounts    pid files, the mount table, unmount-and-wait
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
