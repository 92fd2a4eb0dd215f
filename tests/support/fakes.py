"""In-memory stand-ins for engine objects, for front-end tests.

FakeVolume implements the BlockDevice protocol of lsbd/engine/api.py over a
sparse dict of blocks: unwritten, trimmed and zeroed blocks are absent and
read as zeros.  It is thread-safe (one lock) and counts its calls, and a test
can make the next calls fail (`fail_next`) to check error paths.

It takes nowait=True as the engine does (`supports_nowait`): a call that
`delay_for` would make sleep (a slow store) or that asks for fua raises
WouldBlock instead, having done nothing.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

from lsbd.engine.api import MAX_REQUEST, Allocation
from lsbd.errors import InvalidRequest, ReadOnlyError, WouldBlock


class FakeVolume:
    supports_nowait = True

    def __init__(self, name: str = "vol", size: int = 64 * 1024 * 1024, *,
                 block_size: int = 4096, read_only: bool = False):
        if size % block_size:
            raise ValueError("size must be a multiple of block_size")
        self.name = name
        self.block_size = block_size
        self.read_only = read_only
        self._size = size
        self._blocks: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self.calls: Counter[str] = Counter()
        self.flushed_calls = 0
        self.closed = False
        self._failures: list[BaseException] = []
        #: delay_for(op, offset) -> seconds that call sleeps before running
        #: (outside the lock), to make some requests slow on purpose
        self.delay_for = None

    # --- test hooks ---------------------------------------------------------

    def fail_next(self, exc: BaseException, times: int = 1) -> None:
        """The next `times` data calls raise `exc` instead of doing anything."""
        with self._lock:
            self._failures.extend([exc] * times)

    def snapshot(self) -> dict[int, bytes]:
        with self._lock:
            return dict(self._blocks)

    def _enter(self, op: str) -> None:
        # Called with the lock held.
        self.calls[op] += 1
        if self.closed:
            raise ValueError("volume is closed")
        if self._failures:
            raise self._failures.pop(0)

    def _check(self, offset: int, length: int, *, write: bool) -> None:
        if write and self.read_only:
            raise ReadOnlyError(f"{self.name} is read-only")
        if offset < 0 or length < 0 or offset + length > self._size:
            raise InvalidRequest(f"range {offset}+{length} outside volume of {self._size} bytes")

    def _sleep(self, op: str, offset: int, nowait: bool = False, fua: bool = False) -> None:
        if nowait and fua:
            raise WouldBlock(f"{op} with fua waits for an fsync")
        if self.delay_for is not None:
            seconds = self.delay_for(op, offset)
            if seconds:
                if nowait:
                    raise WouldBlock(f"{op} at {offset} waits for the store")
                time.sleep(seconds)

    # --- BlockDevice ------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int, *, nowait: bool = False) -> bytes:
        self._sleep("read", offset, nowait)
        bs = self.block_size
        with self._lock:
            self._enter("read")
            self._check(offset, length, write=False)
            if length > MAX_REQUEST:
                raise InvalidRequest("read too large")
            first, last = offset // bs, (offset + length - 1) // bs
            blocks = self._blocks
            if offset % bs == 0 and length % bs == 0:
                if first == last:
                    block = blocks.get(first)
                    return block if block is not None else bytes(bs)
                zero = bytes(bs)
                return b"".join([blocks.get(i, zero) for i in range(first, last + 1)])
            out = bytearray(length)
            for index in range(first, last + 1):
                block = blocks.get(index)
                if block is None:
                    continue
                start = max(offset, index * bs)
                end = min(offset + length, (index + 1) * bs)
                out[start - offset:end - offset] = block[start - index * bs:end - index * bs]
            return bytes(out)

    def write_many(self, writes: list[tuple[int, bytes]], *, nowait: bool = False) -> None:
        """Block-aligned writes in order, all or none (as Volume.write_many).
        A pending fail_next failure fails the whole batch without being used
        up, so each write then meets it on its own, as on a failing engine."""
        for offset, _data in writes:
            self._sleep("write", offset, nowait)
        bs = self.block_size
        with self._lock:
            self.calls["write_many"] += 1
            if self.closed:
                raise ValueError("volume is closed")
            if self._failures:
                raise self._failures[0]
            for offset, data in writes:
                self._check(offset, len(data), write=True)
                if offset % bs or len(data) % bs or not data:
                    raise InvalidRequest("write_many takes whole blocks")
            for offset, data in writes:
                self.calls["write"] += 1
                first = offset // bs
                for i in range(len(data) // bs):
                    self._blocks[first + i] = bytes(data[i * bs:(i + 1) * bs])

    def write(self, offset: int, data: bytes, *, fua: bool = False,
              nowait: bool = False) -> None:
        self._sleep("write", offset, nowait, fua)
        bs = self.block_size
        length = len(data)
        with self._lock:
            self._enter("write")
            self._check(offset, length, write=True)
            if length > MAX_REQUEST:
                raise InvalidRequest("write too large")
            if offset % bs == 0 and length % bs == 0:
                data = bytes(data)
                first = offset // bs
                for i in range(length // bs):
                    self._blocks[first + i] = data[i * bs:(i + 1) * bs]
                if fua:
                    self.flushed_calls += 1
                return
            view = memoryview(data)
            pos = 0
            while pos < length:
                index, inner = divmod(offset + pos, bs)
                n = min(bs - inner, length - pos)
                if n == bs:
                    self._blocks[index] = bytes(view[pos:pos + n])
                else:
                    block = bytearray(self._blocks.get(index) or bytes(bs))
                    block[inner:inner + n] = view[pos:pos + n]
                    self._blocks[index] = bytes(block)
                pos += n
            if fua:
                self.flushed_calls += 1

    def _zero(self, op: str, offset: int, length: int, fua: bool) -> None:
        bs = self.block_size
        with self._lock:
            self._enter(op)
            self._check(offset, length, write=True)
            end = offset + length
            pos = offset
            while pos < end:
                index, inner = divmod(pos, bs)
                n = min(bs - inner, end - pos)
                if n == bs:
                    self._blocks.pop(index, None)
                elif index in self._blocks:
                    block = bytearray(self._blocks[index])
                    block[inner:inner + n] = bytes(n)
                    self._blocks[index] = bytes(block)
                pos += n
            if fua:
                self.flushed_calls += 1

    def write_zeroes(self, offset: int, length: int, *, fua: bool = False,
                     nowait: bool = False) -> None:
        self._sleep("write_zeroes", offset, nowait, fua)
        self._zero("write_zeroes", offset, length, fua)

    def trim(self, offset: int, length: int, *, fua: bool = False,
             nowait: bool = False) -> None:
        self._sleep("trim", offset, nowait, fua)
        self._zero("trim", offset, length, fua)

    def flush(self) -> None:
        with self._lock:
            self._enter("flush")
            self.flushed_calls += 1

    def allocation(self, offset: int, length: int) -> list[Allocation]:
        bs = self.block_size
        with self._lock:
            self._enter("allocation")
            self._check(offset, length, write=False)
            end = offset + length
            if length == 0:
                return []
            first, last = offset // bs, (end - 1) // bs
            if len(self._blocks) < last - first + 1:
                present = sorted(k for k in self._blocks if first <= k <= last)
            else:
                present = [k for k in range(first, last + 1) if k in self._blocks]
        runs: list[Allocation] = []

        def add(start: int, stop: int, allocated: bool) -> None:
            start, stop = max(start, offset), min(stop, end)
            if stop <= start:
                return
            if runs and runs[-1].allocated == allocated:
                runs[-1] = Allocation(runs[-1].offset, stop - runs[-1].offset, allocated)
            else:
                runs.append(Allocation(start, stop - start, allocated))

        pos = offset
        for index in present:
            add(pos, index * bs, False)
            add(index * bs, (index + 1) * bs, True)
            pos = (index + 1) * bs
        add(pos, end, False)
        return runs

    def resize(self, new_size: int) -> None:
        with self._lock:
            if new_size < self._size or new_size % self.block_size:
                raise InvalidRequest("cannot shrink")
            self._size = new_size

    def close(self) -> None:
        with self._lock:
            self.calls["close"] += 1
            self.closed = True
