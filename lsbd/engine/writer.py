"""The writer: every change to a volume (writes, batches of writes, zeroes,
trims, transactions, resizes and compaction's relocation) goes into the open
segment through one append path, `_append`, with one set of checks, one
roll-back and one failure rule: a roll-back that fails stops writes."""

from __future__ import annotations

import bisect

import errno
import logging
import os
import time
from typing import Callable

from lsbd.engine.reader import Reader
from lsbd.engine.sealer import Sealer
from lsbd.engine.state import VolumeState
from lsbd.errors import InvalidRequest, WouldBlock
from lsbd.map.blockmap import Extent
from lsbd.meta.config import too_many_blocks
from lsbd.format.segment import DATA, RESIZE, TRIM, ZERO, block_crcs, pack_masked, raw_block_crcs
from lsbd.segments.journal import OpenSegment

log = logging.getLogger(__name__)

#: Reserved past a new journal's target size: its last write overshoots it.
SEGMENT_SLACK = 1024 * 1024
#: A write that needs a new journal on a full disk waits this long for
#: uploads to make segments evictable, then fails with ENOSPC (the default of
#: `--cache-full-wait`).
FULL_DISK_WAIT = 30.0
MiB = 1024 * 1024
MAP_ROOM = 8 * 1024 * 1024    # kept free beyond a journal's reservation, for the map
#: Blocks in one ZERO or TRIM record at most: a record's length is 32 bits
#: (lsbd.format.segment), and a discard of a volume of 16 TiB or more (4 KiB
#: blocks) is longer; it becomes several records of one transaction.
MAX_RECORD_BLOCKS = 1 << 31


def _disk_size(path: str) -> int:
    """Bytes of the file system holding path, free or not."""
    fs = os.statvfs(path)
    return fs.f_blocks * fs.f_frsize


def room_needed(segment_size: int) -> int:
    """Free disk a writer's cache dir keeps for the next journal and the map."""
    return segment_size + SEGMENT_SLACK + MAP_ROOM


class Transaction:
    """Writes, zeroes and trims that commit all together or not at all."""

    def __init__(self, writer: "Writer"):
        self._writer = writer
        self.ops: list[tuple] = []

    def write(self, offset: int, data: bytes) -> None:
        self._writer.st.check_range(offset, len(data))
        if data:
            self.ops.append((DATA, offset, bytes(data)))

    def write_zeroes(self, offset: int, length: int) -> None:
        self._writer.st.check_range(offset, length, data=False)
        if length:
            self.ops.append((ZERO, offset, length))

    def trim(self, offset: int, length: int) -> None:
        self._writer.st.check_range(offset, length, data=False)
        if length:
            self.ops.append((TRIM, offset, length))

    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._writer.commit(self.ops, fua=False)


