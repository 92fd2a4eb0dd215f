"""Segment files in the cache dir of an encrypted volume, encrypted at rest.

    header (32 bytes, in the clear) | body: the segment's bytes, AES-256-CTR

| offset | size | field |
|---|---|---|
| 0 | 8 | magic "LSBDLOC1" |
| 8 | 4 | data key id (u32 LE): the volume's data key the file key comes from |
| 12 | 16 | file id: random, new for every file |
| 28 | 4 | masked CRC32C of bytes 0-27 |

The segment's byte at offset X (the offset the segment format, the map and
the journal's index use) is at file offset 32 + X, XORed with AES-256-CTR
keystream block X // 16 under the file key, HKDF-SHA256(data key, salt =
file id, info = "lsbd local file" | volume id).  A journal appends and a
reader reads any range at its offset, as in the clear: one pread and an XOR.

A counter mode must never encrypt two different plaintexts at one offset
under one key.  A local file is therefore written once at each offset: a
journal rolled back past bytes it wrote, or recovered after a crash with a
torn tail, is copied up to its valid end into a new file under a new file
id (rewrite()), renamed over the old one, before anything is appended; a
seq used again gets a new file, hence a new id, like every file.

The body is not authenticated: someone who can change the cache dir can
flip bits unnoticed by the cipher.  The segment's own CRCs (every record,
every block, the index) catch that on read, and a segment's store copy is
authenticated: sealed with AES-GCM from the bytes read here, or this very
file with a tag per frame appended (lsbd.crypto.linked): see
docs/security.md.  The segment's length in such a file is not its size:
lsbd.segments.locallength.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

from lsbd import fileio
from lsbd.checksum import masked_crc
from lsbd.crypto.aead import Stream, hkdf, random_bytes
from lsbd.errors import CorruptionError

MAGIC = b"LSBDLOC1"
HEADER = struct.Struct("<8sI16sI")
HEADER_SIZE = HEADER.size          # 32
FILE_ID_SIZE = 16
_COPY_CHUNK = 1 << 20


def has_header(head: bytes) -> bool:
    """Whether a file's first bytes start like an encrypted local file."""
    return head[:len(MAGIC)] == MAGIC


class FileCipher:
    """The key of one local file: encrypt and decrypt at plain offsets."""

    __slots__ = ("key", "key_id", "file_id", "header", "_stream", "xor_one")

    def __init__(self, key: bytes, *, key_id: int, file_id: bytes):
        self.key = key        # for the sealing process, which decrypts as it reads
        self.key_id = key_id
        self.file_id = file_id
        head = HEADER.pack(MAGIC, key_id, file_id, 0)[:-4]
        self.header = head + struct.pack("<I", masked_crc(head))
        self._stream = Stream(key)
        # xor(offset, [data]) of one buffer, without a call in between (the
        # path of every small read).
        self.xor_one = self._stream.xor_one

    def xor(self, offset: int, parts) -> bytes:
        """Encrypt (or decrypt: the same) parts that lie contiguous from `offset`."""
        return self._stream.xor(offset, parts)

    def xor_in_place(self, offset: int, buf: bytearray, n: int) -> None:
        """Decrypt buf[:n], read from `offset`, in place (buf has 15 spare bytes)."""
        self._stream.xor_in_place(offset, buf, n)

    def context(self):
        """A CTR context of this file's key of its own (aead.seek() it to an
        offset), for one thread at a time."""
        return self._stream.at(0)

    def at(self, offset: int):
        """A context that encrypts from `offset` on, one update after another
        (for one thread: the journal's appends)."""
        return self._stream.at(offset)


