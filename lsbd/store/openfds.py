"""Descriptors of a file:// store's segment objects, kept open between reads.

A read of a few blocks from each of thousands of stored segments (a
sequential read after random writes over a large volume) opened and closed
an object's file for every piece: the path walk, the open and the close
cost about as much as the read itself (docs/scale.md).  A segment object
is never changed in place: a put writes a new file and renames it over the
old one, a delete unlinks it.  So a descriptor held here reads the object
as it was when opened; the store forgets it when it writes or deletes the
key itself, and a generation count keeps a descriptor opened before such a
change from being kept after it.  An object another process deletes (a
volume's segments are deleted by its writer, this process) stays readable
through a kept descriptor, and its disk space taken, until the descriptor
is dropped.
"""

from __future__ import annotations

import os
import resource
import threading
from collections import OrderedDict

#: Descriptors kept: enough for the segments a read over a large volume
#: visits in turn, and a quarter of the process's limit at most (the local
#: segment files keep another, lsbd.segments.copies).
KEPT = max(16, min(4096, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4))


class Held:
    """One key's open descriptor: `users` reads hold it; closed once it is
    dropped and none does."""

    __slots__ = ("fd", "users", "dropped")

    def __init__(self, fd: int):
        self.fd = fd
        self.users = 0
        self.dropped = False


class OpenObjects:
    """Open descriptors by key, least recently used dropped first; each one
    is closed only once no read holds it."""

    def __init__(self, kept: int = KEPT):
        self.kept = kept
        self._lock = threading.Lock()
        self._held: OrderedDict[str, Held] = OrderedDict()
        self._generation = 0

    def acquire(self, key: str, path: str) -> Held:
        """The held descriptor of `key` (opened from `path` if none is);
        OSError as os.open raises it.  Give it back with release()."""
        with self._lock:
            held = self._held.get(key)
            if held is not None:
                self._held.move_to_end(key)
                held.users += 1
                return held
            generation = self._generation
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        fresh = Held(fd)
        fresh.users = 1
        with self._lock:
            if generation != self._generation:
                fresh.dropped = True       # the key may have changed since: use once
                return fresh
            held = self._held.get(key)
            if held is not None:           # another read opened it meanwhile
                held.users += 1
                fresh.dropped = True
                self._release_locked(fresh)
                return held
            self._held[key] = fresh
            while len(self._held) > self.kept:
                self._drop_locked(self._held.popitem(last=False)[1])
            return fresh

    def release(self, held: Held) -> None:
        with self._lock:
            self._release_locked(held)

    def forget(self, key: str) -> None:
        """`key` was written or deleted: its next read opens it afresh."""
        with self._lock:
            self._generation += 1
            held = self._held.pop(key, None)
            if held is not None:
                self._drop_locked(held)

    def close(self) -> None:
        with self._lock:
            self._generation += 1
            while self._held:
                self._drop_locked(self._held.popitem()[1])

    def __len__(self) -> int:
        return len(self._held)

    def _drop_locked(self, held: Held) -> None:
        held.dropped = True
        if held.users == 0:
            os.close(held.fd)

    def _release_locked(self, held: Held) -> None:
        held.users -= 1
        if held.dropped and held.users == 0:
            os.close(held.fd)
