"""A sealed object: what a compressed or encrypted volume stores in place
of a plain segment or checkpoint object.

    frame 0 | frame 1 | ... | index (a frame) | tail (64 bytes)

The object's plain bytes are cut into frames of `frame_size` (the last one
shorter), each sealed by frames.Framer with its index as position and the
plain length as the bound value.  The index lists every frame's stored
length, so the frames that hold any plain byte range are found without
reading the others: a random 4 KiB read opens one frame.

Tail (all integers little endian):

| offset | size | field |
|---|---|---|
| 0 | 8 | magic `LSBDOBJ1` |
| 8 | 2 | version: 1, or 2 for a segment sealed by link (lsbd.crypto.linked) |
| 10 | 1 | flags: bit 0 ENCRYPTED |
| 11 | 1 | reserved (0) |
| 12 | 4 | data key id (0 when not encrypted) |
| 16 | 16 | object id (random) |
| 32 | 4 | frame size |
| 36 | 4 | frame count |
| 40 | 8 | plain length |
| 48 | 4 | index length (the sealed index frame) |
| 52 | 8 | reserved (0) |
| 60 | 4 | masked CRC32C of bytes 0..59 |

The index frame's plain bytes are the tail's bytes 0..47 followed by one u32
per frame; it is sealed at position 2^64-1.  Opening it authenticates the
tail's fields; opening a frame authenticates its place, so frames swapped,
moved, cut off, or taken from another object fail.
"""

from __future__ import annotations

import array
import itertools
import struct
from collections.abc import Callable

import attrs

from lsbd import numpyload
from lsbd.checksum import masked_crc
from lsbd.crypto.compress import RAW
from lsbd.crypto.frames import FrameError, Framer, Place, open_clear, place_bytes, place_prefix

TAIL = struct.Struct("<8sHBBI16sIIQI8xI")
assert TAIL.size == 64
MAGIC = b"LSBDOBJ1"
VERSION = 1
LINKED_VERSION = 2           # lsbd.crypto.linked: the local file, tagged
FLAG_ENCRYPTED = 0x01
INDEX_POSITION = (1 << 64) - 1
_BOUND = 48                  # tail bytes repeated (and so authenticated) in the index


@attrs.frozen(kw_only=True)
class Tail:
    encrypted: bool
    key_id: int
    object_id: bytes
    frame_size: int
    frame_count: int
    plain_length: int
    index_length: int
    version: int = VERSION

    def pack(self) -> bytes:
        body = TAIL.pack(MAGIC, self.version, FLAG_ENCRYPTED if self.encrypted else 0, 0,
                         self.key_id, self.object_id, self.frame_size, self.frame_count,
                         self.plain_length, self.index_length, 0)
        return body[:-4] + struct.pack("<I", masked_crc(body[:-4]))


def is_sealed(tail: bytes) -> bool:
    return len(tail) >= TAIL.size and tail[-TAIL.size:-TAIL.size + 8] == MAGIC


