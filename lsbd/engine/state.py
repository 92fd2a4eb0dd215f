"""The state the pieces of an open volume share, and the one lock over it.

The writer, the sealer, the reader, the checkpointer and the timer each
hold this object.  One re-entrant lock guards the open segment, the segments
being sealed, the map updates and the resolution of reads (which copy of
each block to read); block data is read without it, from files that never
change once written.  The lock is never held across an fsync or a store
call."""

from __future__ import annotations

import threading
import time

from lsbd.checksum import crc32c_of
from lsbd.engine.api import MAX_REQUEST
from lsbd.errors import InvalidRequest, LeaseLost, ReadOnlyError, StoreError
from lsbd.map.blockmap import PENDING, BlockMap
from lsbd.meta.lease import Lease
from lsbd.meta.config import Lineage, VolumeConfig
from lsbd.segments.journal import OpenSegment
from lsbd.segments.local import SegmentFiles
from lsbd.segments.uploader import Uploader
from lsbd.store import Store


class VolumeState:
    def __init__(self, *, store: Store, config: VolumeConfig, folder: str, read_only: bool,
                 flush_mode: str, lineage: Lineage, bmap: BlockMap, files: SegmentFiles,
                 lease: Lease | None = None):
        self.store = store
        self.config = config
        self.lineage = lineage
        self.name = config.name
        self.block_size = config.block_size
        self.read_only = read_only
        self.flush_mode = flush_mode
        self.folder = folder
        self.lease = lease            # None: read-only, or left in the store on purpose
        self.lock = threading.RLock()
        #: notified when the sealing queue or `applied` changes, or writing fails
        self.sealing_changed = threading.Condition(self.lock)
        self.map_guard = threading.Lock()   # closing the map vs upload callbacks
        self.map_closed = False
        self.map = bmap
        self.files = files
        self.open: OpenSegment | None = None
        #: sealed, oldest first, not yet synced and in the map (the sealer's queue)
        self.sealing: list[OpenSegment] = []
        self.prev_crc = 0            # trailer fingerprint of the newest sealed segment (the chain)
        self.size = config.size
        self.applied = 0             # newest seq in the map
        #: bumped (under the lock) by every append that can change what a block
        #: reads as; not by moves of the same bytes (relocations), nor by
        #: sealing or mapping (they move where a block is read from, not what
        #: it holds).  Equal before and after: no block reads differently.
        self.content_changes = 0
        self.last_checkpoint = 0
        self.last_checkpoint_time = time.monotonic()
        self.failed: BaseException | None = None
        self.closed = False
        self.uploader: Uploader | None = None
        self.zero_block = bytes(self.block_size)
        self.zero_crc = crc32c_of(self.zero_block)
        self.stats: dict[str, float] = {
            "reads": 0, "writes": 0, "bytes_read": 0, "bytes_written": 0,
            "segments_sealed": 0, "checkpoints": 0,
            # the sealer's map commits: segments, seconds, seconds of its CPU
            "segments_mapped": 0, "map_seconds": 0.0, "map_cpu_seconds": 0.0,
            # checkpoints written: seconds, seconds of the writing thread's CPU
            "checkpoint_seconds": 0.0, "checkpoint_cpu_seconds": 0.0}

    def check_range(self, offset: int, length: int, *, data: bool = True) -> None:
        """data=False: zeroes, trims and allocation queries, which move no
        data, may cover any length."""
        if offset < 0 or length < 0:
            raise InvalidRequest(f"negative offset or length ({offset}, {length})")
        if data and length > MAX_REQUEST:
            raise InvalidRequest(f"request of {length} bytes is larger than {MAX_REQUEST}")
        if offset + length > self.size:
            raise InvalidRequest(f"request [{offset}, {offset + length}) is past the end of "
                                 f"volume {self.name} ({self.size} bytes)")

    def check_open(self) -> None:
        if self.closed:
            raise InvalidRequest(f"volume {self.name} is closed")

    def check_writable(self) -> None:
        self.check_open()
        if self.read_only:
            raise ReadOnlyError(f"volume {self.name} is open read-only")
        self.check_not_failed()
        if self.uploader is not None and self.uploader.fatal is not None:
            raise self.uploader.fatal

    def check_not_failed(self) -> None:
        if self.failed is not None:
            raise StoreError(f"volume {self.name} stopped taking writes: {self.failed}")

    def fail(self, error: BaseException) -> None:
        """Stop taking writes (under the lock): a journal or the disk is in
        an unknown state.  Waiting writers and flushes wake and see it."""
        self.failed = error
        self.sealing_changed.notify_all()

    def check_lease(self) -> None:
        """Raise LeaseLost (and stop uploads) if another writer took the
        lease: asked before every change to the store."""
        if self.lease is None:
            return
        try:
            self.lease.check()
        except LeaseLost as e:
            if self.uploader is not None:
                self.uploader.stop_for(e)
            raise

    def waiting_uploads(self) -> str:
        """What is not in the store yet, in words (for log lines)."""
        infos = [i for i in self.map.segments() if i.state == PENDING] \
            if not self.map_closed else []
        err = self.uploader.last_error if self.uploader is not None else None
        silent = self.uploader.silent_for if self.uploader is not None else None
        why = (f" (last upload error: {err})" if err else
               f" (the store answered nothing for {silent:.0f}s)" if silent else "")
        return (f"{len(infos)} segments ({sum(i.size for i in infos)} bytes) are not in the "
                f"store yet" + why)
