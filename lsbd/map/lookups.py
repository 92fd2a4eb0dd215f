"""Reads of the block map's extents (lsbd.map.blockmap): the pieces of a
range, clipped to it, and every extent in block order.  Cursor work only:
the caller holds the read transaction and lays the staged writes over
(lsbd.map.staged)."""

from __future__ import annotations

import functools
import itertools
import operator
from typing import Iterator

from lsbd.map.encoding import SHORT, Extent
from lsbd.map.encoding import key_of as _k
from lsbd.map.encoding import lba_of as _lba
from lsbd.map.encoding import unpack_value as _unv

_first = operator.itemgetter(0)
_second = operator.itemgetter(1)
#: An Extent from a tuple (lba, nblocks, seq, offset), by a C call.
_as_extent = functools.partial(tuple.__new__, Extent)


def extents_in(cur, lba: int, nblocks: int, bs: int) -> list[Extent]:
    """One cursor pass: the extent at or before lba, then those after it."""
    end = lba + nblocks
    out: list[Extent] = []
    key = _k(lba)
    if cur.set_range(key):
        if cur.key() != key:
            if cur.prev():
                _clip_first(cur, lba, end, out, bs)
                if nblocks == 1:     # a single block: nothing more can start in it
                    return out
                cur.next()
            else:
                cur.set_range(key)   # nothing before lba: back where we were
        elif nblocks == 1:
            n, seq, off = _unv(cur.value())
            return [Extent(lba, 1, seq, off)]
    else:
        # Every extent starts before lba: only the last may reach it.
        if cur.last():
            _clip_first(cur, lba, end, out, bs)
        return out
    out.extend(extents_before(cur, end))
    if out:
        last = out[-1]
        if last.lba + last.nblocks > end:
            out[-1] = last._replace(nblocks=end - last.lba)
    return out


def extents_before(cur, end: int) -> list[Extent]:
    """The extents from `cur` on that start before block `end`, whole.

    After random writes a 1 MiB read's range holds an extent or so a
    block: the entries are taken off the cursor and decoded by C loops
    (takewhile, map, iter_unpack), not one by one in Python.  Half the
    processor time alone; and py-lmdb lets go of the GIL at every step of
    the cursor, so beside threads that want the GIL a walk with Python
    between its steps handed it over and waited for it back far more
    often: 3-7 times slower than this beside one such thread
    (bench/map_lookup_bench.py)."""
    # (end_key,) > (key, value) exactly when key < end_key (keys are big-endian).
    items = list(itertools.takewhile((_k(end),).__gt__, cur))
    if not items:
        return []
    starts = map(int.from_bytes, map(_first, items))   # big-endian keys
    values = b"".join(map(_second, items))
    if len(values) == SHORT.size * len(items):        # every value short: one decode
        decoded = SHORT.iter_unpack(values)
    else:
        decoded = map(_unv, map(_second, items))
    return list(map(_as_extent, zip(starts, *zip(*decoded))))


def _clip_first(cur, lba: int, end: int, out: list, bs: int) -> None:
    """The extent under `cur` starts before lba: its part from lba on, if any."""
    s = _lba(cur.key())
    n, seq, off = _unv(cur.value())
    if s + n > lba:
        out.append(Extent(lba, min(s + n, end) - lba, seq, off + (lba - s) * bs))


def all_extents(txn, db) -> Iterator[Extent]:
    for key, value in txn.cursor(db=db):
        n, seq, off = _unv(value)
        yield Extent(_lba(key), n, seq, off)
