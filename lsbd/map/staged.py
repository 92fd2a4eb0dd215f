"""Staged segments: sealed segments of one-block writes that the map holds
as arrays until it merges them into its extents (lsbd.map.blockmap).

A segment of 8,192 random 4 KiB writes applied to a large map dirties a
leaf page per write, and each commit writes them all: at 18 million
extents that was 8,600 page writes and 63 ms of system CPU a segment
(docs/scale.md, seventeenth round).  Staged, a segment costs one value of
16 bytes a write, appended; merged, many segments' newest writes go into
the extents in block order, each leaf page written once for all of them.

Pure arrays, no LMDB.  A staged value (the `staged` database, key >Q seq)
is a u32 LE count n, then n u64 LE block numbers, then n u64 LE file
offsets, in record order (the last write of a block wins).  In memory the
newest staged write of every block is one `Newest`: the blocks sorted, and
for each `seq << OFF_BITS | file offset`.  A Newest is never changed, only
replaced: a reader that took one reads a consistent view.

A cover (the `covers` database, key >Q seq) is the ranges of blocks that
segment `seq` laid over the extents while older writes were staged: a u32
LE count n, then n u64 LE first blocks, then n u64 LE ends (exclusive),
sorted and disjoint.  A staged write at seq s in a range of a cover at seq
c > s is dead (`Newest.uncovered`); ranges stay ranges (a trim may cover
2^28 blocks).

A segment to stage comes as `OneBlockWrites` (its writes as two arrays),
which is also how the map's process (lsbd.map.offload) receives it.
"""

from __future__ import annotations

import struct
from array import array
from typing import Iterable, Iterator

from lsbd.format.segment import Record
from lsbd.map.encoding import Extent

#: Bits of a file offset in a packed (seq, offset) (segments are at most 4 GiB).
OFF_BITS = 40
OFF_MASK = (1 << OFF_BITS) - 1
_COUNT = struct.Struct("<I")


def _np():
    import numpy as np   # on first use, as lsbd.map.packed does
    return np


def pack(lbas, offsets) -> bytes:
    """A staged value: the segment's writes in record order."""
    np = _np()
    return _COUNT.pack(len(lbas)) + np.asarray(lbas, dtype="<u8").tobytes() \
        + np.asarray(offsets, dtype="<u8").tobytes()


def unpack(value) -> tuple:
    """(block numbers, file offsets) of a staged value, as uint64 arrays."""
    np = _np()
    raw = bytes(value)
    n = _COUNT.unpack_from(raw)[0]
    if len(raw) != _COUNT.size + 16 * n:
        raise ValueError(f"a staged value of {len(raw)} bytes for {n} writes")
    lbas = np.frombuffer(raw, dtype="<u8", count=n, offset=_COUNT.size)
    offsets = np.frombuffer(raw, dtype="<u8", count=n, offset=_COUNT.size + 8 * n)
    return lbas.astype("u8"), offsets.astype("u8")


def cover_ranges(starts, ends) -> tuple:
    """Ranges [start, end) (in any order, overlapping or not) as the sorted,
    disjoint ranges of the blocks they cover (touching ones joined)."""
    np = _np()
    starts = np.asarray(starts, dtype="u8")
    ends = np.asarray(ends, dtype="u8")
    if not len(starts):
        return starts, ends
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], np.maximum.accumulate(ends[order])
    first = np.ones(len(starts), dtype=bool)
    first[1:] = starts[1:] > ends[:-1]
    last = np.ones(len(starts), dtype=bool)
    last[:-1] = first[1:]
    return starts[first], ends[last]


def pack_cover(starts, ends) -> bytes:
    """A cover's value: u32 LE n, then n u64 LE starts, then n u64 LE ends."""
    np = _np()
    return _COUNT.pack(len(starts)) + np.asarray(starts, dtype="<u8").tobytes() \
        + np.asarray(ends, dtype="<u8").tobytes()


def unpack_cover(value) -> tuple:
    """(starts, ends) of a cover's value, as uint64 arrays."""
    try:
        return unpack(value)
    except ValueError:
        raise ValueError(f"a cover of {len(bytes(value))} bytes") from None


