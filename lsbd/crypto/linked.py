"""Sealing by link: an encrypted volume's segment stored as its local file
already is (lsbd.crypto.localfile), with a tag per frame appended.

    header (32 B, "LSBDLOC1") | body: the segment, AES-256-CTR | index | tail (64 B)

Header and body are the local file's, byte for byte: nothing is enciphered
twice, and on a file:// store on the cache dir's file system the object is
the local file itself (a hard link).  The tail is objects.TAIL at version
2: the file's data key id, its file id as the object id, the frame size,
the frame count and the body's length as the plain length.  Frame i is
body bytes [i * frame size, (i + 1) * frame size) (the last one shorter).

The index is one 16-byte AES-GMAC tag per frame (AES-GCM with no plaintext,
the frame's ciphertext as associated data), then the index tag, over the
tail's bytes 0..47 followed by every frame tag.  All under the object's MAC
key, HKDF-SHA256(data key, salt = file id, info = "lsbd frame mac" |
volume id | body length (u64 LE) | object name); frame i at nonce i (12 bytes, big endian), the
index at nonce 2^96 - 1.  Encrypt, then MAC, under two keys: a frame moved
to another position, object or volume, or changed, fails its tag before it
is deciphered; a tail or index changed fails the index tag.  A key tags
each position once: a local file is written once at each offset, and a
journal rolled back or recovered gets a new file id (localfile.rewrite).
Tagging the same file again gives the same bytes.

Only segments whose first frames do not compress are sealed so (the
sealing process decides, lsbd.crypto.worker); checkpoints and compressible
segments are sealed in frames of their own (lsbd.crypto.objects, version 1).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import attrs

from lsbd.crypto.aead import TAG_SIZE, Cipher, hkdf
from lsbd.crypto.frames import FrameError
from lsbd.crypto.localfile import HEADER_SIZE, FileCipher
from lsbd.crypto.objects import (BATCH, LINKED_VERSION, MAGIC, TAIL, Framer, Layout, Tail,
                                 decode_tail)

INDEX_NONCE = ((1 << 96) - 1).to_bytes(12, "big")
_BOUND = 48                  # tail bytes the index tag covers


def mac_key(data_key: bytes, *, volume_id: bytes, name: str, file_id: bytes,
            body_length: int) -> bytes:
    """The object's MAC key.  The body's length is bound in too: were a file
    ever tagged again with another length (its last frame longer or
    shorter), a key would otherwise tag two different frames at one nonce,
    which gives GMAC's key away."""
    return hkdf(data_key, salt=file_id, info=b"lsbd frame mac" + volume_id
                + body_length.to_bytes(8, "little") + name.encode())


def _nonce(i: int) -> bytes:
    return i.to_bytes(12, "big")