class Writer:
    def __init__(self, st: VolumeState, sealer: Sealer, reader: Reader):
        self.st = st
        self.sealer = sealer
        self.reader = reader
        self.full_wait = FULL_DISK_WAIT   # seconds a write waits for room on a full disk

    # -- the one append path ----------------------------------------------------

    def _append(self, append: Callable[[OpenSegment, tuple], None], *, writes: int,
                nbytes: int, nowait: bool = False, same_bytes: bool = False) -> OpenSegment:
        """Run append(open segment, mark) under the lock, with what every
        change needs around it: the checks, back-pressure, the roll-back of a
        failure, the counters, sealing a full segment.  Returns the segment
        appended to (call with the lock held to use it after).  same_bytes:
        append only copies of what the blocks already hold (a relocation)."""
        st = self.st
        with st.lock:
            st.check_writable()
            if nowait and self.sealer.behind():
                raise WouldBlock("the sealer is behind")
            seg = self.open_segment(nowait)
            mark = seg.mark()
            if not same_bytes:
                st.content_changes += 1   # before: a failed append may have changed some
                seg.moves_only = False
            try:
                append(seg, mark)
            except (WouldBlock, InvalidRequest):
                seg.rollback(mark)   # refused before appending: an edge block is not local
                raise
            except BaseException as e:
                try:
                    seg.rollback(mark, failed=True)
                except OSError:
                    st.fail(e)  # the journal is in an unknown state: stop writing
                raise
            stats = st.stats
            stats["writes"] += writes
            stats["bytes_written"] += nbytes
            if seg.end >= st.config.segment_size:
                self.sealer.seal_full()
            return seg

    def open_segment(self, nowait: bool = False) -> OpenSegment:
        """The open segment (under the lock); a new journal takes its
        segment's space on the disk up front.  A full disk: evict segments
        already in the store; if that is not enough, wait (the lock let go)
        for uploads to make more evictable, up to full_wait seconds, then
        fail with ENOSPC."""
        st = self.st
        deadline = None
        while st.open is None:
            seq = (st.sealing[-1].seq if st.sealing else st.applied) + 1
            need = st.config.segment_size + SEGMENT_SLACK
            try:
                st.open = OpenSegment(st.files.path(seq), volume_id=st.config.volume_id_bytes,
                                      seq=seq, block_size=st.block_size, expected_size=need,
                                      keys=st.files.keys)
                st.open.on_replaced = st.files.drop_file
                break
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
            if st.files.make_room(need + MAP_ROOM):
                continue
            if nowait:
                raise WouldBlock("the cache dir's disk is full")
            disk = _disk_size(st.folder)
            if disk < need + MAP_ROOM:      # no eviction or upload can ever make the room
                message = (f"volume {st.name}: the cache dir's disk ({disk / MiB:.1f} MiB) is "
                           f"smaller than a segment needs ({(need + MAP_ROOM) / MiB:.1f} MiB): "
                           f"use a larger disk for the cache dir, or a volume with a smaller "
                           f"--segment-size")
                log.error("%s", message)
                raise OSError(errno.ENOSPC, message)
            self.sealer.needed = True   # held relocations go on to the store, making room
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.full_wait
            elif now >= deadline or st.failed is not None or st.closed:
                message = (f"volume {st.name}: the cache dir's disk is full and nothing "
                           f"more can be evicted: {st.waiting_uploads()}; write refused "
                           f"after {self.full_wait:g}s")
                log.error("%s", message)
                raise OSError(errno.ENOSPC, message)
            st.sealing_changed.wait(0.25)   # uploads finishing make room
        return st.open

    # -- the operations -----------------------------------------------------------

    def write(self, offset: int, data: bytes, *, fua: bool = False, nowait: bool = False) -> None:
        st = self.st
        bs = st.block_size
        if len(data) == bs and not offset % bs and not fua and 0 <= offset <= st.size - bs:
            # Random writes' short path: one whole block, not FUA.
            lba = offset // bs
            ((kind, _lba, _n, data, crcs),) = self.split_zero_runs(lba, data)
            self._append(lambda seg, mark: seg.append(kind, lba, 1, data=data, crcs=crcs,
                                                      undo=None, commit=True),
                         writes=1, nbytes=bs, nowait=nowait)
            return
        st.check_range(offset, len(data))
        if data:
            self.commit([(DATA, offset, data)], fua=fua, nowait=nowait)

    def write_many(self, writes: list[tuple[int, bytes]], *, nowait: bool = False) -> None:
        """Several block-aligned writes, in order, each its own transaction (as
        if write() had been called for each), with one hold of the lock and
        one system call: what a front end does with a burst of pipelined
        small writes.  All of them are done, or (WouldBlock, any error) none."""
        bs = self.st.block_size
        size = self.st.size
        records = []
        for offset, data in writes:
            if offset % bs or len(data) % bs or not data or offset < 0 \
                    or offset + len(data) > size:
                raise InvalidRequest(f"write_many takes whole blocks inside the volume "
                                     f"(offset {offset}, length {len(data)})")
            runs = self.split_zero_runs(offset // bs, data)
            last = len(runs) - 1
            records += [(kind, lba, n, d, crcs, i == last)
                        for i, (kind, lba, n, d, crcs) in enumerate(runs)]
        self._append(lambda seg, mark: seg.append_many(records, undo=mark[2]),
                     writes=len(writes), nbytes=sum(len(d) for _o, d in writes), nowait=nowait)

    def write_zeroes(self, offset: int, length: int, *, fua: bool = False,
                     nowait: bool = False) -> None:
        self.st.check_range(offset, length, data=False)
        if length:
            self.commit([(ZERO, offset, length)], fua=fua, nowait=nowait)

    def trim(self, offset: int, length: int, *, fua: bool = False, nowait: bool = False) -> None:
        self.st.check_range(offset, length, data=False)
        if length:
            self.commit([(TRIM, offset, length)], fua=fua, nowait=nowait)

    def transaction(self) -> Transaction:
        self.st.check_writable()
        return Transaction(self)

    def commit(self, ops: list[tuple], *, fua: bool, nowait: bool = False) -> None:
        """Append the records of `ops` as one transaction (the last record
        carries the commit flag); with fua, sync before returning."""
        if nowait and fua:
            raise WouldBlock("a FUA write waits for an fsync")
        st = self.st
        bs = st.block_size
        # Block-aligned data needs nothing from the volume: its checksums are
        # computed before taking the lock, which is then held only to append.
        ready = [self.split_zero_runs(offset // bs, arg)
                 if kind == DATA and not offset % bs and not len(arg) % bs else None
                 for kind, offset, arg in ops]

        def append(seg: OpenSegment, mark: tuple) -> None:
            undo = mark[2]
            for i, (kind, offset, arg) in enumerate(ops):
                records = ready[i]
                if records is None:
                    records = self._records_for(kind, offset, arg, nowait)
                for j, (rkind, lba, n, data, crcs) in enumerate(records):
                    last = i == len(ops) - 1 and j == len(records) - 1
                    # Once the last record is appended nothing is rolled back,
                    # and a failing append changes no index: the last record
                    # needs no undo entries (a large write's are one per block).
                    seg.append(rkind, lba, n, data=data, crcs=crcs,
                               undo=None if last else undo, commit=last)

        nbytes = sum(len(a) if k == DATA else a for k, _o, a in ops)
        with st.lock:
            seg = self._append(append, writes=1, nbytes=nbytes, nowait=nowait)
            journals = [*st.sealing, *([seg] if st.open is seg else [])] if fua else None
        if journals is not None:
            if st.flush_mode == "store":
                self.sealer.flush_to_store()
            else:
                self.sealer.sync_journals(journals)

    def resize(self, new_size: int) -> None:
        st = self.st
        st.check_writable()
        if new_size % st.block_size:
            raise InvalidRequest(f"new size must be a multiple of the block size ({st.block_size})")
        if too_many_blocks(new_size, st.block_size):
            raise InvalidRequest(too_many_blocks(new_size, st.block_size))
        with st.lock:
            if new_size < st.size:
                raise InvalidRequest(f"cannot shrink volume {st.name} from {st.size} to "
                                     f"{new_size} bytes (only growing is supported)")
            if new_size == st.size:
                return

            def append(seg: OpenSegment, mark: tuple) -> None:
                seg.append(RESIZE, new_size, 0, commit=True)
                st.size = new_size

            self._append(append, writes=0, nbytes=0)
        self.sealer.flush()

    def relocate(self, extents) -> int:
        """Copy extents (in block order) to the open segment, each block only
        if the map still points where the extent says (a newer write wins).
        Blocks that follow each other become one record, so scattered small
        extents come out as one extent.  Returns bytes moved."""
        st = self.st
        loaded = [(e, st.files.read_blocks(e.seq, e.offset, e.nblocks)) for e in extents]
        return self.relocate_loaded(loaded)

    def relocate_loaded(self, loaded: list[tuple]) -> int:
        """relocate() of extents whose bytes were read already: [(extent, bytes)].
        One plan of the range they cover says which blocks still live where
        the read found them (a plan per extent cost more than the move)."""
        loaded = sorted(loaded, key=lambda x: x[0].lba)
        if not loaded:
            return 0
        return self._relocate(lambda: self._planned_records(loaded))

    def relocate_read(self, runs: list[tuple], data: bytes | memoryview,
                      planned_at: int) -> int:
        """Lay out again the sealed pieces of a read (read-directed
        defragmentation): `runs` its plan (lsbd.plans.reads), `data` the
        whole blocks it read, `planned_at` st.content_changes when it
        planned (under the lock).  If no append has changed a block since,
        the bytes are still what every block reads as: consecutive pieces
        are moved as one record of the read's own bytes, made before taking
        the lock, with no second plan of the range (that plan and its loop
        over the pieces were a fifth of a scattered read's processor time,
        docs/scale.md).  Otherwise as relocate_loaded()."""
        bs = self.st.block_size
        view = memoryview(data)
        spans: list[list] = []   # [first block, end block, first byte in data]
        pos = 0
        for lba, n, source, _off, crcs in runs:
            if source is not None and crcs is None:
                if spans and spans[-1][1] == lba:
                    spans[-1][1] = lba + n
                else:
                    spans.append([lba, lba + n, pos])
            pos += n * bs
        if not spans:
            return 0
        records: list[tuple] = []
        for lba, end, at in spans:
            records.extend(self.split_zero_runs(lba, view[at:at + (end - lba) * bs]))
        ready = records, sum(end - lba for lba, end, _at in spans) * bs

        def loaded() -> list[tuple]:
            out, at = [], 0
            for lba, n, source, off, crcs in runs:
                if source is not None and crcs is None:
                    out.append((Extent(lba, n, source, off), view[at:at + n * bs]))
                at += n * bs
            return out

        return self._relocate(lambda: ready if self.st.content_changes == planned_at
                              else self._planned_records(loaded()))

    def _relocate(self, records_of: Callable[[], tuple[list[tuple], int]]) -> int:
        """Append the records records_of() gives under the lock, as moves of
        the same bytes; the bytes moved."""
        moved = 0

        def append(seg: OpenSegment, mark: tuple) -> None:
            nonlocal moved
            records, moved = records_of()
            for j, (rkind, lba, n, data, crcs) in enumerate(records):
                seg.append(rkind, lba, n, data=data, crcs=crcs, undo=mark[2],
                           commit=(j == len(records) - 1))

        self._append(append, writes=0, nbytes=0, same_bytes=True)
        return moved

    def _planned_records(self, loaded: list[tuple]) -> tuple[list[tuple], int]:
        """Under the lock: the records that lay out the pieces the map (and
        the journals) still point to where the read found them; the rest
        was written since.  And the bytes in them."""
        bs = self.st.block_size
        starts = [e.lba for e, _data in loaded]
        runs: list[list] = []   # [first block, end block, chunks] of consecutive blocks
        moved = 0
        first, last = loaded[0][0], loaded[-1][0]
        for lba, n, source, off, crcs in self.reader.plan(first.lba,
                                                          last.lba + last.nblocks - first.lba):
            if source is None or crcs is not None:
                continue  # a hole, or rewritten since (in a journal): nothing to move
            i = bisect.bisect_right(starts, lba) - 1
            if i < 0:
                continue
            e, data = loaded[i]
            start = lba - e.lba
            if source != e.seq or start >= e.nblocks or off != e.offset + start * bs:
                continue  # rewritten since: nothing to move
            n = min(n, e.nblocks - start)
            chunk = data[start * bs:(start + n) * bs]
            if runs and runs[-1][1] == lba:
                runs[-1][1] = lba + n
                runs[-1][2].append(chunk)
            else:
                runs.append([lba, lba + n, [chunk]])
            moved += n * bs
        return self._run_records(runs), moved

    def _run_records(self, runs: list[list]) -> list[tuple]:
        records = []
        for lba, _end, chunks in runs:
            records.extend(self.split_zero_runs(lba, b"".join(chunks)))
        return records

    # -- records ------------------------------------------------------------------

    def _records_for(self, kind: int, offset: int, arg, nowait: bool = False) -> list[tuple]:
        """The records for one operation: (kind, lba, nblocks, data, crcs)."""
        bs = self.st.block_size
        length = len(arg) if kind == DATA else arg
        end = offset + length
        first, last = offset // bs, -(-end // bs)
        head, tail = offset - first * bs, last * bs - end
        if kind != DATA:
            # Whole blocks become one ZERO/TRIM record; partial edge blocks are
            # rewritten with zeros in them (read-modify-write).
            lo = first + (1 if head else 0)
            hi = last - (1 if tail else 0)
            out: list[tuple] = []
            if first == last - 1 and (head or tail):
                return self._records_for(DATA, offset, bytes(length), nowait)
            if head:
                out += self._records_for(DATA, offset, bytes(bs - head), nowait)
            for start in range(lo, hi, MAX_RECORD_BLOCKS):
                out.append((kind, start, min(hi - start, MAX_RECORD_BLOCKS), None, b""))
            if tail:
                out += self._records_for(DATA, hi * bs, bytes(bs - tail), nowait)
            return out
        data = arg
        if head or tail:
            buf = bytearray()
            if head:
                buf += self.reader.read_locked(first, 1, nowait)[:head]
            buf += data
            if tail:
                buf += self.reader.read_locked(last - 1, 1, nowait)[bs - tail:]
            data = bytes(buf)
        return self.split_zero_runs(first, data)

    def split_zero_runs(self, lba: int, data: bytes) -> list[tuple]:
        """DATA records for the non-zero runs, ZERO records for all-zero blocks."""
        st = self.st
        bs = st.block_size
        n = len(data) // bs
        if n == 1:
            if data == st.zero_block:
                return [(ZERO, lba, 1, None, b"")]
            return [(DATA, lba, 1, data, block_crcs(data, bs))]
        # Every block's CRC is needed anyway, and an all-zero block has a
        # known one: only blocks with that CRC are compared with zeros.
        crcs = raw_block_crcs(data, bs)
        zero_crc = st.zero_crc
        if zero_crc not in crcs:
            return [(DATA, lba, n, data, pack_masked(crcs))]
        view = memoryview(data)
        zero = st.zero_block
        out: list[tuple] = []
        run_start = 0
        run_zero: bool | None = crcs[0] == zero_crc and view[0:bs] == zero
        for i in range(1, n + 1):
            is_zero = None if i == n else (crcs[i] == zero_crc and view[i * bs:(i + 1) * bs] == zero)
            if is_zero != run_zero:
                if run_zero:
                    out.append((ZERO, lba + run_start, i - run_start, None, b""))
                else:
                    out.append((DATA, lba + run_start, i - run_start,
                                view[run_start * bs:i * bs], pack_masked(crcs[run_start:i])))
                run_start, run_zero = i, is_zero
        return out