class Newest:
    """The newest staged write of each block: `lbas` sorted and unique,
    `vals` seq << OFF_BITS | file offset (uint64 arrays)."""

    __slots__ = ("_lbas", "_vals", "_counts")

    def __init__(self, lbas=None, vals=None) -> None:
        # None: none staged, and no arrays made (nor numpy imported) until
        # they are asked for: every open makes one, and a cold read of
        # large writes needs no numpy at all (its import held up the
        # attach for 0.07-0.1 s, lsbd.numpyload).
        self._lbas = lbas
        self._vals = vals
        self._counts: dict[int, int] | None = None

    @property
    def lbas(self):
        if self._lbas is None:
            self._lbas = _np().zeros(0, dtype="u8")
        return self._lbas

    @property
    def vals(self):
        if self._vals is None:
            self._vals = _np().zeros(0, dtype="u8")
        return self._vals

    def __len__(self) -> int:
        return 0 if self._lbas is None else len(self._lbas)

    @classmethod
    def of(cls, segments: Iterable[tuple[int, object, object]]) -> "Newest":
        """From (seq, block numbers, file offsets) of segments in seq order."""
        segments = list(segments)
        if not segments:
            return cls()
        np = _np()
        parts = [(seq, np.asarray(lbas, dtype="u8"), np.asarray(offs, dtype="u8"))
                 for seq, lbas, offs in segments]
        lbas = np.concatenate([p[1] for p in parts])
        vals = np.concatenate([(np.uint64(seq) << np.uint64(OFF_BITS)) | offs
                               for seq, _l, offs in parts])
        # The last write of each block wins: unique() keeps a value's first
        # place, so it is given the writes newest first.
        lbas, vals = lbas[::-1], vals[::-1]
        keys, first = np.unique(lbas, return_index=True)
        return cls(keys, vals[first])

    def added(self, seq: int, lbas, offsets) -> "Newest":
        """This with one newer segment's writes laid over it."""
        np = _np()
        new = Newest.of([(seq, lbas, offsets)])
        if not len(self):
            return new
        pos = np.searchsorted(self.lbas, new.lbas)
        inside = pos < len(self.lbas)
        same = np.zeros(len(new), dtype=bool)
        same[inside] = self.lbas[pos[inside]] == new.lbas[inside]
        vals = self.vals.copy()
        vals[pos[same]] = new.vals[same]
        fresh = ~same
        return Newest(np.insert(self.lbas, pos[fresh], new.lbas[fresh]),
                      np.insert(vals, pos[fresh], new.vals[fresh]))

    def after(self, seq: int) -> "Newest":
        """Only the blocks whose newest write is in a segment after `seq`
        (those up to it are merged): exact, since a block written after
        `seq` has its newest write after it."""
        np = _np()
        keep = (self.vals >> np.uint64(OFF_BITS)) > np.uint64(seq)
        return Newest(self.lbas[keep], self.vals[keep])

    def uncovered(self, covers: Iterable[tuple[int, object, object]]) -> "Newest":
        """This without the writes that a newer segment's records cover:
        `covers` (seq, starts, ends) in seq order, each its segment's
        ranges [start, end) sorted and disjoint (cover_ranges).  Exact on
        the newest writes alone: a block whose newest staged write is
        covered has its older ones covered too."""
        covers = list(covers)
        if not len(self) or not covers:
            return self
        np = _np()
        lbas = self.lbas
        # The newest cover of each staged block (0: none), by index ranges
        # of the sorted blocks: a cover of 2^28 blocks costs what the staged
        # blocks inside it do.
        cover_at = np.zeros(len(lbas), dtype="u8")
        for seq, starts, ends in covers:
            i = lbas.searchsorted(np.asarray(starts, dtype="u8"))
            n = lbas.searchsorted(np.asarray(ends, dtype="u8")) - i
            some = n > 0
            i, n = i[some], n[some]
            if len(n):
                # The ranges are disjoint: each index once (a newer cover,
                # later in the list, writes over an older one).
                cover_at[np.arange(int(n.sum())) + np.repeat(i - (np.cumsum(n) - n), n)] = seq
        alive = (self.vals >> np.uint64(OFF_BITS)) >= cover_at
        if alive.all():
            return self
        return Newest(lbas[alive], self.vals[alive])

    def find(self, lba: int) -> tuple[int, int] | None:
        """(seq, file offset) of block `lba`'s newest staged write, or None."""
        lbas = self.lbas
        # A key of the array's own type: a Python int would have numpy
        # convert the whole array to float64 first (150 us at 500,000 blocks).
        i = int(lbas.searchsorted(lbas.dtype.type(lba)))
        if i < len(lbas) and int(lbas[i]) == lba:
            v = int(self.vals[i])
            return v >> OFF_BITS, v & OFF_MASK
        return None

    def between(self, first: int, end: int) -> tuple[list[int], list[int]]:
        """The blocks in [first, end) and their packed values, as ints."""
        lbas = self.lbas
        u64 = lbas.dtype.type
        i, j = lbas.searchsorted(u64(first)), lbas.searchsorted(u64(end))
        return lbas[i:j].tolist(), self.vals[i:j].tolist()

    def counts(self) -> dict[int, int]:
        """Blocks whose newest staged write is in each segment."""
        if self._counts is None:
            if not len(self):
                self._counts = {}
                return self._counts
            np = _np()
            # The staged seqs are a short run of numbers: counted in one
            # pass (bincount), not sorted (unique: 10 times the time).
            seqs = (self.vals >> np.uint64(OFF_BITS)).astype(np.int64)
            low = int(seqs.min())
            n = np.bincount(seqs - low)
            where = np.flatnonzero(n)
            self._counts = dict(zip((where + low).tolist(), n[where].tolist()))
        return self._counts