class LocalKeys:
    """The keys of one encrypted volume's local files."""

    def __init__(self, volume_id: bytes, data_key: Callable[[int], bytes],
                 current: Callable[[], tuple[int, bytes]]):
        self.volume_id = volume_id
        self._data_key = data_key
        self._current = current

    @classmethod
    def from_keyring(cls, keyring, volume_id: bytes) -> LocalKeys:
        """The keys of the volume `volume_id` (its config's id) from its keyring."""
        def current() -> tuple[int, bytes]:
            k = keyring.current_key()
            return k.id, k.key
        return cls(volume_id, keyring.data_key, current)

    def of_file(self, data_key: bytes, key_id: int, file_id: bytes) -> FileCipher:
        """The cipher of the file `file_id` under `data_key` (key `key_id`)."""
        return self._cipher(data_key, key_id, file_id)

    def _cipher(self, data_key: bytes, key_id: int, file_id: bytes) -> FileCipher:
        key = hkdf(data_key, salt=file_id, info=b"lsbd local file" + self.volume_id)
        return FileCipher(key, key_id=key_id, file_id=file_id)

    def new_file(self) -> FileCipher:
        key_id, data_key = self._current()
        return self._cipher(data_key, key_id, random_bytes(FILE_ID_SIZE))

    def from_header(self, head: bytes, *, where: str) -> FileCipher:
        """The cipher of a file from its first HEADER_SIZE bytes; CorruptionError
        if they are not a whole header or name a data key the volume lacks."""
        if len(head) < HEADER_SIZE or not has_header(head):
            raise CorruptionError(f"{where}: not an encrypted local file", key=where)
        magic, key_id, file_id, crc = HEADER.unpack_from(head)
        if masked_crc(head[:HEADER_SIZE - 4]) != crc:
            raise CorruptionError(f"{where}: damaged local file header", key=where)
        try:
            data_key = self._data_key(key_id)
        except Exception as e:   # noqa: BLE001 - a retired or unknown key: unreadable here
            raise CorruptionError(f"{where}: {e}", key=where) from None
        return self._cipher(data_key, key_id, file_id)


class LocalReader:
    """A local segment file read at the segment's own offsets, decrypted if
    it is encrypted (cipher) and in the clear otherwise.  Also file-like
    (seek, read) for the journal's record scan."""

    __slots__ = ("fd", "cipher", "base", "_pos")

    def __init__(self, fd: int, cipher: FileCipher | None):
        self.fd = fd
        self.cipher = cipher
        self.base = HEADER_SIZE if cipher is not None else 0
        self._pos = 0

    def pread(self, length: int, offset: int) -> bytes:
        data = os.pread(self.fd, length, self.base + offset)
        if self.cipher is None or not data:
            return data
        return self.cipher.xor_one(offset, data)

    def size(self) -> int:
        return max(0, os.fstat(self.fd).st_size - self.base)

    def seek(self, pos: int) -> None:
        self._pos = pos

    def read(self, length: int) -> bytes:
        data = self.pread(length, self._pos)
        self._pos += len(data)
        return data


def open_reader(path: str, keys: LocalKeys | None, *, where: str) -> LocalReader:
    """Open a local segment file for reading (close its fd when done).
    With keys, the file must be encrypted (CorruptionError otherwise)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return reader_of(fd, keys, where=where)
    except BaseException:
        os.close(fd)
        raise


def reader_of(fd: int, keys: LocalKeys | None, *, where: str) -> LocalReader:
    if keys is None:
        return LocalReader(fd, None)
    return LocalReader(fd, keys.from_header(os.pread(fd, HEADER_SIZE, 0), where=where))


def write_new(fd: int, cipher: FileCipher, data) -> None:
    """Write header and `data` (plain bytes of offset 0 on) to an empty file."""
    _write_all(fd, cipher.header, 0)
    if len(data):
        _write_all(fd, cipher.xor(0, [data]), HEADER_SIZE)


def _write_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(28, "short write to a local segment file (disk full?)")
        view = view[n:]
        offset += n


def rewrite(path: str, src: LocalReader, end: int, keys: LocalKeys, *,
            tail: bytes = b"") -> tuple[int, FileCipher]:
    """Replace the file at `path` by one under a new file id holding the
    plain bytes [0, end) of `src` and then `tail`: synced, renamed over
    `path`, its directory synced.  Returns the new file's descriptor
    (read-write; the caller closes it) and its cipher.  `src` stays open.
    A crash leaves either file whole at `path` (and maybe a stray
    PATH.rekey, which SegmentFiles removes)."""
    cipher = keys.new_file()
    tmp = path + ".rekey"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _write_all(fd, cipher.header, 0)
        pos = 0
        while pos < end:
            chunk = src.pread(min(_COPY_CHUNK, end - pos), pos)
            if not chunk:
                raise CorruptionError(f"{path}: shorter than its valid end {end}", key=path)
            _write_all(fd, cipher.xor(pos, [chunk]), HEADER_SIZE + pos)
            pos += len(chunk)
        if tail:
            _write_all(fd, cipher.xor(end, [tail]), HEADER_SIZE + end)
        fileio.fsync(fd)
        os.rename(tmp, path)
        fileio.fsync_dir(os.path.dirname(path) or ".")
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return fd, cipher
