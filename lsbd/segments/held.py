"""Segments fetched whole, held in memory for the reads that follow.

A segment fetched whole for a reader (lsbd.segments.fetch) is read from
its fetched bytes, not from the cache dir: the copy into the cache dir goes
on beside the reads (through the page cache, lsbd.segments.copies), and no
reader waits for it.  The image's page cache, in the kernel, holds what was
read.

Held bytes are bounded: beyond the segment read most recently (a reader is
likely in the middle of it), once over the limit, segments already in the
cache dir are let go, in this order: those read already (least recently
read first), those not read yet that a reader going in order will not reach
next (fetched for someone else, or read-ahead it has gone past), then those
it will reach, the furthest from it first.  A segment whose copy is still
being written is never let go, and there is at most one per fetch in
flight.  A segment in the cache dir and unused for IDLE seconds is let go
as well, so a process holds none once its reader has moved on (its reads
then go to the cache dir).

Read-ahead is bounded by what is held for the reader (ahead_bytes): a
segment fetched ahead of a reader slowed by the fetches themselves, and let
go before it got there, is read back from its copy (lsbd.segments.fetch
waits for room instead).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Callable

from lsbd import linux

#: Bytes of fetched segments held in memory: 2 segments of the default size
#: (32 MiB, and up to 1 MiB more: a segment is sealed once past its size),
#: beyond the one read most recently and those whose copy into the cache dir
#: is under way.  With two fetches in flight (lsbd.segments.fetch) a cold
#: read from a distant store peaked at 249-277 MiB resident (222-241 MiB
#: anonymous after it), against 355-407 MiB with 128 MiB and four, at the
#: same speed (docs/distant.md; #15 bounds the serving process at 256 MiB
#: anonymous).  With read-ahead bounded by it and the segment read last
#: held too: 302-347 MiB resident, 192-256 MiB anonymous after it.
HELD_BYTES = 66 << 20
#: Seconds a segment in the cache dir stays held after its last use.
IDLE = 5.0

_held_lock = threading.Lock()
_held_count = 0     # segments held by every HeldSegments of the process


def held_count() -> int:
    """Segments fetched whole that this process holds now."""
    return _held_count


def any_held() -> bool:
    """Whether this process holds a fetched segment now (a reader is going
    through fetched segments: the freed-memory cap, lsbd.freedcap, waits)."""
    return _held_count > 0


def _count(n: int) -> None:
    global _held_count
    with _held_lock:
        _held_count += n


class _Held:
    __slots__ = ("data", "installed", "read", "used", "read_ahead")

    def __init__(self, data: bytes, now: float, read_ahead: bool):
        self.data = data
        self.installed = False   # its copy is in the cache dir
        self.read = False        # a read has used it
        self.used = now          # when it was fetched, written or last read
        self.read_ahead = read_ahead   # fetched ahead of a reader going in order


class HeldSegments:
    def __init__(self, limit: int = HELD_BYTES, idle: float = IDLE):
        self.limit = limit
        self.idle = idle
        self._lock = threading.Lock()
        self._held: collections.OrderedDict[int, _Held] = collections.OrderedDict()
        self.nbytes = 0
        self._timer = False     # a let_go_idle is due (one at a time)
        #: where a reader is: the last segment read for the first time
        self.reached = -1
        self._last_read = -1    # the segment read most recently
        #: bytes of the last segment fetched (what one fetch in flight will add)
        self.segment_bytes = 0
        #: called (outside the lock) when room is made for read-ahead: a
        #: reader reached a segment, or segments were let go
        self.on_room: Callable[[], None] | None = None

    def __bool__(self) -> bool:
        return bool(self._held)

    def __contains__(self, seq: int) -> bool:
        return seq in self._held

    def add(self, seq: int, data: bytes, *, read_ahead: bool = False) -> None:
        """A fetched segment's bytes, before its copy is written.
        read_ahead: fetched ahead of a reader going in order."""
        with self._lock:
            self._drop_locked(seq)
            self._held[seq] = _Held(data, time.monotonic(), read_ahead)
            _count(1)
            self.nbytes += len(data)
            self.segment_bytes = len(data)
            let_go = self._trim_locked()
        if let_go:
            self._room_made()

    def installed(self, seq: int) -> bool:
        """Its copy is in the cache dir now; False if it is no longer held
        (a read found it damaged, or it was forgotten meanwhile)."""
        with self._lock:
            entry = self._touch_locked(seq)
            if entry is None:
                return False
            entry.installed = True
            let_go = self._trim_locked()
        if let_go:
            self._room_made()
        self._let_go_later(self.idle)
        return True

    def get(self, seq: int) -> bytes | None:
        with self._lock:
            entry = self._touch_locked(seq)
            if entry is None:
                return None
            first = not entry.read
            entry.read = True
            self._last_read = seq
            self._held.move_to_end(seq)
            if first:
                self.reached = seq
        if first:
            self._room_made()
        return entry.data

    def ahead_bytes(self) -> int:
        """Bytes held for a reader going in order and not read yet: the
        segments fetched ahead of it, beyond the one it reached last."""
        with self._lock:
            return sum(len(e.data) for s, e in self._held.items()
                       if e.read_ahead and not e.read and s > self.reached)

    def drop(self, seq: int) -> bool:
        """Let go of `seq`; whether it was held."""
        with self._lock:
            dropped = self._drop_locked(seq)
        if dropped:
            self._room_made()
        return dropped

    def _room_made(self) -> None:
        call = self.on_room
        if call is not None:
            call()

    def let_go_idle(self) -> None:
        """Let go of the segments in the cache dir unused for `idle` seconds,
        and come back for those read since (a reader still going after the
        last copy was installed keeps them in use past that copy's timer).

        Once none is held, the C library is told to give its free memory
        back: a serving process keeps up to 256 MiB of freed heap per heap
        for its request buffers (lsbd.cli.context), and the whole-segment
        buffers of a cold read (each fetch's body and its segment, 32 MiB
        each) would otherwise stay in it, over 400 MiB of anonymous memory
        after a cold read that ended."""
        with self._lock:
            self._timer = False
            let_go = self._trim_locked()
            empty = not self._held
            due = min((e.used for e in self._held.values() if e.installed), default=None)
        if let_go:
            self._room_made()
        if due is not None:
            self._let_go_later(due + self.idle - time.monotonic())
        elif empty:
            linux.malloc_trim()

    def _let_go_later(self, delay: float) -> None:
        """let_go_idle in `delay` seconds, unless one is due already (it
        comes back for what is left)."""
        with self._lock:
            if self._timer:
                return
            self._timer = True
        timer = threading.Timer(max(delay, 0.0) + 0.1, self.let_go_idle)
        timer.daemon = True     # the tail: nothing else may come to trim it
        timer.start()

    def clear(self) -> None:
        with self._lock:
            _count(-len(self._held))
            self._held.clear()
            self.nbytes = 0

    def _touch_locked(self, seq: int) -> _Held | None:
        """The entry for `seq`, marked used now; None if not held."""
        entry = self._held.get(seq)
        if entry is not None:
            entry.used = time.monotonic()
        return entry

    def _drop_locked(self, seq: int) -> bool:
        entry = self._held.pop(seq, None)
        if entry is None:
            return False
        _count(-1)
        self.nbytes -= len(entry.data)
        return True

    def _trim_locked(self) -> bool:
        """Let go of segments unused for `idle` seconds, then of more while
        over the limit; whether any was let go."""
        old = time.monotonic() - self.idle
        idle = [s for s, e in self._held.items() if e.installed and e.used < old]
        for seq in idle:
            self._drop_locked(seq)
        let_go = bool(idle)
        reading = self._held.get(self._last_read)
        while self.nbytes - (len(reading.data) if reading is not None else 0) > self.limit:
            victim = self._victim_locked()
            if victim is None:
                break       # every one is still being written: the fetches bound them
            self._drop_locked(victim)
            let_go = True
        return let_go

    def _victim_locked(self) -> int | None:
        """The segment in the cache dir to let go first (see the module's
        docstring for the order); None if there is none but the one read
        most recently."""
        read: int | None = None
        passed: int | None = None
        furthest: int | None = None
        for seq, e in self._held.items():        # least recently read first
            if seq == self._last_read:
                continue
            if e.read_ahead and not e.read and seq > self.reached:
                if furthest is None or seq > furthest:
                    furthest = seq      # its turn comes once its copy is written
            elif not e.installed:
                continue
            elif e.read:
                if read is None:
                    read = seq
            elif passed is None:
                passed = seq
        if furthest is not None and not self._held[furthest].installed:
            furthest = None
        return next((v for v in (read, passed, furthest) if v is not None), None)
