"""What a front end may call on an open volume.

The FUSE and NBD front ends translate their protocol into these calls and
nothing else: no store, no LMDB, no segment knowledge.  Offsets and lengths
are in bytes and need not be block aligned (the engine does the
read-modify-write of partial blocks).  Every method is safe to call from
several threads at once.

Errors a front end must map:
  InvalidRequest (ValueError)  out of range, negative, too large
  ReadOnlyError (PermissionError)  a write to a read-only volume
  CorruptionError (OSError, errno EIO)  stored data failed its checksum
  StoreError (OSError, errno EIO or other)  the store failed

Non-blocking calls: a device with `supports_nowait = True` takes nowait=True
on read, write, write_zeroes and trim.  Such a call either completes using
only local files (a short hold of the volume lock, a pread or pwrite of the
local journal or segment cache) or raises WouldBlock having done nothing,
when it would wait for the object store (blocks not cached locally, also
the edge blocks of a partial-block write), for the disk (local blocks not in
the page cache: reads use RWF_NOWAIT) or for an fsync (fua=True).  A
front end with an event loop runs calls inline with nowait=True and hands
only the WouldBlock ones to worker threads.  A nowait read may return a
bytearray rather than bytes (the buffer the kernel filled, not a copy).

Long reads in turn: a device may have `long_reads_in_turn = True` when its
long reads are processor work, not waits (a volume whose store is a local
directory).  A front end then runs one client's long reads one after
another on one worker thread rather than each on a thread of its own.

Batched writes: a device may also have write_many(writes, nowait=False),
which takes a list of (offset, data) whole-block writes inside the volume
and does them in order, each its own transaction, as a series of write()
calls would, but with one hold of the volume lock and one system call.  All
of them are done or (an error, WouldBlock) none.  A front end that reads a
burst of pipelined small writes hands them over together.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

#: The largest single request the engine accepts (an NBD WRITE maximum).
MAX_REQUEST = 32 * 1024 * 1024


class Allocation(NamedTuple):
    """A run of bytes that is either backed by data or reads as zeros."""

    offset: int
    length: int
    allocated: bool  # False: a hole (never written, trimmed or zeroed): reads as zeros


class BlockDevice(Protocol):
    supports_nowait: bool  # see "Non-blocking calls" above
    name: str
    block_size: int  # the volume's block size (4096 by default)
    read_only: bool

    @property
    def size(self) -> int:
        """Current size in bytes (a multiple of block_size)."""

    def read(self, offset: int, length: int, *, nowait: bool = False) -> bytes:
        """Exactly `length` bytes (bytes, or a bytearray from a nowait read);
        unwritten ranges read as zeros."""

    def write(self, offset: int, data: bytes, *, fua: bool = False,
              nowait: bool = False) -> None:
        """Atomic across a crash: after a crash all of `data` or none of it is there.
        fua=True: durable (as flush() defines it) when this returns."""

    def write_many(self, writes: list[tuple[int, bytes]], *, nowait: bool = False) -> None:
        """Whole-block writes in order, each its own transaction; all or none
        (see "Batched writes" above)."""

    def write_zeroes(self, offset: int, length: int, *, fua: bool = False,
                     nowait: bool = False) -> None:
        """Make the range read as zeros without storing data."""

    def trim(self, offset: int, length: int, *, fua: bool = False,
             nowait: bool = False) -> None:
        """Discard the range; it reads as zeros afterwards (lsbd never returns stale data)."""

    def flush(self) -> None:
        """Every write that returned before this call is durable when it returns
        (in the local journal, or in the store in flush mode 'store')."""

    def allocation(self, offset: int, length: int) -> list[Allocation]:
        """Cover [offset, offset+length) with runs of allocated / hole (for NBD
        BLOCK_STATUS and sparse copies).  Adjacent runs of one kind are merged."""

    def resize(self, new_size: int) -> None:
        """Grow the volume (shrinking raises InvalidRequest)."""

    def close(self) -> None:
        """Flush, upload what is pending, release the writer lease."""
