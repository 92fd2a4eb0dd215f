"""The block map: for every written block, where its newest copy lives.

Kept in LMDB (lsbd.map.mapfile opens it) as non-overlapping extents
keyed by their first block, so a long sequential write costs one entry, not
one per block.  Updated in one transaction per sealed segment.  Holes (never
written, trimmed, zeroed) are simply absent.

Databases (map format 2; docs/format.md "Cache dir"):
  blocks    6-byte BE first block  ->  10 bytes <HII nblocks, seq, file offset
                                       (20 bytes <IQQ when one does not fit)
  segments  >Q seq          ->  SegmentInfo (state, times, size, live blocks)
  meta      name            ->  value (volume id, store URL, applied seq, size ...)
  staged    >Q seq          ->  a staged segment's one-block writes (lsbd.map.staged)
  covers    >Q seq          ->  the ranges a segment laid over the extents while
                                older writes were staged (lsbd.map.staged)

BlockMap holds the state its parts share (the LMDB environment, the newest
staged writes that reads lay over the extents, lookup_block's kept read
transaction, the map's process) and the segment table; each of its jobs
is a module of this package:
  mapfile   the LMDB file: opening it, format 1 converted, write transactions
  lookups   reads: a range's extents, every extent
  updates   a segment's records laid over the extents, one-block puts,
            punching, live counts
  merge     staging segments of one-block writes and merging them into the
            extents (StagedMerge, a part of BlockMap)
  loading   filling the map from checkpoints (load, overlay)
  offload   the map's own process, which applies and merges for this one

Segments of one-block writes (random 4 KiB writes) are staged, and merged
into the extents later (lsbd.map.merge).

A segment of other records (longer writes, zeroes, trims: a read-directed
relocation's) is laid over the extents at once, staged writes or not; in
the same transaction its ranges are written as a cover: every staged
write older than it in those blocks is dead, left out of what reads see,
of merges and of live counts (never counted: a staged write counts only
once merged).  A merge of everything staged first, as before covers, held
the sealer up for 1.6-9 s (docs/scale.md).  A cover goes with the last
staged value older than it.

A random 4 KiB write costs one entry of 16 bytes of key and value (LMDB adds
10 more), where format 1 (`extents`, >Q -> <IQQ) took 28.  A map of format 1
is converted in place when it is opened (lsbd.map.mapfile).  The bytes of
keys and values are lsbd.map.encoding's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from collections import Counter, defaultdict
from typing import Iterable, Iterator

from lsbd import fileio, private
from lsbd.format.segment import DATA, RESIZE, Record
from lsbd.map import loading, mapfile, staged, updates
from lsbd.map.encoding import MAP_FORMAT, PENDING, STORED, Extent, SegmentInfo
from lsbd.map.encoding import SEQ_KEY as _KEY
from lsbd.map.encoding import key_of as _k
from lsbd.map.encoding import lba_of as _lba
from lsbd.map.encoding import unpack_value as _unv
from lsbd.map.lookups import all_extents, extents_in
from lsbd.map.merge import StagedMerge
from lsbd.map.offload import GIVE_UP_AFTER, MapProcess, OffloadUnavailable
from lsbd.map.packed import Run
from lsbd.map.staged import OFF_BITS as _OFF_BITS
from lsbd.map.staged import Newest, OneBlockWrites

log = logging.getLogger(__name__)
__all__ = ["MAP_FORMAT", "PENDING", "STORED", "BlockMap", "Extent", "MapSnapshot", "SegmentInfo"]


class BlockMap(StagedMerge):
    def __init__(self, path: str, block_size: int, *, scratch: bool = False,
                 lookups: bool = True):
        private.make_dirs(path)
        self.path = path
        self.block_size = block_size
        # scratch: a throwaway map (a delta being built), never synced.
        # lookups=False: the map's process, which only applies and merges.
        self._env = mapfile.open_env(path, scratch)
        (self._segments, self._meta, self._extents, self._staged_db,
         self._covers_db) = mapfile.open_dbs(
            self._env, [b"segments", b"meta", b"blocks", b"staged", b"covers"], b"meta")
        mapfile.migrate(self._env, self._meta, self._extents)
        # Stage segments of one-block writes (not in a scratch map, which
        # overlay() and load() fill, nor in the map's process: its parent stages).
        self._stages = not scratch and lookups
        # The newest staged write of each block (replaced, never changed:
        # swapped under _reader_lock), and the staged seqs in order.
        self._newest = Newest()
        self._staged_seqs: list[int] = []
        if lookups:
            with self._env.begin() as txn:
                self._staged_seqs, self._newest = self._staged_in(txn)
        self._merging: int | None = None   # the merge under way: up to this seq
        self._merge_from = 0               # ... from this block on
        self._gen: tuple[int, Newest] | None = None   # its writes, as merge_ranges loaded them
        # A scratch map that holds only one-block entries (it starts empty):
        # overlay() then replaces entries without looking them up.
        self._singles = scratch and self.extent_count() == 0
        # lookup_block's read transaction, kept between lookups (beginning one
        # costs about as much as the lookup) and dropped at every write.
        self._reader_lock = threading.Lock()
        self._reader: tuple | None = None  # a read transaction and its cursor, kept between lookups
        self._offload: MapProcess | None = None   # offload_writes()
        self._offload_cpu = 0.0     # CPU of map processes given up on

    def sync(self) -> None:
        """Make every commit so far durable, the last one included (the map
        runs with metasync off: a power cut may otherwise undo it)."""
        self._env.sync(True)
        fileio.map_committed(self.path, self._env, synced=True)

    def close(self) -> None:
        if self._offload is not None:
            self._offload.close()
        self._drop_reader()
        self._env.close()

    def offload_writes(self) -> None:
        """From now on, apply_segments runs in a process of its own
        (lsbd.map.offload: off this process's GIL)."""
        if self._offload is None:
            self._offload = MapProcess(self.path, self.block_size)

    @property
    def offload_cpu_seconds(self) -> float:
        """The CPU the map's process spent in the batches it applied."""
        return self._offload_cpu + (self._offload.cpu_seconds if self._offload else 0.0)

    def _offload_failed(self, e: OffloadUnavailable, doing: str) -> None:
        """The map's process could not do a request (`doing`: what the caller
        does here instead).  After GIVE_UP_AFTER failures in a row it cannot
        run on this machine: it is stopped, and from then on every request
        is done in this process."""
        assert self._offload is not None
        log.warning("the map %s: its process stopped (%s); %s here", self.path, e, doing)
        if self._offload.failures >= GIVE_UP_AFTER:
            self._offload.close()
            self._offload_cpu += self._offload.cpu_seconds
            self._offload = None

    @contextlib.contextmanager
    def _writing(self, db=None):
        """A write transaction; once it ends, lookups see what it did."""
        try:
            with mapfile.writing(self._env, self.path, db) as txn:
                yield txn
        finally:
            self._drop_reader()

    def _drop_reader(self) -> None:
        with self._reader_lock:
            self._drop_reader_locked()

    def _drop_reader_locked(self) -> None:
        if self._reader is not None:
            self._reader[0].abort()
            self._reader = None

    @staticmethod
    def destroy(path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)

    # --- meta ---------------------------------------------------------------

    def get_meta(self, name: str, default: bytes | None = None) -> bytes | None:
        with self._env.begin(db=self._meta) as txn:
            value = txn.get(name.encode())
        return default if value is None else bytes(value)

    def set_meta(self, **values: bytes) -> None:
        with self._writing(self._meta) as txn:
            for k, v in values.items():
                txn.put(k.encode(), v)

    def get_int(self, name: str, default: int = 0) -> int:
        raw = self.get_meta(name)
        return default if raw is None else int(raw)

    # --- reads (lsbd.map.lookups) -----------------------------------------------

    def lookup(self, lba: int, nblocks: int) -> list[Extent]:
        """The mapped pieces of [lba, lba+nblocks), clipped to it, in order."""
        # The staged writes first: a merge commits before it lets go of
        # them, so a transaction begun after this sees at least their merge.
        newest = self._newest
        with self._env.begin(db=self._extents) as txn:
            out = extents_in(txn.cursor(), lba, nblocks, self.block_size)
        if len(newest):
            lbas, vals = newest.between(lba, lba + nblocks)
            if lbas:
                return list(staged.laid_over(out, zip(lbas, vals), self.block_size))
        return out

    def lookup_block(self, lba: int) -> tuple[int, int] | None:
        """(seq, file offset) of one block, or None for a hole: lookup() for
        random reads, without building a list.  Its cursor work is written
        out here, not called in lsbd.map.lookups: a call more per block read."""
        key = _k(lba)
        with self._reader_lock:
            if len(self._newest):
                hit = self._newest.find(lba)
                if hit is not None:
                    return hit
            if self._reader is None:
                txn = self._env.begin(db=self._extents)
                self._reader = (txn, txn.cursor())
            cur = self._reader[1]
            if cur.set_range(key):
                if cur.key() == key:
                    _n, seq, off = _unv(cur.value())
                    return seq, off
                if not cur.prev():
                    return None
            elif not cur.last():
                return None
            start = _lba(cur.key())
            n, seq, off = _unv(cur.value())
        if start + n > lba:
            return seq, off + (lba - start) * self.block_size
        return None

    def iter_extents(self) -> Iterator[Extent]:
        """Every extent, in block order, from one consistent view."""
        with self._env.begin() as txn:
            yield from self._overlaid(txn)

    def _overlaid(self, txn) -> Iterator[Extent]:
        """The extents with the staged writes laid over, as of `txn`."""
        _seqs, newest = self._staged_in(txn)
        if not len(newest):
            return all_extents(txn, self._extents)
        return staged.laid_over(all_extents(txn, self._extents), staged.pairs(newest),
                                self.block_size)

    def _staged_in(self, txn) -> tuple[list[int], Newest]:
        """The staged seqs and their newest writes that no newer record
        covers, as of `txn`."""
        segs = [(_KEY.unpack(k)[0], *staged.unpack(v))
                for k, v in txn.cursor(db=self._staged_db)]
        return [s for s, _l, _o in segs], Newest.of(segs).uncovered(self._covers_in(txn))

    def _covers_in(self, txn) -> list[tuple]:
        """(seq, starts, ends) of the covers (lsbd.map.staged), in seq order."""
        return [(_KEY.unpack(k)[0], *staged.unpack_cover(v))
                for k, v in txn.cursor(db=self._covers_db)]

    def referenced_seqs(self) -> set[int]:
        """Every seq the map's extents point into (one pass over the map)."""
        seqs: set[int] = set()
        with self._env.begin() as txn:
            for value in txn.cursor(db=self._extents).iternext(keys=False, values=True):
                seqs.add(_unv(value)[1])
            # An entry the staged writes hide may be gone once they are
            # merged; counted all the same (a seq kept a while longer).
            seqs.update(self._staged_in(txn)[1].counts())
        return seqs

    def live_blocks_by_seq(self) -> dict[int, int]:
        live: dict[int, int] = defaultdict(int)
        for e in self.iter_extents():
            live[e.seq] += e.nblocks
        return dict(live)

    def staged_count(self) -> int:
        """Segments staged, not yet merged into the extents."""
        return len(self._staged_seqs)

    def snapshot(self) -> "MapSnapshot":
        """A frozen view of the map for a long read (a checkpoint) while
        writers go on.  Use it as a context manager (or close() it)."""
        return MapSnapshot(self, self._env.begin())

    def is_new(self) -> bool:
        """Nothing was ever written into this map (only its format mark)."""
        with self._env.begin() as txn:
            if any(txn.stat(db)["entries"] for db in (self._extents, self._segments,
                                                      self._staged_db, self._covers_db)):
                return False
            return [bytes(k) for k in txn.cursor(db=self._meta).iternext(values=False)] \
                == [b"map_format"]

    def extent_count(self) -> int:
        with self._env.begin(db=self._extents) as txn:
            return txn.stat(self._extents)["entries"]

    def map_stats(self) -> dict:
        """What the map costs on the cache disk: its file, the pages in use
        (LMDB's last page number), the extents database's pages, and what
        is staged (not yet among the extents)."""
        with self._env.begin(db=self._extents) as txn:
            st = txn.stat(self._extents)
        info = self._env.info()
        try:
            file_bytes = os.path.getsize(os.path.join(self.path, "data.mdb"))
        except OSError:
            file_bytes = 0
        return {"file_bytes": file_bytes, "page_size": st["psize"],
                "pages_used": info["last_pgno"] + 1, "extents": st["entries"],
                "depth": st["depth"], "branch_pages": st["branch_pages"],
                "leaf_pages": st["leaf_pages"], "overflow_pages": st["overflow_pages"],
                # not yet in `extents`: segments staged, blocks they write
                "staged_segments": len(self._staged_seqs), "staged_blocks": len(self._newest)}

    # --- the segment table -----------------------------------------------------

    def segment(self, seq: int) -> SegmentInfo | None:
        counts = self._newest.counts() if len(self._newest) else {}
        with self._env.begin(db=self._segments) as txn:
            raw = txn.get(_KEY.pack(seq))
        return None if raw is None else _with_staged(SegmentInfo.unpack(seq, raw), counts)

    def segments(self) -> list[SegmentInfo]:
        """Every segment's row; live blocks count its staged writes that are
        the newest of their block too."""
        counts = self._newest.counts() if len(self._newest) else {}
        with self._env.begin(db=self._segments) as txn:
            return [_with_staged(SegmentInfo.unpack(_KEY.unpack(k)[0], v), counts)
                    for k, v in txn.cursor()]

    def set_segment_state(self, seq: int, state: int) -> None:
        with self._writing(self._segments) as txn:
            raw = txn.get(_KEY.pack(seq))
            if raw is not None:
                info = SegmentInfo.unpack(seq, raw)
                info.state = state
                txn.put(_KEY.pack(seq), info.pack())

    def drop_segments(self, seqs) -> None:
        with self._writing(self._segments) as txn:
            for seq in seqs:
                txn.delete(_KEY.pack(seq))

    # --- applying sealed segments (lsbd.map.updates; staged: lsbd.map.merge) ----

    def apply_segment(self, info: SegmentInfo, records: Iterable[Record],
                      **meta: bytes) -> list[int]:
        """Apply one sealed segment's records, in order, in one transaction,
        and record the segment and `meta` (e.g. the new applied seq).
        Returns the older segments it left without a live block."""
        return self.apply_segments([(info, records)], **meta)

    def apply_segments(self, batch: list[tuple[SegmentInfo, Iterable[Record] | OneBlockWrites]],
                       **meta: bytes) -> list[int]:
        """Apply several sealed segments (in seq order), as if one after the
        other, in one transaction; record them and `meta`.  One commit for
        several segments: random writes that fall on the same leaf page
        dirty it once, not once per segment.  Returns the older segments
        they left without a live block."""
        lists = [(info, r if isinstance(r, (list, OneBlockWrites)) else list(r))
                 for info, r in batch]
        if self._stages and lists and all(_single_writes(r) for _, r in lists):
            return self._stage(lists, meta)
        # Any other record is laid over the extents as they are; the staged
        # writes in its blocks, older, are dead from now on: covered, not
        # merged (a merge of everything staged held the sealer up for
        # seconds, docs/scale.md).
        covers = _covers_of(lists) if len(self._newest) or self._gen is not None else None
        emptied = self._apply_batch(lists, meta, covers)
        if covers is not None:
            # Reads of these blocks meanwhile find them in the sealing
            # journal still (the engine drops it only after this returns).
            with self._reader_lock:
                self._newest = self._newest.uncovered(covers)
                self._drop_reader_locked()
            if self._gen is not None:
                self._gen = (self._gen[0], self._gen[1].uncovered(covers))
        return emptied

    def _apply_batch(self, lists: list, meta: dict[str, bytes],
                     covers: list[tuple] | None) -> list[int]:
        """apply_segments of a batch not staged: in the map's process when
        there is one, else here (`covers`: _covers_of(lists) if the caller
        needed them too)."""
        if self._offload is not None:
            try:
                emptied, live = self._offload.apply(
                    [(info, OneBlockWrites.of(records)
                      if isinstance(records, list) and _single_writes(records) else records)
                     for info, records in lists], meta)
            except OffloadUnavailable as e:
                self._offload_failed(e, "applying")
            else:
                for (info, _), n in zip(lists, live):
                    info.live_blocks = n
                fileio.map_committed(self.path, self._env)
                self._drop_reader()
                return emptied
        live_delta: dict[int, int] = defaultdict(int)
        emptied = []
        mine = {info.seq for info, _ in lists}
        with self._writing() as txn:
            if lists and self._applied_already(txn, lists[-1][0].seq, meta):
                return []
            if txn.stat(self._staged_db)["entries"]:
                # Staged writes, older than the batch, would hide its
                # records where they cover them: covered in this transaction.
                self._put_covers(txn, covers if covers is not None else _covers_of(lists))
            cur = txn.cursor(db=self._extents)
            if all(_single_writes(records) for _, records in lists):
                # Every record a one-block write: the newest write of each
                # block across the batch (seq and offset packed in one int), in one
                # pass in block order.
                newest: dict[int, int] = {}
                for info, records in lists:
                    newest.update(_newest_pairs(info.seq, records))
                updates.apply_single(txn, cur, self._extents, self.block_size, newest, live_delta)
            else:
                for info, records in lists:
                    if _single_writes(records):
                        updates.apply_single(txn, cur, self._extents, self.block_size,
                                             dict(_newest_pairs(info.seq, records)), live_delta)
                    else:
                        assert isinstance(records, list)     # OneBlockWrites are single
                        updates.apply_records(txn, cur, self._extents, self._meta, self.block_size,
                                              info.seq, records, live_delta)
            for info, _ in lists:
                info.live_blocks = max(0, live_delta.pop(info.seq, 0))
                txn.put(_KEY.pack(info.seq), info.pack(), db=self._segments)
            for seq, delta in live_delta.items():
                if seq in mine:
                    continue
                raw = txn.get(_KEY.pack(seq), db=self._segments)
                if raw is not None:
                    old = SegmentInfo.unpack(seq, raw)
                    old.live_blocks = max(0, old.live_blocks + delta)
                    if old.live_blocks == 0:
                        emptied.append(seq)
                    txn.put(_KEY.pack(seq), old.pack(), db=self._segments)
            for k, v in meta.items():
                txn.put(k.encode(), v, db=self._meta)
        return emptied

    def _put_covers(self, txn, covers: list[tuple]) -> None:
        for seq, starts, ends in covers:
            if len(starts):
                txn.put(_KEY.pack(seq), staged.pack_cover(starts, ends), db=self._covers_db)

    def _applied_already(self, txn, last: int, meta: dict[str, bytes]) -> bool:
        """Whether a batch ending at seq `last` is in the map already: applied
        by the map's process, which died before it could say so, or staged
        and then replayed again.  Applying it again would count its blocks twice."""
        return (txn.get(_KEY.pack(last), db=self._segments) is not None
                and "applied_seq" in meta
                and int(txn.get(b"applied_seq", b"0", db=self._meta)) >= last)

    # --- filling from checkpoints (lsbd.map.loading) -----------------------------

    def load(self, extents: Iterable[tuple | Run], segments: Iterable[SegmentInfo], *,
             batch: int = 1 << 18, **meta: bytes) -> None:
        """Replace the whole map (loading a checkpoint), extents sorted by
        lba, as (lba, nblocks, seq, offset) or packed runs (lsbd.map.packed:
        no Python object per extent).  In transactions of about `batch`
        extents (a run longer than what is left goes whole: at most a
        checkpoint part), so the pages a transaction holds stay few whatever
        the map's size: a crash half way leaves a map without the volume
        id, which recovery does not trust."""
        live: Counter = Counter()
        with self._reader_lock:
            self._newest, self._staged_seqs, self._merging, self._gen = Newest(), [], None, None
        it = iter(extents)
        first = True
        done = False
        while not done:
            with self._writing() as txn:
                if first:
                    txn.drop(self._extents, delete=False)
                    txn.drop(self._segments, delete=False)
                    txn.drop(self._staged_db, delete=False)
                    txn.drop(self._covers_db, delete=False)
                    first = False
                done = loading.put_sorted(txn.cursor(db=self._extents), it, batch, live)
        with self._writing() as txn:
            for info in segments:
                info.live_blocks = live.get(info.seq, 0)
                txn.put(_KEY.pack(info.seq), info.pack(), db=self._segments)
            for k, v in meta.items():
                txn.put(k.encode(), v, db=self._meta)

    def overlay(self, seq: int, records: Iterable[Record]) -> None:
        """Lay one segment's records over the map, holes included: DATA as
        extents of `seq`, ZERO and TRIM as extents of seq 0.  Used on a
        scratch map that starts empty, it ends up holding exactly the
        ranges the segments touched, as the live map has them (a delta
        checkpoint).  Segment rows and live counts are left alone."""
        records = records if isinstance(records, list) else list(records)
        if self._singles and all(r.nblocks == 1 or r.kind == RESIZE or not r.nblocks
                                 for r in records):
            # Every entry so far and every record here one block long: laying
            # one over is replacing the entry of its block, in one putmulti.
            with self._writing() as txn:
                loading.overlay_singles(txn.cursor(db=self._extents), seq, records)
            return
        self._singles = False
        with self._writing() as txn:
            loading.overlay_records(txn, txn.cursor(db=self._extents), self._extents,
                                    self.block_size, seq, records)



class MapSnapshot:
    """The map as of one moment (an LMDB read transaction, kept inside this
    module)."""

    def __init__(self, bm: BlockMap, txn):
        self._bm = bm
        self._txn = txn

    def meta(self, name: str, default: int = 0) -> int:
        raw = self._txn.get(name.encode(), db=self._bm._meta)
        return default if raw is None else int(bytes(raw))

    def extents(self) -> Iterator[Extent]:
        """The extents with the staged writes laid over, as of this moment."""
        return self._bm._overlaid(self._txn)

    def segments(self) -> list[SegmentInfo]:
        """The rows as of this moment, their live blocks as the rows count
        them (staged writes not added: a checkpoint keeps no live counts,
        and adding them means decoding every staged segment)."""
        return [SegmentInfo.unpack(_KEY.unpack(k)[0], v)
                for k, v in self._txn.cursor(db=self._bm._segments)]

    def close(self) -> None:
        self._txn.abort()

    def __enter__(self) -> "MapSnapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _with_staged(info: SegmentInfo, counts: dict[int, int]) -> SegmentInfo:
    """A row with its newest staged writes counted live."""
    if counts.get(info.seq):
        info.live_blocks += counts[info.seq]
    return info


def _covers_of(lists: list) -> list[tuple]:
    """(seq, starts, ends) of the blocks each segment of a batch writes,
    trims or zeroes (lsbd.map.staged.cover_ranges), in seq order."""
    out = []
    for info, records in lists:
        if isinstance(records, OneBlockWrites):
            starts = staged._np().asarray(records.lbas, dtype="u8")
            ends = starts + 1
        else:
            ranges = [(r.lba, r.lba + r.nblocks) for r in records
                      if r.kind != RESIZE and r.nblocks]
            starts = [a for a, _b in ranges]
            ends = [b for _a, b in ranges]
        out.append((info.seq, *staged.cover_ranges(starts, ends)))
    return out


def _single_writes(records: list[Record] | OneBlockWrites) -> bool:
    """Whether every record is a one-block DATA record (random 4 KiB writes)."""
    return isinstance(records, OneBlockWrites) or \
        all(r.kind == DATA and r.nblocks == 1 for r in records)


def _newest_pairs(seq: int, records: list[Record] | OneBlockWrites) -> Iterable[tuple[int, int]]:
    """(lba, seq << _OFF_BITS | file offset) of each one-block write, in
    record order (a dict made of them keeps each block's last write)."""
    top = seq << _OFF_BITS
    if isinstance(records, OneBlockWrites):
        return zip(records.lbas, [top | off for off in records.offsets])
    return ((r.lba, top | r.data_offset) for r in records)
