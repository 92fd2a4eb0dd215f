"""Reads and allocation queries: plan under the lock (the map, then the
journals it lacks yet), then read the blocks without it, from the open and
sealing journals, the local copies, or the store."""

from __future__ import annotations

import functools
import threading
from typing import Callable

from lsbd.engine.api import MAX_REQUEST, Allocation
from lsbd.engine.readahead import ReadAhead
from lsbd.engine.readdefrag import ReadDefrag, scattered
from lsbd.engine.state import VolumeState
from lsbd.errors import CorruptionError, WouldBlock
from lsbd.plans.reads import plan_reads
from lsbd.map.blockmap import SegmentInfo
from lsbd.segments.checks import check_open_blocks
from lsbd.segments.scrub import verify_segments


#: Segments fetched ahead, in seq order, of one fetched whole for a reader
#: (lsbd.segments.fetch says when) or read ahead: data written together is
#: read together, so a reader on a cold cache that reads a segment fetched
#: whole will likely want the next ones.  The first read of each segment
#: fetched so moves the window on; one-off scattered reads start nothing.
#: At most a quarter of the cache limit, so fetches ahead never push out
#: segments not read yet.  (8 measured no faster than 4 in a cold read of a
#: tree against a store 10 ms away: there the reader waited on the writes of
#: fetched segments into the cache dir, not on the store; docs/distant.md.)
SEGMENTS_AHEAD = 4
#: Reads of this many runs or more read their sealed pieces together
#: (SegmentFiles.read_batch: one call per span of nearby pieces, and the
#: disk given every cold one at once).
BATCH_FROM = 4
#: Reads longer than STITCHED_FROM from a volume whose store is a local
#: directory that run at once, at most: such a read is processor work (its
#: plan, then up to hundreds of pieces read and checked), and its disk
#: waits are handed to the kernel all together (SegmentFiles.read_batch), so
#: more of them at once than the machine's two cores only hand the GIL from
#: thread to thread at every system call.  After random writes, 16 at once
#: (fio at iodepth 16) spent half their time in the kernel switching
#: threads, and starved read-directed defragmentation (docs/scale.md,
#: "Twelfth round").  A distant store's reads wait on the network, so
#: there every read runs at once.
STITCHED_AT_ONCE = 2
STITCHED_FROM = 16 * 1024


