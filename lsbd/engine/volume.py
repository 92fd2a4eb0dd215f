"""Volume: an open, writable volume.  It builds the pieces around one shared
state (lsbd.engine.state) and delegates to them:

    Writer        every change, through one append path (writer.py)
    Sealer        seals, syncs, maps and hands segments to the uploader (sealer.py)
    Reader        reads and allocation queries (reader.py)
    Checkpointer  checkpoints and their pruning; Timer, the background thread
    opening       trusting or rebuilding the cache dir, journal replay (opening.py)

A read-only view of any state (Volume.open(read_only=True) or at_seq=...) is
a PastVolume (past.py), which takes no lease and starts no thread."""

from __future__ import annotations

import logging
import os
from typing import Callable

from lsbd.engine.checkpointer import Checkpointer, Timer
from lsbd.engine.control import ControlServer
from lsbd.engine.control import socket_path as control_socket_path
from lsbd.engine.opening import recover, writer_state
from lsbd.engine.past import PastVolume
from lsbd.engine.readdefrag import ReadDefrag
from lsbd.engine.reader import ReadFace, Reader
from lsbd.engine.sealer import Sealer
from lsbd.engine.state import VolumeState
from lsbd.engine.summaries import write_summary
from lsbd.engine.writer import Transaction, Writer
from lsbd.engine import report
from lsbd.errors import InvalidRequest, StoreError, UserError
from lsbd.meta.config import FLUSH_MODES, VolumeConfig, load_config
from lsbd.meta.snapshots import Snapshot, check_snapshot_name, write_snapshot
from lsbd.store import Store

log = logging.getLogger(__name__)

DEFAULT_CACHE_LIMIT = 1 << 30
CLOSE_UPLOAD_TIMEOUT = 300.0
CLOSE_STALL = 10.0            # close stops waiting once uploads have failed this long in a row
CLOSE_SILENCE = 20.0          # ... or once the store has answered nothing this long
#: A clean close writes a checkpoint only once this many segments follow the
#: last one.  Fewer are cheaper to replay (their indexes are read in
#: parallel) than a checkpoint is to write: its three PUTs would be a tenth of
#: a 400 MiB session's requests, and round trips the unmount waits for.
CLOSE_CHECKPOINT_SEGMENTS = 16


