"""The frame: one piece of an object (segment data, a checkpoint part),
compressed and then, on an encrypted volume, sealed with AES-256-GCM.

    header (24 bytes) | body

| offset | size | field |
|---|---|---|
| 0 | 1 | codec: 0 raw, 1 zstd (lsbd.crypto.compress) |
| 1 | 1 | flags: bit 0 ENCRYPTED |
| 2 | 2 | reserved (0) |
| 4 | 4 | plain length: bytes after decompression |
| 8 | 4 | body length |
| 12 | 12 | nonce (random; zero when not encrypted) |

Encrypted, the body is the AES-256-GCM ciphertext of the stored bytes and
its 16-byte tag; the associated data is the header followed by the frame's
Place (below), so neither the codec, the lengths nor the frame's place can
change unnoticed.  Not encrypted, the body is the stored bytes and the
masked CRC32C of header, Place and stored bytes.

A Place says where a frame belongs: the volume id, the SHA-256 of the
object's name in the store, the object's random id, the frame's position
(its index) in the object, and a value the caller binds in (the object's
plain length, so that a cut-off object fails).

    | 0 | 8 | "LSBDFRM1" | 8 | 16 | volume id | 24 | 32 | SHA-256 of the name |
    | 56 | 16 | object id | 72 | 8 | position | 80 | 8 | extra |

The key of each object is HKDF-SHA256(data key, salt = object id,
info = "lsbd object key" | volume id | name): an object written again under
the same name (a seq used again after a crash) gets a new object id, hence
a new key.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Callable, Sequence

import attrs

from lsbd.checksum import MASK_DELTA, crc32c_on
from lsbd.crypto.aead import (NONCE_SIZE, TAG_SIZE, AuthenticationFailed, Cipher, hkdf,
                              random_bytes)
from lsbd.crypto.compress import RAW, Compressor, DecompressionFailed, decompress
from lsbd.errors import CorruptionError

HEADER = struct.Struct("<BBHII12s")
assert HEADER.size == 24
PLACE = struct.Struct("<8s16s32s16sQQ")
assert PLACE.size == 88
PLACE_MAGIC = b"LSBDFRM1"
_CRC = struct.Struct("<I")

FLAG_ENCRYPTED = 0x01
OBJECT_ID_SIZE = 16
#: The largest frame's plain length (a bound for readers of untrusted headers).
MAX_PLAIN = 1 << 24


class FrameError(CorruptionError):
    """A frame that does not authenticate, decompress or parse."""


@attrs.frozen(kw_only=True)
class Place:
    volume_id: bytes
    name: str                 # the object's key in the store
    object_id: bytes
    position: int
    extra: int = 0

    def pack(self) -> bytes:
        return place_prefix(self.volume_id, self.name, self.object_id) + \
            _POSITION.pack(self.position, self.extra)


_POSITION = struct.Struct("<QQ")


@functools.lru_cache(maxsize=4096)
def place_prefix(volume_id: bytes, name: str, object_id: bytes) -> bytes:
    """The first 72 bytes of every Place of one object (the same for all its
    frames: a loop over frames packs only the last 16).  Kept for the
    objects read last: a read of one block from each of many objects
    hashed the object's name again for every frame it opened (docs/scale.md)."""
    return PLACE.pack(PLACE_MAGIC, volume_id, hashlib.sha256(name.encode()).digest(),
                      object_id, 0, 0)[:PLACE.size - _POSITION.size]


def place_bytes(prefix: bytes, position: int, extra: int) -> bytes:
    return prefix + _POSITION.pack(position, extra)


def frame_crc(header: bytes | memoryview, place: bytes, body: bytes | memoryview) -> int:
    """The CRC that ends a frame in the clear: over its header, its Place
    and its body.  One function for the sealing and both opening paths, so
    that they cannot drift apart.  (Three CRC steps in C and the mask
    written out: open_clear calls it for every frame of a read.)"""
    c = crc32c_on(body, crc32c_on(place, crc32c_on(header, 0)))
    return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + MASK_DELTA) & 0xFFFFFFFF


def object_key(data_key: bytes, *, volume_id: bytes, name: str, object_id: bytes) -> bytes:
    info = b"lsbd object key" + volume_id + name.encode()
    return hkdf(data_key, salt=object_id, info=info)


def object_cipher(data_key: bytes, *, volume_id: bytes, name: str, object_id: bytes) -> Cipher:
    return Cipher(object_key(data_key, volume_id=volume_id, name=name, object_id=object_id))


def new_object_id() -> bytes:
    return random_bytes(OBJECT_ID_SIZE)


