"""The durable points of the cache dir, in one place: every fsync or
fdatasync of a journal or segment file, every fsync of a directory that
makes a new file's name durable, and every commit of the block map.

Durability rests on these calls alone: whatever was written but not synced
through here may be gone after a power cut (names too: a new file's name
is durable only once its directory is synced).  The tests replace the
functions of this module with a double that keeps only what was synced and
drops the rest at a simulated power cut (tests/powercut.py), so each call
here must be made through the module (`fileio.fdatasync(fd)`), never
imported by name.

The map is LMDB, opened with sync=True and metasync=False: a commit's
data pages are synced before the commit returns, its meta page only at the
next commit.  So a power cut may undo the last commit, never more, and
never leaves the map torn (LMDB's copy-on-write keeps the previous tree
intact).  Where the last commit must not be undone (the cache dir's
identity after a rebuild: without it the next open distrusts the cache dir,
journals included), the map is synced whole.  map_committed() tells the
double which state a cut may go back to."""

from __future__ import annotations

import os

from lsbd import linux


def fdatasync(fd: int) -> None:
    """Make a file's data (and its size) durable."""
    os.fdatasync(fd)


def fsync(fd: int) -> None:
    """Make a file's data and metadata durable."""
    os.fsync(fd)


def fsync_dir(path: str) -> None:
    """Make the names in a directory durable (a new file's, a removed one's)."""
    linux.sync_directory(path)


def map_committed(path: str, env, synced: bool = False) -> None:
    """The block map in folder `path` (an LMDB environment) committed a
    write transaction (synced: and then synced itself whole, env.sync).
    Nothing to do here: LMDB syncs by its own flags."""
