"""Staging and the staged merge: a part of the block map (lsbd.map.blockmap).

Segments of one-block writes (random 4 KiB writes) are staged: their
writes kept as one value, their row and the applied seq written, in one
small transaction; reads see them through the newest staged write of each
block, held in memory.  Once STAGE_SEGMENTS are staged they are merged into
the extents in block order, a range of MERGE_RANGE blocks a transaction,
a few ranges per segment staged meanwhile; the last range's transaction
deletes their staged values.  Merging is idempotent: a block whose entry
already is its newest staged write is left alone, so a merge cut short (a
crash) is simply done again, and live counts move only with the entries.
A staged segment's row counts only its merged blocks; segments() adds its
newest staged ones (an over-count while a merge is half done, never an
under-count).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import defaultdict
from typing import Any, Callable, Iterator

from lsbd import fileio, linux
from lsbd.map import staged, updates
from lsbd.map.encoding import SEQ_KEY as _KEY
from lsbd.map.encoding import lba_of as _lba
from lsbd.map.offload import MapProcess, OffloadUnavailable
from lsbd.map.staged import Newest, OneBlockWrites

#: Segments staged before a merge starts (lsbd.map.staged): at 8,192
#: writes each, about as many writes as a 16-million-extent map has leaf
#: pages, so that a merge writes each leaf about once for several writes.
STAGE_SEGMENTS = 64
#: Blocks merged in one transaction: about the pages one segment's commit
#: dirtied before staging.
MERGE_RANGE = 8192
#: Ranges merged per segment staged while a merge runs: done in half the
#: time the next one takes to stage.
MERGE_STEPS = 2
#: A merge of everything staged whose blocks spread over at least 1/this of
#: the extents' leaf pages reads the whole map file ahead (BlockMap.merge_all).
MERGE_READ_AHEAD = 8


class StagedMerge:
    """BlockMap's staging and merging, mixed into it: they work on the
    state its reads share (the newest staged writes, the kept reader) and
    its transactions.  The names below are BlockMap's (its __init__ sets
    them), declared here so that a reader, and mypy, sees what the merge
    uses of the map."""

    path: str
    block_size: int
    _env: Any
    _meta: Any
    _segments: Any
    _extents: Any
    _staged_db: Any
    _covers_db: Any
    _newest: Newest                           # read by lookups
    _staged_seqs: list[int]
    _merging: int | None
    _merge_from: int
    _gen: tuple[int, Newest] | None
    _reader_lock: threading.Lock
    _offload: MapProcess | None
    _offload_failed: Callable[..., None]
    _writing: Callable[..., contextlib.AbstractContextManager]
    _drop_reader: Callable[[], None]
    _drop_reader_locked: Callable[[], None]
    _covers_in: Callable[..., list[tuple]]
    _applied_already: Callable[..., bool]

    def _stage(self, lists: list, meta: dict[str, bytes]) -> list[int]:
        """Stage segments of one-block writes: their writes as values of the
        `staged` database, their rows (live blocks 0: merges count them)
        and `meta`, in one transaction; then a step of the merge."""
        writes = [(info, r if isinstance(r, OneBlockWrites) else OneBlockWrites.of(r))
                  for info, r in lists]
        with self._writing() as txn:
            last = writes[-1][0].seq
            if self._applied_already(txn, last, meta):
                return []
            for info, w in writes:
                info.live_blocks = 0
                txn.put(_KEY.pack(info.seq), staged.pack(w.lbas, w.offsets),
                        db=self._staged_db)
                txn.put(_KEY.pack(info.seq), info.pack(), db=self._segments)
            for k, v in meta.items():
                txn.put(k.encode(), v, db=self._meta)
        newest = self._newest
        for info, w in writes:
            newest = newest.added(info.seq, w.lbas, w.offsets)
        # No lock: lookups read a Newest whole, whichever one they took.
        self._newest = newest
        self._staged_seqs.extend(info.seq for info, _ in writes)
        return self._merge_step()

    def _merge_step(self) -> list[int]:
        """Go on with the merge (start one once STAGE_SEGMENTS are staged):
        MERGE_STEPS ranges, or all that is left when another merge is due."""
        if self._merging is None:
            if len(self._staged_seqs) < STAGE_SEGMENTS:
                return []
            self._merging, self._merge_from = self._staged_seqs[-1], 0
        ahead = sum(1 for s in self._staged_seqs if s > self._merging)
        steps = MERGE_STEPS if ahead < STAGE_SEGMENTS else 1 << 40
        return self._run_merge(steps)

    def merge_all(self) -> list[int]:
        """Merge every staged segment into the extents (before other
        records are laid over them).  Returns the segments left without a
        live block."""
        emptied: list[int] = []
        if self._staged_seqs:
            self._read_ahead_for_merge()
        while self._staged_seqs:
            if self._merging is None:
                self._merging, self._merge_from = self._staged_seqs[-1], 0
            emptied += self._run_merge(1 << 40)
        return emptied

    def _read_ahead_for_merge(self) -> None:
        """Before a merge of everything staged: when its blocks spread over
        at least 1/MERGE_READ_AHEAD of the extents' leaf pages (estimated
        from the blocks a leaf page spans on average), have the kernel read
        the whole map file at once.  From a cold page cache the merge
        otherwise faults those pages in one at a time in the map's process:
        a merge of 81 segments of random writes over a 1 TiB volume at 16
        million extents took 9 s from a cold page cache and 2.6 with the
        file read ahead (2.1 warm), and held up the segments after it (a
        read-directed relocation's) as long (docs/scale.md).  Only a hint."""
        newest = self._newest
        if len(newest) < MERGE_RANGE:
            return
        with self._env.begin(db=self._extents) as txn:
            leaves = txn.stat(self._extents)["leaf_pages"]
            cur = txn.cursor()
            if leaves < MERGE_READ_AHEAD or not cur.first():
                return
            lo = _lba(cur.key())
            cur.last()
            hi = _lba(cur.key()) + 1
        np = staged._np()
        span = np.uint64(max(1, (hi - lo) // leaves))
        touched = len(np.unique(newest.lbas // span))
        if touched * MERGE_READ_AHEAD < leaves:
            return
        try:
            fd = os.open(os.path.join(self.path, "data.mdb"), os.O_RDONLY)
        except OSError:
            return
        try:
            linux.will_need(fd, 0, os.fstat(fd).st_size)
        finally:
            os.close(fd)

    def _run_merge(self, steps: int) -> list[int]:
        """`steps` ranges of the merge under way, in the map's process when
        there is one (else here: merging again what it did is harmless)."""
        assert self._merging is not None
        upto = self._merging
        nxt: int | None
        if self._offload is not None:
            try:
                nxt, emptied = self._offload.merge(upto, self._merge_from, steps, MERGE_RANGE)
            except OffloadUnavailable as e:
                self._offload_failed(e, "merging")
                nxt, emptied = self.merge_ranges(upto, self._merge_from, steps)
            else:
                fileio.map_committed(self.path, self._env)
        else:
            nxt, emptied = self.merge_ranges(upto, self._merge_from, steps)
        self._drop_reader()
        if nxt is None:
            with self._reader_lock:
                # After the merge's commits: a lookup that finds a block no
                # longer staged finds it in the extents.
                self._newest = self._newest.after(upto)
                self._drop_reader_locked()
            self._staged_seqs = [s for s in self._staged_seqs if s > upto]
            self._merging = None
        else:
            self._merge_from = nxt
        return emptied

    def merge_ranges(self, upto: int, start: int, steps: int,
                     blocks: int | None = None) -> tuple[int | None, list[int]]:
        """Merge the newest writes of the segments staged up to seq `upto`
        into the extents, from block `start` on, `steps` transactions of
        `blocks` blocks (default MERGE_RANGE): (the block to go on from, or
        None once the last transaction also deleted their staged values;
        segments left without a live block)."""
        blocks = blocks or MERGE_RANGE
        if self._gen is None or self._gen[0] != upto:
            self._gen = None
            with self._env.begin() as txn:
                segs = [(s, *staged.unpack(v))
                        for s, v in _staged_upto(txn.cursor(db=self._staged_db), upto)]
                # Every cover, those newer than `upto` too: merged, a write
                # they cover would come back over their records.
                self._gen = (upto, Newest.of(segs).uncovered(self._covers_in(txn)))
        gen = self._gen[1]
        i = int(gen.lbas.searchsorted(gen.lbas.dtype.type(start)))
        emptied: list[int] = []
        for _ in range(steps):
            j = min(i + blocks, len(gen))
            last = j >= len(gen)
            live_delta: dict[int, int] = defaultdict(int)
            with self._writing() as txn:
                cur = txn.cursor(db=self._extents)
                updates.merge_blocks(txn, cur, self._extents, self.block_size,
                                     gen.lbas[i:j].tolist(), gen.vals[i:j].tolist(), live_delta)
                emptied += updates.count_live(txn, self._segments, live_delta)
                if last:
                    cur = txn.cursor(db=self._staged_db)
                    while cur.first() and _KEY.unpack(cur.key())[0] <= upto:
                        cur.delete()
                    # A cover is needed while a staged write older than it is.
                    oldest = _KEY.unpack(cur.key())[0] if cur.first() else None
                    cur = txn.cursor(db=self._covers_db)
                    while cur.first() and (oldest is None
                                           or _KEY.unpack(cur.key())[0] < oldest):
                        cur.delete()
            if last:
                self._gen = None
                return None, emptied
            i = j
        return int(gen.lbas[i]), emptied


def _staged_upto(cur, upto: int) -> Iterator[tuple[int, bytes]]:
    """(seq, value) of the staged segments up to seq `upto`."""
    for k, v in cur:
        seq = _KEY.unpack(k)[0]
        if seq > upto:
            return
        yield seq, v
