"""Seams for tests: what a test needs to see or hold still inside a Volume.

Tests reach the engine's insides only through these functions (a check in
the suite refuses `vol._anything` in tests), so the engine can change shape
without breaking them: when a piece moves, only this module follows.  Not
for use by the product."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

from lsbd.engine import opening
from lsbd.engine.sealer import MAX_SEALING
from lsbd.engine.volume import Volume
from lsbd.map import testing as map_testing
from lsbd.map.blockmap import STORED, SegmentInfo
from lsbd.segments.journal import OpenSegment
from lsbd.segments.local import SegmentFiles


def seal_now(vol: Volume) -> int:
    """Seal the open segment and wait until the map has it; the newest seq."""
    return vol._sealer.seal_and_wait()


def seal_queued(vol: Volume) -> OpenSegment | None:
    """Seal the open segment and queue it for the sealer without waiting;
    the segment queued (None when there was nothing to seal)."""
    st = vol._st
    with st.lock:
        before = len(st.sealing)
        vol._sealer.seal()
        return st.sealing[-1] if len(st.sealing) > before else None


def pause_sealer(vol: Volume) -> None:
    """Stop the sealer thread for good: sealed segments stay queued, never
    synced, mapped or uploaded (as in a crash before the sealer ran)."""
    sealer = vol._sealer
    with vol._st.lock:
        sealer.abandoned = True
        vol._st.sealing_changed.notify_all()
    assert sealer.thread is not None
    sealer.thread.join(5)


def sealing(vol: Volume) -> list[OpenSegment]:
    """The sealed segments waiting for the sealer, oldest first (a copy)."""
    with vol._st.lock:
        return list(vol._st.sealing)


@contextlib.contextmanager
def sealer_far_behind(vol: Volume) -> Iterator[None]:
    """Within: the sealing queue looks full, so writes meet back-pressure
    (nowait writes refuse with WouldBlock)."""
    st = vol._st
    with st.lock:
        filler = vol._writer.open_segment()
        st.sealing.extend([filler] * MAX_SEALING)
    try:
        yield
    finally:
        with st.lock:
            st.sealing[:] = [s for s in st.sealing if s is not filler]
            st.sealing_changed.notify_all()


def journal(vol: Volume) -> OpenSegment | None:
    """The open segment (the journal being written), or None."""
    return vol._st.open


def local_path(vol: Volume, seq: int) -> str:
    """Where segment `seq`'s file lives (or would live) in the cache dir."""
    return vol._st.files.path(seq)


def local_files(vol: Volume) -> SegmentFiles:
    """The volume's local segment files (its cache dir)."""
    return vol._st.files


def open_file_uses(vol: Volume) -> int:
    """Uses of the cache dir's open segment files held now (reads under
    way, read-ahead not yet advised): 0 when nothing holds one."""
    files = vol._st.files
    with files._lock:
        return sum(f.users for f in files._files.values())


def extent_count(vol) -> int:
    """How many extents the block map holds (a Volume or a PastVolume), as
    reads see them: staged one-block writes cut the extents they fall in."""
    return sum(1 for _ in vol._st.map.iter_extents())


def map_of(vol):
    """The volume's block map (to watch or stub what it is asked)."""
    return vol._st.map


def map_process(vol: Volume):
    """The map's process (lsbd.map.offload) as a Popen, or None when none runs."""
    return map_testing.map_process(vol._st.map)


def staged_segments(vol) -> int:
    """Segments the map holds staged, not yet merged into its extents."""
    return vol._st.map.staged_count()


def map_merging(vol) -> bool:
    """Whether a merge of staged segments is under way (some ranges done)."""
    return map_testing.merging(vol._st.map)


def merge_staged(vol) -> None:
    """Merge every staged segment now (the sealer idle: nothing written)."""
    with vol._st.map_guard:
        vol._st.map.merge_all()


def map_live_rows(vol) -> dict[int, int]:
    """Each segment's live blocks as its row in the map says, staged writes
    not added (those not 0)."""
    return map_testing.segment_rows(vol._st.map)


def map_recount(vol) -> dict[int, int]:
    """Each segment's live blocks counted over the map's extents."""
    return vol._st.map.live_blocks_by_seq()