def segments_ahead(cache_limit: int, segment_size: int) -> int:
    """How many segments to fetch ahead of a reader (SEGMENTS_AHEAD, fewer
    for a small cache); at least one."""
    return max(1, min(SEGMENTS_AHEAD, cache_limit // (4 * segment_size)))


class Reader:
    def __init__(self, st: VolumeState):
        self.st = st
        self._readahead = ReadAhead()
        self._stitching = threading.BoundedSemaphore(STITCHED_AT_ONCE)
        #: a writer's read-directed defragmenter (lsbd.engine.readdefrag), or None
        self.read_defrag: ReadDefrag | None = None

    def read(self, offset: int, length: int, *, nowait: bool = False) -> bytes:
        st = self.st
        bs = st.block_size
        if st.files.on_stream is None:   # the cache dir's files may be new since open
            st.files.on_stream = self._fetch_after
        sequential, ahead = self._readahead.note(offset, length)
        if ahead is not None and not st.files.store_is_local:   # nothing to fetch from it
            self.prefetch(*ahead, wait=False, mark=True)
        if length == bs and not offset % bs and 0 <= offset <= st.size - bs:
            data = self._read_one_block(offset // bs, nowait, sequential)
            if data is not None:
                return data
        st.check_range(offset, length)
        if length == 0:
            return b""
        first = offset // bs
        last = -(-(offset + length) // bs)
        gated = length >= STITCHED_FROM and st.files.store_is_local
        if gated and not self._stitching.acquire(blocking=not nowait):
            raise WouldBlock("other long reads are running")   # the caller waits on its pool
        try:
            with st.lock:
                st.check_open()
                runs = self.plan(first, last - first)
                planned_at = st.content_changes
            data = self.read_runs(runs, nowait, sequential)
        finally:
            if gated:
                self._stitching.release()
        # Only once this session has written: a session that only reads (a
        # file system mounted read-only, a copy out after a disaster) leaves
        # the volume as it found it, and uploads nothing.
        if self.read_defrag is not None and st.stats["writes"] and scattered(runs, bs):
            self._offer_defrag(runs, data, planned_at)
        st.stats["reads"] += 1
        st.stats["bytes_read"] += length
        start = offset - first * bs
        return data[start:start + length] if (start or len(data) != length) else data

    def _offer_defrag(self, runs: list[tuple], data: bytes, planned_at: int) -> None:
        """Hand a scattered read to the read-directed defragmenter: its plan,
        the bytes it read and when it planned (VolumeState.content_changes).
        Its pieces are sorted out on the defragmenter's thread."""
        assert self.read_defrag is not None
        self.read_defrag.offer(runs, data, planned_at)

    def close_defrag(self) -> None:
        """Stop read-directed defragmentation (before the last seal: it
        appends to the open segment)."""
        if self.read_defrag is not None:
            self.read_defrag.close()
            self.read_defrag = None

    def prefetch(self, offset: int, length: int, *, wait: bool = True,
                 mark: bool = False) -> None:
        """Bring the segments holding [offset, offset+length) into the local
        cache (NBD_CMD_CACHE, read-ahead); wait: until they are there.
        mark: read-ahead, whose segments fetch the next ones when first read."""
        st = self.st
        bs = st.block_size
        first = max(0, offset) // bs
        last = min(-(-(offset + length) // bs), st.size // bs)
        if last <= first:
            return
        with st.lock:
            if st.closed:
                return
            seqs = {e.seq for e in st.map.lookup(first, last - first)}
        futures = [f for f in (st.files.prefetch(s, mark=mark) for s in sorted(seqs))
                   if f is not None]
        if wait:
            for f in futures:
                f.result()

    def warm_up(self) -> None:
        """A cache dir just rebuilt from the store holds no data, and the
        first reader of a block device reads its start (a partition table, a
        file system's superblock and first group): fetch the segments
        holding the volume's first READ_AHEAD bytes now, while the front end
        starts, as read-ahead (reading them fetches the next ones: fetched
        as a guess that starts nothing, the fetches then waited for the
        reads to ask, and segments read last were fetched last).  At most
        segments_ahead() of them, those holding the lowest blocks first."""
        st = self.st
        if st.files.store_is_local:    # nothing to fetch whole
            return
        limit = segments_ahead(st.files.cache_limit, st.config.segment_size)
        with st.lock:
            seqs: list[int] = []
            for e in st.map.lookup(0, min(self._readahead.window, st.size) // st.block_size):
                if e.seq not in seqs:
                    seqs.append(e.seq)
                    if len(seqs) == limit:
                        break
        for seq in seqs:
            st.files.prefetch(seq, mark=True)

    def _fetch_after(self, seq: int) -> None:
        """A read first reached segment `seq`, fetched whole: fetch the next
        SEGMENTS_AHEAD segments the map uses."""
        st = self.st
        ahead = segments_ahead(st.files.cache_limit, st.config.segment_size)
        with st.lock:
            if st.closed:
                return
            top = st.applied
            nxt = [s for s in range(seq + 1, min(seq + 1 + 2 * ahead, top + 1))
                   if st.map.segment(s) is not None][:ahead]
        for s in nxt:
            st.files.prefetch(s, mark=True)

    def _read_one_block(self, lba: int, nowait: bool, sequential: bool = False) -> bytes | None:
        """Random reads' short path: one whole block with no journal to look
        at is found through the map alone.  None: take the general path."""
        st = self.st
        with st.lock:
            seg = st.open
            if st.sealing or st.closed or (seg is not None and seg.has_overlay):
                return None
            where = st.map.lookup_block(lba)
        data = st.zero_block if where is None else \
            st.files.read_blocks(where[0], where[1], 1, nowait=nowait, sequential=sequential)
        stats = st.stats
        stats["reads"] += 1
        stats["bytes_read"] += len(data)
        return data

    def allocation(self, offset: int, length: int) -> list[Allocation]:
        st = self.st
        st.check_range(offset, length, data=False)
        if length == 0:
            return []
        bs = st.block_size
        first = offset // bs
        last = -(-(offset + length) // bs)
        step = MAX_REQUEST // bs  # bounded work per lock hold, whatever the length
        runs: list[tuple] = []
        for start in range(first, last, step):
            with st.lock:
                runs.extend(self.plan(start, min(step, last - start)))
        out: list[Allocation] = []
        for lba, n, source, _off, _crcs in runs:
            start = max(offset, lba * bs)
            end = min(offset + length, (lba + n) * bs)
            allocated = source is not None
            if out and out[-1].allocated == allocated and out[-1].offset + out[-1].length == start:
                prev = out.pop()
                out.append(Allocation(prev.offset, end - prev.offset, allocated))
            else:
                out.append(Allocation(start, end - start, allocated))
        return out

    def plan(self, first: int, n: int) -> list[tuple]:
        """Under the lock: where to read blocks [first, first+n) from (see
        lsbd.plans.reads): the map, then the journals it lacks yet."""
        st = self.st
        seg = st.open
        return plan_reads(st.map.lookup(first, n), first, n, st.sealing,
                          seg if seg is not None and seg.has_overlay else None, st.block_size)

    def read_runs(self, runs: list[tuple], nowait: bool = False,
                  sequential: bool = False) -> bytes:
        if len(runs) == 1:
            return self._read_run(runs[0], nowait, sequential)
        files = self.st.files
        groups: dict[int, list[tuple[int, int]]] = {}   # sealed pieces by segment
        for _lba, n, source, off, crcs in runs:
            if source is not None and crcs is None:
                pieces = groups.get(source)
                if pieces is None:
                    pieces = groups[source] = []
                pieces.append((off, n))
        remote = [seq for seq in groups if not files.is_local(seq)]
        if remote:
            if nowait:
                # Refuse before reading anything, not after reading the local part.
                raise WouldBlock("some blocks are not cached locally")
            if not files.store_is_local and sum(len(groups[seq]) for seq in remote) > 1:
                # several pieces from a distant store: in parallel, each
                # asking whether its segment is to be fetched whole
                return b"".join(files.fetcher.map_reads(
                    [functools.partial(self._read_run, r, False, sequential) for r in runs]))
        if remote and files.store_is_local:
            got = self._read_batches(groups, remote, len(runs) >= BATCH_FROM, sequential)
        elif len(runs) >= BATCH_FROM:
            got = files.read_batch(groups, nowait=nowait, sequential=sequential)
        else:
            got = {}
        parts = []
        for r in runs:
            data = got.get((r[2], r[3])) if r[4] is None else None
            parts.append(data if data is not None else self._read_run(r, nowait, sequential))
        return b"".join(parts)

    def _read_batches(self, groups: dict[int, list[tuple[int, int]]], remote: list[int],
                      local_batch: bool, sequential: bool) -> dict:
        """The sealed pieces of a read some of whose segments are in a store
        that is a local directory (nothing to fetch whole): the store's
        segments named to it first (the disk reads them all while the rest
        is read), the local segments' pieces together (read_batch), and
        each store segment's pieces a span at a time.  Which pieces are
        not in the result, the caller reads one by one.  All in this thread,
        one after the other: on the read pool, the hand-offs between threads
        cost more processor time than the waits they overlapped
        (docs/scale.md, "Twelfth round")."""
        files = self.st.files
        away = set(remote)
        here = {seq: pieces for seq, pieces in groups.items() if seq not in away}
        got: dict = {}
        stored = {seq: groups[seq] for seq in remote}
        files.name_stored(stored)       # the disk starts on them while the rest is read
        if here and local_batch:
            got.update(files.read_batch(here, sequential=sequential))
        got.update(files.read_stored(stored))
        return got

    def _read_run(self, run: tuple, nowait: bool, sequential: bool) -> bytes:
        st = self.st
        _lba, n, source, off, crcs = run
        if source is None:
            return bytes(n * st.block_size) if n > 1 else st.zero_block
        if crcs is not None:
            return self._read_journal(source, off, n, crcs, nowait)
        return st.files.read_blocks(source, off, n, nowait=nowait, sequential=sequential)

    def _read_journal(self, seq: int, offset: int, n: int, crcs: list[int],
                      nowait: bool) -> bytes:
        """Blocks of a journal (the open segment, or one sealed but not yet in
        the map), checked against the CRCs of its in-memory index."""
        st = self.st
        for attempt in (1, 2):
            data = st.files.read_journal(seq, offset, n * st.block_size, nowait=nowait)
            if data is None:  # sealed, uploaded and evicted meanwhile
                return st.files.read_blocks(seq, offset, n, nowait=nowait)
            try:
                check_open_blocks(data, crcs, st.block_size, where=st.lineage.segment_key(seq),
                                  offset=offset)
                return data
            except CorruptionError:
                if attempt == 2:
                    raise
                # A descriptor opened just before a new file took the name (an
                # encrypted journal given a new key): read the file now there.
                st.files.drop_file(seq)
        raise AssertionError("unreachable")

    def read_locked(self, lba: int, n: int, nowait: bool = False) -> bytes:
        """Whole blocks, under the lock (a read-modify-write's edge blocks)."""
        return self.read_runs(self.plan(lba, n), nowait)

    def extents_in_use(self) -> list[int]:
        """The seqs the map refers to, in order."""
        with self.st.lock:
            return sorted({e.seq for e in self.st.map.iter_extents()})


class ReadFace:
    """The read side of the BlockDevice API and the map's views, shared by
    Volume and PastVolume (each has `_st` and `_reader`)."""

    _st: VolumeState
    _reader: Reader

    @property
    def size(self) -> int:
        return self._st.size

    @property
    def applied_seq(self) -> int:
        return self._st.applied

    @property
    def long_reads_in_turn(self) -> bool:
        """A long read here is processor work, not a wait: the store is a
        local directory (see STITCHED_AT_ONCE).  A front end does best to
        run one client's long reads one after another on one thread; two
        at once only trade the GIL.  False: they wait on a distant store,
        and should overlap."""
        return self._st.files.store_is_local

    def read(self, offset: int, length: int, *, nowait: bool = False) -> bytes:
        return self._reader.read(offset, length, nowait=nowait)

    def allocation(self, offset: int, length: int) -> list[Allocation]:
        return self._reader.allocation(offset, length)

    def prefetch(self, offset: int, length: int, *, wait: bool = True) -> None:
        """Bring the segments holding a range into the local cache."""
        self._reader.prefetch(offset, length, wait=wait)

    def extents(self):
        """The block map's extents (lba, nblocks, seq, offset), in block order,
        as of the last sealed segment."""
        return self._st.map.iter_extents()

    def segment_infos(self) -> list[SegmentInfo]:
        return self._st.map.segments()

    def map_extents(self, offset_blocks: int, nblocks: int):
        """The map's extents over [offset_blocks, offset_blocks+nblocks), clipped."""
        return self._st.map.lookup(offset_blocks, nblocks)

    def extents_in(self, seqs: set[int]):
        """The live extents stored in the given segments (one scan of the map)."""
        return [e for e in self.extents() if e.seq in seqs]

    def verify(self, progress: Callable[[int, int], None] | None = None) -> list[str]:
        """Read every segment the map refers to from the store (not the cache)
        and check every CRC; returns the problems found."""
        st = self._st
        return verify_segments(st.store, st.lineage, self._reader.extents_in_use(),
                               progress=progress)