def index_length(body_length: int, frame_size: int) -> int:
    return TAG_SIZE * (-(-body_length // frame_size) + 1)


def stored_size(body_length: int, frame_size: int) -> int:
    """The object's size: header, body, index and tail."""
    return HEADER_SIZE + body_length + index_length(body_length, frame_size) + TAIL.size


def body_length_for(size: int, frame_size: int) -> int | None:
    """The body length whose object is `size` bytes, if one is (stored_size
    grows with the body, so there is at most one)."""
    rest = size - HEADER_SIZE - TAIL.size - TAG_SIZE
    if rest < 0:
        return None
    # rest = n + TAG_SIZE * ceil(n / frame_size): n * (frame_size + TAG_SIZE)
    # / frame_size and less than one tag more, so n is at most the guess
    # and less than a tag below it
    guess = rest * frame_size // (frame_size + TAG_SIZE)
    for n in range(max(0, guess - TAG_SIZE - 1), guess + 2):
        if stored_size(n, frame_size) == size:
            return n
    return None


def tail_of(*, key_id: int, file_id: bytes, frame_size: int, body_length: int) -> Tail:
    count = -(-body_length // frame_size)
    return Tail(encrypted=True, key_id=key_id, object_id=file_id, frame_size=frame_size,
                frame_count=count, plain_length=body_length,
                index_length=TAG_SIZE * (count + 1), version=LINKED_VERSION)


def make_index(read: Callable[[int, int], bytes | bytearray | memoryview], mac: Cipher,
               tail: Tail) -> bytes:
    """The index of the body read with read(offset, n) (the ciphertext, at
    body offsets), BATCH frames at a time."""
    fs, length = tail.frame_size, tail.plain_length
    tags = []
    tag = mac.tag
    for first in range(0, tail.frame_count, BATCH):
        start = first * fs
        want = min(length, (first + BATCH) * fs) - start
        view = memoryview(read(start, want))
        if len(view) != want:
            raise ValueError("the local file ended before its body did")
        for k in range(0, want, fs):
            tags.append(tag(_nonce(first + k // fs), view[k:k + fs]))
    body = b"".join(tags)
    return body + mac.tag(INDEX_NONCE, tail.pack()[:_BOUND] + body)


def append(fd: int, tail: Tail, index: bytes) -> int:
    """Put index and tail after the body of the local file `fd` (open for
    reading and writing) and sync it; returns the object's size.  The file
    is first grown to its final size in one step (readers of the cache
    never see it grown by part of the append: lsbd.format.segment's
    segment_size), then written.  Bytes already there and right are not
    written again; a crash leaves the body whole, and tagging again gives
    the same bytes."""
    end = HEADER_SIZE + tail.plain_length
    want = index + tail.pack()
    size = end + len(want)
    if os.fstat(fd).st_size != size or os.pread(fd, len(want), end) != want:
        os.ftruncate(fd, size)
        view = memoryview(want)
        at = end
        while view:
            n = os.pwrite(fd, view, at)
            if n <= 0:
                raise OSError(28, "short write of a segment's index (disk full?)")
            view, at = view[n:], at + n
    os.fdatasync(fd)
    return size


def complete_tail(fd: int) -> Tail | None:
    """The tail of a local file whose append is whole (its tail checks and
    matches its size), else None.  Only the tail: tags are checked by
    readers of the store."""
    size = os.fstat(fd).st_size
    if size < HEADER_SIZE + TAIL.size:
        return None
    buf = os.pread(fd, TAIL.size, size - TAIL.size)
    if buf[:len(MAGIC)] != MAGIC:
        return None
    try:
        tail = decode_tail(buf, where="")
    except FrameError:
        return None
    if tail.version != LINKED_VERSION or stored_size(tail.plain_length, tail.frame_size) != size:
        return None
    return tail


class _Starts:
    """Stored offset of each frame, then of the index (Layout.starts)."""

    __slots__ = ("_fs", "_count", "_end")

    def __init__(self, tail: Tail):
        self._fs, self._count = tail.frame_size, tail.frame_count
        self._end = HEADER_SIZE + tail.plain_length

    def __len__(self) -> int:
        return self._count + 1

    def __getitem__(self, k: int) -> int:
        if k < 0:
            k += self._count + 1
        if not 0 <= k <= self._count:
            raise IndexError(k)
        return min(HEADER_SIZE + k * self._fs, self._end)


@attrs.frozen
class ObjectKeys:
    """What reads a linked object: its MAC key's cipher and its file key."""

    mac: Cipher
    file: FileCipher


class LinkedLayout(Layout):
    """A version 2 object's layout, as objects.Layout for version 1: frames
    are checked against their tags, then deciphered."""

    def __init__(self, name: str, tail: Tail, keys: ObjectKeys, index: bytes,
                 raw: bytes = b""):
        # objects.Layout's fields, without its frames of their own
        self.name = name
        self.raw = raw
        self.tail = tail
        self.framer = Framer(None)
        self.keys = keys
        if len(index) != tail.index_length or not keys.mac.check(
                INDEX_NONCE, index[-TAG_SIZE:], tail.pack()[:_BOUND] + index[:-TAG_SIZE]):
            raise FrameError(f"{name}: index fails authentication (at stored offset "
                             f"{HEADER_SIZE + tail.plain_length})", key=name,
                             offset=HEADER_SIZE + tail.plain_length)
        self.tags = index[:-TAG_SIZE]
        self.starts = _Starts(tail)     # type: ignore[assignment]

    @property
    def nbytes(self) -> int:
        return len(self.tags) + len(self.raw) + 1024

    @property
    def stored_length(self) -> int:
        return stored_size(self.tail.plain_length, self.tail.frame_size)

    def check_head(self, head: bytes, *, where: str) -> None:
        """The local file's header: what the tail (authenticated) says."""
        if head != self.keys.file.header:
            raise FrameError(f"{where}: header does not match the object's tail (at stored "
                             "offset 0)", key=where, offset=0)

    def open_frames(self, i: int, j: int, stored: bytes, *, where: str) -> bytearray:
        """Plain bytes of frames i..j-1 from their stored bytes: each frame's
        tag checked, then all deciphered in one call."""
        fs, length = self.tail.frame_size, self.tail.plain_length
        n = max(0, min(j * fs, length) - i * fs)
        if len(stored) != n:
            raise FrameError(f"{where}: frames {i}..{j - 1} cut short", key=where,
                             offset=self.starts[i])
        view, tags, check = memoryview(stored), self.tags, self.keys.mac.check
        for k in range(i, j):
            at = (k - i) * fs
            if not check(_nonce(k), tags[TAG_SIZE * k:TAG_SIZE * (k + 1)], view[at:at + fs]):
                raise FrameError(f"{where}: frame {k} at stored offset {self.starts[k]} "
                                 "fails authentication", key=where, offset=self.starts[k])
        out = bytearray(n + 15)             # xor_in_place's spare bytes
        out[:n] = view
        self.keys.file.xor_in_place(i * fs, out, n)
        del out[n:]
        return out