def map_extents(vol) -> list[tuple]:
    """Every extent of the block map, in block order, as (lba, nblocks, seq, offset)."""
    return [tuple(e) for e in vol._st.map.iter_extents()]


def segment(vol: Volume, seq: int) -> SegmentInfo | None:
    """The map's record of segment `seq` (its state, sizes), or None."""
    return vol._st.map.segment(seq)


def map_meta(vol: Volume, key: str) -> bytes | None:
    """A value from the block map's own metadata."""
    return vol._st.map.get_meta(key)


def failure(vol: Volume) -> BaseException | None:
    """Why the volume stopped taking writes, or None while it takes them."""
    return vol._st.failed


def wait_failed(vol: Volume, timeout: float = 10.0) -> bool:
    """Wait until the volume stops taking writes; whether it did."""
    deadline = time.monotonic() + timeout
    while vol._st.failed is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return vol._st.failed is not None


def upload_error(vol: Volume) -> BaseException | None:
    """The last error of the uploader (None if no upload failed)."""
    up = vol._st.uploader
    return None if up is None else up.last_error


def uploader(vol: Volume):
    """The volume's uploader (None on a store that needs none)."""
    return vol._st.uploader


def map_snapshots_held(vol: Volume) -> int:
    """How many read transactions (snapshots) of the block map are open now:
    the slots of LMDB's reader table with a transaction id ("-" is a slot
    kept for a thread, holding nothing)."""
    return map_testing.snapshots_held(vol._st.map)


def stop_background(vol: Volume) -> None:
    """Stop the timer thread: no more idle seals or automatic checkpoints."""
    vol._timer.join()


def wait_stored(vol: Volume, seq: int, timeout: float = 10.0) -> bool:
    """Wait until the map records segment `seq` as stored; whether it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = vol._st.map.segment(seq)
        if info is not None and info.state == STORED:
            return True
        time.sleep(0.02)
    return False


def lease_holder(vol: Volume):
    """Who this writer's lease names (None once it let go of it)."""
    lease = vol._st.lease
    return None if lease is None else lease.holder


def read_defrag(vol):
    """The writer's read-directed defragmenter (lsbd.engine.readdefrag), or
    None (a read-only volume, or read_defrag off)."""
    reader = getattr(vol, "_reader", None)
    return None if reader is None else getattr(reader, "read_defrag", None)


def content_changes(vol: Volume) -> int:
    """The count of appends that may have changed what a block reads as
    (what a read's relocation compares: Writer.relocate_read)."""
    with vol._st.lock:
        return vol._st.content_changes


def plan_read(vol: Volume, first: int, n: int) -> tuple[list[tuple], int]:
    """A read's plan of blocks [first, first+n), and content_changes then."""
    st = vol._st
    with st.lock:
        return vol._reader.plan(first, n), st.content_changes


def reads_streaming(vol: Volume, streaming) -> None:
    """Make the sealer ask streaming() whether reads stream (it holds
    relocated segments back while they do: Sealer.holding)."""
    vol._sealer.reads_streaming = streaming


def stop_read_defrag(vol: Volume) -> None:
    """No more read-directed defragmentation on this writer (relocations
    by hand only)."""
    vol._reader.close_defrag()


def map_commits(vol) -> int:
    """The write transactions the block map's file has committed since it
    was made (each one a sync of that file)."""
    return map_testing.commits(vol._st.map)


@contextlib.contextmanager
def cache_dir_resets() -> Iterator[list[str]]:
    """The folders of the cache dirs an open clears and makes again, while
    in the block."""
    resets: list[str] = []
    reset = opening._reset_cache_dir

    def counted(st) -> None:
        resets.append(st.folder)
        reset(st)

    opening._reset_cache_dir = counted
    try:
        yield resets
    finally:
        opening._reset_cache_dir = reset


def after_clean_close(vol: Volume, then: Callable[[], None]) -> None:
    """Call `then` once vol.close()'s clean part (its uploads waited for)
    is done, before its teardown closes the journals (for this volume
    object only)."""
    close_cleanly = vol._close_cleanly

    def close_cleanly_then() -> None:
        close_cleanly()
        then()

    vol._close_cleanly = close_cleanly_then  # type: ignore[method-assign]
