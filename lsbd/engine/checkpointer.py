"""Checkpoints of a writer's map: write one now, prune the ones no kept
point needs, and the timer that seals idle segments and checkpoints on
schedule (and runs the periodic work registered from above the engine)."""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from typing import Any, Callable

from lsbd.engine import sealer as sealing
from lsbd.engine.deltas import (chain_extents, delta_entries, keep_mapped, previous_chain,
                               segment_arrays, segment_records)
from lsbd.engine.sealer import Sealer
from lsbd.engine.state import VolumeState
from lsbd.errors import LeaseLost, StoreError
from lsbd.meta.pins import pinned_points
from lsbd.plans.retention import deletable_checkpoints, window_start
from lsbd.segments import checkpoints as ckpt

log = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 3
LEASE_CHECK_INTERVAL = 10.0   # seconds between checks that the lease is still ours
#: Reads stream when at least READS_BUSY_BYTES were read in the last
#: READS_WINDOW seconds.  A checkpoint that falls due meanwhile waits until
#: they have not streamed for READS_PAUSE seconds (a sequential reader
#: pauses between files, or between passes), up to twice its count of
#: segments or its interval: a delta of 64 segments of random writes takes
#: seconds of this process's processor time, which a first read of a
#: fragmented range, bound by that processor time, lost a quarter of its
#: speed to (docs/scale.md, "Seventeenth round, reads").
READS_BUSY_BYTES = 16 << 20
READS_WINDOW = 2.0
READS_PAUSE = 10.0


class Checkpointer:
    def __init__(self, st: VolumeState, sealer: Sealer):
        self.st = st
        self.sealer = sealer
        self.lock = threading.Lock()

    def checkpoint(self, force: bool = False, *, base: bool = False) -> int:
        """Write a checkpoint of the map now; returns its seq.  Everything up to
        it is uploaded first (a checkpoint never names a segment the store lacks).
        force: write it even if one exists at this seq (it may have been pruned).
        base: a full one, never a delta (compaction: older chains can go).
        Reads and writes go on meanwhile: a checkpoint that follows another
        comes from the segments since and the previous chain; only a first
        one (or one after a broken chain) reads the map, from an LMDB snapshot."""
        st = self.st
        st.check_writable()
        with self.lock:
            target = self.sealer.seal_and_wait()
            if target == 0 or (target == st.last_checkpoint and not force):
                return target
            wall, cpu = time.perf_counter(), time.thread_time()
            # The map is read from a snapshot, which may hold segments sealed
            # after `target`: the checkpoint is of the snapshot's seq, once
            # every segment up to it is in the store.  Writes go on meanwhile.
            # A delta needs only the snapshot's segment table, so the snapshot
            # is let go before the wait for uploads (a reader held for long
            # keeps LMDB from reusing the pages the writer frees meanwhile, and
            # the map file grows); a base read from the map keeps it.
            with contextlib.ExitStack() as held:
                snap = held.enter_context(st.map.snapshot())
                target = snap.meta("applied_seq")
                shape: dict[str, Any] = dict(volume_size=snap.meta("size", st.size),
                             block_size=st.block_size, top_crc=snap.meta("top_crc"))
                chain = None if base else previous_chain(
                    st.store, st.name, st.config.volume_id, st.last_checkpoint, target)
                if chain is not None:
                    segments = snap.segments()
                    held.close()
                if st.uploader is not None and not st.uploader.wait_durable(
                        target, sealing.STORE_FLUSH_TIMEOUT):
                    raise StoreError(f"volume {st.name}: cannot checkpoint: uploads are not "
                                     f"getting through ({st.uploader.last_error})")
                st.check_lease()
                if chain is None:
                    ckpt.write_checkpoint(st.store, st.name, st.config.volume_id, target,
                                          extents=snap.extents(), segments=snap.segments(),
                                          **shape)
            if chain is not None:
                # Built from the segments and the previous chain alone, with no
                # snapshot held (a long one keeps LMDB from reusing the pages
                # the writer frees meanwhile, and the map file grows): a delta,
                # or, once the chain is long, a base of the chain with that
                # delta laid over it.
                prev = chain[-1]
                with delta_entries(st.folder, st.block_size, self._segment_records,
                                   prev.seq + 1, target,
                                   arrays_of=self._segment_arrays) as entries:
                    if ckpt.choose_kind(prev, chain[0]):
                        ckpt.write_checkpoint(st.store, st.name, st.config.volume_id, target,
                                              extents=entries, segments=segments,
                                              delta_of=prev, **shape)
                    else:
                        merged = chain_extents(st.store, chain, st.block_size, then=entries)
                        ckpt.write_checkpoint(st.store, st.name, st.config.volume_id, target,
                                              extents=keep_mapped(merged),
                                              segments=segments, **shape)
            st.last_checkpoint = target
            st.last_checkpoint_time = time.monotonic()
            st.map.set_meta(last_checkpoint=str(target).encode())
            st.stats["checkpoints"] += 1
            self._prune()
            # What checkpoints cost the serving process (`lsbd stats`;
            # bench/scale_bench.py shows it per round).
            st.stats["checkpoint_seconds"] += time.perf_counter() - wall
            st.stats["checkpoint_cpu_seconds"] += time.thread_time() - cpu
            return target

    def _segment_records(self, seq: int):
        st = self.st
        return segment_records(st.store, st.lineage.segment_key, st.files, seq)

    def _segment_arrays(self, seq: int):
        st = self.st
        return segment_arrays(st.store, st.lineage.segment_key, st.files, seq)

    def _prune(self) -> None:
        """Delete checkpoints no kept point needs (see lsbd.plans.retention)."""
        st = self.st
        window = window_start({s.seq: s.sealed_ns for s in st.map.segments()},
                              now_ns=time.time_ns(), retain_seconds=st.config.retain_seconds,
                              top=st.last_checkpoint)
        cps = ckpt.list_checkpoints(st.store, st.name)
        for seq in deletable_checkpoints(cps, pinned=pinned_points(st.store, st.config),
                                         window=window, live_checkpoint=st.last_checkpoint,
                                         keep_recent=KEEP_CHECKPOINTS,
                                         parents=ckpt.chain_parents(st.store, st.name, cps)):
            ckpt.delete_checkpoint(st.store, st.name, seq)
        # Parts left by an interrupted checkpoint or delete (we hold the
        # checkpoint lock: none is being written now).
        for seq in ckpt.list_incomplete_checkpoints(st.store, st.name):
            ckpt.delete_checkpoint(st.store, st.name, seq)


