"""Compaction: move the live data out of sparse segments, checkpoint, then
delete what no point needs (safe reclamation: docs/history.md).

Order, and why each step is safe to interrupt:
  1. pin: make sure every kept point has a checkpoint at exactly its seq;
  2. rewrite: copy the live blocks of each victim into the open segment, each
     block only if the map still points at the victim (a foreground write
     wins; the check and the append happen under the volume lock, so a
     replay of the log gives the same map);
  3. seal, wait until everything is in the store, write a live checkpoint;
  4. delete the segments and checkpoints nothing needs, now that nothing
     durable refers to them.
A kill before 4 leaves extra copies (the next run deletes them); a kill
during 4 leaves some garbage (the next run finishes the job).

Defragmentation (defrag=True) is part of step 2: a log scatters a range
that was written in small random pieces over many segments, so reading it
in order costs one small read per piece.  Every window of DEFRAG_WINDOW
bytes whose blocks lie in DEFRAG_MIN_EXTENTS or more extents is copied
forward whole (the same per-block check as above), as one record per run
of consecutive blocks; its old copies die and step 4 reclaims the segments
left empty (the next compaction, those left sparse)."""

from __future__ import annotations

import logging
import tempfile
import threading
import time
import weakref
from typing import Callable

import attrs

from lsbd import names
from lsbd.engine.recovery import load_checkpoint
from lsbd.map.blockmap import BlockMap
from lsbd.engine.volume import Volume
from lsbd.errors import ReadOnlyError
from lsbd.meta.pins import pinned_points
from lsbd.segments import checkpoints as ckpt
from lsbd.segments.remote import store_segment_seqs
from lsbd.plans.retention import (
    deletable_checkpoints,
    held_back,
    plan_compaction,
    plan_deletions,
    window_start,
)

log = logging.getLogger(__name__)

BATCH_BYTES = 4 * 1024 * 1024
DEFRAG_WINDOW = 1024 * 1024     # bytes laid out in order together
DEFRAG_MIN_EXTENTS = 32         # a window in this many pieces or more is rewritten
AUTO_COMPACT_INTERVAL = 300.0         # seconds between background compactions
AUTO_COMPACT_RATE = 16 * 1024 * 1024  # bytes/s a background compaction may rewrite


@attrs.define(kw_only=True)
class CompactionReport:
    dry_run: bool = False
    window: int = 0
    threshold: float = 0.6
    retain_seconds: float = 0.0
    segments_read: int = 0
    segments_written: int = 0
    segments_deleted: int = 0
    checkpoints_deleted: int = 0
    bytes_rewritten: int = 0
    bytes_reclaimed: int = 0
    stored_bytes_before: int = 0
    stored_bytes_after: int = 0
    skipped_pinned: int = 0
    windows_defragmented: int = 0
    bytes_defragmented: int = 0
    # Dead data left in place, and why (see retention.held_back).
    held_by_window_segments: int = 0
    held_by_window_bytes: int = 0
    held_by_points_segments: int = 0
    held_by_points_bytes: int = 0
    held_by_threshold_segments: int = 0
    held_by_threshold_bytes: int = 0
    seconds: float = 0.0

    @property
    def write_amplification(self) -> float:
        """Bytes compaction wrote per byte it reclaimed."""
        return self.bytes_rewritten / self.bytes_reclaimed if self.bytes_reclaimed else 0.0

    def as_dict(self) -> dict:
        d = attrs.asdict(self)
        d["write_amplification"] = round(self.write_amplification, 3)
        return d


def checkpoint_refs(volume, seq: int) -> set[int]:
    """The segments the map at checkpoint `seq` refers to.  A base is
    streamed; a delta's map is built in a scratch map in the cache dir (the
    delta alone does not say which of its base's extents it covers)."""
    manifest = ckpt.read_manifest(volume.store, volume.name, seq)
    if not manifest.is_delta:
        return {e.seq for e in ckpt.read_extents(volume.store, manifest)}
    scratch = tempfile.mkdtemp(prefix="refs-", dir=volume.cache_root)
    bm = BlockMap(scratch, volume.block_size)
    try:
        load_checkpoint(bm, volume.store, volume.name, manifest)
        return {e.seq for e in bm.iter_extents()}
    finally:
        bm.close()
        BlockMap.destroy(scratch)


