"""Local segment files as the cache reads them: a descriptor shared by the
reads that hold it, read at the segment's own offsets (decrypted when the
file is encrypted, lsbd.crypto.localfile), from the page cache only when
asked (nowait)."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from itertools import repeat

from lsbd.crypto.localfile import LocalReader
from lsbd.errors import WouldBlock
from lsbd.linux import unfilled_bytearray

_RWF_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)


def _nowait_failed(e: OSError) -> None:
    """After an RWF_NOWAIT read failed: WouldBlock when the blocks are not
    in the page cache; plain reads from now on when this kernel or file
    system cannot read that way (the caller then reads plainly); else the
    error itself."""
    global _RWF_NOWAIT
    if isinstance(e, BlockingIOError):
        raise WouldBlock("the blocks are not in the page cache") from None
    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
        raise e
    _RWF_NOWAIT = None


def pread(fd: int, length: int, offset: int, nowait: bool) -> bytes | bytearray:
    """pread; with nowait, only from the page cache (RWF_NOWAIT): a read that
    would wait for the disk raises WouldBlock, so that an event loop never
    stalls on a cold block either.  That read returns the bytearray it read
    into: copying it to bytes cost a quarter of the speed of 1 MiB reads."""
    if not nowait or _RWF_NOWAIT is None:
        return os.pread(fd, length, offset)
    buf = unfilled_bytearray(length)
    try:
        n = os.preadv(fd, [buf], offset, _RWF_NOWAIT)
    except OSError as e:
        _nowait_failed(e)
        return os.pread(fd, length, offset)
    if n < length:   # partly cached (or cut short: the blocking retry tells)
        raise WouldBlock("the blocks are not all in the page cache")
    return buf


_SPARE = 15   # what the cipher's update_into asks for past the data
_IN_PLACE_FROM = 64 * 1024
#: Ciphertext buffers of small reads, by length, shared by every open file
#: and taken last in, first out, so that the next read of any file takes
#: one still in the processor's caches rather than a buffer of its own
#: file, cold after reads of some 160 others.  Only ever ciphertext.  A
#: buffer is made only when its list is empty and goes back after its read,
#: so a list never holds more than the most reads ever at once.
_BUFFERS: dict[int, list[bytearray]] = {}
_LENGTHS_KEPT = 32    # the first lengths read (4 KiB, ...); others are not kept
#: The keystream's offset within a 16-byte block, as zeros to encipher.
_ZEROS = tuple(bytes(n) for n in range(16))


def _keep(buffers: list[bytearray] | None, buf: bytearray) -> None:
    if buffers is not None:
        buffers.append(buf)


def pread_into(fd: int, view: memoryview, offset: int, nowait: bool) -> int:
    """pread() into `view`; the number of bytes read (fewer at the file's end)."""
    global _RWF_NOWAIT
    if nowait and _RWF_NOWAIT is not None:
        try:
            n = os.preadv(fd, [view], offset, _RWF_NOWAIT)
        except BlockingIOError:
            raise WouldBlock("the blocks are not in the page cache") from None
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            _RWF_NOWAIT = None
        else:
            if n < len(view):
                raise WouldBlock("the blocks are not all in the page cache")
            return n
    n = done = os.preadv(fd, [view], offset)
    while n and done < len(view):    # a short read before the end: go on
        n = os.preadv(fd, [view[done:]], offset + done)
        done += n
    return done


def _unused(*_args):
    raise AssertionError("a file in the clear has no cipher")


class OpenFile:
    """A cached descriptor; `users` reads hold it, `retired`: close it when
    the last one lets go (the file was evicted or forgotten meanwhile).
    `reader` reads it at segment offsets (decrypting an encrypted file with
    the key of this very file, even once a new file has taken its name)."""

    __slots__ = ("fd", "users", "retired", "reader", "_base", "_xor_one", "_context",
                 "_idle")

    def __init__(self, reader: LocalReader):
        self.fd = reader.fd
        self.reader = reader
        self.users = 0
        self.retired = False
        # Looked up once here, not on every read (a reader's cipher is its
        # file's for good: a file under a new key is a new OpenFile).
        self._base = reader.base
        cipher = reader.cipher
        self._xor_one: Callable = cipher.xor_one if cipher is not None else _unused
        self._context: Callable = cipher.context if cipher is not None else _unused
        # Small reads' CTR contexts, one per concurrent reader (setting one
        # up costs several microseconds).  The ciphertext is read into a
        # buffer used again (_BUFFERS), and only the plain bytes are a new
        # object (measured 0.25 us of the 1.6 a 4 KiB read of an encrypted
        # file costs more than one in the clear).
        self._idle: list | None = [] if cipher is not None else None

    def read(self, length: int, offset: int, nowait: bool):
        idle = self._idle
        if idle is None:      # in the clear
            return pread(self.fd, length, offset, nowait)
        if length >= _IN_PLACE_FROM:
            return self._read_large(length, offset, nowait)
        if nowait and _RWF_NOWAIT is None:
            return self._read_plain_pread(length, offset, nowait)
        # Every random read's path, kept short: the ciphertext of exactly
        # these bytes into a shared buffer, deciphered into the bytes
        # returned.  Reading from the 16-byte boundary before the offset
        # instead (one cipher call, then a copy without the first bytes)
        # measured 0.3 us slower per 4 KiB read (docs/security.md, "the path
        # around the cipher").
        buffers = _BUFFERS.get(length)
        try:
            buf = buffers.pop()   # type: ignore[union-attr]  # None: AttributeError
        except (IndexError, AttributeError):
            buf = bytearray(length)
            if buffers is None and len(_BUFFERS) < _LENGTHS_KEPT:
                buffers = _BUFFERS.setdefault(length, [])
        try:
            n = os.preadv(self.fd, [buf], self._base + offset,
                          _RWF_NOWAIT if nowait and _RWF_NOWAIT is not None else 0)
        except BlockingIOError:
            _keep(buffers, buf)
            raise WouldBlock("the blocks are not in the page cache") from None
        except OSError as e:
            _keep(buffers, buf)
            if not nowait or e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            return self._read_plain_pread(length, offset, nowait)   # turns nowait off
        if n != length:
            _keep(buffers, buf)
            if nowait:
                raise WouldBlock("the blocks are not all in the page cache")
            return self._read_plain_pread(length, offset, nowait)   # cut short at the end
        try:
            ctx = idle.pop()
        except IndexError:
            ctx = self._context()
        # lsbd.crypto.aead.seek(ctx, offset), without the call.
        ctx.reset_nonce((offset >> 4).to_bytes(16, "big"))
        if offset & 15:
            ctx.update(_ZEROS[offset & 15])
        out = ctx.update(buf)
        idle.append(ctx)      # as many as reads ever at once, as the buffers
        if buffers is not None:
            buffers.append(buf)
        return out

    @property
    def in_clear(self) -> bool:
        """The file is not encrypted (read_apart() reads it)."""
        return self._idle is None

    def read_apart(self, length: int, offsets: list[int], nowait: bool) -> list:
        """read(length, offset, nowait) at each of these offsets of a file
        in the clear, a pread each, the calls made by a C loop (map) rather
        than a Python step each: after random writes a MiB read finds some
        160 blocks far apart in some 30 local files.  Reads cut short at
        the file's end come back short (the caller's checks name them)."""
        n = len(offsets)
        if nowait and _RWF_NOWAIT is not None:
            bufs = list(map(bytearray, repeat(length, n)))
            try:
                got = list(map(os.preadv, repeat(self.fd, n), zip(bufs), offsets,
                               repeat(_RWF_NOWAIT, n)))
            except OSError as e:
                _nowait_failed(e)
            else:
                if got.count(length) != n:   # partly cached, or cut short: read them again
                    raise WouldBlock("the blocks are not all in the page cache")
                return bufs
        return list(map(os.pread, repeat(self.fd, n), repeat(length, n), offsets))

    def _read_plain_pread(self, length: int, offset: int, nowait: bool):
        data = pread(self.fd, length, self._base + offset, nowait)
        return self._xor_one(offset, data) if data else data

    def _read_large(self, length: int, offset: int, nowait: bool) -> bytearray:
        cipher = self.reader.cipher
        assert cipher is not None
        # Decrypted where it was read: no second buffer for a 1 MiB read
        # (0.2 ms against 0.7 measured; small reads are faster the other way).
        buf = unfilled_bytearray(length + _SPARE)
        n = pread_into(self.fd, memoryview(buf)[:length], self._base + offset, nowait)
        cipher.xor_in_place(offset, buf, n)
        del buf[n:]
        return buf
