"""Worker threads for the engine calls that may wait.

A fixed set of threads takes jobs from one queue, so the number of engine
calls waiting at once (for the store, an fsync) is bounded by the pool's
size, and a slow one holds one thread, not the mount.  Each job answers its
request itself; the pool only runs it.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("lsbd.fuse")

_STOP = object()


class WorkerPool:
    """`submit(fn, *args)` runs fn(*args) in one of `size` threads."""

    def __init__(self, size: int, *, name: str = "lsbd-fuse") -> None:
        if size < 1:
            raise ValueError("a pool needs at least one thread")
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(size)]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        get = self._queue.get
        while True:
            job = get()
            if job is _STOP:
                return
            fn, args = job
            del job
            try:
                fn(*args)
            except BaseException:
                log.exception("a worker's job failed")
            del fn, args  # no references to request data kept while idle

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self._queue.put((fn, args))

    def close(self, timeout: float | None = None) -> None:
        """Let the jobs already submitted finish, then stop the threads."""
        for _ in self._threads:
            self._queue.put(_STOP)
        for t in self._threads:
            t.join(timeout)
