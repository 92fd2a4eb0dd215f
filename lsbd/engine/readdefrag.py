"""Read-directed defragmentation: ranges that reads find scattered over many
small pieces are written again, in block order, in the background.

After random writes a sequential read of 1 MiB stitches up to 256 pieces
from as many places, one read and one check each; the same read of blocks
laid out in order is one read.  A read that found its blocks scattered
hands the bytes it read to this worker, which appends them to the open
segment as one record per run of blocks, each block only if the map still
points where the read found it (Volume.relocate_loaded: a newer write
wins).  Nothing is deleted here: the old copies stay until compaction
finds them dead and the retention rules let it reclaim them, so the cost
is space, bounded by what compaction reclaims, and the bytes written,
bounded by RATE on average: a token bucket as deep as the queue, so
that reads arriving faster than RATE for a moment (or while an append
waits for the lock) are taken as they come, up to QUEUE_BYTES at once,
not at RATE while the queue overflows.  A writer that has not been written to since it opened
offers nothing (lsbd.engine.reader): reading alone never changes a volume.
While scattered reads keep coming (streaming()), the sealer holds the
segments of these moves back, unsynced and unmapped (Sealer.holding): their
disk writes wait for the reads to pause."""

from __future__ import annotations

import collections
import logging
import threading
import time

log = logging.getLogger(__name__)

#: A read qualifies when it is at least MIN_BYTES long and its blocks come
#: from sealed segments in at least one piece per MAX_PIECE_BYTES on average.
MIN_BYTES = 128 * 1024
MAX_PIECE_BYTES = 16 * 1024
#: Bytes of reads waiting to be written again; more are dropped (a later
#: read of the same range asks again).  Also the most the worker writes at
#: once, past RATE, when it catches up.  A thirty-second of a second at
#: RATE: it is the server's memory (a queue of 64 MiB laid out no more of
#: a fragmented region than one of 32, docs/scale.md).
QUEUE_BYTES = 16 << 20
#: Bytes written again per second on average, at most: above what a
#: reader of scattered blocks gets (a first pass of 200-350 MiB/s with
#: 1 MiB reads), so that one pass over a range lays all of it out again,
#: not a part.  The bound is there for what each byte relocated costs:
#: written again, uploaded, space until compaction reclaims the old copy,
#: and the sealer's and the map's work (docs/scale.md).
RATE = 512 << 20
#: Reads stream while scattered reads keep coming less than this apart:
#: the sealer then holds the relocated segments back (lsbd.engine.sealer).
STREAM_GAP = 0.25


def scattered(runs: list[tuple], block_size: int) -> bool:
    """Whether a read plan (lba, n, source, offset, crcs) is worth laying
    out again: long enough, and in many small pieces of sealed segments."""
    blocks = sum(r[1] for r in runs)
    if blocks * block_size < MIN_BYTES:
        return False
    pieces = sum(1 for r in runs if r[2] is not None and r[4] is None)
    return pieces * MAX_PIECE_BYTES >= blocks * block_size


class Pacer:
    """A token bucket: `rate` bytes a second on average, and up to `burst`
    more at once after a quiet or held-up spell."""

    def __init__(self, rate: int, burst: int, clock=time.monotonic):
        self.rate = rate
        self.burst = burst
        self._clock = clock
        #: when the bucket is empty again; the bucket starts full
        self._empty_at = clock() - burst / rate

    def spend(self, nbytes: int) -> float:
        """Count nbytes moved now; the seconds to wait before moving more."""
        now = self._clock()
        self._empty_at = max(self._empty_at, now - self.burst / self.rate) + nbytes / self.rate
        return max(0.0, self._empty_at - now)


class ReadDefrag:
    """One background thread; `offer` is cheap and never blocks a read."""

    def __init__(self, relocate, *, name: str):
        #: (a read's plan, its bytes, planned_at) -> bytes moved
        self._relocate = relocate
        self._queue: collections.deque = collections.deque()
        self._queued = 0
        self._busy = False
        self._cond = threading.Condition()
        self._stop = False
        self.moved = 0
        #: Bytes of scattered reads not queued (the queue was full): a later
        #: read of the same range finds it scattered still.
        self.dropped = 0
        self._pacer = Pacer(RATE, QUEUE_BYTES)
        self._last_offer = float("-inf")   # time.monotonic() of the last offer
        self._thread = threading.Thread(target=self._run, name=f"lsbd-{name}-read-defrag",
                                        daemon=True)
        self._thread.start()

    def offer(self, runs: list[tuple], data: bytes, planned_at: int) -> bool:
        """Queue a read that found its blocks scattered: its plan, the whole
        blocks it read, and the volume's content_changes when it planned."""
        nbytes = len(data)
        self._last_offer = time.monotonic()
        with self._cond:
            if self._stop:
                return False
            if self._queued + nbytes > QUEUE_BYTES:
                self.dropped += nbytes
                return False
            self._queue.append((runs, data, planned_at))
            self._queued += nbytes
            self._cond.notify()
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                runs, data, planned_at = self._queue.popleft()
                nbytes = len(data)
                self._queued -= nbytes
                self._busy = True
            try:
                self.moved += self._relocate(runs, data, planned_at)
            except Exception as e:  # noqa: BLE001 - an optimisation: never fail the volume
                log.info("read-directed defragmentation skipped a range: %s", e)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
            pause = self._pacer.spend(nbytes)
            if pause > 0:
                with self._cond:
                    self._cond.wait_for(lambda: self._stop, pause)

    def streaming(self) -> bool:
        """Whether scattered reads are coming now (one came within STREAM_GAP)."""
        return time.monotonic() - self._last_offer < STREAM_GAP

    def drain(self, timeout: float = 60) -> bool:
        """Wait until everything queued has been handled (tests)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._queue.clear()
            self._queued = 0
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=60)
