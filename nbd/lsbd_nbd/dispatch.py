"""Where a request runs: on the connection's own thread, or on the pool.

Every engine call blocks its caller.  A call that returns in microseconds (a
cached read, a journal append) is best run right on the connection's thread:
handing it to a worker costs more than the call itself (measured with fio,
4 KiB random writes over one connection against an in-memory volume: about
125k IOPS inline against about 23k through a thread pool; the GIL hand-offs
dominate).  So:

  * WRITE, TRIM, WRITE_ZEROES and BLOCK_STATUS run inline.  A write that
    blocks is the engine pushing back (the store is behind); running more
    writes at once would not make the store faster.
  * FLUSH and anything with FUA run on the pool: they wait for an fsync or
    the store by definition, and the connection keeps reading meanwhile.
  * READ runs inline while reads are fast, and on the pool while reads wait
    on the store (cache misses: independent ranged GETs that overlap well).

ReadPolicy tells the two apart, per export.  It measures how long inline
reads spend blocked rather than computing: wall time minus the thread's CPU
time (computing on another thread would be no faster under the GIL),
counted only if the thread really blocked (a voluntary context switch; a
thread merely preempted on a busy machine gains nothing from the pool).  A
read blocked longer than `offload_after` is slow.  When a quarter or more of
the recent reads were slow (a moving average), reads go to the pool for a
window of time; after it the next read runs inline again as a probe.  While
reads keep being slow the windows grow (up to MAX_WINDOW).
"""

from __future__ import annotations

import math
import resource
import time

MIN_WINDOW = 0.25
MAX_WINDOW = 8.0


class ReadPolicy:
    """Shared by every connection to one export.  Updates race harmlessly
    (plain attributes under the GIL)."""

    ALPHA = 0.125        # weight of the newest read in the moving average
    SLOW_SHARE = 0.25    # share of slow reads that sends reads to the pool

    def __init__(self, offload_after: float):
        self.offload_after = offload_after
        self.slow_share = 0.0                # moving average of "this read was slow"
        # Until this perf_counter() time, reads run on the pool.
        self.pool_until = math.inf if offload_after <= 0 else 0.0
        self.window = MIN_WINDOW
        # Reads take long enough to be worth measuring with getrusage (a
        # system call); short reads only count their wall time, never slow.
        self.precise = False
        self._precise_above = offload_after / 4

    def measure(self, started: float, call, *args):
        """Run call(*args) inline, started at `started` (perf_counter), and
        record whether it blocked for long."""
        before = resource.getrusage(resource.RUSAGE_THREAD)
        result = call(*args)
        done = time.perf_counter()
        after = resource.getrusage(resource.RUSAGE_THREAD)
        wall = done - started
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        self.record(wall, wall - cpu > self.offload_after and after.ru_nvcsw > before.ru_nvcsw,
                    done)
        return result

    def record(self, wall: float, slow: bool, now: float) -> None:
        """An inline read took `wall` seconds and ended at `now`; `slow`: it
        blocked longer than offload_after."""
        self.precise = wall > self._precise_above
        share = self.slow_share + (slow - self.slow_share) * self.ALPHA
        if share >= self.SLOW_SHARE:
            self.pool_until = now + self.window
            self.window = min(self.window * 2, MAX_WINDOW)
            # The probe after the window tips the balance either way.
            share = self.SLOW_SHARE - self.ALPHA / 2
        elif share < self.SLOW_SHARE / 4:
            self.window = MIN_WINDOW
        self.slow_share = share
