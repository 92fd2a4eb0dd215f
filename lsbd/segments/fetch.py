"""Hiding the store's latency on reads: which segments to fetch whole, and
a bounded number of requests in flight.

A store 10-100 ms away costs a round trip per request, whatever its size:
reading a segment's blocks one ranged GET at a time, in order, runs at a
few MiB/s, while one GET of the whole segment (32 MiB) costs one round trip
plus the transfer.  So a segment is fetched whole, in the background, as
soon as a read pattern says more of it will be read:

- a read that continues where the previous one ended (sequential), or a
  large read;
- a second remote read of the same segment;
- read-ahead: a sequential reader's next segments (the volume asks);
- an explicit prefetch (NBD_CMD_CACHE).

Scattered one-off reads of a segment are a ranged GET of just their blocks,
so random reads never flood the cache.  Nothing is fetched whole from a
store in a local directory: a ranged read there costs what a read of a copy
would, and copying whole segments for reads scattered over more of them than
the cache holds only churns it (measured: 1 MiB reads after random writes
ran 5x slower).  While a segment's fetch is in flight,
reads of it wait for the fetched bytes (not for their copy into the cache
dir, lsbd.segments.copies) instead of asking the store again.  A read never
waits behind guesses: a fetch it waits for that is still queued (behind
read-ahead) starts at once on a worker kept for reads, if the others are
busy, and otherwise moves to the front of the queue; while it waits, a
worker that comes free starts no second guess beside one under way
(once one of two in flight ends, its GET shares the store with one guess
at most).  Read-ahead goes no further ahead of a reader than what is held
in memory for it (lsbd.segments.held): a fetch read ahead starts only while
the segments fetched ahead and not read yet, and the fetches read ahead in
flight, stay under that limit; the next one starts when the reader reaches
one of them.  Fetched further ahead, a reader slowed by the fetches
themselves (they share the machine with it) found most of them let go
unread, and read them back from the cache dir (docs/distant.md).  The
blocks a read needs from several segments are fetched in parallel.  At most
FETCH_WORKERS whole-segment GETs (one more for a read waiting) and
READ_WORKERS ranged GETs are in flight.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

log = logging.getLogger(__name__)

FETCH_WORKERS = 2        # whole-segment GETs in flight (4 held 100-140 MiB more, no faster)
#: Whole-segment GETs that only fetches a read waits for may run on, when
#: the FETCH_WORKERS are busy with read-ahead: the large file's first read
#: of a cold tree waited 0.17-0.28 s behind two guesses (docs/distant.md).
DEMAND_WORKERS = 1
READ_WORKERS = 8         # ranged GETs in flight for reads of several runs
HOT_AFTER_READS = 2      # remote reads of one segment before it is fetched whole
LARGE_READ = 1 << 20     # a read this large fetches its segment whole
WAIT_FOR_FETCH = 120.0   # seconds a read waits for a fetch in flight
_REMEMBERED = 4096       # segments whose remote reads are counted


class _Fetch:
    """One whole-segment fetch: queued, then run by a worker."""

    __slots__ = ("seq", "future", "ready", "queued", "demand", "counted", "guessing", "here",
                 "ahead", "reading_ahead")

    def __init__(self, seq: int, ahead: bool):
        self.seq = seq
        self.future: Future = Future()
        self.ready = threading.Event()      # its bytes are here (or it failed)
        self.queued = True                  # waiting for a worker
        self.demand = False                 # a read waits for it
        self.counted = False                # in Fetcher._reads_waiting
        self.guessing = False               # in Fetcher._guesses
        self.here = False                   # its bytes came (or it ended)
        self.ahead = ahead                  # read-ahead: starts only if there is room
        self.reading_ahead = False          # in Fetcher._ahead


class Fetcher:
    def __init__(self, fetch_whole: Callable[[int, Callable[[], None]], None], *,
                 enabled: bool = True, room: Callable[[int], bool] | None = None):
        # (seq, ready) -> None: installs the local copy, calling ready() as
        # soon as reads can be served (from the fetched bytes in memory).
        self._fetch_whole = fetch_whole
        self.enabled = enabled               # False: never fetch whole (a local store)
        # room(n): whether one more fetch read ahead may start while n are in
        # flight (their bytes not here yet); None: always
        self._room = room
        self._lock = threading.Lock()
        self._inflight: dict[int, _Fetch] = {}
        # Fetches waiting for a worker, in the order they run: read-ahead
        # queues at the back, a read waiting for one moves it to the front.
        self._queue: deque[_Fetch] = deque()
        self._hits: dict[int, int] = {}
        self._marks: set[int] = set()
        self._closed = False
        self._busy = 0              # FETCH_WORKERS running a fetch
        self._reads_waiting = 0     # fetches a read waits for, bytes not here yet
        self._guesses = 0           # guesses started, bytes not here yet
        self._ahead = 0             # fetches read ahead started, bytes not here yet
        self._held_back = 0         # worker jobs left for when no read waits, or for room
        # Each job runs whichever fetch is first in the queue then; a job
        # of the demand pool, the first one a read waits for.
        self._whole = ThreadPoolExecutor(max_workers=FETCH_WORKERS,
                                         thread_name_prefix="lsbd-fetch")
        self._demand = ThreadPoolExecutor(max_workers=DEMAND_WORKERS,
                                          thread_name_prefix="lsbd-fetch-read")
        self._reads = ThreadPoolExecutor(max_workers=READ_WORKERS,
                                         thread_name_prefix="lsbd-read")
        self.stats = {"whole_fetches": 0, "waited": 0, "moved_ahead": 0, "for_reads": 0,
                      "held_back": 0, "no_room": 0}

    def prefetch(self, seq: int, *, mark: bool = False) -> Future | None:
        """Start fetching `seq` whole unless that is under way; its future.
        mark: a read pattern asked for it (not a caller naming a range), so
        its first read may start the next fetches (take_mark), and it waits
        for room ahead of the reader (room)."""
        with self._lock:
            if self._closed or not self.enabled:
                return None
            if mark:
                self._marks.add(seq)
                if len(self._marks) > _REMEMBERED:
                    self._marks.clear()
            entry = self._inflight.get(seq)
            if entry is not None:
                if not mark and entry.queued:
                    entry.ahead = False     # a caller named it: it waits for no reader
                return entry.future
            self.stats["whole_fetches"] += 1
            entry = self._inflight[seq] = _Fetch(seq, mark)
            self._queue.append(entry)
            self._whole.submit(self._run_next)
            return entry.future

    def take_mark(self, seq: int) -> bool:
        """Whether a read pattern asked for `seq` (once)."""
        with self._lock:
            if seq in self._marks:
                self._marks.discard(seq)
                return True
            return False

    def _run_next(self) -> None:
        with self._lock:
            if not self._queue:
                return
            entry = self._queue[0]
            if not entry.demand and self._reads_waiting and self._guesses:
                # at most one guess shares the store with a read's fetch
                self._held_back += 1
                self.stats["held_back"] += 1
                return
            if entry.ahead and self._room is not None and not self._room(self._ahead):
                # no room ahead of the reader: a fetch a caller named may go
                named = next((e for e in self._queue if not e.ahead), None)
                if named is None:
                    self._held_back += 1
                    self.stats["no_room"] += 1
                    return
                entry = named
            self._queue.remove(entry)
            entry.queued = False
            self._busy += 1
            if not entry.demand:
                entry.guessing = True
                self._guesses += 1
            if entry.ahead:
                entry.reading_ahead = True
                self._ahead += 1
        try:
            self._run(entry)
        finally:
            with self._lock:
                self._busy -= 1

    def _run_demand(self) -> None:
        with self._lock:
            entry = next((e for e in self._queue if e.demand), None)
            if entry is None:       # a worker took it first
                return
            self._queue.remove(entry)
            entry.queued = False
            self.stats["for_reads"] += 1
        self._run(entry)

    def _run(self, entry: _Fetch) -> None:
        if not entry.future.set_running_or_notify_cancel():
            return
        try:
            self._fetch_whole(entry.seq, lambda: self._bytes_here(entry))
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
            error: BaseException | None = e
        else:
            error = None
        finally:
            with self._lock:
                self._inflight.pop(entry.seq, None)
            self._bytes_here(entry)
        if error is None:
            entry.future.set_result(None)
        else:
            entry.future.set_exception(error)

    def _bytes_here(self, entry: _Fetch) -> None:
        """`entry`'s bytes came (or it ended): the jobs held back run once
        no read waits for a fetch, or no guess is under way."""
        with self._lock:
            if not entry.here:
                entry.here = True
                if entry.guessing:
                    self._guesses -= 1
                if entry.reading_ahead:
                    self._ahead -= 1
                if entry.counted:
                    self._reads_waiting -= 1
                if not (self._reads_waiting and self._guesses):
                    self._resubmit_locked()
        entry.ready.set()

    def room_made(self) -> None:
        """A reader reached a segment read ahead, or held segments were let
        go: fetches read ahead that waited for room may start."""
        with self._lock:
            self._resubmit_locked()

    def _resubmit_locked(self) -> None:
        """The worker jobs held back look at the queue again."""
        if self._held_back and not self._closed:
            for _ in range(self._held_back):
                self._whole.submit(self._run_next)
            self._held_back = 0

    def wait_if_fetching(self, seq: int) -> bool:
        """If a whole fetch of `seq` is in flight, wait until its bytes are
        here (or it failed); True if one was.  One still queued (behind
        read-ahead) goes first, at once if the demand worker is free: a
        read is waiting for it now."""
        with self._lock:
            entry = self._inflight.get(seq)
            if entry is None:
                return False
            if entry.queued and not entry.demand:
                # behind the fetches reads waited for before, ahead of guesses
                first_guess = next(i for i, e in enumerate(self._queue) if not e.demand)
                if self._queue[first_guess] is not entry:
                    self._queue.remove(entry)
                    self._queue.insert(first_guess, entry)
                    self.stats["moved_ahead"] += 1
                entry.demand = True
                entry.ahead = False               # a read waits: no room needed
                if self._busy >= FETCH_WORKERS:   # no worker free for it
                    self._demand.submit(self._run_demand)
                elif self._held_back:             # a worker job left for room takes it
                    self._held_back -= 1
                    self._whole.submit(self._run_next)
            if not entry.counted and not entry.here:
                entry.counted = True
                self._reads_waiting += 1
            self.stats["waited"] += 1
        entry.ready.wait(WAIT_FOR_FETCH)
        return True

    def note_remote_read(self, seq: int, length: int, sequential: bool) -> None:
        """A read of `seq` went to the store: fetch it whole if the pattern says so."""
        if not self.enabled:
            return
        with self._lock:
            hits = self._hits.pop(seq, 0) + 1
            self._hits[seq] = hits
            while len(self._hits) > _REMEMBERED:
                self._hits.pop(next(iter(self._hits)))
        if sequential or length >= LARGE_READ or hits >= HOT_AFTER_READS:
            self.prefetch(seq, mark=True)

    def map_reads(self, calls: list[Callable[[], Any]]) -> list[Any]:
        """Run reads in parallel (bounded), results in order; the first error
        is raised.  Called from one of its own threads (a read of several
        runs, each reading data and index), it runs them in that thread:
        waiting there for the pool could wait for ever."""
        if len(calls) == 1 or getattr(_pool_thread, "active", False):
            return [c() for c in calls]
        futures = [self._reads.submit(_in_pool, c) for c in calls[1:]]
        first = calls[0]()            # this thread does one of them itself
        return [first, *(f.result() for f in futures)]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            queued = list(self._queue)
            self._queue.clear()
            for entry in queued:
                self._inflight.pop(entry.seq, None)
        for entry in queued:        # never to run: their waiters go on
            entry.future.cancel()
            entry.ready.set()
        self._whole.shutdown(wait=False, cancel_futures=True)
        self._demand.shutdown(wait=False, cancel_futures=True)
        self._reads.shutdown(wait=False, cancel_futures=True)


_pool_thread = threading.local()


def _in_pool(call: Callable[[], Any]) -> Any:
    _pool_thread.active = True
    return call()