class Timer:
    """The background thread: seal an idle open segment after seal_interval;
    checkpoint after checkpoint_segments new segments or checkpoint_interval
    seconds; run the periodic jobs registered with every()."""

    TICK = 0.25

    def __init__(self, st: VolumeState, sealer: Sealer, checkpointer: Checkpointer):
        self.st = st
        self.sealer = sealer
        self.checkpointer = checkpointer
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self._jobs: list[list] = []   # [interval, last run (monotonic), job]
        # (monotonic time, bytes read so far) at the ticks of the last READS_WINDOW s
        self._reads: collections.deque[tuple[float, int]] = collections.deque()
        self._streamed_at = -READS_PAUSE    # when reads last streamed (monotonic)

    def every(self, interval: float, job: Callable[[], object]) -> None:
        """Run job() on the timer's thread every `interval` seconds (the first
        time `interval` seconds from now).  Its errors are logged."""
        self._jobs.append([interval, time.monotonic(), job])

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"lsbd-{self.st.name}",
                                       daemon=True)
        self.thread.start()

    def join(self, timeout: float | None = None) -> None:
        self.stop.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def note_reads(self, now: float) -> None:
        """Note the bytes read so far, at `now` (a tick of the timer)."""
        reads = self._reads
        reads.append((now, int(self.st.stats["bytes_read"])))
        while reads[0][0] < now - READS_WINDOW:
            reads.popleft()
        if reads[-1][1] - reads[0][1] >= READS_BUSY_BYTES:
            self._streamed_at = now

    def reads_streaming(self, now: float) -> bool:
        """Whether reads streamed in the last READS_PAUSE seconds."""
        return now - self._streamed_at < READS_PAUSE

    def checkpoint_due(self, due: int, now: float) -> bool:
        """Whether to checkpoint now, `due` segments after the last one: at
        checkpoint_segments of them or checkpoint_interval seconds, once
        reads pause (see READS_PAUSE), and at twice either at once."""
        st, cfg = self.st, self.st.config
        if due <= 0:
            return False
        age = now - st.last_checkpoint_time
        if due >= 2 * cfg.checkpoint_segments or age >= 2 * cfg.checkpoint_interval:
            return True
        if due < cfg.checkpoint_segments and age < cfg.checkpoint_interval:
            return False
        return not self.reads_streaming(now)

    def _run(self) -> None:
        st, cfg = self.st, self.st.config
        next_lease_check = time.monotonic() + LEASE_CHECK_INTERVAL
        while not self.stop.wait(self.TICK):
            try:
                # Now and then, that the lease is still ours.
                if time.monotonic() >= next_lease_check:
                    next_lease_check = time.monotonic() + LEASE_CHECK_INTERVAL
                    try:
                        st.check_lease()
                    except LeaseLost:
                        return    # logged once; every write now fails with it
                    except StoreError:
                        pass      # the store is down: that says nothing of the lease
                with st.lock:
                    seg = st.open
                    if seg is not None and not seg.empty and \
                            time.monotonic() - seg.opened_at >= cfg.seal_interval:
                        self.sealer.seal()
                    due = st.applied - st.last_checkpoint
                now = time.monotonic()
                self.note_reads(now)
                if self.checkpoint_due(due, now):
                    self.checkpointer.checkpoint()
                for entry in self._jobs:
                    interval, last, job = entry
                    if time.monotonic() - last >= interval:
                        entry[1] = time.monotonic()
                        job()
            except Exception as e:  # noqa: BLE001 - never let the timer die; the next tick retries
                log.warning("volume %s: background work failed: %s", st.name, e)