def ensure_checkpoint_at(store, volume: str, seq: int, *, cache_root: str) -> None:
    """A kept point needs a checkpoint at exactly its seq: build one from
    the history if it is missing (it can be rebuilt while its segments exist)."""
    if seq <= 0 or seq in ckpt.list_checkpoints(store, volume):
        return
    with Volume.open(store, volume, cache_root=cache_root, at_seq=seq) as past:
        past.write_checkpoint_here()


_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def _lock_of(volume) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(volume, threading.Lock())


def compact(volume, *, threshold: float = 0.6, dry_run: bool = False, rate: float | None = None,
            progress: Callable[[int, int], None] | None = None,
            defrag: bool = False, force: frozenset[int] = frozenset()) -> CompactionReport:
    """Reclaim space on an open writable volume (and with defrag, lay
    scattered ranges out in order).  One compaction of a volume at a time.
    `force`: segments to rewrite whatever their live fraction (those sealed
    with a retired key).  A dry run makes the same plan and predicts what the
    run would delete, changing nothing."""
    if volume.read_only:
        raise ReadOnlyError(f"volume {volume.name} is open read-only")
    with _lock_of(volume):
        return _compact(volume, threshold=threshold, dry_run=dry_run, rate=rate,
                        progress=progress, defrag=defrag, force=force)


def attach(volume, *, auto: bool = False) -> None:
    """Serve compaction on a writer: the control socket's "compact" request,
    and with auto, a rate-limited compaction every AUTO_COMPACT_INTERVAL on
    the volume's background thread (so foreground I/O keeps most of its
    throughput)."""
    def serve(request: dict, progress: Callable[[int, int], None] | None = None) -> dict:
        return compact(volume, threshold=float(request.get("threshold", 0.6)),
                       dry_run=bool(request.get("dry_run")),
                       defrag=bool(request.get("defrag")), progress=progress,
                       force=frozenset(request.get("force", ()))).as_dict()

    volume.control_ops["compact"] = serve
    if auto:
        volume.every(AUTO_COMPACT_INTERVAL, lambda: compact(volume, rate=AUTO_COMPACT_RATE))


