"""A segment fetched whole, streamed into the cache dir as it arrives.

The answer to the GET is read a piece at a time (lsbd.store's get_stream),
every data block checked against the segment's index as it passes, and
written into a .part file past the page cache (O_DIRECT, through one
aligned buffer) that becomes the segment's file once the whole object is
there and its own index checks out.  So a fetch holds a few MiB, not a
segment: four 32 MiB fetches in flight took 70 MiB each when they were read
whole (the answer's body, then the bytes kept for reads).  Reads that come
while it streams wait only for their own bytes, and read them from the
.part file (Streaming)."""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from typing import Callable, Iterable

from lsbd.errors import CorruptionError
from lsbd.format.segment import SegmentIndex
from lsbd.segments.checks import check_blocks
from lsbd.segments.openfile import pread

_O_DIRECT = getattr(os, "O_DIRECT", 0)
_ALIGN = 4096
CHUNK = 1 << 21          # bytes written at a time (the aligned buffer)


class Stopped(Exception):
    """The fetch was given up (the folder closed, or the segment forgotten)."""


class Streaming:
    """One segment streaming into its .part file: how far it is, for reads."""

    def __init__(self, fd: int, size: int):
        self.size = size
        self._fd = fd            # a read descriptor of the .part file
        self._users = 0
        self._cond = threading.Condition()
        self.written = 0
        self.ended = False
        self.dropped = False     # forgotten meanwhile: never installed

    def advance(self, written: int) -> None:
        with self._cond:
            self.written = written
            self._cond.notify_all()

    def wait_for(self, end: int, timeout: float, nowait: bool = False) -> bool:
        """Whether bytes [0, end) are written, waiting for them unless nowait
        (False: the stream ended short, or failed)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.written < end and not self.ended and not nowait:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self.written >= end and self._fd >= 0

    def pread(self, length: int, offset: int, nowait: bool = False):
        """Bytes of the .part file (WouldBlock if nowait and they are not in
        the page cache); None once the stream has ended."""
        with self._cond:
            if self._fd < 0:
                return None
            self._users += 1
            fd = self._fd
        try:
            return pread(fd, length, offset, nowait)
        finally:
            with self._cond:
                self._users -= 1
                if self._users == 0 and self.ended and self._fd >= 0:
                    os.close(self._fd)
                    self._fd = -1

    def end(self) -> None:
        with self._cond:
            self.ended = True
            if self._users == 0 and self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            self._cond.notify_all()


class BlockChecker:
    """Checks a segment's data blocks against its index as its bytes pass
    in order, in pieces of any size (a block split between two pieces
    included): CorruptionError naming the first bad block."""

    def __init__(self, idx: SegmentIndex, block_size: int, where: str):
        self._idx = idx
        self._bs = block_size
        self._where = where
        self._runs = idx.runs()
        self._i = 0            # the record, and the block in it, checked next
        self._k = 0
        self._at = 0           # object offset of the next byte fed
        self._tail = b""       # the bytes of a block begun in an earlier piece
        self._tail_at = 0

    def _next(self) -> int | None:
        if self._i >= len(self._runs):
            return None
        return self._runs[self._i][0] + self._k * self._bs

    def feed(self, piece) -> None:
        view = memoryview(piece).cast("B")
        if self._tail:
            data, start = memoryview(self._tail + view), self._tail_at
        else:
            data, start = view, self._at
        self._at += len(view)
        end = self._at
        bs = self._bs
        while self._i < len(self._runs):
            s, n = self._runs[self._i]
            off = s + self._k * bs
            m = min(n - self._k, (end - off) // bs)
            if m <= 0:
                break
            check_blocks(self._idx, data[off - start:off - start + m * bs], off, m, bs,
                         where=self._where)
            self._k += m
            if self._k == n:
                self._i += 1
                self._k = 0
        nxt = self._next()
        if nxt is not None and nxt < end:
            self._tail, self._tail_at = bytes(data[max(0, nxt - start):]), max(nxt, start)
        else:
            self._tail = b""

    def finish(self) -> None:
        nxt = self._next()
        if nxt is not None:
            raise CorruptionError(f"{self._where}: short object, no block at offset {nxt}",
                                  key=self._where, offset=nxt)


def open_part(path: str) -> tuple[int, bool]:
    """A new .part file for writing: (its descriptor, whether O_DIRECT)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if _O_DIRECT:
        try:
            return os.open(path, flags | _O_DIRECT, 0o666), True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    return os.open(path, flags, 0o666), False


def stream_into(fd: int, direct: bool, pieces: Iterable[bytes], size: int,
                checker: BlockChecker, progress: Callable[[int], None],
                stop: Callable[[], bool]) -> None:
    """Write the object's pieces at the start of fd, checking its blocks as
    they pass; progress(n): the first n bytes are in the file."""
    buf = mmap.mmap(-1, CHUNK)          # page-aligned, as O_DIRECT needs
    out = memoryview(buf)
    pos = fill = 0
    try:
        for piece in pieces:
            if stop():
                raise Stopped()
            checker.feed(piece)
            view = memoryview(piece).cast("B")
            while len(view):
                n = min(CHUNK - fill, len(view))
                out[fill:fill + n] = view[:n]
                fill += n
                view = view[n:]
                if fill == CHUNK:
                    _pwrite(fd, out, pos)
                    pos += CHUNK
                    fill = 0
                    progress(pos)
        if pos + fill != size:
            raise CorruptionError(f"short answer: {pos + fill} of {size} bytes")
        checker.finish()
        if fill:
            padded = -(-fill // _ALIGN) * _ALIGN if direct else fill
            out[fill:padded] = bytes(padded - fill)
            _pwrite(fd, out[:padded], pos)
            if padded != fill:
                os.ftruncate(fd, size)
        progress(size)
    finally:
        out.release()
        buf.close()


def _pwrite(fd: int, view: memoryview, pos: int) -> None:
    if os.pwrite(fd, view, pos) != len(view):
        raise OSError(errno.ENOSPC, "short write of a fetched segment (disk full?)")