def decode_tail(buf: bytes, *, where: str) -> Tail:
    if not is_sealed(buf):
        raise FrameError(f"{where}: not a sealed object (its volume is compressed or "
                         "encrypted)", key=where)
    raw = buf[-TAIL.size:]
    (_m, version, flags, _r, key_id, object_id, frame_size, count, plain, index_length,
     crc) = TAIL.unpack(raw)
    if masked_crc(raw[:-4]) != crc:
        raise FrameError(f"{where}: object tail checksum mismatch", key=where)
    if version not in (VERSION, LINKED_VERSION) or flags & ~FLAG_ENCRYPTED or not frame_size:
        raise FrameError(f"{where}: unsupported object version {version}", key=where)
    if count != -(-plain // frame_size):
        raise FrameError(f"{where}: frame count does not match the length", key=where)
    if version == LINKED_VERSION and (not flags & FLAG_ENCRYPTED
                                      or index_length != 16 * (count + 1)):
        raise FrameError(f"{where}: a linked object's tail does not match its index",
                         key=where)
    return Tail(encrypted=bool(flags & FLAG_ENCRYPTED), key_id=key_id, object_id=object_id,
                frame_size=frame_size, frame_count=count, plain_length=plain,
                index_length=index_length, version=version)


#: Frames sealed together: the plain bytes read at a time, and what the
#: sealing of an object of any size holds in memory (1 MiB at 16 KiB frames).
BATCH = 64


def seal(plain: bytes | memoryview, *, name: str, volume_id: bytes, framer: Framer,
         key_id: int, object_id: bytes, frame_size: int) -> bytes:
    """The sealed object of `plain`, stored under `name`."""
    view = memoryview(plain)
    parts: list = []
    seal_into(lambda start, n: view[start:start + n], len(view), parts.extend, name=name,
              volume_id=volume_id, framer=framer, key_id=key_id, object_id=object_id,
              frame_size=frame_size)
    return b"".join(parts)


def seal_into(read: Callable[[int, int], bytes | bytearray | memoryview], plain_length: int,
              write: Callable[[list], object], *, name: str, volume_id: bytes,
              framer: Framer, key_id: int, object_id: bytes, frame_size: int,
              reserve: Callable[[int], memoryview] | None = None) -> int:
    """Seal an object of `plain_length` bytes, read BATCH frames at a time with
    read(offset, length), handing its bytes in order to write(buffers): the
    bytes seal() makes, with only one batch in memory.  Returns the sealed
    length.  reserve: the output's next n bytes (room for a whole frame),
    into which encrypted frames are enciphered rather than handed to write."""
    count = -(-plain_length // frame_size)
    prefix = place_prefix(volume_id, name, object_id)
    compressor = framer.compressor
    direct = reserve if framer.cipher is not None else None
    lengths = array.array("I")
    total = 0
    for first in range(0, count, BATCH):
        last = min(count, first + BATCH)
        start = first * frame_size
        view = memoryview(read(start, min(plain_length, last * frame_size) - start))
        chunks = [view[k:k + frame_size] for k in range(0, len(view), frame_size)]
        if len(chunks) != last - first or len(chunks[-1]) != \
                min(frame_size, plain_length - (last - 1) * frame_size):
            raise ValueError(f"{name}: the plain bytes ended early")
        packed = compressor.compress_many(chunks) if compressor is not None \
            else [None] * len(chunks)
        out: list = []
        for k, chunk in enumerate(chunks):
            place = place_bytes(prefix, first + k, plain_length)
            if direct is not None:
                n = framer.seal_to(direct, chunk, place, compressed=packed[k] or (RAW, chunk))
            else:
                parts = framer.seal_parts(chunk, place, compressed=packed[k])
                n = sum(map(len, parts))
                out.extend(parts)
            lengths.append(n)
            total += n
        if out:
            write(out)
    tail = Tail(encrypted=framer.cipher is not None, key_id=key_id, object_id=object_id,
                frame_size=frame_size, frame_count=count, plain_length=plain_length,
                index_length=0)
    index = b"".join(framer.seal_parts(tail.pack()[:_BOUND] + lengths.tobytes(),
                                       place_bytes(prefix, INDEX_POSITION, plain_length)))
    tail = attrs.evolve(tail, index_length=len(index))
    packed_tail = tail.pack()
    write([index, packed_tail])
    return total + len(index) + len(packed_tail)


#: Frame lengths summed in Python before numpy is asked for (128 segments of
#: 2,048 frames, about 12 ms): its import costs 0.12-0.2 s of a core, most
#: of it holding the GIL, and a small volume's attach (its layouts come
#: with the map summary) ran it beside the map's build and the first
#: fetches, for a cold read that needed it nowhere.
PYTHON_FRAMES = 1 << 18
_summed = 0     # frame lengths summed in Python by this process (about: no lock)


def _frame_starts(plain: bytes | bytearray, at: int) -> array.array:
    """The stored offset of every frame, and where the index starts (last),
    from the frames' stored lengths (u32 each) at plain[at:].  4 bytes an
    offset where they fit: a serving process keeps the layouts of thousands
    of segments (lsbd.crypto.store).  Summed in numpy once it is loaded,
    and numpy asked for once PYTHON_FRAMES were summed without it: after
    random writes over a large volume a read opens the layouts of about two
    segments a MiB, and summing a segment's 2,048 lengths in Python took
    94 us, in numpy 14 (docs/scale.md)."""
    global _summed
    np = numpyload.loaded() if _summed >= PYTHON_FRAMES else numpyload.imported()
    if np is None:
        lengths = array.array("I")
        lengths.frombytes(plain[at:])
        _summed += len(lengths)
        ends = list(itertools.accumulate(lengths))
        wide = bool(ends) and ends[-1] >= 1 << 32
        return array.array("q" if wide else "I", [0, *ends])
    sums = np.frombuffer(plain, dtype="<u4", offset=at).cumsum(dtype=np.int64)
    wide = bool(len(sums)) and int(sums[-1]) >= 1 << 32
    starts = array.array("q" if wide else "I", [0])
    starts.frombytes(sums.astype("=i8" if wide else "=u4").tobytes())
    return starts


class Layout:
    """Where each frame of a sealed object lies: what ranged reads need."""

    def __init__(self, name: str, volume_id: bytes, tail: Tail, framer: Framer,
                 index_frame: bytes, raw: bytes = b""):
        self.name = name
        #: The index frame and tail as stored, when kept (a map summary
        #: carries them, lsbd.segments.summary); b"" otherwise.
        self.raw = raw
        self.volume_id = volume_id
        self.tail = tail
        self.framer = framer
        index_place = Place(volume_id=volume_id, name=name, object_id=tail.object_id,
                            position=INDEX_POSITION, extra=tail.plain_length)
        plain = framer.open(index_frame, index_place, where=name)
        expected = attrs.evolve(tail, index_length=0).pack()[:_BOUND]
        if plain[:_BOUND] != expected or len(plain) != _BOUND + 4 * tail.frame_count:
            raise FrameError(f"{name}: object tail does not match its index", key=name)
        self.starts = _frame_starts(plain, _BOUND)
        # self.starts[i]: stored offset of frame i; self.starts[-1]: the index

    @property
    def nbytes(self) -> int:
        """Memory it holds, about (what a cache of layouts counts)."""
        return self.starts.itemsize * len(self.starts) + len(self.raw) + 1024

    @property
    def stored_length(self) -> int:
        return self.starts[-1] + self.tail.index_length + TAIL.size

    def check_head(self, head: bytes, *, where: str) -> None:
        """Check the object's bytes before its first frame (none here)."""

    def frames_for(self, start: int, end: int) -> tuple[int, int]:
        """Frames [i, j) that hold plain bytes [start, end)."""
        fs = self.tail.frame_size
        return start // fs, min(self.tail.frame_count, -(-end // fs))

    def open_span(self, lo: int, hi: int, stored: bytes, *, where: str) -> bytearray:
        """Plain bytes [lo, hi) from the stored bytes of the frames that
        hold them (frames_for(lo, hi), contiguous)."""
        i, j = self.frames_for(lo, hi)
        if self.framer.cipher is None and self.tail.version == VERSION:   # not linked
            out = open_clear(memoryview(stored), self.starts, i, j,
                             place_prefix(self.volume_id, self.name, self.tail.object_id),
                             self.tail.frame_size, self.tail.plain_length, lo, hi)
            if out is not None:
                return out
        return cut(self.open_frames(i, j, stored, where=where), lo - i * self.tail.frame_size,
                   hi - lo)

    def open_frames(self, i: int, j: int, stored: bytes, *, where: str) -> bytearray:
        """Plain bytes of frames i..j-1 from their stored bytes (contiguous,
        starting at frame i).  Each frame is opened straight into its place
        in the result: a whole 32 MiB segment otherwise took two more
        copies of itself at once (its frames, then their join)."""
        base = self.starts[i]
        fs, plain_length = self.tail.frame_size, self.tail.plain_length
        out = bytearray(max(0, min(j * fs, plain_length) - i * fs))
        view, frames = memoryview(out), memoryview(stored)
        for k in range(i, j):
            place = Place(volume_id=self.volume_id, name=self.name,
                          object_id=self.tail.object_id, position=k, extra=plain_length)
            at = (k - i) * fs
            self.framer.open_into(frames[self.starts[k] - base:self.starts[k + 1] - base],
                                  place, view[at:min(at + fs, len(out))], where=where)
        return out


def cut(data: bytearray, skip: int, length: int) -> bytearray:
    """data[skip:skip + length], cut in place rather than copied: a span of
    a read after random writes is up to 1 MiB, and 16 reads in flight each
    held both."""
    try:
        del data[skip + length:]
        del data[:skip]
    except BufferError:
        # A view of it is still alive somewhere (a reference cycle not
        # collected yet, a debugger): copy the range out instead.
        return bytearray(memoryview(data)[skip:skip + length])
    return data


def layout_from_tail(buf: bytes, *, name: str, volume_id: bytes,
                     framer_for: Callable[[Tail], Framer],
                     fetch_suffix: Callable[[int], bytes], keep_raw: bool = False,
                     linked: Callable[[Tail, bytes, bytes], Layout] | None = None) -> Layout:
    """The Layout of an object from a read of its last bytes (`buf`), reading
    its last n bytes again with `fetch_suffix(n)` if `buf` misses part of
    the index.  An object cut short or grown at either end fails: its tail,
    index or frames then do not open.  keep_raw: the Layout keeps its index
    frame and tail as stored (Layout.raw).  linked(tail, index, raw): the
    layout of a version 2 object (lsbd.crypto.linked); None: there is none."""
    tail = decode_tail(buf, where=name)
    have = len(buf) - TAIL.size
    if tail.index_length <= have:
        index = buf[have - tail.index_length:have]
    else:
        index = fetch_suffix(tail.index_length + TAIL.size)[:tail.index_length]
    raw = bytes(index) + bytes(buf[-TAIL.size:]) if keep_raw else b""
    if tail.version == LINKED_VERSION:
        if linked is None:
            raise FrameError(f"{name}: a linked object where none can be", key=name)
        return linked(tail, bytes(index), raw)
    return Layout(name, volume_id, tail, framer_for(tail), index, raw)


def open_whole(data: bytes, *, name: str, volume_id: bytes,
               framer_for: Callable[[Tail], Framer],
               linked: Callable[[Tail, bytes, bytes], Layout] | None = None) -> bytes:
    """The plain bytes of a whole sealed object."""
    layout = layout_from_tail(data, name=name, volume_id=volume_id, framer_for=framer_for,
                              fetch_suffix=lambda n: data[-n:], linked=linked)
    if layout.stored_length != len(data):
        raise FrameError(f"{name}: object length does not match its index", key=name)
    layout.check_head(data[:layout.starts[0]], where=name)
    return layout.open_frames(0, layout.tail.frame_count,
                              memoryview(data)[layout.starts[0]:layout.starts[-1]], where=name)
