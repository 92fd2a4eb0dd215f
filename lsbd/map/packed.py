"""Extents packed 28 bytes each, as checkpoints store them (<QIQQ: lba,
nblocks, seq, offset, little-endian), moved through merging and loading
without a Python object per extent.

Opening a volume of millions of extents from its checkpoint cost about
1.5 us per extent in Python (unpack, merge, encode the map's key and
value); a run of a base's entries that no delta touches needs none of it:
its map keys and values come from byte slicing, its live counts from a
Counter over one column, and LMDB takes them in one call.  Pure: no LMDB
(lsbd.map.blockmap loads them)."""

from __future__ import annotations

import struct
import sys
from array import array
from collections import Counter
from typing import Iterable, Iterator

from lsbd.map.encoding import KEY_BYTES, SHORT

ENTRY = struct.Struct("<QIQQ")   # lba nblocks seq offset
PAIR = struct.Struct(f"{KEY_BYTES}s{SHORT.size}s")   # a map key and its short value
#: Entries per Part that pack_runs makes (a checkpoint part's worth).
PACK_ENTRIES = 1 << 18
_LITTLE = sys.byteorder == "little"
# Byte columns of an entry that are zero when the map's short value holds it
# (lsbd.map.encoding.value_of) and its key holds the lba.
_HIGH = [6, 7, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27]
# The bytes of an entry that make its map key and short value, in order.
_PAIR_BYTES = [*range(KEY_BYTES - 1, -1, -1), 8, 9, 12, 13, 14, 15, 20, 21, 22, 23]
#: Runs from this many entries on are counted on arrays (numpy).
_ARRAY_RUN = 1024


class Part:
    """The entries of one checkpoint part (the bytes as stored) and the
    columns built from them once, shared by every run of the part."""

    def __init__(self, body: bytes):
        if len(body) % ENTRY.size:
            raise ValueError(f"{len(body)} bytes are not whole entries")
        self.body = body
        self.count = len(body) // ENTRY.size
        self._lbas: array | None = None
        self._pairs: memoryview | None = None
        self._short: bool | None = None
        self._live: Counter | None = None

    @property
    def lbas(self) -> array:
        if self._lbas is None:
            self._lbas = _column(self.body, 0, 8, "Q")
        return self._lbas

    def entry(self, i: int) -> tuple[int, int, int, int]:
        return ENTRY.unpack_from(self.body, i * ENTRY.size)

    def short(self) -> bool:
        """Whether every entry fits the map's short value (the usual case)."""
        if self._short is None:
            e = _entries(self.body)
            self._short = not self.count or bool(
                e["n"].max() < 1 << 16 and e["seq"].max() < 1 << 32 and e["off"].max() < 1 << 32)
        return self._short

    def pairs_bytes(self) -> memoryview:
        """The map's (key, short value) of every entry, 16 bytes each: the
        key the lba's low 6 bytes big-endian, the value <HII."""
        if self._pairs is None:
            np = _np()
            e, n = _entries(self.body), self.count
            out = np.empty((n, PAIR.size), dtype=np.uint8)
            out[:, :KEY_BYTES] = e["lba"].astype(">u8").view(np.uint8).reshape(n, 8)[:, 2:]
            out[:, 6:8] = e["n"].astype("<u2").view(np.uint8).reshape(n, 2)
            out[:, 8:12] = e["seq"].astype("<u4").view(np.uint8).reshape(n, 4)
            out[:, 12:16] = e["off"].astype("<u4").view(np.uint8).reshape(n, 4)
            self._pairs = memoryview(out.tobytes())
        return self._pairs

    def live(self, start: int = 0, stop: int | None = None) -> Counter:
        """Blocks per seq of entries start..stop-1 (all of them kept)."""
        whole = start == 0 and (stop is None or stop == self.count)
        if whole and self._live is not None:
            return self._live
        size = ENTRY.size
        chunk = self.body[start * size:(self.count if stop is None else stop) * size]
        if len(chunk) >= _ARRAY_RUN * size:
            live = _live_of(chunk)
        else:
            live = Counter()
            for _lba, nblocks, seq, _off in ENTRY.iter_unpack(chunk):
                live[seq] += nblocks
        if whole:
            self._live = live
        return live

    def prepare(self, live: bool = True) -> None:
        """Work out what loading needs (done in a thread ahead of the load;
        numpy lets go of the GIL meanwhile); live: the live counts of all
        the entries too."""
        if self.short():
            self.pairs_bytes()
        if live:
            self.live()


