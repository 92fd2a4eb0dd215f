"""A cap on the freed memory a serving process keeps.

A serving process tells glibc to keep what it frees (lsbd.cli.context:
requests' buffers come back from the heap without page faults), and that
is freed memory still counted in its resident size.  After a burst (the
spans and replies of 16 reads of 1 MiB in flight, read-directed
defragmentation's queue, indexes let go) the heaps' free parts stayed
resident, so the process's anonymous memory followed its highest peak,
not what it uses.  This thread looks at the anonymous resident size now
and then.  Above the cap it hands the free pages back (malloc_trim) and
lowers glibc's trim threshold, so that what is freed meanwhile goes back
too: malloc_trim frees the pages of free chunks and the main heap's top,
but the top of a thread's heap is only ever cut by a free() that finds it
over the threshold (glibc 2.36), and a serving process's I/O threads
allocate there.  Once back under the cap by a margin, the threshold is
raised again: below the cap nothing changes, so a small working set keeps
its fast reuse.

While `hold()` says a burst is still going on (segments fetched whole held
for a reader: each fetch allocates its 32 MiB buffers again), nothing is
handed back below `hold_cap` (#15's bound), and what is freed is kept:
trimming between fetches made each fetch page-fault 64 MiB of
new zeroed pages (a cold read at 10 ms, no trim at all against the cap:
70-92k minor faults in the serving process against 180-240k, 1.28-1.5 s of
its CPU against 1.65-1.86 s, docs/distant.md).  The burst's owner hands its memory back once it
ends (lsbd.segments.held), and the cap looks again after."""

from __future__ import annotations

import logging
import threading
from typing import Callable

from lsbd import linux

log = logging.getLogger(__name__)

#: Seconds between looks at the resident size (reading /proc/self/statm:
#: some 20 us).
INTERVAL = 0.5
#: A trim is asked for again only once the anonymous size grew this much
#: past what the previous trim left (what is in use cannot be trimmed).
REGROWTH = 8 << 20
#: glibc's trim threshold while over the cap (its own default).
RELEASE_THRESHOLD = 128 << 10


def _set_trim_threshold(value: int) -> None:
    linux.mallopt(linux.M_TRIM_THRESHOLD, value)


class FreedMemoryCap:
    def __init__(self, cap: int, keep_threshold: int, *, interval: float = INTERVAL,
                 measure: Callable[[], int] = linux.anonymous_resident,
                 trim: Callable[[], object] = linux.malloc_trim,
                 set_threshold: Callable[[int], None] = _set_trim_threshold,
                 hold: Callable[[], bool] = lambda: False, hold_cap: int | None = None):
        self.cap = cap
        self._hold = hold
        self.hold_cap = cap if hold_cap is None else hold_cap
        self.keep_threshold = keep_threshold   # the threshold under the cap
        self.interval = interval
        self._measure = measure
        self._trim = trim
        self._set_threshold = set_threshold
        self._floor = 0           # what the last trim left
        self.releasing = False    # the low threshold is in force
        self.trims = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> bool:
        """One look: over the cap, release (and trim, if grown since the
        last trim); back under 3/4 of it, keep again.  Whether it trimmed."""
        now = self._measure()
        if self.cap < now <= self.hold_cap and self._hold():
            if self.releasing:
                self._set_threshold(self.keep_threshold)
                self.releasing = False
            return False
        if now <= self.cap:
            self._floor = min(self._floor, now)
            if self.releasing and now <= self.cap * 3 // 4:
                self._set_threshold(self.keep_threshold)
                self.releasing = False
            return False
        if not self.releasing:
            self._set_threshold(RELEASE_THRESHOLD)
            self.releasing = True
        if self.trims and now < self._floor + REGROWTH:
            return False
        self._trim()
        self.trims += 1
        self._floor = self._measure()
        return True

    def start(self) -> FreedMemoryCap:
        self._thread = threading.Thread(target=self._run, name="lsbd-freed-memory-cap",
                                        daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except OSError as e:   # no /proc: the cap cannot look, so it stops
                log.info("freed memory is not capped: %s", e)
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