def _compact(volume, *, threshold: float, dry_run: bool, rate: float | None,
             progress: Callable[[int, int], None] | None, defrag: bool,
             force: frozenset[int]) -> CompactionReport:
    started = time.monotonic()
    store = volume.store
    bs = volume.block_size
    report = CompactionReport(dry_run=dry_run, threshold=threshold,
                              retain_seconds=volume.config.retain_seconds)
    volume.flush_to_store()
    top = volume.applied_seq
    infos = {s.seq: s for s in volume.segment_infos()}
    stored = store_segment_seqs(store, volume.name)
    report.stored_bytes_before = sum(stored.values())
    window = window_start({s: i.sealed_ns for s, i in infos.items()}, now_ns=time.time_ns(),
                          retain_seconds=volume.config.retain_seconds, top=top)
    report.window = window
    points = pinned_points(volume.store, volume.config)

    # 1. Pin.  Snapshots and clones wrote their checkpoint when taken; W may be new.
    kept = {p for p in points if p <= window}
    if window < top:
        kept.add(window)
    pinned_refs: set[int] = set()
    for p in sorted(kept):
        pinned_refs |= _refs_at(volume, p, build=not dry_run)

    # 2a. Defragment first: the segments it empties need no rewrite after it.
    windows = fragmented_windows(volume) if defrag else []
    report.windows_defragmented = len(windows)
    sealed_before = volume.stats["segments_sealed"]
    live = {s: i.live_blocks for s, i in infos.items()}
    if windows and dry_run:
        for seq, n in _blocks_in_windows(volume, windows).items():
            live[seq] = live.get(seq, 0) - n
            report.bytes_defragmented += n * bs
    elif windows:
        report.bytes_defragmented = _defragment(volume, windows, rate=rate, progress=progress)
        volume.flush_to_store()
        infos = {s.seq: s for s in volume.segment_infos()}
        live = {s: i.live_blocks for s, i in infos.items()}
        stored = store_segment_seqs(store, volume.name)

    # A sealed volume's stored sizes are compressed: its live fraction is
    # taken against the plain data the segment holds.
    sizes = _sizes(volume, infos, stored)
    plan = plan_compaction(
        segments={s: (sizes[s], n) for s, n in live.items() if s in sizes},
        block_size=bs, window=window, top=top, base_seq=volume.config.base_seq,
        pinned_refs=pinned_refs, threshold=threshold, force=force)
    report.segments_read = len(plan.victims)
    report.skipped_pinned = plan.skipped_pinned
    if dry_run:
        # What the run would leave, and so delete: the victims' live blocks move out.
        for seq in plan.victims:
            live[seq] = 0
        doomed = plan_deletions(stored=stored, live_blocks=live, window=window,
                                live_checkpoint=top, base_seq=volume.config.base_seq,
                                kept_refs=pinned_refs)
        report.bytes_rewritten = plan.rewrite_bytes + report.bytes_defragmented
        report.segments_deleted = len(doomed)
        report.bytes_reclaimed = sum(stored[s] for s in doomed)
        cps = ckpt.list_checkpoints(store, volume.name)
        report.checkpoints_deleted = len(deletable_checkpoints(
            cps, pinned=points, window=window, live_checkpoint=top,
            parents=ckpt.chain_parents(store, volume.name, cps)))
        report.stored_bytes_after = report.stored_bytes_before - report.bytes_reclaimed
        _explain(report, sizes, live, bs, window, pinned_refs, doomed)
        report.seconds = time.monotonic() - started
        return report

    # 2b. Rewrite the sparse segments.
    if plan.victims:
        report.bytes_rewritten = _rewrite(volume, set(plan.victims), plan.rewrite_bytes,
                                          rate=rate, progress=progress)
    report.bytes_rewritten += report.bytes_defragmented

    # 3. Make it durable and checkpoint the live map.
    # A base: the chains of the points deleted here need not outlive them.
    live_checkpoint = volume.checkpoint(base=True)
    report.segments_written = volume.stats["segments_sealed"] - sealed_before

    # 4. Delete what nothing needs, judged again now (with retain 0, W moved).
    infos = {s.seq: s for s in volume.segment_infos()}
    top = volume.applied_seq
    window = window_start({s: i.sealed_ns for s, i in infos.items()}, now_ns=time.time_ns(),
                          retain_seconds=volume.config.retain_seconds, top=min(top, live_checkpoint))
    points = pinned_points(volume.store, volume.config)
    kept = {p for p in points if p <= window} | ({window} if window else set())
    kept_refs: set[int] = set()
    for p in sorted(kept):
        kept_refs |= _refs_at(volume, p, build=True)
    stored = store_segment_seqs(store, volume.name)
    live = {s: i.live_blocks for s, i in infos.items()}
    doomed = plan_deletions(stored=stored, live_blocks=live, window=window,
                            live_checkpoint=live_checkpoint, base_seq=volume.config.base_seq,
                            kept_refs=kept_refs)
    volume.check_lease()   # a writer fenced off meanwhile must delete nothing
    for i, seq in enumerate(doomed):
        store.delete(names.segment_key(volume.name, seq))
        report.bytes_reclaimed += stored[seq]
        if progress:
            progress(i + 1, len(doomed))
    volume.forget_segments(doomed)
    report.segments_deleted = len(doomed)
    cps = ckpt.list_checkpoints(store, volume.name)
    for seq in deletable_checkpoints(cps, pinned=points, window=window,
                                     live_checkpoint=live_checkpoint,
                                     parents=ckpt.chain_parents(store, volume.name, cps)):
        ckpt.delete_checkpoint(store, volume.name, seq)
        report.checkpoints_deleted += 1
    report.stored_bytes_after = sum(store_segment_seqs(store, volume.name).values())
    _explain(report, _sizes(volume, infos, stored), live, bs, window, kept_refs, doomed)
    report.seconds = time.monotonic() - started
    log.info("volume %s: compaction %s", volume.name, report.as_dict())
    return report


