"""Whole segments read ahead on a thread of their own.

Having the kernel start reading a 32 MiB segment file (POSIX_FADV_WILLNEED
a piece at a time, lsbd.linux.will_need) is processor work in the kernel:
the file's pages are allocated and their reads queued before the call
returns, some 9 ms a segment measured in a first pass after random
writes, about a tenth of the read lane's processor time.  The read lane
hands the file here and goes on reading; the advice lets go of the GIL,
so it runs on the other core."""

from __future__ import annotations

import queue
import threading
from typing import Callable

from lsbd.segments import spans
from lsbd.segments.openfile import OpenFile


class WholeAdvice:
    """One thread that advises the files handed to it, in turn.  Each file
    comes held (a use of its descriptor, so it is not closed meanwhile) and
    is let go with `release` once advised."""

    def __init__(self, release: Callable[[OpenFile], None]):
        self._release = release
        self._queue: queue.Queue[OpenFile | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def put(self, f: OpenFile) -> bool:
        """Advise held file `f` on the thread; False (still held) once closed."""
        with self._lock:
            if self._closed:
                return False
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lsbd-whole-advice",
                                                daemon=True)
                self._thread.start()
            self._queue.put(f)
            return True

    def drain(self) -> None:
        """Wait until every file handed in so far is advised."""
        self._queue.join()

    def close(self) -> None:
        """Advise what is queued, then stop the thread."""
        with self._lock:
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._queue.put(None)
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while True:
            f = self._queue.get()
            try:
                if f is None:
                    return
                try:
                    spans.will_need_whole(f.fd)
                finally:
                    self._release(f)
            finally:
                self._queue.task_done()
