"""The block map's LMDB file (the only module that imports lmdb): opening
it, converting a map of format 1 in place, and write transactions, whose
commit on a full disk is an OSError ENOSPC.  What the databases hold is
lsbd.map.blockmap's (docs/format.md "Cache dir")."""

from __future__ import annotations

import contextlib
import errno
from typing import Iterator

import lmdb

from lsbd import fileio, private
from lsbd.map.encoding import MAP_FORMAT
from lsbd.map.encoding import SEQ_KEY as _KEY
from lsbd.map.encoding import WIDE as _EXTENT
from lsbd.map.encoding import key_of as _k
from lsbd.map.encoding import value_of as _v

_MIGRATE_BATCH = 1 << 16


def open_env(path: str, scratch: bool):
    """The map's LMDB environment in folder `path` (made by the caller)."""
    # A large virtual map size costs nothing until used (sparse file).
    # metasync=False: a crash may undo the last commit (replay redoes it from
    # the journal files); data pages are still synced, so the map is never torn.
    # scratch: never synced.
    return lmdb.open(path, map_size=1 << 40, max_dbs=8, sync=not scratch,
                     metasync=False, readahead=False, max_readers=512,
                     mode=private.FILE_MODE)


def open_dbs(env, names: list[bytes], meta: bytes) -> list:
    """The named databases, created in one transaction if new (one commit,
    one sync: a new map's first open used to commit once per database); a
    new map is marked with this format in `meta` in the same commit."""
    with env.begin(write=True) as txn:
        dbs = [env.open_db(name, txn=txn) for name in names]
        meta_db = dbs[names.index(meta)]
        if txn.get(b"map_format", db=meta_db) is None and txn.get(b"extents") is None:
            txn.put(b"map_format", str(MAP_FORMAT).encode(), db=meta_db)
    return dbs


@contextlib.contextmanager
def writing(env, path: str, db=None) -> Iterator:
    """A write transaction, committed when the block ends."""
    try:
        with env.begin(write=True, db=db) as txn:
            yield txn
        fileio.map_committed(path, env)
    except lmdb.DiskError as e:
        # The commit found no room to grow the map file: nothing was
        # written (LMDB aborted it), and a caller may try again once
        # there is room.
        raise OSError(errno.ENOSPC, f"the map {path}: no space left on its disk") from e


def migrate(env, meta_db, extents_db) -> None:
    """Convert a map of format 1 (its `extents` database) into this
    format, in batches of bounded memory.  A crash half way leaves the
    format mark unset: the next open starts the copy again."""
    with env.begin(db=meta_db) as txn:
        fmt = txn.get(b"map_format")
    if fmt is not None and int(bytes(fmt)) == MAP_FORMAT:
        return
    with env.begin() as txn:
        had_old = txn.get(b"extents") is not None
    if had_old:
        old = env.open_db(b"extents")
        with env.begin(write=True) as txn:
            txn.drop(extents_db, delete=False)
        start = b""
        while True:
            with env.begin(write=True) as txn:
                cur = txn.cursor(db=old)
                new = txn.cursor(db=extents_db)
                found = cur.set_range(start) if start else cur.first()
                count = 0
                while found and count < _MIGRATE_BATCH:
                    lba = _KEY.unpack(cur.key())[0]
                    new.put(_k(lba), _v(*_EXTENT.unpack(cur.value())), append=True)
                    count += 1
                    found = cur.next()
                start = cur.key() if found else b""
            if not found:
                break
        with env.begin(write=True) as txn:
            txn.drop(old, delete=True)
    with env.begin(write=True, db=meta_db) as txn:
        txn.put(b"map_format", str(MAP_FORMAT).encode())