def frame_length(header: bytes) -> int:
    """The whole frame's length from its first 24 bytes."""
    _codec, _flags, _r, _plain, body, _nonce = HEADER.unpack_from(header)
    return HEADER.size + body


class _Nonces:
    """Random nonces, drawn from the system's generator a few hundred at a
    time (one call per frame cost as much as encrypting it)."""

    def __init__(self) -> None:
        self._buf = b""
        self._at = 0

    def __call__(self, n: int) -> bytes:
        if self._at + n > len(self._buf):
            self._buf, self._at = random_bytes(256 * n), 0
        self._at += n
        return self._buf[self._at - n:self._at]


class Framer:
    """Seals and opens frames of one object: its cipher (None: not encrypted)
    and the compressor for new frames (None: stored raw)."""

    def __init__(self, cipher: Cipher | None, compressor: Compressor | None = None, *,
                 nonce: Callable[[int], bytes] | None = None):
        self.cipher = cipher
        self.compressor = compressor
        # Tests pass a fixed one for golden bytes.  One Framer seals on one
        # thread at a time (an object's frames, in order).
        self._nonce = nonce or _Nonces()

    @property
    def overhead(self) -> int:
        return HEADER.size + (TAG_SIZE if self.cipher is not None else _CRC.size)

    def seal(self, plain: bytes, place: Place, *,
             compressed: tuple[int, bytes] | None = None) -> bytes:
        """`compressed`: (codec, stored bytes) of `plain` made beforehand
        (Compressor.compress_many), instead of compressing here."""
        return b"".join(self.seal_parts(plain, place.pack(), compressed=compressed))

    def seal_parts(self, plain: bytes | memoryview, place: bytes, *,
                   compressed: tuple[int, bytes | memoryview] | None = None
                   ) -> tuple[bytes | memoryview, ...]:
        """The frame of `plain` at the packed Place `place`, in pieces to write
        one after the other (the plain bytes of a raw, unencrypted frame are
        not copied)."""
        if len(plain) > MAX_PLAIN:
            raise ValueError("frame too large")
        if compressed is not None:
            codec, stored = compressed
        elif self.compressor is not None:
            codec, stored = self.compressor.compress(plain)
        else:
            codec, stored = RAW, plain
        if self.cipher is None:
            header = HEADER.pack(codec, 0, 0, len(plain), len(stored) + _CRC.size,
                                 bytes(NONCE_SIZE))
            crc = frame_crc(header, place, stored)
            return header, stored, _CRC.pack(crc)
        nonce = self._nonce(NONCE_SIZE)
        header = HEADER.pack(codec, FLAG_ENCRYPTED, 0, len(plain), len(stored) + TAG_SIZE,
                             nonce)
        return header, self.cipher.seal(nonce, stored, header + place)

    def seal_to(self, reserve: Callable[[int], memoryview], plain: bytes | memoryview,
                place: bytes, *, compressed: tuple[int, bytes | memoryview]) -> int:
        """seal_parts() of an encrypted frame written where it goes:
        reserve(n) gives the next n bytes of the output, and the frame is
        enciphered straight into them (no copy of the ciphertext).  Returns
        the frame's length.  The same bytes as seal_parts()."""
        assert self.cipher is not None
        if len(plain) > MAX_PLAIN:
            raise ValueError("frame too large")
        codec, stored = compressed
        nonce = self._nonce(NONCE_SIZE)
        body = len(stored) + TAG_SIZE
        header = HEADER.pack(codec, FLAG_ENCRYPTED, 0, len(plain), body, nonce)
        n = HEADER.size + body
        view = reserve(n)
        view[:HEADER.size] = header
        self.cipher.seal_into(nonce, stored, header + place, view[HEADER.size:])
        return n

    def open(self, frame: bytes | memoryview, place: Place, *, where: str = "frame") -> bytes:
        """The plain bytes of a whole frame; FrameError if anything is off."""
        codec, stored, plain_length = self._open_stored(frame, place, where)
        return _decompress(codec, stored, plain_length, place, where)

    def open_into(self, frame: memoryview, place: Place, out: memoryview, *,
                  where: str = "frame") -> None:
        """open() of a frame whose plain bytes are exactly `out`, written
        there: a frame that is neither encrypted nor compressed is copied
        once, from the fetched bytes to `out`."""
        codec, stored, plain_length = self._open_stored(frame, place, where)
        if len(out) != plain_length:
            raise FrameError(f"{where}: frame {place.position} has the wrong length", key=where,
                             offset=place.position)
        out[:] = stored if codec == RAW else _decompress(codec, stored, plain_length, place,
                                                         where)

    def _open_stored(self, frame: bytes | memoryview, place: Place, where: str
                     ) -> tuple[int, bytes | memoryview, int]:
        """(codec, stored bytes, plain length) of a whole frame, checked
        (authenticated, or its CRC); FrameError if anything is off."""
        if len(frame) < HEADER.size:
            raise FrameError(f"{where}: frame cut short", offset=place.position)
        codec, flags, _r, plain_length, body_length, nonce = HEADER.unpack_from(frame)
        if len(frame) != HEADER.size + body_length or plain_length > MAX_PLAIN:
            raise FrameError(f"{where}: frame length does not match its header",
                             offset=place.position)
        header = bytes(frame[:HEADER.size])
        encrypted = bool(flags & FLAG_ENCRYPTED)
        if encrypted != (self.cipher is not None) or flags & ~FLAG_ENCRYPTED:
            raise FrameError(f"{where}: frame is "
                             f"{'encrypted' if encrypted else 'not encrypted'}, "
                             "unlike its volume", offset=place.position)
        if self.cipher is not None:
            try:
                stored = self.cipher.open(nonce, frame[HEADER.size:], header + place.pack())
            except AuthenticationFailed:
                raise FrameError(f"{where}: frame {place.position} fails "
                                 "authentication", offset=place.position) from None
        else:
            stored = frame[HEADER.size:len(frame) - _CRC.size]
            (crc,) = _CRC.unpack_from(frame, len(frame) - _CRC.size)
            if (body_length < _CRC.size
                    or frame_crc(header, place.pack(), stored) != crc):
                raise FrameError(f"{where}: frame {place.position} fails its "
                                 "checksum", offset=place.position)
        if codec == RAW and len(stored) != plain_length:
            raise FrameError(f"{where}: frame {place.position}: raw frame of the "
                             "wrong length", offset=place.position)
        return codec, stored, plain_length