class Volume(ReadFace):
    """An open volume; see lsbd.engine.api.BlockDevice for the contract."""

    supports_nowait = True
    read_only = False

    def __init__(self, st: VolumeState):
        self._st = st
        self.store, self.config, self.name = st.store, st.config, st.name
        self.lineage, self.block_size, self.folder = st.lineage, st.block_size, st.folder
        self.flush_mode = st.flush_mode
        self.cache_root = os.path.dirname(st.folder)
        self.stats = st.stats
        self._reader = Reader(st)
        self._sealer = Sealer(st)
        self._writer = Writer(st, self._sealer, self._reader)
        self._checkpointer = Checkpointer(st, self._sealer)
        self._timer = Timer(st, self._sealer, self._checkpointer)
        self._control: ControlServer | None = None
        self._opened_at: int | None = None   # applied seq once open: a close after
        # segments stored since writes the map summary
        #: control socket operations added from above the engine: name -> fn(request)
        self.control_ops: dict[str, Callable[[dict], object]] = {}
        #: called after a resize asked on the control socket, before it is
        #: answered (a FUSE mount tells the kernel the image's new size)
        self.resize_listeners: list[Callable[[], None]] = []
        self.left_waiting: str | None = None   # set by close() when uploads are left over

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, store: Store, name: str, *, cache_root: str, read_only: bool = False,
             break_lease: bool = False, flush_mode: str | None = None,
             cache_limit: int = DEFAULT_CACHE_LIMIT, cache_full_wait: float | None = None,
             at_seq: int | None = None, progress: Callable[[int, int], None] | None = None,
             config: VolumeConfig | None = None):
        """Open a volume.  A writer takes the lease and recovers from the cache
        dir and the store; a reader (read_only, or at_seq for a past state) is
        a PastVolume with a private map, removed on close.  cache_full_wait:
        how long a write waits for room on a full cache disk (default 30 s).
        config: the volume's settings, when the caller has just read them."""
        if config is None or config.name != name:
            config = load_config(store, name)
        if config.sealed and not store.seals_objects:
            # Plain objects must never enter a compressed or encrypted volume.
            raise UserError(f"volume {name} is compressed or encrypted: open it through "
                            "lsbd.crypto.store.SealingStore")
        mode = flush_mode or config.flush_mode
        if mode not in FLUSH_MODES:
            raise InvalidRequest(f"bad flush mode {mode!r}: journal or store")
        if read_only or at_seq is not None:
            return PastVolume(store, config, cache_root=cache_root, flush_mode=mode,
                              cache_limit=cache_limit, at_seq=at_seq, progress=progress)
        st = writer_state(store, config, cache_root=cache_root, flush_mode=mode,
                          cache_limit=cache_limit, break_lease=break_lease)
        vol = cls(st)
        if cache_full_wait is not None:
            vol._writer.full_wait = cache_full_wait
        try:
            if recover(st, vol._sealer, progress):
                vol._reader.warm_up()
            vol._opened_at = st.applied
            vol._timer.start()
            vol._sealer.start()
            if config.read_defrag:
                rd = vol._reader.read_defrag = ReadDefrag(vol._writer.relocate_read, name=name)
                vol._sealer.reads_streaming = rd.streaming
            vol._control = ControlServer(vol, control_socket_path(st.folder))
        except BaseException:
            vol._teardown()
            raise
        return vol

    # ------------------------------------------------------------------ the API

    def write(self, offset: int, data: bytes, *, fua: bool = False, nowait: bool = False) -> None:
        self._writer.write(offset, data, fua=fua, nowait=nowait)

    def write_many(self, writes: list[tuple[int, bytes]], *, nowait: bool = False) -> None:
        self._writer.write_many(writes, nowait=nowait)

    def write_zeroes(self, offset: int, length: int, *, fua: bool = False,
                     nowait: bool = False) -> None:
        self._writer.write_zeroes(offset, length, fua=fua, nowait=nowait)

    def trim(self, offset: int, length: int, *, fua: bool = False, nowait: bool = False) -> None:
        self._writer.trim(offset, length, fua=fua, nowait=nowait)

    def transaction(self) -> Transaction:
        return self._writer.transaction()

    def flush(self) -> None:
        self._sealer.flush()

    def resize(self, new_size: int) -> None:
        self._writer.resize(new_size)

    # ------------------------------------------------------------------ admin

    def flush_to_store(self) -> int:
        """Seal and wait until everything written so far is in the store;
        returns the seq that covers it."""
        self._st.check_writable()
        return self._sealer.flush_to_store()

    def checkpoint(self, force: bool = False, *, base: bool = False) -> int:
        """Write a checkpoint of the map now (see Checkpointer.checkpoint)."""
        return self._checkpointer.checkpoint(force, base=base)

    def snapshot(self, name: str) -> Snapshot:
        """Bind `name` to the current state, after making it durable in the
        store (so the snapshot is crash-consistent and readable by anyone).  A
        checkpoint at its seq keeps it readable whatever compaction deletes."""
        check_snapshot_name(name)
        seq = self.checkpoint(force=True)
        return write_snapshot(self.store, self.config, name, seq)

    def every(self, interval: float, job: Callable[[], object]) -> None:
        """Run job() on the volume's background thread every `interval` seconds."""
        self._timer.every(interval, job)

    def usage(self) -> dict:
        """Counters and space accounting, for `lsbd stats` (no store call)."""
        rd = self._reader.read_defrag
        if rd is None:
            return report.usage(self._st)
        return report.usage(self._st, read_defrag_bytes=rd.moved,
                            read_defrag_dropped_bytes=rd.dropped)

    def describe(self) -> dict:
        """What `lsbd info` shows, as this writer knows it (no store call)."""
        return report.describe(self._st)

    def check_lease(self) -> None:
        """Raise LeaseLost (and stop uploads) if another writer took the lease."""
        self._st.check_lease()

    def waiting_uploads(self) -> str:
        """What is not in the store yet, in words (for log lines)."""
        return self._st.waiting_uploads()

    def give_up_uploads(self) -> None:
        """Stop retrying uploads now (a second stop signal): a close waiting
        for them goes on; the segments stay for the next open."""
        if self._st.uploader is not None:
            self._st.uploader.give_up()

    def relocate(self, extents) -> int:
        """Compaction's copy of live blocks (see Writer.relocate)."""
        return self._writer.relocate(extents)

    def relocate_loaded(self, loaded: list[tuple]) -> int:
        """relocate() of extents whose bytes were read already: [(extent, bytes)]."""
        return self._writer.relocate_loaded(loaded)

    def relocate_read(self, runs: list[tuple], data: bytes, planned_at: int) -> int:
        """Lay out again what a read found scattered (see Writer.relocate_read)."""
        return self._writer.relocate_read(runs, data, planned_at)

    def forget_segments(self, seqs) -> None:
        """Segments deleted from the store: drop them from the map's table and the cache."""
        self._st.map.drop_segments(seqs)
        for seq in seqs:
            self._st.files.forget(seq)

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        st = self._st
        if st.closed:
            return
        try:
            self._reader.close_defrag()   # before the last seal: it appends to the open segment
            if st.failed is None:
                self._close_cleanly()
            else:
                # Writing stopped on an error: the journals may hold what the
                # store lacks; they are replayed on the next open.
                log.warning("volume %s: closing after a failure (%s); the journals stay in %s "
                            "and the lease is kept", self.name, st.failed, self.folder)
                self._keep_lease()
        finally:
            st.closed = True
            self._teardown()

    def _close_cleanly(self) -> None:
        st = self._st
        with st.lock:
            self._sealer.seal()
        self._timer.join()
        self._sealer.stop()
        if st.sealing:
            log.warning("volume %s: %d sealed segments could not be recorded (%s); they "
                        "stay in %s and are replayed on the next open", self.name,
                        len(st.sealing), st.failed, self.folder)
            self._keep_lease()  # our journal must win
            return
        up = st.uploader
        if up is None:
            return
        up.close(CLOSE_UPLOAD_TIMEOUT, stall=CLOSE_STALL, silence=CLOSE_SILENCE)
        if up.fatal is None and up.durable_seq >= st.applied:
            if st.applied - st.last_checkpoint >= min(CLOSE_CHECKPOINT_SEGMENTS,
                                                      st.config.checkpoint_segments):
                try:
                    self.checkpoint()
                except Exception as e:  # noqa: BLE001 - the segments are safe; recovery replays them
                    log.warning("volume %s: checkpoint at close failed: %s", self.name, e)
            if self._opened_at is not None and st.applied > self._opened_at:
                write_summary(st)
        else:
            self.left_waiting = st.waiting_uploads()
            log.warning("volume %s: %s; they stay in %s and upload on the next open",
                        self.name, self.left_waiting, self.folder)
            self._keep_lease()  # our journal must win

    def abandon(self) -> None:
        """Stop as a crash would: nothing sealed, flushed, uploaded or released
        (the lease stays in the store).  For crash tests.  Like a power cut,
        it returns only once no thread of this volume can still upload: a
        dead process sends nothing more, and every upload it had under way
        has ended (stored or not) before the next open lists the store."""
        self._keep_lease()
        self._st.closed = True
        self._teardown(crash=True)

    def _teardown(self, *, crash: bool = False) -> None:
        st = self._st
        self._timer.stop.set()
        self._reader.close_defrag()
        if self._control is not None:
            self._control.close()
            self._control = None
        # The sealer (which queues uploads) stops before the uploader.  It and
        # the background thread may be inside a map transaction (a sealed
        # segment, a checkpoint): the map must not close under them.  Its
        # stop takes the volume's lock, so a write under way (it passed its
        # checks before `closed` was set) ends before the journals'
        # descriptors close below: their numbers are never freed under it.
        self._sealer.stop(drain=False)
        if st.uploader is not None:
            st.uploader.close(0, join=crash)
        self._timer.join(timeout=120)
        if st.open is not None:
            st.open.close_fd()
        for seg in st.sealing:
            seg.close_fd()
        st.files.close()
        with st.map_guard:
            st.map_closed = True
            try:
                st.map.close()
            except Exception:  # noqa: BLE001 - closing after a failure; the first error is reported
                pass
        if st.lease is not None and not self._all_stored():
            # Stopped before everything reached the store (a stop signal
            # mid-close): our journal must win, so no other writer may start.
            log.warning("volume %s: stopped with segments not in the store; they stay in %s "
                        "and the lease is kept", self.name, self.folder)
            self._keep_lease()
        if st.lease is not None:
            try:
                st.lease.release()
            except StoreError as e:
                log.warning("volume %s: could not release the lease: %s", self.name, e)
            st.lease = None

    def _all_stored(self) -> bool:
        """Nothing written waits in the cache dir for the store."""
        st = self._st
        if (st.open is not None and not st.open.empty) or st.sealing:
            return False
        return st.uploader is None or st.uploader.durable_seq >= st.applied

    def _keep_lease(self) -> None:
        """Leave the lease in the store (our journal must win), no longer
        held by this volume."""
        st = self._st
        if st.lease is not None:
            st.lease.abandon()
            st.lease = None

    def __enter__(self) -> "Volume":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

