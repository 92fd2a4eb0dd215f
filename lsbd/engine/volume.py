"""Volume: the engine's coordinator.  It owns the writer lease, the open
segment, the block map, the local segment files and the uploader, and keeps
them consistent; the work itself lives in those pieces.

Concurrency: one lock guards the open segment, the segments being sealed,
the map updates and the resolution of reads (which copy of each block to
read); block data is read without it, from files that never change once
written.  The lock is never held across an fsync or a store call: a sealed
segment is synced and recorded in the map by the sealer thread, while its
blocks stay readable from its in-memory index until the map has them."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Callable

from lsbd import fileio, names
from lsbd.names import cache_dir_for
from lsbd.checksum import crc32c_of
from lsbd.segments import checkpoints as ckpt
from lsbd.engine.api import MAX_REQUEST, Allocation
from lsbd.map.blockmap import PENDING, STORED, BlockMap, Extent, SegmentInfo
from lsbd.meta.config import FLUSH_MODES, Lineage, VolumeConfig, load_config
from lsbd.engine.control import ControlServer
from lsbd.engine.control import socket_path as control_socket_path
from lsbd.engine.deltas import delta_base, delta_entries, segment_records
from lsbd.engine.readdefrag import ReadDefrag, scattered
from lsbd.segments.journal import OpenSegment
from lsbd.meta.lease import Lease
from lsbd.engine.readahead import ReadAhead
from lsbd.plans.reads import plan_reads
from lsbd.engine.recovery import (
    MAX_ORPHANS,
    journal_is_sealed,
    rebuild_from_store,
    recover_journal_file,
)
from lsbd.segments.remote import fetch_segment_index, segment_info, store_segment_seqs
from lsbd.segments.local import SegmentFiles, check_open_blocks
from lsbd.format.segment import (
    DATA,
    RESIZE,
    TRAILER,
    TRIM,
    ZERO,
    block_crcs,
    encode_trailer,
    pack_masked,
    raw_block_crcs,
)
from lsbd.segments.uploader import Uploader
from lsbd.errors import (
    CacheMismatch,
    CorruptionError,
    InvalidRequest,
    LeaseLost,
    ReadOnlyError,
    StoreError,
    UserError,
    WouldBlock,
)
from lsbd.store import Store

log = logging.getLogger(__name__)

DEFAULT_CACHE_LIMIT = 1 << 30
STORE_FLUSH_TIMEOUT = 120.0   # a flush in 'store' mode gives up (EIO) after this
#: Reserved past a new journal's target size: its last write overshoots it.
SEGMENT_SLACK = 1024 * 1024
MAX_SEALING = 4               # sealed segments waiting for the sealer before writers wait
CLOSE_UPLOAD_TIMEOUT = 300.0
#: A write that needs a new journal on a full disk waits this long for
#: uploads to make segments evictable, then fails with ENOSPC.
FULL_DISK_WAIT = 30.0
MAP_ROOM = 8 * 1024 * 1024    # kept free beyond a journal's reservation, for the map
CLOSE_STALL = 10.0            # close stops waiting once uploads have failed this long in a row
KEEP_CHECKPOINTS = 3
AUTO_COMPACT_INTERVAL = 300.0         # seconds between background compactions
AUTO_COMPACT_RATE = 16 * 1024 * 1024  # bytes/s a background compaction may rewrite
LEASE_CHECK_INTERVAL = 10.0   # seconds between checks that the lease is still ours


class Transaction:
    """Writes, zeroes and trims that commit all together or not at all."""

    def __init__(self, volume: "Volume"):
        self._volume = volume
        self.ops: list[tuple] = []

    def write(self, offset: int, data: bytes) -> None:
        self._volume._check_range(offset, len(data))
        if data:
            self.ops.append((DATA, offset, bytes(data)))

    def write_zeroes(self, offset: int, length: int) -> None:
        self._volume._check_range(offset, length, data=False)
        if length:
            self.ops.append((ZERO, offset, length))

    def trim(self, offset: int, length: int) -> None:
        self._volume._check_range(offset, length, data=False)
        if length:
            self.ops.append((TRIM, offset, length))

    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._volume._commit(self.ops, fua=False)


class Volume:
    """An open volume; see lsbd.engine.api.BlockDevice for the contract."""

    supports_nowait = True

    def __init__(self, *, store: Store, config: VolumeConfig, folder: str, read_only: bool,
                 flush_mode: str, cache_limit: int, lease: Lease | None, temporary: bool):
        self.store = store
        self.config = config
        self.lineage = Lineage.load(store, config)
        self.name = config.name
        self.block_size = config.block_size
        self.read_only = read_only
        self.flush_mode = flush_mode
        self.folder = folder
        self._lease = lease
        self._temporary = temporary
        self._lock = threading.RLock()
        self._checkpoint_lock = threading.Lock()
        self._compact_lock = threading.Lock()
        self._map_guard = threading.Lock()   # closing the map vs upload callbacks
        self._map_closed = False
        self._auto_compact = False
        self._last_compaction = time.monotonic()
        self.cache_root = os.path.dirname(folder)
        self._map = BlockMap(os.path.join(folder, "map"), self.block_size)
        self._files = SegmentFiles(os.path.join(folder, "segments"), store,
                                   self.lineage.segment_key, self.block_size,
                                   cache_limit=cache_limit, keep_free=self._room_needed())
        self._open: OpenSegment | None = None
        # Sealed, oldest first, not yet synced and in the map (the sealer's queue).
        self._sealing: list[OpenSegment] = []
        self._sealing_changed = threading.Condition(self._lock)
        self._sealer: threading.Thread | None = None
        self._stop_sealing = False
        self._sealing_abandoned = False   # stop without handling the rest (a crash)
        self._prev_crc = 0            # trailer fingerprint of the newest sealed segment (the chain)
        self._size = config.size
        self._applied = 0             # newest seq in the map
        self._last_checkpoint = 0
        self._last_checkpoint_time = time.monotonic()
        self._failed: BaseException | None = None
        self._closed = False
        self._uploader: Uploader | None = None
        self._stop = threading.Event()
        self._read_defrag: ReadDefrag | None = None   # writers only
        self._timer: threading.Thread | None = None
        self._zero_block = bytes(self.block_size)
        self._zero_crc = crc32c_of(self._zero_block)
        self._control: ControlServer | None = None
        self.left_waiting: str | None = None   # set by close() when uploads are left over
        self._readahead = ReadAhead()
        self.stats = {"reads": 0, "writes": 0, "bytes_read": 0, "bytes_written": 0,
                      "segments_sealed": 0, "checkpoints": 0}

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, store: Store, name: str, *, cache_root: str, read_only: bool = False,
             break_lease: bool = False, flush_mode: str | None = None,
             cache_limit: int = DEFAULT_CACHE_LIMIT, at_seq: int | None = None,
             progress: Callable[[int, int], None] | None = None,
             auto_compact: bool = False) -> "Volume":
        """Open a volume.  A writer takes the lease and recovers from the cache
        dir and the store; a reader (read_only, or at_seq for a past state)
        builds a private map in a temporary folder that is removed on close."""
        config = load_config(store, name)
        if config.sealed and not getattr(store, "seals_objects", False):
            # Plain objects must never enter a compressed or encrypted volume.
            raise UserError(f"volume {name} is compressed or encrypted: open it through "
                            "lsbd.crypto.store.SealingStore")
        mode = flush_mode or config.flush_mode
        if mode not in FLUSH_MODES:
            raise InvalidRequest(f"bad flush mode {mode!r}: journal or store")
        if read_only or at_seq is not None:
            os.makedirs(cache_root, exist_ok=True)
            folder = tempfile.mkdtemp(prefix=f"{name}-ro-", dir=cache_root)
            vol = cls(store=store, config=config, folder=folder, read_only=True, flush_mode=mode,
                      cache_limit=cache_limit, lease=None, temporary=True)
            try:
                plan, size = rebuild_from_store(vol._map, store, config, upto=at_seq,
                                                progress=progress)
                vol._applied, vol._size = plan.top, size
            except BaseException:
                vol._teardown()
                raise
            return vol
        lease = Lease.acquire(store, name, break_lease=break_lease)
        folder = cache_dir_for(cache_root, store, name)
        try:
            vol = cls._open_writer(store, config, folder, lease, mode, cache_limit, progress)
            vol._auto_compact = auto_compact
        except BaseException:
            lease.release()
            raise
        return vol

    @classmethod
    def _open_writer(cls, store, config, folder, lease, mode, cache_limit, progress) -> "Volume":
        os.makedirs(folder, exist_ok=True)
        vol = cls(store=store, config=config, folder=folder, read_only=False, flush_mode=mode,
                  cache_limit=cache_limit, lease=lease, temporary=False)
        try:
            stored = store_segment_seqs(store, config.name)
            try:
                vol._check_cache_identity(stored)
                vol._replay_local()
            except CacheMismatch as e:
                report = log.info if str(e) == "empty" else log.warning
                report("volume %s: the cache dir is not trusted (%s); rebuilding it from the store",
                       config.name, e)
                vol._reset_cache_dir()
                vol._rebuild(stored, progress)
            vol._remove_orphans(stored)
            vol._start_background()
        except BaseException:
            vol._teardown()
            raise
        return vol

    def _check_cache_identity(self, stored: dict[int, int]) -> None:
        m = self._map
        vid = m.get_meta("volume_id")
        if vid is None:
            raise CacheMismatch("empty")
        if vid.decode() != self.config.volume_id:
            raise CacheMismatch("it belongs to another volume")
        if (m.get_meta("store_url") or b"").decode() != self.store.url:
            raise CacheMismatch("it belongs to another store")
        applied = m.get_int("applied_seq")
        local = set(self._files.local_seqs())
        foreign = [s for s in stored if s > applied and s not in local]
        if foreign and min(foreign) == applied + 1:
            # Another writer went on from our history (it broke our lease)?  Or
            # leftovers of a writer that had lost the lease (not chained to us:
            # orphans, removed below)?
            trailer, _ = fetch_segment_index(self.store, self.name, applied + 1)
            if trailer.prev_crc == m.get_int("top_crc"):
                raise CacheMismatch(f"the store has segments it does not know "
                                    f"({applied + 1:016x}..)")
        # Our newest stored segment must be the very object we wrote.
        ours = [s for s in stored if s <= applied]
        if ours:
            top = max(ours)
            info = m.segment(top)
            if info is not None and info.trailer_crc:
                from lsbd.checksum import masked_crc

                # A suffix range, checked by the store (lsbd.store.s3): the
                # map's size of a segment rebuilt from a listing is what the
                # store holds, not the segment's own once a wrapper seals it.
                tail = self.store.get(names.segment_key(self.name, top), -TRAILER.size)
                if masked_crc(tail) != info.trailer_crc:
                    raise CacheMismatch(f"segment {top:016x} in the store is not the one it holds")
        self._applied = applied
        self._prev_crc = m.get_int("top_crc")
        self._size = m.get_int("size", self.config.size)
        self._last_checkpoint = m.get_int("last_checkpoint")

    def _replay_local(self) -> None:
        """Apply journal files newer than the map (a crash between sealing and
        the map update, or an open segment cut short), then queue every
        segment not yet in the store for upload."""
        history_ends = False   # a journal cut short is the newest write that survived
        for seq in self._files.local_seqs():
            if seq <= self._applied:
                continue
            path = self._files.path(seq)
            if history_ends:
                # Written after a journal that lost its tail (a power loss
                # before any flush covered it): not part of the prefix.
                log.warning("volume %s: discarding journal file %016x: it follows one cut "
                            "short, and no flush covered either", self.name, seq)
                os.unlink(path)
                continue
            if seq != self._applied + 1:
                raise CacheMismatch(f"journal file {seq:016x} after a gap")
            was_sealed = journal_is_sealed(path)
            result = recover_journal_file(path, volume_id=self.config.volume_id_bytes,
                                          seq=seq, block_size=self.block_size,
                                          volume_size=self._size, prev_crc=self._prev_crc)
            if result is None:
                history_ends = True
                continue
            trailer, records = result
            if trailer.prev_crc != self._prev_crc:
                # Sealed after a predecessor that lost its tail since.
                log.warning("volume %s: discarding journal file %016x: it does not continue "
                            "the history", self.name, seq)
                os.unlink(path)
                history_ends = True
                continue
            log.info("volume %s: replayed journal segment %016x (%d records)", self.name, seq,
                     len(records))
            # A journal left by a crashed process may never have been synced,
            # name included: recovery synced its data, the map must not
            # name it before its name is durable too.
            fileio.fsync_dir(os.path.dirname(path))
            self._apply_sealed(seq, trailer, records, state=PENDING)
            history_ends = not was_sealed

    def _rebuild(self, stored: dict[int, int], progress) -> None:
        plan, size = rebuild_from_store(self._map, self.store, self.config, progress=progress)
        self._applied, self._size = plan.top, size
        self._prev_crc = self._map.get_int("top_crc")
        self._last_checkpoint = plan.base
        self._map.set_meta(volume_id=self.config.volume_id.encode(),
                           store_url=self.store.url.encode(),
                           last_checkpoint=str(plan.base).encode())
        # Durable before any journal is written: a map whose last commit (this
        # identity) a power cut undid would be distrusted, journals and all.
        self._map.sync()

    def _remove_orphans(self, stored: dict[int, int]) -> None:
        orphans = sorted(s for s in stored if s > self._applied)
        if len(orphans) > MAX_ORPHANS:
            raise CorruptionError(
                f"volume {self.name}: segment {self._applied + 1:016x} is missing but "
                f"{len(orphans)} later segments exist; refusing to open for writing "
                "(run lsbd verify)")
        for seq in orphans:
            log.warning("volume %s: removing orphan segment %016x (after a gap: never part of "
                        "the volume)", self.name, seq)
            self.store.delete(names.segment_key(self.name, seq))

    def _reset_cache_dir(self) -> None:
        """Move an untrusted cache dir aside if it holds data the store lacks,
        else delete it; then start a fresh one."""
        self._map.close()
        pending = [s.seq for s in self._map_segments_safe() if s.state == PENDING]
        if pending:
            aside = f"{self.folder}.stale-{int(time.time())}"
            log.warning("volume %s: keeping the old cache dir as %s (it holds %d segments "
                        "never uploaded)", self.name, aside, len(pending))
            os.rename(self.folder, aside)
        else:
            shutil.rmtree(self.folder, ignore_errors=True)
        os.makedirs(self.folder, exist_ok=True)
        self._map = BlockMap(os.path.join(self.folder, "map"), self.block_size)
        self._files.close()
        self._files = SegmentFiles(os.path.join(self.folder, "segments"), self.store,
                                   self.lineage.segment_key, self.block_size,
                                   cache_limit=self._files.cache_limit,
                                   keep_free=self._room_needed())

    def _map_segments_safe(self) -> list[SegmentInfo]:
        try:
            m = BlockMap(os.path.join(self.folder, "map"), self.block_size)
            try:
                return m.segments()
            finally:
                m.close()
        except Exception:  # noqa: BLE001 - an unreadable map is an untrusted one
            return []

    def _start_background(self) -> None:
        infos = self._map.segments()
        pending = [s.seq for s in infos if s.state == PENDING]
        stored = {s.seq for s in infos if s.state == STORED}
        # Everything below the first pending segment is durable; above it, the
        # segments already stored count as soon as the gaps below them fill.
        durable = (min(pending) - 1) if pending else max([self._applied, *stored])
        self._uploader = Uploader(self.store, self.name, self._files.path, self._on_stored,
                                  durable_seq=durable, already_stored=stored,
                                  fence=self._lease.check if self._lease is not None else None)
        for seq in sorted(pending):
            self._uploader.submit(seq)
        for seq in self._files.local_seqs():
            info = self._map.segment(seq)
            if info is not None and info.state == STORED:
                self._files.adopt(seq)
        self._timer = threading.Thread(target=self._background, name=f"lsbd-{self.name}",
                                       daemon=True)
        self._timer.start()
        self._sealer = threading.Thread(target=self._seal_loop, name=f"lsbd-{self.name}-sealer",
                                        daemon=True)
        self._sealer.start()
        if self.config.read_defrag:
            self._read_defrag = ReadDefrag(self.relocate_loaded, name=self.name)
        self._control = ControlServer(self, control_socket_path(self.folder))

    # ------------------------------------------------------------------ the API

    @property
    def size(self) -> int:
        return self._size

    @property
    def applied_seq(self) -> int:
        return self._applied

    def transaction(self) -> Transaction:
        self._check_writable()
        return Transaction(self)

    def read(self, offset: int, length: int, *, nowait: bool = False) -> bytes:
        bs = self.block_size
        sequential, ahead = self._readahead.note(offset, length)
        if ahead is not None:
            self.prefetch(*ahead, wait=False)
        if length == bs and not offset % bs and 0 <= offset <= self._size - bs:
            data = self._read_one_block(offset // bs, nowait, sequential)
            if data is not None:
                return data
        self._check_range(offset, length)
        if length == 0:
            return b""
        first = offset // bs
        last = -(-(offset + length) // bs)
        with self._lock:
            self._check_open()
            runs = self._plan(first, last - first)
        data = self._read_runs(runs, nowait, sequential)
        if self._read_defrag is not None and scattered(runs, bs):
            self._offer_defrag(runs, data)
        self.stats["reads"] += 1
        self.stats["bytes_read"] += length
        start = offset - first * bs
        return data[start:start + length] if (start or len(data) != length) else data

    def _offer_defrag(self, runs: list[tuple], data: bytes) -> None:
        """Hand the sealed pieces of a scattered read to the read-directed
        defragmenter (lsbd.engine.readdefrag), with the bytes just read."""
        bs = self.block_size
        view = memoryview(data)
        loaded = []
        pos = 0
        for lba, n, source, off, crcs in runs:
            if source is not None and crcs is None:
                loaded.append((Extent(lba, n, source, off), view[pos:pos + n * bs]))
            pos += n * bs
        self._read_defrag.offer(loaded, len(data))

    def prefetch(self, offset: int, length: int, *, wait: bool = True) -> None:
        """Bring the segments holding [offset, offset+length) into the local
        cache (NBD_CMD_CACHE, read-ahead); wait: until they are there."""
        bs = self.block_size
        first = max(0, offset) // bs
        last = min(-(-(offset + length) // bs), self._size // bs)
        if last <= first:
            return
        with self._lock:
            if self._closed:
                return
            seqs = {e.seq for e in self._map.lookup(first, last - first)}
        futures = [f for f in map(self._files.prefetch, sorted(seqs)) if f is not None]
        if wait:
            for f in futures:
                f.result()

    def _read_one_block(self, lba: int, nowait: bool, sequential: bool = False) -> bytes | None:
        """Random reads' short path: one whole block with no journal to look
        at is found through the map alone.  None: take the general path."""
        with self._lock:
            seg = self._open
            if self._sealing or self._closed or (seg is not None and seg.has_overlay):
                return None
            where = self._map.lookup_block(lba)
        data = self._zero_block if where is None else \
            self._files.read_blocks(where[0], where[1], 1, nowait=nowait, sequential=sequential)
        stats = self.stats
        stats["reads"] += 1
        stats["bytes_read"] += len(data)
        return data

    def write(self, offset: int, data: bytes, *, fua: bool = False, nowait: bool = False) -> None:
        bs = self.block_size
        if len(data) == bs and not offset % bs and not fua and 0 <= offset <= self._size - bs:
            self._write_one_block(offset // bs, data, nowait)
            return
        self._check_range(offset, len(data))
        if data:
            self._commit([(DATA, offset, data)], fua=fua, nowait=nowait)

    def _write_one_block(self, lba: int, data: bytes, nowait: bool) -> None:
        """Random writes' short path: _commit of one whole block, not FUA."""
        ((kind, _lba, _n, data, crcs),) = self._split_zero_runs(lba, data)
        self._append_locked(
            lambda seg, mark: seg.append(kind, lba, 1, data=data, crcs=crcs, undo=None,
                                         commit=True),
            writes=1, nbytes=self.block_size, nowait=nowait)

    def write_many(self, writes: list[tuple[int, bytes]], *, nowait: bool = False) -> None:
        """Several block-aligned writes, in order, each its own transaction (as
        if write() had been called for each), with one hold of the lock and
        one system call: what a front end does with a burst of pipelined
        small writes.  All of them are done, or (WouldBlock, any error) none."""
        bs = self.block_size
        size = self._size
        records = []
        for offset, data in writes:
            if offset % bs or len(data) % bs or not data or offset < 0 \
                    or offset + len(data) > size:
                raise InvalidRequest(f"write_many takes whole blocks inside the volume "
                                     f"(offset {offset}, length {len(data)})")
            runs = self._split_zero_runs(offset // bs, data)
            last = len(runs) - 1
            records += [(kind, lba, n, d, crcs, i == last)
                        for i, (kind, lba, n, d, crcs) in enumerate(runs)]
        self._append_locked(lambda seg, mark: seg.append_many(records, undo=mark[2]),
                            writes=len(writes), nbytes=sum(len(d) for _o, d in writes),
                            nowait=nowait)

    def _append_locked(self, append, *, writes: int, nbytes: int, nowait: bool) -> None:
        """Run append(open segment, mark) under the lock, with what every
        append of whole blocks needs around it: the checks, the roll-back of
        a failure, the counters, sealing a full segment."""
        with self._lock:
            self._check_writable()
            if nowait and len(self._sealing) >= MAX_SEALING:
                raise WouldBlock("the sealer is behind")
            seg = self._open_segment(nowait)
            mark = seg.mark()
            try:
                append(seg, mark)
            except BaseException as e:
                self._roll_back(seg, mark, e)
                raise
            stats = self.stats
            stats["writes"] += writes
            stats["bytes_written"] += nbytes
            if seg.end >= self.config.segment_size:
                self._seal_full()

    def write_zeroes(self, offset: int, length: int, *, fua: bool = False,
                     nowait: bool = False) -> None:
        self._check_range(offset, length, data=False)
        if length:
            self._commit([(ZERO, offset, length)], fua=fua, nowait=nowait)

    def trim(self, offset: int, length: int, *, fua: bool = False, nowait: bool = False) -> None:
        self._check_range(offset, length, data=False)
        if length:
            self._commit([(TRIM, offset, length)], fua=fua, nowait=nowait)

    def flush(self) -> None:
        self._check_writable()
        if self.flush_mode == "store":
            self._flush_to_store()
            return
        with self._lock:
            journals = [*self._sealing, *([self._open] if self._open is not None else [])]
        self._sync_journals(journals)

    def _sync_journals(self, journals: list[OpenSegment]) -> None:
        """Sync journal files in seq order, outside the lock (the sealer may be
        finishing some of them meanwhile: each sync is safe against that)."""
        for seg in journals:
            seg.sync()
        if self._failed is not None:
            raise StoreError(f"volume {self.name} stopped taking writes: {self._failed}")

    def allocation(self, offset: int, length: int) -> list[Allocation]:
        self._check_range(offset, length, data=False)
        if length == 0:
            return []
        bs = self.block_size
        first = offset // bs
        last = -(-(offset + length) // bs)
        step = MAX_REQUEST // bs  # bounded work per lock hold, whatever the length
        runs: list[tuple] = []
        for start in range(first, last, step):
            with self._lock:
                runs.extend(self._plan(start, min(step, last - start)))
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

    def resize(self, new_size: int) -> None:
        self._check_writable()
        if new_size % self.block_size:
            raise InvalidRequest(f"new size must be a multiple of the block size ({self.block_size})")
        with self._lock:
            if new_size < self._size:
                raise InvalidRequest(f"cannot shrink volume {self.name} from {self._size} to "
                                     f"{new_size} bytes (only growing is supported)")
            if new_size == self._size:
                return
            seg = self._open_segment()
            seg.append(RESIZE, new_size, 0, commit=True)
            self._size = new_size
        self.flush()

    def close(self) -> None:
        if self._closed:
            return
        try:
            if self._read_defrag is not None:
                self._read_defrag.close()   # before the last seal: it appends to the open segment
                self._read_defrag = None
            if not self.read_only and self._failed is None:
                with self._lock:
                    self._seal()
                self._stop.set()
                if self._timer is not None:
                    self._timer.join()
                self._stop_sealer()
                if self._sealing:
                    log.warning("volume %s: %d sealed segments could not be recorded (%s); they "
                                "stay in %s and are replayed on the next open", self.name,
                                len(self._sealing), self._failed, self.folder)
                    self._keep_lease()  # keep the lease: our journal must win
                elif self._uploader is not None:
                    self._uploader.close(CLOSE_UPLOAD_TIMEOUT, stall=CLOSE_STALL)
                    if self._uploader.fatal is None and self._uploader.durable_seq >= self._applied:
                        if self._applied > self._last_checkpoint:
                            try:
                                self.checkpoint()
                            except Exception as e:  # noqa: BLE001 - the segments are safe; recovery replays them
                                log.warning("volume %s: checkpoint at close failed: %s", self.name, e)
                    else:
                        self.left_waiting = self.waiting_uploads()
                        log.warning("volume %s: %s; they stay in %s and upload on the next "
                                    "open", self.name, self.left_waiting, self.folder)
                        self._keep_lease()  # keep the lease: our journal must win
            elif not self.read_only:
                # Writing stopped on an error: the journals may hold what the
                # store lacks; they are replayed on the next open.
                log.warning("volume %s: closing after a failure (%s); the journals stay in %s "
                            "and the lease is kept", self.name, self._failed, self.folder)
                self._keep_lease()
        finally:
            self._closed = True
            self._teardown()

    def waiting_uploads(self) -> str:
        """What is not in the store yet, in words (for log lines)."""
        infos = [i for i in self._map.segments() if i.state == PENDING] if not self._map_closed \
            else []
        err = self._uploader.last_error if self._uploader is not None else None
        return (f"{len(infos)} segments ({sum(i.size for i in infos)} bytes) are not in the "
                f"store yet" + (f" (last upload error: {err})" if err else ""))

    def give_up_uploads(self) -> None:
        """Stop retrying uploads now (a second stop signal): a close waiting
        for them goes on; the segments stay for the next open."""
        if self._uploader is not None:
            self._uploader.give_up()

    def abandon(self) -> None:
        """Stop as a crash would: nothing sealed, flushed, uploaded or released
        (the lease stays in the store).  For crash tests."""
        self._keep_lease()
        self._closed = True
        self._teardown()

    def _keep_lease(self) -> None:
        """Leave the lease in the store (our journal must win), no longer
        held by this volume."""
        if self._lease is not None:
            self._lease.abandon()
            self._lease = None

    def _teardown(self) -> None:
        self._stop.set()
        if self._read_defrag is not None:
            self._read_defrag.close()
            self._read_defrag = None
        if self._control is not None:
            self._control.close()
            self._control = None
        # The sealer (which queues uploads) stops before the uploader.  It and
        # the background thread may be inside a map transaction (a sealed
        # segment, a checkpoint): the map must not close under them.
        self._stop_sealer(drain=False)
        if self._uploader is not None:
            self._uploader.close(0)
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.join(timeout=120)
        if self._open is not None:
            self._open.close_fd()
        for seg in self._sealing:
            seg.close_fd()
        self._files.close()
        with self._map_guard:
            self._map_closed = True
            try:
                self._map.close()
            except Exception:  # noqa: BLE001 - closing after a failure; the first error is reported
                pass
        if self._lease is not None:
            try:
                self._lease.release()
            except StoreError as e:
                log.warning("volume %s: could not release the lease: %s", self.name, e)
            self._lease = None
        if self._temporary:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "Volume":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ checks

    def _check_range(self, offset: int, length: int, *, data: bool = True) -> None:
        """data=False: zeroes, trims and allocation queries, which move no data,
        may cover any length."""
        if offset < 0 or length < 0:
            raise InvalidRequest(f"negative offset or length ({offset}, {length})")
        if data and length > MAX_REQUEST:
            raise InvalidRequest(f"request of {length} bytes is larger than {MAX_REQUEST}")
        if offset + length > self._size:
            raise InvalidRequest(f"request [{offset}, {offset + length}) is past the end of "
                                 f"volume {self.name} ({self._size} bytes)")

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidRequest(f"volume {self.name} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self.read_only:
            raise ReadOnlyError(f"volume {self.name} is open read-only")
        if self._failed is not None:
            raise StoreError(f"volume {self.name} stopped taking writes: {self._failed}")
        if self._uploader is not None and self._uploader.fatal is not None:
            raise self._uploader.fatal

    # ------------------------------------------------------------------ writes

    def _room_needed(self) -> int:
        """Free disk the cache dir keeps for the next journal and the map."""
        return 0 if self.read_only else self.config.segment_size + SEGMENT_SLACK + MAP_ROOM

    def _open_segment(self, nowait: bool = False) -> OpenSegment:
        """The open segment; a new journal takes its segment's space on the
        disk up front.  A full disk: evict segments already in the store; if
        that is not enough, wait (the lock let go) for uploads to make more
        evictable, up to FULL_DISK_WAIT, then fail with ENOSPC."""
        deadline = None
        while self._open is None:
            seq = (self._sealing[-1].seq if self._sealing else self._applied) + 1
            need = self.config.segment_size + SEGMENT_SLACK
            try:
                self._open = OpenSegment(self._files.path(seq),
                                         volume_id=self.config.volume_id_bytes, seq=seq,
                                         block_size=self.block_size, expected_size=need)
                break
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
            if self._files.make_room(need + MAP_ROOM):
                continue
            if nowait:
                raise WouldBlock("the cache dir's disk is full")
            now = time.monotonic()
            if deadline is None:
                deadline = now + FULL_DISK_WAIT
            elif now >= deadline or self._failed is not None or self._closed:
                message = (f"volume {self.name}: the cache dir's disk is full and nothing "
                           f"more can be evicted: {self.waiting_uploads()}; write refused "
                           f"after {FULL_DISK_WAIT:g}s")
                log.error("%s", message)
                raise OSError(errno.ENOSPC, message)
            self._sealing_changed.wait(0.25)   # uploads finishing make room
        return self._open

    def _commit(self, ops: list[tuple], *, fua: bool, nowait: bool = False) -> None:
        if nowait and fua:
            raise WouldBlock("a FUA write waits for an fsync")
        bs = self.block_size
        # Block-aligned data needs nothing from the volume: its checksums are
        # computed before taking the lock, which is then held only to append.
        ready = [self._split_zero_runs(offset // bs, arg)
                 if kind == DATA and not offset % bs and not len(arg) % bs else None
                 for kind, offset, arg in ops]
        with self._lock:
            self._check_writable()
            if nowait and len(self._sealing) >= MAX_SEALING:
                raise WouldBlock("the sealer is behind")
            seg = self._open_segment(nowait)
            mark = seg.mark()
            undo = mark[2]
            try:
                for i, (kind, offset, arg) in enumerate(ops):
                    records = ready[i]
                    if records is None:
                        records = self._records_for(kind, offset, arg, nowait)
                    for j, (rkind, lba, n, data, crcs) in enumerate(records):
                        last = i == len(ops) - 1 and j == len(records) - 1
                        # Once the last record is appended nothing is rolled
                        # back, and a failing append changes no index: the
                        # last record needs no undo entries (a large write's
                        # are one per block).
                        seg.append(rkind, lba, n, data=data, crcs=crcs,
                                   undo=None if last else undo, commit=last)
            except WouldBlock:
                seg.rollback(mark)   # nothing was appended: an edge block is not local
                raise
            except BaseException as e:
                self._roll_back(seg, mark, e)
                raise
            self.stats["writes"] += 1
            self.stats["bytes_written"] += sum(len(a) if k == DATA else a for k, _o, a in ops)
            journals = [*self._sealing, seg] if fua else None
            if seg.end >= self.config.segment_size:
                self._seal_full()
        if fua:
            if self.flush_mode == "store":
                self._flush_to_store()
            else:
                self._sync_journals(journals)

    def _roll_back(self, seg: OpenSegment, mark, error: BaseException) -> None:
        """Undo a transaction's appends after `error` (under the lock)."""
        try:
            seg.rollback(mark, failed=True)
        except OSError:
            self._failed = error  # the journal is in an unknown state: stop writing

    def _seal_full(self) -> None:
        """Seal the open segment, which is full (under the lock)."""
        self._seal()
        # Back-pressure: writers wait while the sealer is far behind.
        while len(self._sealing) > MAX_SEALING and self._failed is None \
                and not self._stop_sealing:
            self._sealing_changed.wait()

    def _records_for(self, kind: int, offset: int, arg, nowait: bool = False) -> list[tuple]:
        """The records for one operation: (kind, lba, nblocks, data, crcs)."""
        bs = self.block_size
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
            if hi > lo:
                out.append((kind, lo, hi - lo, None, b""))
            if tail:
                out += self._records_for(DATA, hi * bs, bytes(bs - tail), nowait)
            return out
        data = arg
        if head or tail:
            buf = bytearray()
            if head:
                buf += self._read_locked(first, 1, nowait)[:head]
            buf += data
            if tail:
                buf += self._read_locked(last - 1, 1, nowait)[bs - tail:]
            data = bytes(buf)
        return self._split_zero_runs(first, data)

    def _split_zero_runs(self, lba: int, data: bytes) -> list[tuple]:
        """DATA records for the non-zero runs, ZERO records for all-zero blocks."""
        bs = self.block_size
        n = len(data) // bs
        if n == 1:
            if data == self._zero_block:
                return [(ZERO, lba, 1, None, b"")]
            return [(DATA, lba, 1, data, block_crcs(data, bs))]
        # Every block's CRC is needed anyway, and an all-zero block has a
        # known one: only blocks with that CRC are compared with zeros.
        crcs = raw_block_crcs(data, bs)
        zero_crc = self._zero_crc
        if zero_crc not in crcs:
            return [(DATA, lba, n, data, pack_masked(crcs))]
        view = memoryview(data)
        zero = self._zero_block
        out = []
        run_start = 0
        run_zero = crcs[0] == zero_crc and view[0:bs] == zero
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

    def _seal(self) -> None:
        """Seal the open segment (under the lock): write its index and hand it
        to the sealer, which syncs it, records it in the map in one
        transaction and queues its upload.  Until then reads find its blocks
        through its in-memory index."""
        seg = self._open
        if seg is None:
            return
        if seg.empty:
            self._files.drop_file(seg.seq)   # the next segment reuses its name
            seg.discard()
            self._open = None
            return
        seg.seal(self._size, self._prev_crc)
        self._open = None
        self._prev_crc = seg.trailer_crc
        self.stats["segments_sealed"] += 1
        if self._sealer is None:      # opening (journal replay): no sealer yet
            seg.finish()
            self._apply_sealed(seg.seq, seg.trailer, seg.records, state=PENDING)
            return
        self._sealing.append(seg)
        self._sealing_changed.notify_all()

    def _seal_and_wait(self) -> int:
        """Seal the open segment and wait until the map has it; returns the
        newest seq (the one every write so far is in)."""
        with self._lock:
            self._seal()
            target = self._sealing[-1].seq if self._sealing else self._applied
            while self._applied < target and self._failed is None and not self._stop_sealing:
                self._sealing_changed.wait()
        if self._failed is not None:
            raise StoreError(f"volume {self.name} stopped taking writes: {self._failed}")
        if self._applied < target:
            raise StoreError(f"volume {self.name} is closing")
        return target

    def _seal_loop(self) -> None:
        """The sealer: sync each sealed segment, record it in the map, queue
        its upload; in seq order."""
        while True:
            with self._lock:
                while not self._sealing and not self._sealer_done():
                    self._sealing_changed.wait()
                if not self._sealing or self._failed is not None or self._sealing_abandoned:
                    return
                seg = self._sealing[0]
            try:
                seg.finish()
                with self._map_guard:
                    if self._map_closed:
                        return
                    self._apply_sealed(seg.seq, seg.trailer, seg.records, state=PENDING,
                                       advance=False)
            except BaseException as e:  # noqa: BLE001 - a failing disk: stop taking writes
                log.error("volume %s: sealing segment %016x failed: %s", self.name, seg.seq, e)
                with self._lock:
                    self._failed = e
                    self._sealing_changed.notify_all()
                return
            with self._lock:
                self._sealing.pop(0)
                self._applied = seg.seq
                self._sealing_changed.notify_all()
            if self._uploader is not None:
                self._uploader.submit(seg.seq)

    def _sealer_done(self) -> bool:
        return self._stop_sealing or self._failed is not None

    def _stop_sealer(self, drain: bool = True) -> None:
        """Stop the sealer; drain: after it has handled every sealed segment."""
        if self._sealer is None:
            return
        with self._lock:
            if not drain:
                self._sealing_abandoned = True
            self._stop_sealing = True
            self._sealing_changed.notify_all()
        if self._sealer is not threading.current_thread():
            self._sealer.join(timeout=300)

    def _apply_sealed(self, seq: int, trailer, records, *, state: int,
                      advance: bool = True) -> None:
        """Record a sealed segment in the map.  advance: also make it the
        newest segment (when replaying; the sealer's caller does that)."""
        size = os.path.getsize(self._files.path(seq))
        info = segment_info(seq, trailer, records, size, state, encode_trailer(trailer))
        emptied = self._map.apply_segment(info, records, applied_seq=str(seq).encode(),
                                          size=str(trailer.volume_size).encode(),
                                          top_crc=str(info.trailer_crc).encode(),
                                          volume_id=self.config.volume_id.encode(),
                                          store_url=self.store.url.encode())
        # Nothing reads a segment without live blocks (short of a restore of
        # the past): its cached pages are better spent on new writes.
        self._files.drop_page_cache(emptied)
        if advance:
            self._applied = seq
            self._size = trailer.volume_size
            self._prev_crc = info.trailer_crc

    def _on_stored(self, seq: int) -> None:
        # Called from upload threads, which may outlive a close: never touch a
        # closed map (the next open re-checks the segment and finds it stored).
        with self._map_guard:
            if self._map_closed:
                return
            self._map.set_segment_state(seq, STORED)
        self._files.adopt(seq)

    def flush_to_store(self) -> int:
        """Seal and wait until everything written so far is in the store;
        returns the seq that covers it."""
        self._check_writable()
        return self._flush_to_store()

    def snapshot(self, name: str):
        """Bind `name` to the current state, after making it durable in the
        store (so the snapshot is crash-consistent and readable by anyone).  A
        checkpoint at its seq keeps it readable whatever compaction deletes."""
        from lsbd.meta.snapshots import check_snapshot_name, write_snapshot

        check_snapshot_name(name)
        seq = self.checkpoint(force=True)
        return write_snapshot(self.store, self.config, name, seq)

    def _flush_to_store(self) -> int:
        target = self._seal_and_wait()
        if self._uploader is None:
            return target
        if not self._uploader.wait_durable(target, STORE_FLUSH_TIMEOUT):
            err = self._uploader.last_error
            raise StoreError(f"volume {self.name}: flush to the store timed out"
                             + (f" ({err})" if err else "") + "; the data is kept in the journal")
        return target

    # ------------------------------------------------------------------ reads

    def _plan(self, first: int, n: int) -> list[tuple]:
        """Under the lock: where to read blocks [first, first+n) from (see
        lsbd.plans.reads): the map, then the journals it lacks yet."""
        seg = self._open
        return plan_reads(self._map.lookup(first, n), first, n, self._sealing,
                          seg if seg is not None and seg.has_overlay else None, self.block_size)

    def _read_runs(self, runs: list[tuple], nowait: bool = False,
                   sequential: bool = False) -> bytes:
        if len(runs) > 1:
            is_local = self._files.is_local
            remote = sum(1 for _lba, _n, source, _off, crcs in runs
                         if source is not None and crcs is None and not is_local(source))
            if nowait and remote:
                # Refuse before reading anything, not after reading the local part.
                raise WouldBlock("some blocks are not cached locally")
            if remote > 1:   # several segments from the store: in parallel
                return b"".join(self._files.fetcher.map_reads(
                    [lambda r=r: self._read_run(r, False, sequential) for r in runs]))
        parts = [self._read_run(r, nowait, sequential) for r in runs]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_run(self, run: tuple, nowait: bool, sequential: bool) -> bytes:
        _lba, n, source, off, crcs = run
        if source is None:
            return bytes(n * self.block_size) if n > 1 else self._zero_block
        if crcs is not None:
            return self._read_journal(source, off, n, crcs, nowait)
        return self._files.read_blocks(source, off, n, nowait=nowait, sequential=sequential)

    def _read_journal(self, seq: int, offset: int, n: int, crcs: list[int],
                      nowait: bool) -> bytes:
        """Blocks of a journal (the open segment, or one sealed but not yet in
        the map), checked against the CRCs of its in-memory index."""
        data = self._files.read_journal(seq, offset, n * self.block_size, nowait=nowait)
        if data is None:  # sealed, uploaded and evicted meanwhile
            return self._files.read_blocks(seq, offset, n, nowait=nowait)
        check_open_blocks(data, crcs, self.block_size, where=self.lineage.segment_key(seq),
                          offset=offset)
        return data

    def _read_locked(self, lba: int, n: int, nowait: bool = False) -> bytes:
        return self._read_runs(self._plan(lba, n), nowait)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self, force: bool = False, *, base: bool = False) -> int:
        """Write a checkpoint of the map now; returns its seq.  Everything up to
        it is uploaded first (a checkpoint never names a segment the store lacks).
        force: write it even if one exists at this seq (it may have been pruned).
        base: a full one, never a delta (compaction: older chains can go).
        Reads and writes go on meanwhile: the map is read from an LMDB snapshot."""
        self._check_writable()
        with self._checkpoint_lock:
            target = self._seal_and_wait()
            if target == 0 or (target == self._last_checkpoint and not force):
                return target
            # The map is read from a snapshot, which may hold segments sealed
            # after `target`: the checkpoint is of the snapshot's seq, once
            # every segment up to it is in the store (a checkpoint never names
            # a segment the store lacks).  Writes go on meanwhile.
            with self._map.snapshot() as snap:
                target = snap.meta("applied_seq")
                if self._uploader is not None and not self._uploader.wait_durable(
                        target, STORE_FLUSH_TIMEOUT):
                    raise StoreError(f"volume {self.name}: cannot checkpoint: uploads are not "
                                     f"getting through ({self._uploader.last_error})")
                self.check_lease()
                prev = None if base else delta_base(self.store, self.name,
                                                    self.config.volume_id,
                                                    self._last_checkpoint, target)
                shape = dict(volume_size=snap.meta("size", self._size),
                             block_size=self.block_size, top_crc=snap.meta("top_crc"))
                if prev is None:
                    ckpt.write_checkpoint(self.store, self.name, self.config.volume_id, target,
                                          extents=snap.extents(), segments=snap.segments(),
                                          **shape)
                else:
                    segments = snap.segments()
            if prev is not None:
                # A delta comes from the segments alone, with no snapshot held.
                with delta_entries(self.folder, self.block_size, self._segment_records,
                                   prev.seq + 1, target) as entries:
                    ckpt.write_checkpoint(self.store, self.name, self.config.volume_id, target,
                                          extents=entries, segments=segments, delta_of=prev,
                                          **shape)
            self._last_checkpoint = target
            self._last_checkpoint_time = time.monotonic()
            self._map.set_meta(last_checkpoint=str(target).encode())
            self.stats["checkpoints"] += 1
            self._prune_checkpoints()
            return target

    def check_lease(self) -> None:
        """Raise LeaseLost (and stop taking writes) if another writer took
        the lease: asked before every change to the store."""
        if self._lease is None:
            return
        try:
            self._lease.check()
        except LeaseLost as e:
            if self._uploader is not None:
                self._uploader.stop_for(e)
            raise

    def _segment_records(self, seq: int):
        return segment_records(self.store, self.lineage.segment_key, self._files.path(seq), seq)

    def _prune_checkpoints(self) -> None:
        """Delete checkpoints no kept point needs (see lsbd.plans.retention)."""
        from lsbd.meta.pins import pinned_points
        from lsbd.plans.retention import deletable_checkpoints, window_start

        window = window_start({s.seq: s.sealed_ns for s in self.segment_infos()},
                              now_ns=time.time_ns(), retain_seconds=self.config.retain_seconds,
                              top=self._last_checkpoint)
        cps = ckpt.list_checkpoints(self.store, self.name)
        for seq in deletable_checkpoints(cps, pinned=pinned_points(self.store, self.config),
                                         window=window,
                                         live_checkpoint=self._last_checkpoint,
                                         keep_recent=KEEP_CHECKPOINTS,
                                         parents=ckpt.chain_parents(self.store, self.name, cps)):
            ckpt.delete_checkpoint(self.store, self.name, seq)
        # Parts left by an interrupted checkpoint or delete (we hold the
        # checkpoint lock: none is being written now).
        for seq in ckpt.list_incomplete_checkpoints(self.store, self.name):
            ckpt.delete_checkpoint(self.store, self.name, seq)

    def write_checkpoint_here(self) -> int:
        """Write a checkpoint of this (read-only, past) state at its own seq, so
        that the point stays readable after compaction.  Returns the seq."""
        if self._applied > 0:
            with self._map.snapshot() as snap:
                ckpt.write_checkpoint(self.store, self.name, self.config.volume_id, self._applied,
                                      volume_size=self._size, block_size=self.block_size,
                                      extents=snap.extents(), segments=snap.segments(),
                                      top_crc=self._map.get_int("top_crc") or None)
        return self._applied

    # ------------------------------------------------------------------ compaction

    def compact(self, *, threshold: float = 0.6, dry_run: bool = False,
                rate: float | None = None, progress=None, defrag: bool = False,
                force: frozenset[int] = frozenset()):
        """Reclaim space (and with defrag, lay scattered ranges out in
        order); see lsbd.history.compactor."""
        from lsbd.history.compactor import compact

        self._check_writable()
        with self._compact_lock:
            return compact(self, threshold=threshold, dry_run=dry_run, rate=rate, force=force,
                           progress=progress, defrag=defrag)

    def usage(self) -> dict:
        """Counters and space accounting, for `lsbd stats`."""
        infos = self._map.segments()
        data = {
            "volume": self.name, "size": self._size, "applied_seq": self._applied,
            "durable_seq": self._uploader.durable_seq if self._uploader else self._applied,
            "uploads_pending": self._uploader.pending if self._uploader else 0,
            "segments": len(infos), "segment_bytes": sum(i.size for i in infos),
            "live_bytes": sum(i.live_blocks for i in infos) * self.block_size,
            "extents": self._map.extent_count(), "map": self._map.map_stats(),
            "read_defrag_bytes": self._read_defrag.moved if self._read_defrag else 0,
            "last_checkpoint": self._last_checkpoint,
            "flush_mode": self.flush_mode,
        }
        pending = [i for i in infos if i.state == PENDING]
        data["pending_bytes"] = sum(i.size for i in pending)
        err = self._uploader.last_error if self._uploader else None
        data["upload_error"] = str(err) if err else None
        data["uploads_failing_for"] = round(self._uploader.failing_for(), 1) \
            if self._uploader else 0.0
        data["cache_dir"] = self.folder
        data.update(self._files.cache_state())
        data.update(self.stats)
        return data

    def describe(self) -> dict:
        """What `lsbd info` shows, as this writer knows it (no store call)."""
        c = self.config
        holder = self._lease.holder.describe() if self._lease is not None else None
        return {"name": c.name, "volume_id": c.volume_id, "size": self._size,
                "block_size": c.block_size, "created": c.created, "flush_mode": self.flush_mode,
                "segment_size": c.segment_size, "retain_seconds": c.retain_seconds,
                "parent": c.parent, "newest_seq": self._applied,
                "durable_seq": self._uploader.durable_seq if self._uploader else self._applied,
                "last_checkpoint": self._last_checkpoint, "writer": holder,
                "store": self.store.url}

    def extents(self):
        """The block map's extents (lba, nblocks, seq, offset), in block order,
        as of the last sealed segment."""
        return self._map.iter_extents()

    def segment_infos(self) -> list[SegmentInfo]:
        return self._map.segments()

    def map_extents(self, offset_blocks: int, nblocks: int):
        """The map's extents over [offset_blocks, offset_blocks+nblocks), clipped."""
        return self._map.lookup(offset_blocks, nblocks)

    def extents_in(self, seqs: set[int]):
        """The live extents stored in the given segments (one scan of the map)."""
        return [e for e in self.extents() if e.seq in seqs]

    def relocate(self, extents) -> int:
        """Copy extents (in block order) to the open segment, each block only
        if the map still points where the extent says (a newer write wins).
        Blocks that follow each other become one record, so scattered small
        extents come out as one extent.  Returns bytes moved."""
        loaded = [(e, self._files.read_blocks(e.seq, e.offset, e.nblocks)) for e in extents]
        return self.relocate_loaded(loaded)

    def relocate_loaded(self, loaded: list[tuple]) -> int:
        """relocate() of extents whose bytes were read already: [(extent, bytes)]."""
        bs = self.block_size
        moved = 0
        with self._lock:
            self._check_writable()
            seg = self._open_segment()
            mark = seg.mark()
            runs: list[list] = []   # [first block, end block, chunks] of consecutive blocks
            for e, data in loaded:
                for lba, n, source, off, crcs in self._plan(e.lba, e.nblocks):
                    if source != e.seq or crcs is not None:
                        continue  # rewritten since: nothing to move
                    start = lba - e.lba
                    if off != e.offset + start * bs:
                        continue
                    chunk = data[start * bs:(start + n) * bs]
                    if runs and runs[-1][1] == lba:
                        runs[-1][1] = lba + n
                        runs[-1][2].append(chunk)
                    else:
                        runs.append([lba, lba + n, [chunk]])
                    moved += n * bs
            records = []
            for lba, _end, chunks in runs:
                records.extend(self._split_zero_runs(lba, b"".join(chunks)))
            try:
                for j, (rkind, lba, n, data, crcs) in enumerate(records):
                    seg.append(rkind, lba, n, data=data, crcs=crcs, undo=mark[2],
                               commit=(j == len(records) - 1))
            except BaseException as e:
                self._roll_back(seg, mark, e)
                raise
            if seg.end >= self.config.segment_size:
                self._seal_full()
        return moved

    def forget_segments(self, seqs) -> None:
        """Segments deleted from the store: drop them from the map's table and the cache."""
        self._map.drop_segments(seqs)
        for seq in seqs:
            self._files.forget(seq)

    # ------------------------------------------------------------------ background

    def _background(self) -> None:
        """Seal an idle open segment after seal_interval; checkpoint after
        checkpoint_segments new segments or checkpoint_interval seconds."""
        cfg = self.config
        next_lease_check = time.monotonic() + LEASE_CHECK_INTERVAL
        while not self._stop.wait(0.25):
            try:
                if time.monotonic() >= next_lease_check:
                    next_lease_check = time.monotonic() + LEASE_CHECK_INTERVAL
                    try:
                        self.check_lease()
                    except LeaseLost:
                        return    # logged once; every write now fails with it
                    except StoreError:
                        pass      # the store is down: that says nothing of the lease
                with self._lock:
                    seg = self._open
                    if seg is not None and not seg.empty and \
                            time.monotonic() - seg.opened_at >= cfg.seal_interval:
                        self._seal()
                    due = self._applied - self._last_checkpoint
                if due >= cfg.checkpoint_segments or (
                        due > 0 and time.monotonic() - self._last_checkpoint_time
                        >= cfg.checkpoint_interval):
                    self.checkpoint()
                if self._auto_compact and \
                        time.monotonic() - self._last_compaction >= AUTO_COMPACT_INTERVAL:
                    self._last_compaction = time.monotonic()
                    # Rate-limited so foreground I/O keeps most of its throughput.
                    self.compact(rate=AUTO_COMPACT_RATE)
            except Exception as e:  # noqa: BLE001 - never let the timer die; the next tick retries
                log.warning("volume %s: background work failed: %s", self.name, e)

    # ------------------------------------------------------------------ scrubbing

    def verify(self, progress: Callable[[int, int], None] | None = None) -> list[str]:
        """Read every segment the map refers to from the store (not the cache)
        and check every CRC; returns the problems found, each naming a segment
        and offset."""
        from lsbd.segments.scrub import verify_segments

        with self._lock:
            seqs = sorted({e.seq for e in self._map.iter_extents()})
        return verify_segments(self.store, self.lineage, seqs, progress=progress)
