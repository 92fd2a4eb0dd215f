"""Sealing: close the open segment, then, on the sealer's thread, sync it,
record it in the map in one transaction and hand it to the uploader, in seq
order.  Until the map has a sealed segment, reads find its blocks through
its in-memory index.  Flushes live here too: they sync the journals, or
wait for the store."""

from __future__ import annotations

import errno
import logging
import threading
import time
from typing import Callable

from lsbd.engine.state import VolumeState
from lsbd.errors import StoreError
from lsbd.format.segment import encode_trailer
from lsbd.map.blockmap import PENDING, STORED
from lsbd.segments.journal import OpenSegment
from lsbd.segments.remote import segment_info

log = logging.getLogger(__name__)

MAX_SEALING = 4               # sealed segments waiting for the sealer before writers wait
#: Sealed segments that only move bytes (read-directed defragmentation's)
#: wait, unsynced, unmapped and not uploaded, while reads stream, up to
#: this many bytes and this long: syncing, uploading and mapping them
#: (their disk writes above all) took a quarter of a first pass over a
#: fragmented range (docs/scale.md).  Anything that waits for the sealer
#: ends the hold at once.
HOLD_BYTES = 1 << 30
HOLD_SECONDS = 30.0
#: Seconds between looks while holding.  A poll, not a wait on an event:
#: what ends a hold on its own is time (the reads' pause, HOLD_SECONDS),
#: which nothing signals, while everything that waits for the sealer
#: (seal_and_wait, stop, a new seal) notifies it at once; a hold ending up
#: to 50 ms after reads paused for STREAM_GAP delays no one, and 20 looks
#: a second under the lock cost microseconds.
HOLD_CHECK = 0.05
STORE_FLUSH_TIMEOUT = 120.0   # a flush in 'store' mode gives up (EIO) after this
MAP_ROOM_RETRY = 0.25         # seconds between tries of a map commit that found the disk full


class Sealer:
    def __init__(self, st: VolumeState):
        self.st = st
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.abandoned = False   # stop without handling the rest (a crash)
        #: () -> whether reads are streaming now (read-directed
        #: defragmentation's offers); None: sealed segments never wait
        self.reads_streaming: Callable[[], bool] | None = None
        #: callers waiting for the sealer (seal_and_wait), under the lock
        self.waiters = 0
        #: set by a writer short of disk: held segments go on (uploads make room)
        self.needed = False

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
        seg.seal(st.size, st.prev_crc)
        st.open = None
        st.prev_crc = seg.trailer_crc
        st.stats["segments_sealed"] += 1
        if self.thread is None:      # opening (journal replay): no sealer yet
            seg.finish()
            self.apply_sealed(seg.seq, seg.trailer, seg.records, state=PENDING)
            return
        st.sealing.append(seg)
        st.sealing_changed.notify_all()

    def seal_full(self) -> None:
        """Seal the open segment, which is full (under the lock), then wait
        while the sealer is far behind (back-pressure)."""
        st = self.st
        self.seal()
        while len(st.sealing) > MAX_SEALING and st.failed is None and not self.stopping \
                and not self.holding():
            st.sealing_changed.wait()

    def behind(self) -> bool:
        """Whether a write that must not wait would meet back-pressure."""
        return len(self.st.sealing) >= MAX_SEALING and not self.holding()

    def holding(self) -> bool:
        """Whether the sealed segments wait (under the lock): all of them
        only move bytes, reads stream, nothing waits for the sealer, and
        they are within HOLD_BYTES and HOLD_SECONDS.  Held, they are still
        read through their in-memory indexes, and a flush syncs them as any
        journal: what a crash can lose of them is only moves, and the map
        never points into a segment before it is synced."""
        st = self.st
        sealing = st.sealing
        if not sealing or self.waiters or self.needed or self.stopping \
                or self.reads_streaming is None:
            return False
        if time.monotonic() - sealing[0].sealed_at > HOLD_SECONDS \
                or sum(seg.end for seg in sealing) > HOLD_BYTES:
            return False
        return all(seg.moves_only for seg in sealing) and self.reads_streaming()

    def seal_and_wait(self) -> int:
        """Seal the open segment and wait until the map has it; returns the
        newest seq (the one every write so far is in)."""
        st = self.st
        with st.lock:
            self.seal()
            target = st.sealing[-1].seq if st.sealing else st.applied
            self.waiters += 1
            st.sealing_changed.notify_all()     # a held segment goes on now
            try:
                while st.applied < target and st.failed is None and not self.stopping:
                    st.sealing_changed.wait()
            finally:
                self.waiters -= 1
        st.check_not_failed()
        if st.applied < target:
            raise StoreError(f"volume {st.name} is closing")
        return target

    # -- the sealer thread ----------------------------------------------------

    def start(self) -> None:
        # The map takes sealed segments in a process of its own, off this
        # one's GIL (lsbd.map.offload); replay at opening stays in-process.
        self.st.map.offload_writes()
        self.thread = threading.Thread(target=self._loop, name=f"lsbd-{self.st.name}-sealer",
                                       daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        st = self.st
        while True:
            with st.lock:
                while not self.stopping and st.failed is None:
                    if not st.sealing:
                        self.needed = False
                        st.sealing_changed.wait()
                    elif self.holding():
                        st.sealing_changed.wait(HOLD_CHECK)
                    else:
                        break
                if st.failed is not None or self.abandoned:
                    return
                if not st.sealing:
                    break       # stopping, every sealed segment in the map
                seg = st.sealing[0]
            try:
                seg.finish()
                wall, cpu = time.perf_counter(), time.thread_time()
                child = st.map.offload_cpu_seconds
                if not self._apply_when_room(seg):
                    return
                # What the map costs per segment (`lsbd stats`; bench/scale_bench.py
                # shows it by map size), this thread's CPU and the map
                # process's: only this thread writes these.
                st.stats["segments_mapped"] += 1
                st.stats["map_seconds"] += time.perf_counter() - wall
                st.stats["map_cpu_seconds"] += time.thread_time() - cpu \
                    + st.map.offload_cpu_seconds - child
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
        self._merge_staged()

    def _merge_staged(self) -> None:
        """At a clean close, merge the map's staged segments into its
        extents (lsbd.map.staged): a map closed cleanly holds none.  Here,
        on the thread the map's process belongs to."""
        st = self.st
        try:
            with st.map_guard:
                if not st.map_closed:
                    st.map.merge_all()
        except Exception as e:  # noqa: BLE001 - staged segments are read as they are
            log.warning("volume %s: the map's staged segments stay staged (%s); they are "
                        "merged later", st.name, e)

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
        finishing some of them meanwhile: each sync is safe against that).
        A sync that fails stops writes, as in the sealer: the journal can
        never be made durable (OpenSegment.sync)."""
        st = self.st
        for seg in journals:
            try:
                seg.sync()
            except OSError as e:
                with st.lock:
                    if st.failed is None and not st.closed:
                        log.error("volume %s: syncing journal %d failed: %s", st.name,
                                  seg.seq, e)
                        st.fail(e)
                raise
        st.check_not_failed()

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