def open_clear(stored: memoryview, starts: Sequence[int], i: int, j: int, prefix: bytes,
               frame_size: int, plain_length: int, lo: int, hi: int) -> bytearray | None:
    """Plain bytes [lo, hi) of an object sealed in the clear (not
    encrypted) from the stored bytes of its frames i..j-1 (`starts`: the
    stored offset of every frame, as objects.Layout has them; `prefix`:
    place_prefix() of the object), each frame checked against its CRC
    before it is decompressed, written straight to where it goes in the
    result.  Framer.open_into() for every frame, then a cut, did the same
    with a Place, a header copy and a result of its own per frame: on reads
    of 1 MiB that was most of a second pass's time spent on its frames
    (docs/scale.md).  None if any frame is off (its CRC, lengths, codec):
    the caller opens them one by one, which names the bad one."""
    base = starts[i]
    if i >= j or len(stored) != starts[j] - base:
        return None
    out = bytearray(hi - lo)
    dest = memoryview(out)
    head, tail = HEADER.size, _CRC.size
    unpack, pack, crc_at = HEADER.unpack_from, _POSITION.pack, _CRC.unpack_from
    # No builtin calls a frame beyond the checks themselves: a read after
    # random writes opens some 72 frames a MiB, each ~2 us of Python here.
    for k in range(i, j):
        a, b = starts[k] - base, starts[k + 1] - base
        codec, flags, _r, plain, body, _nonce = unpack(stored, a)
        at = k * frame_size
        if (b - a != head + body or body < tail or flags
                or plain != (frame_size if at + frame_size <= plain_length
                             else plain_length - at)):
            return None
        body_view = stored[a + head:b - tail]
        if frame_crc(stored[a:a + head], prefix + pack(k, plain_length),
                     body_view) != crc_at(stored, b - tail)[0]:
            return None
        first = lo - at if lo > at else 0
        last = hi - at if hi < at + plain else plain
        if codec == RAW:
            if len(body_view) != plain:
                return None
            dest[at + first - lo:at + last - lo] = body_view[first:last]
            continue
        try:
            data = decompress(codec, body_view, plain)
        except DecompressionFailed:
            return None
        dest[at + first - lo:at + last - lo] = \
            data if last - first == plain else memoryview(data)[first:last]
    return out


def _decompress(codec: int, stored: bytes | memoryview, plain_length: int, place: Place,
                where: str) -> bytes:
    try:
        return decompress(codec, stored, plain_length)
    except DecompressionFailed as e:
        raise FrameError(f"{where}: frame {place.position}: {e}",
                         offset=place.position) from None
