"""Changes to the block map's extents (lsbd.map.blockmap): records laid over
them, one-block entries put where their lookup leaves the cursor, ranges
punched out, and the segments' live counts moved with them.

Cursor work only, inside a write transaction the caller holds: `ext` is the
extents database, `bs` the block size, `live_delta` the blocks each seq
gains (or, negative, loses), for count_live once the changes are made.
"""

from __future__ import annotations

from lsbd.format.segment import DATA, RESIZE, Record
from lsbd.map.encoding import SEQ_KEY as _KEY
from lsbd.map.encoding import SegmentInfo
from lsbd.map.encoding import key_of as _k
from lsbd.map.encoding import lba_of as _lba
from lsbd.map.encoding import unpack_value as _unv
from lsbd.map.encoding import value_of as _v
from lsbd.map.staged import OFF_BITS as _OFF_BITS


def apply_records(txn, cur, ext, meta_db, bs: int, new_seq: int, records: list[Record],
                  live_delta: dict[int, int]) -> None:
    """One segment's records laid over the extents, in order."""
    for r in records:
        if r.kind == RESIZE:
            txn.put(b"size", str(r.lba).encode(), db=meta_db)
            continue
        if r.kind == DATA:
            # The usual rewrite: the record covers exactly one extent
            # (random 4 KiB writes, or a disk rewritten in the same
            # pieces): replace it where it is.
            key = _k(r.lba)
            if cur.set_key(key):
                n, seq, _off = _unv(cur.value())
                if n == r.nblocks:
                    cur.put(key, _v(n, new_seq, r.data_offset))
                    live_delta[seq] -= n
                    live_delta[new_seq] += n
                    continue
        punch(txn, cur, ext, bs, r.lba, r.lba + r.nblocks, live_delta)
        if r.kind == DATA:
            txn.put(_k(r.lba), _v(r.nblocks, new_seq, r.data_offset), db=ext)
            live_delta[new_seq] += r.nblocks


def apply_single(txn, cur, ext, bs: int, newest: dict[int, int],
                 live_delta: dict[int, int]) -> None:
    """Records that are all one-block writes (random 4 KiB writes),
    `newest` the seq << OFF_BITS | file offset of each block's last
    write (one int: a third of the memory of a pair):
    the blocks are looked up in block order (neighbours share the
    B-tree's upper pages), an extent of several blocks under one is cut
    around it, and each new entry is put where the lookup left the
    cursor: LMDB then finds its leaf without a second descent from the
    root (at 16 million extents the tree is 4 pages deep, and each
    page a cache miss).  Putting it at once is safe: a one-block entry
    covers no other block, so it changes no later lookup's answer."""
    mask = (1 << _OFF_BITS) - 1
    for lba in sorted(newest):
        where = newest[lba]
        put_one_block(txn, cur, ext, bs, lba, where >> _OFF_BITS, where & mask, live_delta)


def merge_blocks(txn, cur, ext, bs: int, lbas: list[int], vals: list[int],
                 live_delta: dict[int, int]) -> None:
    """Put each block's newest staged write (lbas sorted) where its
    lookup leaves the cursor (as apply_single); a block whose entry is
    that write already (a merge done again after a crash) is left
    alone, so its live counts move once."""
    mask = (1 << _OFF_BITS) - 1
    for lba, where in zip(lbas, vals):
        put_one_block(txn, cur, ext, bs, lba, where >> _OFF_BITS, where & mask, live_delta)


def put_one_block(txn, cur, ext, bs: int, lba: int, seq: int, offset: int,
                  live_delta: dict[int, int]) -> None:
    """Put a one-block entry where its lookup leaves the cursor, cutting
    an extent of several blocks under it; an entry that is this one
    already is left alone (its live counts would move by nothing)."""
    key = _k(lba)
    new = _v(1, seq, offset)
    if cur.set_range(key):
        if cur.key() == key:
            if cur.value() == new:
                return
            n, old, _off = _unv(cur.value())
            if n == 1:
                live_delta[old] -= 1
            else:
                punch(txn, cur, ext, bs, lba, lba + 1, live_delta)
        elif cur.prev():
            _cut_under(txn, cur, ext, bs, lba, live_delta)
    elif cur.last():
        _cut_under(txn, cur, ext, bs, lba, live_delta)
    cur.put(key, new)
    live_delta[seq] += 1


def _cut_under(txn, cur, ext, bs: int, lba: int, live_delta: dict[int, int]) -> None:
    """`cur` is at the extent before block `lba`: cut `lba` out of it if
    it reaches over it."""
    s = _lba(cur.key())
    n, _seq, _off = _unv(cur.value())
    if s + n > lba:
        punch(txn, cur, ext, bs, lba, lba + 1, live_delta)


def punch(txn, cur, ext, bs: int, start: int, end: int, live_delta: dict[int, int]) -> None:
    """Remove [start, end) from the extents, keeping the parts outside it."""
    puts = []
    if _floor(cur, start):
        s, n, seq, off = _decode(cur)
        if s < start < s + n:
            cur.put(_k(s), _v(start - s, seq, off))
            if s + n > end:
                puts.append((end, s + n - end, seq, off + (end - s) * bs))
            live_delta[seq] -= min(s + n, end) - start
    if cur.set_range(_k(start)):
        while cur.key():
            s, n, seq, off = _decode(cur)
            if s >= end:
                break
            if s + n > end:
                puts.append((end, s + n - end, seq, off + (end - s) * bs))
            live_delta[seq] -= min(s + n, end) - s
            if not cur.delete():
                break
    for s, n, seq, off in puts:
        txn.put(_k(s), _v(n, seq, off), db=ext)


def count_live(txn, segments_db, live_delta: dict[int, int]) -> list[int]:
    """Move the rows' live blocks by `live_delta`; the segments left at 0."""
    emptied = []
    for seq, delta in live_delta.items():
        raw = txn.get(_KEY.pack(seq), db=segments_db)
        if raw is None or not delta:
            continue
        info = SegmentInfo.unpack(seq, raw)
        info.live_blocks = max(0, info.live_blocks + delta)
        if info.live_blocks == 0:
            emptied.append(seq)
        txn.put(_KEY.pack(seq), info.pack(), db=segments_db)
    return emptied


def _floor(cur, lba: int) -> bool:
    """Position `cur` at the greatest key <= lba; False if there is none."""
    key = _k(lba)
    if cur.set_range(key):
        if cur.key() == key:
            return True
        return cur.prev()
    return cur.last()


def _decode(cur) -> tuple[int, int, int, int]:
    n, seq, off = _unv(cur.value())
    return _lba(cur.key()), n, seq, off