class Run:
    """Entries start..stop-1 of a Part."""

    __slots__ = ("part", "start", "stop")

    def __init__(self, part: Part, start: int = 0, stop: int | None = None):
        self.part = part
        self.start = start
        self.stop = part.count if stop is None else stop

    def __len__(self) -> int:
        return self.stop - self.start

    def entries(self) -> Iterator[tuple[int, int, int, int]]:
        return ENTRY.iter_unpack(self.body())

    def body(self) -> memoryview:
        return memoryview(self.part.body)[self.start * ENTRY.size:self.stop * ENTRY.size]

    def map_pairs(self) -> Iterator[tuple[bytes, bytes]] | None:
        """The map's (key, value) of each entry, or None when some entry
        needs the wide value (then go entry by entry)."""
        if not self.part.short():
            return None
        raw = self.part.pairs_bytes()
        return PAIR.iter_unpack(raw[self.start * PAIR.size:self.stop * PAIR.size])

    def live(self) -> Counter:
        """Blocks per seq."""
        return self.part.live(self.start, self.stop)


def _live_of(chunk) -> Counter:
    """Blocks per seq of packed entries, on arrays."""
    np = _np()
    e = _entries(chunk)
    seqs = e["seq"]
    weights = e["n"] if (e["n"] != 1).any() else None
    top = int(seqs.max())
    if top < 4 * len(seqs) + (1 << 16):       # seqs are dense: count by value
        counts = np.bincount(seqs.astype(np.int64), weights=weights)
        have = np.flatnonzero(counts)
        return Counter(dict(zip(have.tolist(), counts[have].astype(np.int64).tolist())))
    values, where = np.unique(seqs, return_inverse=True)
    counts = np.bincount(where, weights=weights)
    return Counter(dict(zip(values.tolist(), counts.astype(np.int64).tolist())))


def _column(body: bytes, at: int, width: int, code: str) -> array:
    """One field of every entry, as an array of ints."""
    n = len(body) // ENTRY.size
    raw = bytearray(width * n)
    for b in range(width):
        raw[b::width] = body[at + b::ENTRY.size]
    col = array(code)
    col.frombytes(bytes(raw))
    if not _LITTLE:
        col.byteswap()
    return col


def pack_runs(entries: Iterable[tuple | Run], per: int = PACK_ENTRIES) -> Iterator[Run]:
    """(lba, nblocks, seq, offset) entries as packed runs of `per` entries;
    runs among them pass as they are."""
    body = bytearray()
    count = 0
    pack = ENTRY.pack
    for e in entries:
        if isinstance(e, Run):
            if count:
                yield Run(Part(bytes(body)))
                body, count = bytearray(), 0
            yield e
            continue
        body += pack(*e)
        count += 1
        if count >= per:
            yield Run(Part(bytes(body)))
            body, count = bytearray(), 0
    if count:
        yield Run(Part(bytes(body)))


def newest_singles(lbas, seqs, offsets, per: int = PACK_ENTRIES) -> list[Run]:
    """One-block entries given in the order they were written (numpy
    arrays of lba, seq, offset; seq 0 a hole): the newest of each block, in
    block order, holes kept, as packed runs of at most `per` entries.  What
    laying one-block records over an empty map one after the other gives
    (a delta of random 4 KiB writes), without a Python object per entry."""
    np = _np()
    order = np.argsort(lbas, kind="stable")        # written order kept within a block
    sorted_lbas = lbas[order]
    if len(order) > 1:
        newest = np.ones(len(order), dtype=bool)    # the last entry of each block
        newest[:-1] = sorted_lbas[1:] != sorted_lbas[:-1]
        order = order[newest]
    del sorted_lbas
    runs = []
    for i in range(0, len(order), per):     # a run at a time: one copy of the result
        at = order[i:i + per]
        out = np.empty(len(at), dtype=_entries(b"").dtype)
        out["lba"] = lbas[at]
        out["n"] = 1
        out["seq"] = seqs[at]
        out["off"] = np.where(out["seq"] != 0, offsets[at], 0)
        runs.append(Run(Part(out.tobytes())))
    return runs


