"""What a delta checkpoint holds, and when one may be written.

The map changes only through segment records, so the map at seq S differs
from the map at the previous checkpoint P only over the blocks that the
records of segments P+1..S touched, and over those blocks it is what the
last record to touch each block says.  A delta is exactly that, holes
included: laid over the map at P it gives the map at S (DESIGN: checkpoints
are incremental).  It is built from the segments' indexes, one segment at
a time, in a scratch map on the cache disk, so memory is bounded by one
index."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, Iterable, Iterator

from lsbd.format.segment import Record, read_sealed_index
from lsbd.map.blockmap import BlockMap, Extent
from lsbd.segments import checkpoints as ckpt
from lsbd.segments.remote import fetch_index_by_key
from lsbd.errors import CorruptionError, ObjectNotFound
from lsbd.store import Store

log = logging.getLogger(__name__)


@contextlib.contextmanager
def delta_entries(folder: str, block_size: int, records_of: Callable[[int], list[Record]],
                  first: int, last: int) -> Iterator[Iterator[Extent]]:
    """The entries of a delta over segments first..last: their records laid
    one after the other over an empty scratch map in `folder` (holes as
    extents of seq 0), then read back in block order.  Built from the
    segments alone, so no snapshot of the live map is held meanwhile (a
    long one keeps LMDB from reusing the pages the writer frees, and the map
    file grows)."""
    scratch = os.path.join(folder, "delta-scratch")   # one at a time: under the checkpoint lock
    BlockMap.destroy(scratch)                          # what a crash left, if anything
    bm = BlockMap(scratch, block_size, scratch=True)
    try:
        for seq in range(first, last + 1):
            bm.overlay(seq, records_of(seq))
        yield (e if e.seq else Extent(e.lba, e.nblocks, 0, 0) for e in bm.iter_extents())
    finally:
        bm.close()
        BlockMap.destroy(scratch)


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


def previous_chain(store: Store, volume: str, volume_id: str, prev: int,
                   target: int) -> list[ckpt.Manifest] | None:
    """The chain (base first) of the checkpoint at `prev` that the next
    checkpoint at `target` goes on from, if all of it is there; None if
    there is none to go on from (the next one is a base of the map)."""
    if prev <= 0 or prev >= target:
        return None
    try:
        manifest = ckpt.read_manifest(store, volume, prev)
        if manifest.volume_id != volume_id:
            return None
        return ckpt.read_chain(store, volume, manifest)
    except (CorruptionError, ObjectNotFound) as e:
        log.info("volume %s: writing a base checkpoint (%s)", volume, e)
        return None


def chain_extents(store: Store, chain: list[ckpt.Manifest], block_size: int) -> Iterator[tuple]:
    """The map at the last checkpoint of `chain`: its base with its deltas
    laid over it, in one pass as they stream, one part of each in memory.
    Holes (seq 0) are left in: drop them at the end."""
    return lay_over([ckpt.read_extents(store, m) for m in chain], block_size)


def lay_over(layers: list[Iterable[tuple]], block_size: int) -> Iterator[tuple]:
    """layers[0] with each later layer laid over it in turn (see overlay).
    Laying layers over each other is associative (the later wins on each
    block, holes included), so all but the first are merged pairwise first:
    the first, a base and by far the largest, then goes through one merge
    instead of one per delta, and a delta's entry through three at most."""
    upper = list(layers[1:])
    while len(upper) > 1:
        upper = [overlay(upper[i], upper[i + 1], block_size) if i + 1 < len(upper)
                 else upper[i] for i in range(0, len(upper), 2)]
    return iter(overlay(layers[0], upper[0], block_size) if upper else layers[0])


def overlay(under: Iterable[tuple], over: Iterable[tuple], block_size: int) -> Iterator[tuple]:
    """Lay `over` on `under`: both (lba, nblocks, seq, offset) sorted by lba
    and not overlapping; the result is too, with every entry of `over` and
    the parts of `under` it does not cover.  Holes (seq 0) pass through as
    entries, so overlays chain (a base, then each delta); drop them at the
    end.  Pure and streaming: how a chain is opened in one pass."""
    under_it, over_it = iter(under), iter(over)
    u = next(under_it, None)
    o = next(over_it, None)
    while u is not None or o is not None:
        if o is None or (u is not None and u[0] < o[0]):
            assert u is not None  # the loop runs while one of them is left
            ul, un, us, uoff = u
            limit = ul + un if o is None else o[0]
            if ul + un <= limit:
                yield u
                u = next(under_it, None)
            else:          # the part before `o`; `o` cuts the rest below
                yield (ul, limit - ul, us, uoff)
                u = (limit, ul + un - limit, us, uoff + (limit - ul) * block_size)
        else:
            end = o[0] + o[1]
            yield o
            while u is not None and u[0] < end:
                ul, un, us, uoff = u
                if ul + un <= end:
                    u = next(under_it, None)
                else:
                    u = (end, ul + un - end, us, uoff + (end - ul) * block_size)
            o = next(over_it, None)
