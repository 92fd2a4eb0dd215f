"""What a delta checkpoint holds, and when one may be written.

The map changes only through segment records, so the map at seq S differs
from the map at the previous checkpoint P only over the blocks that the
records of segments P+1..S touched, and over those blocks it is what the
last record to touch each block says.  A delta is exactly that, holes
included: laid over the map at P it gives the map at S (checkpoints are
incremental: docs/format.md).  It is built from the segments' indexes, one segment at
a time, in a scratch map on the cache disk, so memory is bounded by one
index."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from bisect import bisect_left
from typing import Callable, Iterable, Iterator

from lsbd import linux
from lsbd.format.segment import (DATA, RESIZE, Record, decode_footer, decode_one_block_footer,
                                 read_sealed_footer_from)
from lsbd.segments.local import SegmentFiles
from lsbd.segments.locallength import local_segment_size
from lsbd.map.blockmap import BlockMap, Extent
from lsbd.map.packed import (Part, Run, lay_single, newest_pieces, newest_singles, pack_runs,
                              single_blocks)
from lsbd.segments import checkpoints as ckpt
from lsbd.segments.remote import fetch_footer_by_key, fetch_index_by_key
from lsbd.errors import CorruptionError, ObjectNotFound
from lsbd.store import Store

log = logging.getLogger(__name__)


@contextlib.contextmanager
def delta_entries(folder: str, block_size: int, records_of: Callable[[int], list[Record]],
                  first: int, last: int, *,
                  arrays_of: Callable[[int], tuple | None] | None = None
                  ) -> Iterator[Iterator[Extent | Run]]:
    """The entries of a delta over segments first..last: their records laid
    one after the other over an empty map (holes as extents of seq 0), in
    block order.  Built from the segments alone, so no snapshot of the live
    map is held meanwhile (a long one keeps LMDB from reusing the pages the
    writer frees, and the map file grows).  Up to ARRAY_DELTA_BLOCKS the
    entries come from arrays, as packed runs (array_delta): arrays_of(seq)
    gives a segment's (lbas, written, data offsets, lengths) or None (see
    segment_arrays; by default made from records_of).  Past that (a long
    trim, or very large segments), from a scratch map in `folder`."""
    arrays = array_delta(arrays_of or (lambda seq: record_arrays(records_of(seq))),
                         first, last, block_size)
    if arrays is not None:
        yield iter(arrays)
        return
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


#: A delta is built on arrays up to this many blocks in its records (80
#: segments of 8,192 one-block writes; a checkpoint comes every 64): about
#: 75 bytes each at the peak of the build, so at most about 50 MiB, 28 of
#: them held until it is written.
ARRAY_DELTA_BLOCKS = 80 * 8192


def array_delta(arrays_of: Callable[[int], tuple | None], first: int, last: int,
                block_size: int) -> list[Run] | None:
    """The entries of the delta over segments first..last, as packed runs,
    built on arrays; None if a segment's records are not to be had that way
    or they hold more than ARRAY_DELTA_BLOCKS blocks, for the scratch map to
    do.  The scratch map cost about 6 us of the serving process's CPU per
    record, most of it Python holding the GIL the request threads wait for:
    3 to 6 s per delta of 64 segments of random 4 KiB writes, and as much
    for one that holds segments of relocated reads (docs/scale.md).  When
    every record is one block long (random 4 KiB writes) each block is an
    entry (newest_singles); else each record's stretches that no later
    record covers are (newest_pieces), as the scratch map gives them."""
    import numpy as np   # on first use, as lsbd.map.packed does

    lbas, seqs, offsets, lengths = [], [], [], []
    total = 0
    for seq in range(first, last + 1):
        got = arrays_of(seq)
        if got is None:
            return None
        seg_lbas, written, seg_offsets, seg_lengths = got
        total += int(seg_lengths.sum(dtype=np.uint64))
        if total > ARRAY_DELTA_BLOCKS:
            return None
        lbas.append(seg_lbas)
        seqs.append(np.where(written, np.uint64(seq), np.uint64(0)))
        offsets.append(seg_offsets)
        lengths.append(seg_lengths)
    if not total:
        return []
    # One array of each column, the segments' own let go before the sort.
    lba_column, seq_column, offset_column, length_column = (
        np.concatenate(c) for c in (lbas, seqs, offsets, lengths))
    del lbas, seqs, offsets, lengths
    if total == len(length_column):
        return newest_singles(lba_column, seq_column, offset_column)
    return newest_pieces(lba_column, length_column, seq_column, offset_column, block_size)


def record_arrays(records: list[Record]) -> tuple | None:
    """A segment's records as (lbas, written, data offsets, lengths), numpy
    arrays in record order (written: a DATA record, else a hole), resizes
    and empty records left out; None if they hold more than
    ARRAY_DELTA_BLOCKS blocks (a long trim)."""
    import numpy as np

    records = [r for r in records if r.nblocks and r.kind != RESIZE]
    if sum(r.nblocks for r in records) > ARRAY_DELTA_BLOCKS:
        return None
    n = len(records)
    return (np.fromiter((r.lba for r in records), np.uint64, n),
            np.fromiter((r.kind == DATA for r in records), bool, n),
            np.fromiter((r.data_offset for r in records), np.uint64, n),
            np.fromiter((r.nblocks for r in records), np.uint64, n))


def _one_block_arrays(lbas, offsets) -> tuple:
    """segment_arrays of a segment of one-block DATA records."""
    import numpy as np

    return lbas, np.ones(len(lbas), bool), offsets, np.ones(len(lbas), np.uint64)


def segment_arrays(store: Store, segment_key: Callable[[int], str], files: SegmentFiles,
                   seq: int) -> tuple | None:
    """record_arrays of a sealed segment, read from its local copy's index
    with no Python object per record when all its records are one-block
    writes; else from its records (decode_footer: a segment of relocated
    reads holds a few hundred)."""
    try:
        r = files.open_reader(seq)
        try:
            trailer, footer = read_sealed_footer_from(r.pread, local_segment_size(r),
                                                      where=files.key_of(seq))
        finally:
            os.close(r.fd)
        got = decode_one_block_footer(footer, trailer, where=files.key_of(seq))
        if got is not None:
            return _one_block_arrays(*got)
        return record_arrays(decode_footer(footer, trailer, where=files.key_of(seq)))
    except (OSError, CorruptionError):
        # Evicted meanwhile (the default cache of 1 GiB holds about 32 of
        # the 64 segments between two checkpoints), or not sealed whole: the
        # store's copy, read the same way.
        return store_segment_arrays(store, segment_key(seq), seq)


def store_segment_arrays(store: Store, key: str, seq: int) -> tuple | None:
    """segment_arrays of the store's copy of a segment: its index read with
    numpy when all its records are one-block writes (decoded record by
    record in Python, the same index cost the serving process about 10 ms
    of CPU per segment, half of a delta's build in a 40 GiB run)."""
    trailer, footer = fetch_footer_by_key(store, key, seq)
    got = decode_one_block_footer(footer, trailer, where=key)
    if got is None:
        return record_arrays(decode_footer(footer, trailer, where=key))
    return _one_block_arrays(*got)


def segment_records(store: Store, segment_key: Callable[[int], str], files: SegmentFiles,
                    seq: int) -> list[Record]:
    """A sealed segment's records: from its local copy when there is one,
    else from the store's copy."""
    try:
        return files.sealed_records(seq)
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


#: Packed runs from this many entries on are prepared for loading ahead.
PREPARED_RUN = 1024
#: Parts of the base fetched and checked ahead, in threads, while the one
#: before is merged and loaded.
BASE_AHEAD = 1


def chain_extents(store: Store, chain: list[ckpt.Manifest], block_size: int, *,
                  then: Iterable[tuple | Run] | None = None) -> Iterator[tuple | Run]:
    """The map at the last checkpoint of `chain`: its base with its deltas
    laid over it, in one pass as they stream.  then: the entries of one
    more delta, laid over last.

    Memory: each checkpoint of the chain is read by pieces of a part
    (read_runs, PIECE_EXTENTS entries): a compressed part and one piece of
    each held, the base's next part fetched ahead, and the arrays of one
    piece's range, whatever the size of the map (the chain is at most
    MAX_CHAIN + 1 long).  The volume is taken in the ranges of the base's
    pieces.  In a range
    where every entry of the base and the deltas is one block long (random
    4 KiB writes) the deltas are laid over in C (lsbd.map.packed.lay_single)
    and the range comes out as one packed run; elsewhere the general
    overlay does it, with the base's stretches no delta touches as packed
    runs and the rest as (lba, nblocks, seq, offset).  Holes (seq 0) may be
    left in: drop them at the end (keep_mapped)."""
    try:
        piece = ckpt.PIECE_EXTENTS
        layers = [_Layer(ckpt.read_runs(store, m, piece=piece)) for m in chain[1:]]
        if then is not None:
            layers.append(_Layer(pack_runs(then, per=piece)))
        lo = 0
        held = None
        for run in ckpt.read_runs(store, chain[0], ahead=BASE_AHEAD, piece=piece):
            hi = _run_end(run.part, run.stop)
            taken = [layer.take(hi) for layer in layers]
            cut = any(layer.carried for layer in layers)
            held = yield from _joined(_lay_range(run.part, taken, lo, hi, block_size), held,
                                      hi if cut else None, block_size)
            lo = hi
        yield from _joined(_lay_range(None, [layer.take(None) for layer in layers], lo, None,
                                      block_size), held, None, block_size)
    finally:
        # The pieces of each layer and the arrays of each range came and
        # went: a serving process would keep what they took.
        linux.malloc_trim()


def _joined(items: Iterator[tuple | Run], held: tuple | None, cut_at: int | None,
            block_size: int):
    """A range's items, the first one joined to `held` (the previous
    range's last) when it goes on with it, and the last one held back and
    returned when it ends at `cut_at`: a delta's entry that reaches over a
    range's end is cut there, and comes out whole as the chain has it."""
    last: tuple | Run | None = held
    for item in items:
        if last is not None:
            if isinstance(last, tuple) and isinstance(item, tuple) and \
                    item[0] == last[0] + last[1] and item[2] == last[2] and \
                    (not item[2] or item[3] == last[3] + last[1] * block_size):
                item = (last[0], last[1] + item[1], last[2], last[3])
            else:
                yield last
        last = item
    if isinstance(last, tuple) and cut_at is not None and last[0] + last[1] == cut_at:
        return last
    if last is not None:
        yield last
    return None


class _Layer:
    """One delta's entries, handed out range by range in block order."""

    def __init__(self, runs: Iterator[Run]):
        self._runs = runs
        self._cur: Run | None = next(runs, None)
        self.carried = False   # the last take handed out an entry that reaches past it

    def take(self, hi: int | None) -> list[Run]:
        """The entries that start below `hi` (all with None).  One that
        reaches past `hi` is handed out again with the next range: each
        range clips what it gets."""
        out: list[Run] = []
        self.carried = False
        while self._cur is not None:
            run = self._cur
            part = run.part
            j = run.stop if hi is None else bisect_left(part.lbas, hi, run.start, run.stop)
            if j > run.start:
                out.append(Run(part, run.start, j))
                lba, n, _seq, _off = part.entry(j - 1)
                if hi is not None and lba + n > hi:
                    self._cur = Run(part, j - 1, run.stop)
                    self.carried = True
                    return out
            if j < run.stop:
                self._cur = Run(part, j, run.stop)
                return out
            self._cur = next(self._runs, None)
        return out


def _lay_range(part: Part | None, runs: list[list[Run]], lo: int, hi: int | None,
               block_size: int) -> Iterator[tuple | Run]:
    """The base's entries in [lo, hi) (those of `part`) with each delta's
    entries there laid over them."""
    if not any(runs):
        if part is not None:
            yield Run(part)
        return
    bodies = [[bytes(r.body()) for r in layer] for layer in runs]
    if (part is None or single_blocks(part.body)) and \
            all(single_blocks(b) for layer in bodies for b in layer):
        merged = lay_single(part, bodies)
        if merged.count:
            yield Run(merged)
        return
    over = merge_layers([_clipped(layer, lo, hi, block_size) for layer in runs], block_size)
    yield from overlay_runs([Run(part)] if part is not None else [], over, block_size)


def _clipped(runs: list[Run], lo: int, hi: int | None, block_size: int) -> Iterator[tuple]:
    """The entries of `runs`, cut to [lo, hi)."""
    for run in runs:
        for lba, n, seq, off in run.entries():
            start, end = max(lba, lo), lba + n if hi is None else min(lba + n, hi)
            if start < end:
                yield (start, end - start, seq, off + (start - lba) * block_size if seq else 0)


def produced_ahead(items: Iterable, depth: int = 2, batch: int = 4096) -> Iterator:
    """The items of `items`, made in a thread of their own, at most `depth`
    batches ahead of the caller, packed runs with what loading them needs
    worked out (Part.prepare): opening merges a chain (numpy and zlib let
    go of the GIL) while the map is loaded (LMDB), on two cores.  An error
    in the thread is raised here; closing this early stops the thread."""
    out: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(value) -> bool:
        while not stop.is_set():
            try:
                out.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        end: BaseException | None = RuntimeError("merging the chain stopped")
        try:
            chunk: list = []
            for item in items:
                chunk.append(item)
                if isinstance(item, Run) and len(item) >= PREPARED_RUN:
                    item.part.prepare(live=len(item) == item.part.count)
                if len(chunk) >= batch or isinstance(item, Run):
                    if not put(chunk):
                        return
                    chunk = []
            if put(chunk):
                end = None
        except Exception as e:  # noqa: BLE001 - handed to the caller, raised there
            end = e
        finally:
            put(end)

    worker = threading.Thread(target=run, name="chain-merge", daemon=True)
    worker.start()
    try:
        while True:
            got = out.get()
            if got is None:
                return
            if isinstance(got, BaseException):
                raise got
            yield from got
    finally:
        stop.set()
        worker.join()


def keep_mapped(entries: Iterable[tuple | Run]) -> Iterator[tuple | Run]:
    """The entries of chain_extents less its holes."""
    return (e for e in entries if isinstance(e, Run) or e[2])


def merge_layers(layers: list[Iterable[tuple]], block_size: int) -> Iterator[tuple]:
    """The layers laid over each other in order (see overlay), merged
    pairwise: laying layers over each other is associative (the later wins
    on each block, holes included), so an entry goes through log2 of the
    layers' merges, not one per layer."""
    while len(layers) > 1:
        layers = [overlay(layers[i], layers[i + 1], block_size) if i + 1 < len(layers)
                  else layers[i] for i in range(0, len(layers), 2)]
    return iter(layers[0] if layers else ())


def lay_over(layers: list[Iterable[tuple]], block_size: int) -> Iterator[tuple]:
    """layers[0] with each later layer laid over it in turn, the later ones
    merged with each other first (merge_layers)."""
    return overlay(layers[0], merge_layers(layers[1:], block_size), block_size)


def overlay_runs(under: Iterable[Run], over: Iterable[tuple], block_size: int
                 ) -> Iterator[tuple | Run]:
    """overlay() with `under` in packed runs: the stretches of them that no
    entry of `over` touches come out as runs, whole; the entries `over`
    cuts, and `over`'s own, as tuples.  Work per entry of `over`: a binary
    search and a few tuples, whatever the size of `under`."""
    over_it = iter(over)
    o = next(over_it, None)
    cut = -1   # the end of the last entry of `over` yielded: under's blocks below it are gone
    bs = block_size

    def one(u: tuple) -> list[tuple]:
        """What becomes of one entry of `under` and the entries of `over`
        up to its end."""
        nonlocal o, cut
        out: list[tuple] = []
        ul, un, us, uoff = u
        if ul < cut:
            if ul + un <= cut:
                return out
            ul, un, uoff = cut, ul + un - cut, uoff + (cut - ul) * bs
        while True:
            if o is None or o[0] >= ul + un:
                out.append((ul, un, us, uoff))
                return out
            if o[0] > ul:
                out.append((ul, o[0] - ul, us, uoff))
            out.append(o)
            cut = o[0] + o[1]
            o = next(over_it, None)
            if cut >= ul + un:
                return out
            if cut > ul:
                ul, un, uoff = cut, ul + un - cut, uoff + (cut - ul) * bs

    for run in under:
        part, lbas = run.part, run.part.lbas
        i, n = run.start, run.stop
        while i < n:
            if lbas[i] < cut:
                # Entries i.. start under the last `over` entry: all gone but
                # the last of them, which may reach past it.
                j = bisect_left(lbas, cut, i, n)
                tail = part.entry(j - 1)
                i = j
                yield from one(tail)
                continue
            if o is None or o[0] >= _run_end(part, n):
                yield Run(part, i, n)
                break
            # The entries that end before `o` starts go whole.
            j = bisect_left(lbas, o[0], i, n)
            if j > i:
                last = part.entry(j - 1)
                k = j if last[0] + last[1] <= o[0] else j - 1
                if k > i:
                    yield Run(part, i, k)
                    i = k
            if i < n:
                u = part.entry(i)
                i += 1
                yield from one(u)
    while o is not None:
        yield o
        o = next(over_it, None)


def _run_end(part: Part, stop: int) -> int:
    lba, n, _seq, _off = part.entry(stop - 1)
    return lba + n


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
