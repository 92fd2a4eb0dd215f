"""What a delta checkpoint holds, and when one may be written.

The map changes only through segment records, so the map at seq S differs
from the map at the previous checkpoint P only over the blocks that the
records of segments P+1..S touched.  A delta is the map at S over exactly
those ranges, holes included: laid over the map at P it gives the map at S
(DESIGN: checkpoints are incremental).  It is built from the segments'
indexes, one segment at a time, so memory is bounded by one index."""

from __future__ import annotations

import logging
import os
from typing import Callable, Iterator

from lsbd.format.segment import RESIZE, Record, read_sealed_index
from lsbd.map.blockmap import Extent, MapSnapshot
from lsbd.segments import checkpoints as ckpt
from lsbd.segments.remote import fetch_index_by_key
from lsbd.errors import CorruptionError, ObjectNotFound
from lsbd.store import Store

log = logging.getLogger(__name__)


def delta_entries(snap: MapSnapshot, records_of: Callable[[int], list[Record]], first: int,
                  last: int) -> Iterator[Extent]:
    """The map in `snap` (at seq `last`) over every range the records of
    segments first..last touched, in the order of the records; holes are
    entries of seq 0."""
    for seq in range(first, last + 1):
        for r in records_of(seq):
            if r.kind != RESIZE and r.nblocks:
                yield from snap.tile(r.lba, r.nblocks)


def segment_records(store: Store, segment_key: Callable[[int], str], local_path: str,
                    seq: int) -> list[Record]:
    """A sealed segment's records: from its local copy when there is one,
    else from the store's copy."""
    if os.path.exists(local_path):
        try:
            return read_sealed_index(local_path, where=local_path)[1]
        except (OSError, CorruptionError):
            pass   # evicted meanwhile, or not sealed whole: the store has it
    return fetch_index_by_key(store, segment_key(seq), seq)[1]


def delta_base(store: Store, volume: str, volume_id: str, prev: int,
               target: int) -> ckpt.Manifest | None:
    """The checkpoint a delta at `target` may lie over: the one at `prev`, if
    its whole chain is there and short enough (ckpt.choose_kind); None for
    a base."""
    if prev <= 0 or prev >= target:
        return None
    try:
        manifest = ckpt.read_manifest(store, volume, prev)
        if manifest.volume_id != volume_id:
            return None
        chain = ckpt.read_chain(store, volume, manifest)
    except (CorruptionError, ObjectNotFound) as e:
        log.info("volume %s: writing a base checkpoint (%s)", volume, e)
        return None
    return manifest if ckpt.choose_kind(manifest, chain[0]) else None
