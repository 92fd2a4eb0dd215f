"""Sealing: close the open segment, then, on the sealer's thread, sync it,
record it in the map in one transaction and hand it to the uploader, in seq
order.  Until the map has a sealed segment, reads find its blocks through
its in-memory index.  Flushes live here too: they sync the journals, or
wait for the store."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading

from lsbd import fileio

from lsbd.engine.state import VolumeState
from lsbd.errors import StoreError
from lsbd.format.segment import encode_trailer, masked_crc
from lsbd.map.blockmap import PENDING, STORED
from lsbd.segments.journal import OpenSegment
from lsbd.segments.sortseal import (
    SORT_SUFFIX,
    looks_random,
    sort_plan,
    sorted_blocks,
    write_sorted,
)
from lsbd.segments.remote import segment_info

log = logging.getLogger(__name__)

MAX_SEALING = 4               # sealed segments waiting for the sealer before writers wait
STORE_FLUSH_TIMEOUT = 120.0   # a flush in 'store' mode gives up (EIO) after this
MAP_ROOM_RETRY = 0.25
#: A full segment waits for the sort of the one before it until it is this
#: many times its size; then it seals and that one keeps its layout.
SORT_WAIT_GROWTH = 2         # seconds between tries of a map commit that found the disk full


class Sealer:
    def __init__(self, st: VolumeState):
        self.st = st
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.abandoned = False   # stop without handling the rest (a crash)

    # -- on the writers' side, under the lock ---------------------------------

    def seal(self) -> None:
        """Seal the open segment (under the lock): write its index and queue
        it for the sealer thread."""
        st = self.st
        seg = st.open
        if seg is None:
            return
        if seg.empty:
            st.files.drop_file(seg.seq)   # the next segment reuses its name
            seg.discard()
            st.open = None
            return
        # Its trailer names the one before as it is now: a sort of that one
        # not done yet is called off (_sort below).  Never waited for here:
        # a caller may hold what the sealer needs to get there.
        st.sorting = 0
        seg.seal(st.size, st.prev_crc)
        st.open = None
        st.seal_when_sorted = False
        st.prev_crc = seg.trailer_crc
        st.stats["segments_sealed"] += 1
        if self.thread is None:      # opening (journal replay): no sealer yet
            seg.finish()
            self.apply_sealed(seg.seq, seg.trailer, seg.records, state=PENDING)
            return
        st.sealing.append(seg)
        if st.files.keys is None and st.config.sort_at_seal and not seg.ranges \
                and looks_random(seg.records):
            st.sorting = seg.seq     # the next seal waits for its sort
        st.sealing_changed.notify_all()

    def seal_full(self) -> None:
        """Seal the open segment, which is full (under the lock), then wait
        while the sealer is far behind (back-pressure)."""
        st = self.st
        if st.sorting:
            seg = st.open
            if seg is not None and seg.end < SORT_WAIT_GROWTH * st.config.segment_size:
                # Its trailer waits for the sort of the one before (seal):
                # the sealer seals it then, so that no writer (perhaps on a
                # front end's event loop) waits; it grows meanwhile.
                st.seal_when_sorted = True
                return
            st.sorting = 0     # the sealer is too far behind: that one keeps its layout
        self.seal()
        while len(st.sealing) > MAX_SEALING and st.failed is None and not self.stopping:
            st.sealing_changed.wait()

    def behind(self) -> bool:
        """Whether a write that must not wait would meet back-pressure."""
        return len(self.st.sealing) >= MAX_SEALING

    def seal_and_wait(self) -> int:
        """Seal the open segment and wait until the map has it; returns the
        newest seq (the one every write so far is in)."""
        st = self.st
        with st.lock:
            self.seal()
            target = st.sealing[-1].seq if st.sealing else st.applied
            while st.applied < target and st.failed is None and not self.stopping:
                st.sealing_changed.wait()
        st.check_not_failed()
        if st.applied < target:
            raise StoreError(f"volume {st.name} is closing")
        return target

    # -- the sealer thread ----------------------------------------------------

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name=f"lsbd-{self.st.name}-sealer",
                                       daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        st = self.st
        while True:
            with st.lock:
                while not st.sealing and not self.stopping and st.failed is None:
                    st.sealing_changed.wait()
                if not st.sealing or st.failed is not None or self.abandoned:
                    return
                seg = st.sealing[0]
            try:
                seg.finish()
                self._sort(seg)
                if not self._apply_when_room(seg):
                    return
            except BaseException as e:  # noqa: BLE001 - a failing disk: stop taking writes
                log.error("volume %s: sealing segment %d failed: %s", st.name, seg.seq, e)
                with st.lock:
                    st.fail(e)
                return
            with st.lock:
                st.sealing.pop(0)
                st.applied = seg.seq
                st.sealing_changed.notify_all()
            if st.uploader is not None:
                st.uploader.submit(seg.seq)

    def _sort(self, seg: OpenSegment) -> None:
        """Lay a sealed segment of random writes out again in block order
        (lsbd.segments.sortseal), before the map names it, if seal() chose
        it and it gains from it.  The next segment's trailer names this
        one's, which the new layout changes: once full, it waits to seal
        until this is done (seal_full above); any other seal (a flush, a
        checkpoint, the timer), or one that has grown to twice its size,
        goes ahead and this one keeps its layout.  Not on an encrypted cache
        dir (each file would be encrypted again)."""
        st = self.st
        if st.sorting != seg.seq:
            return
        try:
            keep = sort_plan(seg.records)
            if keep is not None and not self.abandoned:
                self._sort_locked_out(seg, keep)
        finally:
            with st.lock:
                if st.sorting == seg.seq:
                    st.sorting = 0
                if st.seal_when_sorted:
                    st.seal_when_sorted = False
                    if st.failed is None and not self.stopping:
                        self.seal()
                st.sealing_changed.notify_all()

    def _sort_locked_out(self, seg: OpenSegment, keep: list[int]) -> None:
        """_sort, while the next segment waits to seal."""
        st = self.st
        assert seg.trailer is not None
        path = st.files.path(seg.seq)
        tmp = path + SORT_SUFFIX
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                trailer, records, raw = write_sorted(fd, tmp, seg.records, keep, seg.trailer,
                                                     st.block_size)
            finally:
                os.close(fd)
            blocks = sorted_blocks(seg.blocks, seg.records, records, keep, st.block_size)
        except (OSError, ValueError) as e:
            # The segment as sealed is whole and valid: only slower to read.
            log.warning("volume %s: segment %d keeps its layout: %s", st.name, seg.seq, e)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return
        with st.lock:
            if st.sorting != seg.seq or st.prev_crc != seg.trailer_crc or self.abandoned:
                os.unlink(tmp)        # a later segment names this one's trailer as sealed
                return
            os.replace(tmp, path)
            # From here the file is the new layout, whatever follows: readers
            # that planned against the old one read it again (Reader).
            st.files.drop_file(seg.seq)
            seg.blocks = blocks
            seg.records = records
            seg.trailer = trailer
            seg.trailer_crc = st.prev_crc = masked_crc(raw)
            st.stats["segments_sorted"] += 1
            # Durable before the next segment can seal naming it (under the lock).
            fileio.fsync_dir(os.path.dirname(path))

    def _apply_when_room(self, seg: OpenSegment) -> bool:
        """Record a sealed segment in the map.  A full disk is no failure of
        the disk: the map's commit finds no room only while something else
        holds it for a moment (a sealing scratch file, a checkpoint's scratch
        map, an old read snapshot), so wait for room and try again, as long
        as the volume is not stopping.  False: the map is closed."""
        st = self.st
        warned = False
        while True:
            try:
                with st.map_guard:
                    if st.map_closed:
                        return False
                    self.apply_sealed(seg.seq, seg.trailer, seg.records, state=PENDING,
                                      advance=False)
                return True
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT) or self.stopping \
                        or self.abandoned:
                    raise
                if not warned:
                    log.warning("volume %s: segment %d waits for room on the cache dir's "
                                "disk to enter the map: %s", st.name, seg.seq, e)
                    warned = True
            with st.lock:
                st.sealing_changed.wait(MAP_ROOM_RETRY)

    def stop(self, drain: bool = True) -> None:
        """Stop the sealer; drain: after it has handled every sealed segment."""
        st = self.st
        if self.thread is None:
            return
        with st.lock:
            if not drain:
                self.abandoned = True
            self.stopping = True
            st.sealing_changed.notify_all()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=300)

    def apply_sealed(self, seq: int, trailer, records, *, state: int,
                     advance: bool = True) -> None:
        """Record a sealed segment in the map.  advance: also make it the
        newest segment (when replaying; the sealer's caller does that)."""
        st = self.st
        size = st.files.plain_size(seq)
        info = segment_info(seq, trailer, records, size, state, encode_trailer(trailer))
        emptied = st.map.apply_segment(info, records, applied_seq=str(seq).encode(),
                                       size=str(trailer.volume_size).encode(),
                                       top_crc=str(info.trailer_crc).encode(),
                                       volume_id=st.config.volume_id.encode(),
                                       store_url=st.store.url.encode())
        # Nothing reads a segment without live blocks (short of a restore of
        # the past): its cached pages are better spent on new writes.
        st.files.drop_page_cache(emptied)
        if advance:
            st.applied = seq
            st.size = trailer.volume_size
            st.prev_crc = info.trailer_crc

    def on_stored(self, seq: int) -> None:
        """The uploader's report: segment `seq` is in the store."""
        st = self.st
        # Called from upload threads, which may outlive a close: never touch a
        # closed map (the next open re-checks the segment and finds it stored).
        with st.map_guard:
            if st.map_closed:
                return
            st.map.set_segment_state(seq, STORED)
        st.files.adopt(seq)

    # -- flushes ----------------------------------------------------------------

    def flush(self) -> None:
        st = self.st
        st.check_writable()
        if st.flush_mode == "store":
            self.flush_to_store()
            return
        with st.lock:
            journals = [*st.sealing, *([st.open] if st.open is not None else [])]
        self.sync_journals(journals)

    def sync_journals(self, journals: list[OpenSegment]) -> None:
        """Sync journal files in seq order, outside the lock (the sealer may be
        finishing some of them meanwhile: each sync is safe against that)."""
        for seg in journals:
            seg.sync()
        self.st.check_not_failed()

    def flush_to_store(self) -> int:
        """Seal and wait until everything written so far is in the store;
        returns the seq that covers it."""
        st = self.st
        target = self.seal_and_wait()
        if st.uploader is None:
            return target
        if not st.uploader.wait_durable(target, STORE_FLUSH_TIMEOUT):
            err = st.uploader.last_error
            raise StoreError(f"volume {st.name}: flush to the store timed out"
                             + (f" ({err})" if err else "") + "; the data is kept in the journal")
        return target
