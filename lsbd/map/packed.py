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
from typing import Iterator

from lsbd.map.encoding import KEY_BYTES, SHORT

ENTRY = struct.Struct("<QIQQ")   # lba nblocks seq offset
PAIR = struct.Struct(f"{KEY_BYTES}s{SHORT.size}s")   # a map key and its short value
_LITTLE = sys.byteorder == "little"
# Byte columns of an entry that are zero when the map's short value holds it
# (lsbd.map.encoding.value_of) and its key holds the lba.
_HIGH = (6, 7, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)


class Part:
    """The entries of one checkpoint part (the bytes as stored) and the
    columns built from them once, shared by every run of the part."""

    def __init__(self, body: bytes):
        if len(body) % ENTRY.size:
            raise ValueError(f"{len(body)} bytes are not whole entries")
        self.body = body
        self.count = len(body) // ENTRY.size
        self.lbas = _column(body, 0, 8, "Q")
        self._pairs: memoryview | None = None
        self._short: bool | None = None

    def entry(self, i: int) -> tuple[int, int, int, int]:
        return ENTRY.unpack_from(self.body, i * ENTRY.size)

    def short(self) -> bool:
        """Whether every entry fits the map's short value (the usual case)."""
        if self._short is None:
            body, n = self.body, self.count
            self._short = all(body[b::ENTRY.size].count(0) == n for b in _HIGH)
        return self._short

    def pairs_bytes(self) -> memoryview:
        """The map's (key, short value) of every entry, 16 bytes each."""
        if self._pairs is None:
            body, size = self.body, ENTRY.size
            out = bytearray(PAIR.size * self.count)
            step = PAIR.size
            for i in range(KEY_BYTES):                 # the key: the lba, big-endian
                out[i::step] = body[KEY_BYTES - 1 - i::size]
            for i, b in enumerate((8, 9, 12, 13, 14, 15, 20, 21, 22, 23)):  # <HII
                out[KEY_BYTES + i::step] = body[b::size]
            self._pairs = memoryview(out)
        return self._pairs


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
        body, size = self.part.body, ENTRY.size
        lo, hi = self.start * size, self.stop * size
        n = hi // size - lo // size
        chunk = body[lo:hi]
        if chunk[8::size].count(1) == n and chunk[9::size].count(0) == n and \
                chunk[10::size].count(0) == n and chunk[11::size].count(0) == n:
            return Counter(_column(chunk, 12, 8, "Q"))     # one block each
        live: Counter = Counter()
        for _lba, nblocks, seq, _off in ENTRY.iter_unpack(chunk):
            live[seq] += nblocks
        return live


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
