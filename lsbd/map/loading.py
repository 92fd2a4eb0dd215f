"""Filling the block map (lsbd.map.blockmap) from checkpoints: a
checkpoint's extents put in block order, and one segment's records laid
over a scratch map, holes included (a delta checkpoint being built).

Cursor work only, inside a write transaction the caller holds: `ext` is the
extents database, `bs` the block size.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Iterator

from lsbd.format.segment import DATA, RESIZE, Record
from lsbd.map import updates
from lsbd.map.encoding import key_of as _k
from lsbd.map.encoding import value_of as _v
from lsbd.map.packed import Run

#: Packed runs shorter than this are loaded entry by entry (cheaper than
#: the slicing and counting a run costs).
_SHORT_RUN = 16


def put_sorted(cur, extents: Iterator[tuple | Run], batch: int, live: Counter) -> bool:
    """Put extents (lba, nblocks, seq, offset) or packed runs (lsbd.map.packed:
    no Python object per extent) off `extents`, sorted by lba and after
    every entry the map holds, until about `batch` are put (a run goes
    whole); count their blocks in `live` by seq.  True once `extents` ran out."""
    count = 0
    loose: list[tuple[bytes, bytes]] = []     # entries one by one, in order
    done = False
    for e in extents:
        if isinstance(e, Run):
            fast = e.map_pairs() if len(e) >= _SHORT_RUN else None
            if fast is not None:
                if loose:
                    cur.putmulti(loose, append=True)
                    loose = []
                live.update(e.live())
                cur.putmulti(fast, append=True)   # no Python per entry
            else:       # a few entries cost less one by one
                for lba, n, seq, off in e.entries():
                    live[seq] += n
                    loose.append((_k(lba), _v(n, seq, off)))
            count += len(e)
        else:
            lba, n, seq, off = e
            live[seq] += n
            loose.append((_k(lba), _v(n, seq, off)))
            count += 1
        if count >= batch:
            break
    else:
        done = True
    if loose:
        cur.putmulti(loose, append=True)
    return done


def overlay_singles(cur, seq: int, records: list[Record]) -> None:
    """overlay_records when every entry so far and every record here is one
    block long: laying one over is replacing the entry of its block, in
    one putmulti."""
    newest = {r.lba: _v(1, seq, r.data_offset) if r.kind == DATA else _v(1, 0, 0)
              for r in records if r.nblocks and r.kind != RESIZE}
    cur.putmulti([(_k(lba), newest[lba]) for lba in sorted(newest)], overwrite=True)


def overlay_records(txn, cur, ext, bs: int, seq: int, records: list[Record]) -> None:
    """Lay one segment's records over the extents, holes included: DATA as
    extents of `seq`, ZERO and TRIM as extents of seq 0; live counts left
    alone."""
    ignored: dict[int, int] = defaultdict(int)
    for r in records:
        if r.kind == RESIZE or not r.nblocks:
            continue
        updates.punch(txn, cur, ext, bs, r.lba, r.lba + r.nblocks, ignored)
        if r.kind == DATA:
            txn.put(_k(r.lba), _v(r.nblocks, seq, r.data_offset), db=ext)
        else:
            txn.put(_k(r.lba), _v(r.nblocks, 0, 0), db=ext)