def laid_over(extents: Iterable[Extent], singles: Iterable[tuple[int, int]],
              block_size: int) -> Iterator[Extent]:
    """`extents` (in block order, not overlapping) with the one-block
    writes `singles` ((block, packed value), in block order) laid over
    them: each extent cut around the blocks written over it."""
    it = iter(singles)
    nxt = next(it, None)
    for e in extents:
        start, end = e.lba, e.lba + e.nblocks
        while nxt is not None and nxt[0] < start:
            yield _single(*nxt)
            nxt = next(it, None)
        at = start
        while nxt is not None and nxt[0] < end:
            b = nxt[0]
            if b > at:
                yield Extent(at, b - at, e.seq, e.offset + (at - start) * block_size)
            yield _single(*nxt)
            at = b + 1
            nxt = next(it, None)
        if at < end:
            yield Extent(at, end - at, e.seq, e.offset + (at - start) * block_size) \
                if at > start else e
    while nxt is not None:
        yield _single(*nxt)
        nxt = next(it, None)


def pairs(newest: "Newest", chunk: int = 1 << 15) -> Iterator[tuple[int, int]]:
    """(block, packed value) of every staged block, in block order, made
    into ints a chunk at a time (all at once, a million blocks would be
    60 MiB of ints)."""
    for i in range(0, len(newest), chunk):
        yield from zip(newest.lbas[i:i + chunk].tolist(), newest.vals[i:i + chunk].tolist())


def _single(lba: int, val: int) -> Extent:
    return Extent(lba, 1, val >> OFF_BITS, val & OFF_MASK)


class OneBlockWrites:
    """A segment's records when every one is a one-block DATA record (random
    4 KiB writes), as two arrays in record order: what the map's process
    needs of them.  Sent to it instead of the records: pickling 8,192
    Records cost the serving process about 9 ms of CPU holding its GIL
    (1 ms this way), and unpickling them 5 ms in the map's process."""

    __slots__ = ("lbas", "offsets")

    def __init__(self, lbas: array, offsets: array):
        self.lbas = lbas
        self.offsets = offsets

    @classmethod
    def of(cls, records: list[Record]) -> "OneBlockWrites":
        return cls(array("Q", [r.lba for r in records]),
                   array("Q", [r.data_offset for r in records]))

    def __len__(self) -> int:
        return len(self.lbas)

    def __getstate__(self):
        return self.lbas, self.offsets

    def __setstate__(self, state) -> None:
        self.lbas, self.offsets = state
