"""Writing a new file past the page cache (O_DIRECT), for copies nobody
reads again through the cache soon: a sealed object (lsbd.crypto.worker).

On a virtual machine a new page-cache page costs far more than a reused
one.  perf put 56% of the sealing process's CPU in the kernel's copy into
new pages.

Not a durable point: the caller syncs a sealed object itself.  (A fetched
segment's copy into the cache dir is written through the page cache, which
its readers use: lsbd.segments.copies.)
"""

from __future__ import annotations

import errno
import mmap
import os

O_DIRECT = getattr(os, "O_DIRECT", 0)


class DirectOutput:
    """Writes a stream of buffers to a new file opened with O_DIRECT,
    through one page-aligned buffer; finish() pads the last block and cuts
    the file to the length written."""

    ALIGN = 4096
    SIZE = 1 << 21
    #: reserve() gives at most this much: what is left after a flush.
    MAX_RESERVE = SIZE - ALIGN

    def __init__(self, fd: int):
        self.fd = fd
        self._buf = mmap.mmap(-1, self.SIZE)        # page-aligned, as O_DIRECT needs
        self._view = memoryview(self._buf)
        self._pos = 0       # bytes staged in the buffer
        self._offset = 0    # file offset of the buffer's first byte

    def write(self, parts: list) -> None:
        view, size = self._view, self.SIZE
        for part in parts:
            n = len(part)
            if self._pos + n < size:
                # The common case, a frame's header or body that fits: one
                # copy and no more (a segment is 4,000 such parts, and the
                # general loop below cost 5 of the 40 ms of sealing one).
                view[self._pos:self._pos + n] = part
                self._pos += n
                continue
            data = memoryview(part).cast("B")
            while data:
                n = min(len(data), size - self._pos)
                view[self._pos:self._pos + n] = data[:n]
                self._pos += n
                data = data[n:]
                if self._pos == size:
                    self._flush()

    def reserve(self, n: int) -> memoryview:
        """The file's next n bytes (at most MAX_RESERVE), in the buffer: the
        caller fills them before its next call."""
        if self._pos + n > self.SIZE:
            self._flush()
        start = self._pos
        self._pos += n
        return self._view[start:start + n]

    def _flush(self) -> None:
        """Write the whole blocks staged; keep the rest at the buffer's start."""
        whole = self._pos - self._pos % self.ALIGN
        if whole:
            self._write(whole)
            rest = self._pos - whole
            self._view[:rest] = self._view[whole:self._pos]
            self._pos = rest

    def _write(self, n: int) -> None:
        done = os.pwrite(self.fd, self._view[:n], self._offset)
        if done != n:
            raise OSError(errno.ENOSPC, "short write past the page cache (disk full?)")
        self._offset += n

    def finish(self) -> None:
        """Write what is left, the last block padded, then cut the file to
        the length written."""
        self._flush()
        end = self._offset + self._pos
        if self._pos:
            padded = -(-self._pos // self.ALIGN) * self.ALIGN
            self._view[self._pos:padded] = bytes(padded - self._pos)
            self._write(padded)
            os.ftruncate(self.fd, end)
        self._view.release()
        self._buf.close()


def open_direct(path: str, flags: int, mode: int = 0o666) -> tuple[int, bool]:
    """os.open with O_DIRECT added, and whether it was: a file system that
    refuses O_DIRECT (tmpfs) gets a plain descriptor."""
    if O_DIRECT:
        try:
            return os.open(path, flags | O_DIRECT, mode), True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    return os.open(path, flags, mode), False
