"""A volume's history: snapshots, points in time, and the plans to restore,
clone or diff them.

A *point* is a seq: the state after segment `seq` was applied.  A snapshot
is a name bound to a seq (a small object, no data); `--at TIME` is the last
seq sealed at or before TIME.  The planning functions here are pure; the
doing (building a map at a point, copying data) is in the engine and CLI."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator


from lsbd import names
from lsbd.engine.volume import Volume
from lsbd.engine.walk import allocation_chunks
from lsbd.history.compactor import ensure_checkpoint_at
from lsbd.meta.clones import write_clone_ref
from lsbd.plans.restore import changed_ranges
from lsbd.meta.config import VolumeConfig
from lsbd.store import Store

COPY_CHUNK = 4 * 1024 * 1024


def create_clone(store: Store, source: VolumeConfig, name: str, seq: int, *, size: int,
                 cache_root: str) -> VolumeConfig:
    """A new writable volume whose first state is `source` at `seq`.  No data
    is copied: a checkpoint at `seq` pins the segments it uses, and a
    reference object tells the source's compaction that a clone needs them."""
    from lsbd.meta.config import create_volume

    names.check_volume_name(name)
    if store.exists(names.config_key(name)):
        from lsbd.errors import VolumeExists

        raise VolumeExists(f"volume {name!r} already exists in {store.url}")
    ensure_checkpoint_at(store, source.name, seq, cache_root=cache_root)
    write_clone_ref(store, source.name, name, seq)
    parent = {"volume": source.name, "volume_id": source.volume_id, "seq": seq}
    copy_sealing(store, source, name)
    return create_volume(store, name, size, block_size=source.block_size,
                         flush_mode=source.flush_mode, segment_size=source.segment_size,
                         seal_interval=source.seal_interval,
                         retain_seconds=source.retain_seconds, parent=parent,
                         compression=source.compression, encryption=source.encryption)


def copy_sealing(store: Store, source: VolumeConfig, name: str) -> None:
    """An encrypted volume's clone or copy gets a copy of its keys: the same
    passphrases open it, and it reads the source's segments."""
    if source.encryption:
        from lsbd.crypto import keystore

        keystore.copy(getattr(store, "inner", store), source.name, name)


def restore_volume(store: Store, source: VolumeConfig, seq: int, name: str, *, cache_root: str,
                   progress: Callable[[int, int], None] | None = None,
                   remove: Callable[[str], object] | None = None) -> int:
    """Create volume `name` holding `source`'s state at `seq`, as an independent
    copy (no shared segments).  Never overwrites: an existing `name` is refused
    before anything is written.  Returns the bytes of data copied.  remove:
    called with `name` when the copy fails or is interrupted after `name`
    was created (and closed), so that no half restore is left to be taken
    for a whole one."""
    from lsbd.meta.config import create_volume

    names.check_volume_name(name)
    if store.exists(names.config_key(name)):
        from lsbd.errors import VolumeExists

        raise VolumeExists(f"volume {name!r} already exists: restore never overwrites; "
                           "choose another name")
    copied = 0
    created = False
    try:
        with Volume.open(store, source.name, cache_root=cache_root, at_seq=seq) as src:
            copy_sealing(store, source, name)
            create_volume(store, name, src.size, block_size=src.block_size,
                          flush_mode=source.flush_mode, segment_size=source.segment_size,
                          retain_seconds=source.retain_seconds, compression=source.compression,
                          encryption=source.encryption)
            created = True
            with Volume.open(store, name, cache_root=cache_root) as dst:
                for offset, length, runs in allocation_chunks(src, COPY_CHUNK):
                    for run in runs:
                        if run.allocated:
                            dst.write(run.offset, src.read(run.offset, run.length))
                            copied += run.length
                    if progress:
                        progress(offset + length, src.size)
                dst.flush_to_store()
    except BaseException:
        if created and remove is not None:
            remove(name)
        raise
    return copied


@contextlib.contextmanager
def changed_between(store: Store, volume: str, old_seq: int, new_seq: int, *, cache_root: str
                    ) -> Iterator[tuple[Iterator[tuple[int, int]], int, int]]:
    """Block ranges that differ between two points of a volume, with the block
    size and the size at the newer point.  A context manager: the ranges are
    read lazily from the two maps while it is open (memory does not grow
    with the maps)."""

    with Volume.open(store, volume, cache_root=cache_root, at_seq=old_seq) as old, \
            Volume.open(store, volume, cache_root=cache_root, at_seq=new_seq) as new:
        yield (changed_ranges(old.extents(), new.extents(), block_size=new.block_size),
               new.block_size, new.size)