def _refs_at(volume, seq: int, *, build: bool) -> set[int]:
    """The segments the map at kept point `seq` uses: from its checkpoint,
    written first when missing (build=True), else read from the map rebuilt
    at that point (a dry run writes nothing)."""
    if seq <= 0:
        return set()
    if build:
        ensure_checkpoint_at(volume.store, volume.name, seq, cache_root=volume.cache_root)
    if seq in ckpt.list_checkpoints(volume.store, volume.name):
        return checkpoint_refs(volume, seq)
    from lsbd.engine.volume import Volume

    with Volume.open(volume.store, volume.name, cache_root=volume.cache_root, at_seq=seq) as past:
        return {e.seq for e in past.extents()}


def _blocks_in_windows(volume, windows: list[int]) -> dict[int, int]:
    """seq -> blocks of it that defragmenting `windows` would move."""
    per = DEFRAG_WINDOW // volume.block_size
    out: dict[int, int] = {}
    for w in windows:
        for e in volume.map_extents(w * per, per):
            out[e.seq] = out.get(e.seq, 0) + e.nblocks
    return out


def _sizes(volume, infos: dict, stored: dict[int, int]) -> dict[int, int]:
    """seq -> the size a segment's live fraction is taken against: its object
    size, or for a sealed (compressed) volume the plain data it holds."""
    if volume.config.sealed:
        return {s: infos[s].data_blocks * volume.block_size for s in stored if s in infos}
    return {s: n for s, n in stored.items() if s in infos}


def _explain(report: CompactionReport, stored: dict[int, int], live: dict[int, int],
             block_size: int, window: int, kept_refs: set[int], doomed: list[int]) -> None:
    for key, value in held_back(stored=stored, live_blocks=live, block_size=block_size,
                                window=window, kept_refs=kept_refs, deleted=doomed).items():
        setattr(report, key, value)


def _rewrite(volume, victims: set[int], total: int, *, rate: float | None,
             progress: Callable[[int, int], None] | None) -> int:
    """Copy the live extents of the victims forward, in batches."""
    moved = 0
    batch: list = []
    batch_bytes = 0
    for extent in volume.extents_in(victims):
        batch.append(extent)
        batch_bytes += extent.nblocks * volume.block_size
        if batch_bytes >= BATCH_BYTES:
            moved += volume.relocate(batch)
            batch, batch_bytes = [], 0
            if progress:
                progress(moved, total)
            if rate:
                time.sleep(BATCH_BYTES / rate)
    if batch:
        moved += volume.relocate(batch)
        if progress:
            progress(moved, total)
    return moved


def fragmented_windows(volume) -> list[int]:
    """Indexes of the DEFRAG_WINDOW-sized windows of the volume whose blocks
    lie in DEFRAG_MIN_EXTENTS or more extents (one streaming pass over the
    map; an extent counts in every window it touches)."""
    per = DEFRAG_WINDOW // volume.block_size
    out: list[int] = []
    current, count = -1, 0
    for e in volume.extents():
        for w in range(e.lba // per, (e.lba + e.nblocks - 1) // per + 1):
            if w != current:
                if count >= DEFRAG_MIN_EXTENTS:
                    out.append(current)
                current, count = w, 0
            count += 1
    if count >= DEFRAG_MIN_EXTENTS:
        out.append(current)
    return out


def _defragment(volume, windows: list[int], *, rate: float | None,
                progress: Callable[[int, int], None] | None) -> int:
    """Copy every block of each window forward, in block order."""
    per = DEFRAG_WINDOW // volume.block_size
    moved = 0
    for i, w in enumerate(windows):
        moved += volume.relocate(volume.map_extents(w * per, per))
        if progress:
            progress(i + 1, len(windows))
        if rate:
            time.sleep(DEFRAG_WINDOW / rate)
    return moved