def newest_pieces(lbas, lengths, seqs, offsets, block_size: int,
                  per: int = PACK_ENTRIES) -> list[Run]:
    """Records given in the order they were written (numpy arrays of lba,
    length in blocks, seq, offset of the first block; seq 0 a hole): of each
    record, the stretches that no later record covers, in block order, holes
    kept, as packed runs of at most `per` entries.  What laying them over an
    empty map one after the other gives (a delta that holds relocated
    segments, whose records are longer than one block), with per-block
    arrays instead of a Python object per record: memory is about 40 bytes
    a block at the peak."""
    np = _np()
    lengths = lengths.astype(np.int64)
    total = int(lengths.sum())
    record = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    # Each block's lba: its record's, plus its place in the record.
    starts = np.cumsum(lengths) - lengths
    block_lbas = lbas.astype(np.int64)[record] + (np.arange(total, dtype=np.int64) -
                                                  starts[record])
    del starts
    order = np.argsort(block_lbas, kind="stable")   # written order kept within a block
    block_lbas = block_lbas[order]
    record = record[order]
    del order
    if total > 1:
        newest = np.ones(total, dtype=bool)         # the last record to touch each block
        newest[:-1] = block_lbas[1:] != block_lbas[:-1]
        block_lbas, record = block_lbas[newest], record[newest]
        del newest
    # A stretch starts where the record changes or a block is skipped.
    first = np.ones(len(record), dtype=bool)
    first[1:] = (record[1:] != record[:-1]) | (block_lbas[1:] != block_lbas[:-1] + 1)
    at = np.flatnonzero(first)
    del first
    counts = np.diff(np.append(at, len(record)))
    lba_of, record_of = block_lbas[at], record[at]
    del block_lbas, record
    runs = []
    for i in range(0, len(at), per):
        rec, lba = record_of[i:i + per], lba_of[i:i + per]
        out = np.empty(len(rec), dtype=_entries(b"").dtype)
        out["lba"] = lba
        out["n"] = counts[i:i + per]
        out["seq"] = seqs[rec]
        skipped = (lba - lbas[rec].astype(np.int64)).astype(np.uint64)
        out["off"] = np.where(out["seq"] != 0, offsets[rec] + skipped * np.uint64(block_size), 0)
        runs.append(Run(Part(out.tobytes())))
    return runs


def single_blocks(body) -> bool:
    """Whether every entry of `body` is one block long."""
    size = ENTRY.size
    n = len(body) // size
    return body[8::size].count(1) == n and all(body[b::size].count(0) == n for b in (9, 10, 11))


def _np():
    """numpy, imported on first use (it costs 0.1 s and 9 MiB; only merging
    and loading large checkpoints need it)."""
    import numpy
    return numpy


def _entries(body):
    """Packed entries as a structured array (a view, no copy)."""
    np = _np()
    return np.frombuffer(body, np.dtype([("lba", "<u8"), ("n", "<u4"), ("seq", "<u8"),
                                         ("off", "<u8")]))


def _rows(body):
    """Packed entries as an array of rows of ENTRY.size bytes (a view)."""
    np = _np()
    return np.frombuffer(body, np.uint8).reshape(-1, ENTRY.size)


def _whole(body):
    """Packed entries as an array of opaque ENTRY.size-byte items (a view)."""
    return _np().frombuffer(body, f"V{ENTRY.size}")


def lay_single(base: Part | None, layers: list[list[bytes]]) -> Part:
    """The entries of `base` with each layer's entries (bodies of packed
    entries, sorted) laid over them in turn, holes dropped, when every
    entry of them all is one block long (single_blocks): then laying an
    entry over is replacing the entry of the same block, or adding one, or
    (a hole) removing it.  Done on arrays (numpy): a stable sort keeps the
    newest entry of each block, a search finds the base's entries they
    replace and where the rest go.  What random 4 KiB writes all over a
    volume make of a chain of checkpoints: in Python it cost about a
    microsecond per entry of the layers."""
    np = _np()
    bodies = [body for layer in layers for body in layer if body]
    raw = b"".join(bodies)
    new = _entries(raw)
    order = np.argsort(new["lba"], kind="stable")        # layer order kept within a block
    lbas = new["lba"][order]
    if len(lbas) > 1:
        newest = np.ones(len(lbas), dtype=bool)           # the last entry of each block
        newest[:-1] = lbas[1:] != lbas[:-1]
        order, lbas = order[newest], lbas[newest]
    written = order[new["seq"][order] != 0]
    rows = _whole(raw)[written]
    if base is None or not base.count:
        return Part(rows.tobytes())
    old = np.ascontiguousarray(_entries(base.body)["lba"])
    at = np.minimum(np.searchsorted(lbas, old), max(len(lbas) - 1, 0))
    kept = lbas[at] != old if len(lbas) else np.ones(len(old), dtype=bool)
    kept_lbas = old[kept]
    total = len(kept_lbas) + len(rows)
    mine = np.zeros(total, dtype=bool)
    mine[np.searchsorted(kept_lbas, new["lba"][written]) + np.arange(len(rows))] = True
    out = np.empty(total, dtype=rows.dtype)
    out[mine] = rows
    out[~mine] = _whole(base.body)[kept]
    return Part(out.tobytes())
