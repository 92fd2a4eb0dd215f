"""Read-ahead: spot a reader going in order, and name the range of the
volume it will want next, so that the segments holding it are fetched from
the store before it asks (lsbd.segments.fetch).  Pure bookkeeping: the volume
looks the range up in its map and starts the fetches."""

from __future__ import annotations

import threading

READ_AHEAD = 64 << 20    # bytes of the volume ahead of a sequential reader


class ReadAhead:
    def __init__(self, window: int = READ_AHEAD):
        self.window = window
        self._lock = threading.Lock()
        self._next = -1           # where the previous read ended
        self._until = 0           # read-ahead has been asked for up to here
        self._last: tuple[int, int, bool] = (-1, -1, False)

    def note(self, offset: int, length: int) -> tuple[bool, tuple[int, int] | None]:
        """A read of [offset, offset+length): (whether it continues the
        previous one, the byte range to prefetch now or None).  The same read
        noted twice (a retry after WouldBlock) counts once."""
        with self._lock:
            if (offset, length) == self._last[:2]:
                return self._last[2], None
            sequential = offset == self._next
            self._next = end = offset + length
            self._last = (offset, length, sequential)
            if not sequential:
                self._until = end
                return False, None
            if self._until - end > self.window // 2:
                return True, None
            start = max(self._until, end)
            self._until = end + self.window
            return True, (start, self._until)
