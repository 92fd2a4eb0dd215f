"""Where a request runs: on the connection's own thread, or on the pool.

Every engine call blocks its caller.  A call that returns in microseconds (a
cached read, a journal append) is best run right on the connection's thread:
handing it to a worker costs more than the call itself (measured with fio,
4 KiB random writes over one connection: about 125k IOPS inline against
about 23k through a thread pool, the GIL hand-offs dominate).  A call that
*waits* (a ranged GET from the store, an fsync, back-pressure from uploads)
is best run on the pool, so that the connection keeps reading and several
such calls overlap.

The policy measures, per export and per kind of request, how long inline
calls spend blocked rather than computing: wall time minus the thread's CPU
time (computing on another thread would not be any faster under the GIL),
counted only if the thread really blocked (a voluntary context switch; a
thread that was merely preempted on a busy machine gains nothing from the
pool either).  A call blocked longer than `offload_after` is a slow call.
When a quarter or more of the recent calls of a kind were slow (a moving
average), the kind goes to the pool for a window of time; after the window
the next request of that kind runs inline again as a probe.  A kind that keeps
waiting gets longer windows (up to MAX_WINDOW), one that no longer waits
stays inline.
FLUSH and FUA requests always go to the pool: they wait by definition.
"""

from __future__ import annotations

import math
import resource
import time

# Kinds of request.
K_READ, K_WRITE, K_ZERO, K_STATUS = range(4)

MIN_WINDOW = 0.25
MAX_WINDOW = 8.0


class OffloadPolicy:
    """Shared by every connection to one export.  Updates race harmlessly
    (floats and list slots under the GIL)."""

    ALPHA = 0.125        # weight of the newest call in the moving average
    SLOW_SHARE = 0.25    # share of slow calls that sends a kind to the pool

    def __init__(self, offload_after: float):
        self.offload_after = offload_after
        self.slow_share = [0.0] * 4         # moving average of "this call was slow"
        # pool_until[kind]: a perf_counter() time; before it, run on the pool.
        self.pool_until = [math.inf if offload_after <= 0 else 0.0] * 4
        self.window = [MIN_WINDOW] * 4
        # precise[kind]: calls of this kind take long enough to be worth
        # measuring with getrusage (a system call); short calls only count
        # their wall time, and are never slow.
        self.precise = [False] * 4
        self._precise_above = offload_after / 4

    def measure(self, kind: int, started: float, call, *args):
        """Run call(*args) inline, started at `started` (perf_counter), and
        record whether it blocked for long."""
        before = resource.getrusage(resource.RUSAGE_THREAD)
        result = call(*args)
        done = time.perf_counter()
        after = resource.getrusage(resource.RUSAGE_THREAD)
        wall = done - started
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        slow = wall - cpu > self.offload_after and after.ru_nvcsw > before.ru_nvcsw
        self.record(kind, wall, slow, done)
        return result

    def record(self, kind: int, wall: float, slow: bool, now: float) -> None:
        """An inline call of `kind` took `wall` seconds and ended at `now`;
        `slow`: it blocked longer than offload_after."""
        self.precise[kind] = wall > self._precise_above
        share = self.slow_share[kind]
        share += (slow - share) * self.ALPHA
        if share >= self.SLOW_SHARE:
            self.pool_until[kind] = now + self.window[kind]
            self.window[kind] = min(self.window[kind] * 2, MAX_WINDOW)
            # The probe after the window tips the balance either way.
            share = self.SLOW_SHARE - self.ALPHA / 2
        elif share < self.SLOW_SHARE / 4:
            self.window[kind] = MIN_WINDOW
        self.slow_share[kind] = share
