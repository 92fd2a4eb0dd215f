"""Sealing by link (lsbd.crypto.linked, objects of version 2) on bytes
alone: golden bytes, every kind of tampering named by object and offset,
frames moved between positions, objects and volumes, and the local file's
segment length while and after its index is appended."""

from __future__ import annotations

import hashlib
import os

import attrs
import pytest

from lsbd.crypto import linked, objects
from lsbd.crypto.aead import Cipher
from lsbd.crypto.frames import FrameError, Framer
from lsbd.crypto.localfile import HEADER_SIZE, LocalKeys, write_new

KEY = bytes(range(32))
VOLUME_ID = bytes(range(16))
FILE_ID = bytes(range(100, 116))
NAME = "volumes/v/seg/0000000000000007"
FS = 16384
BODY = b"".join(b"%08d sealing by link; " % i for i in range(40_000 // 24 + 1))[:40_000]


def keys(volume_id: bytes = VOLUME_ID, data_key: bytes = KEY) -> LocalKeys:
    return LocalKeys(volume_id, lambda _id: data_key, lambda: (1, data_key))


def local_file(path, body: bytes = BODY, *, file_id: bytes = FILE_ID,
               volume_id: bytes = VOLUME_ID, data_key: bytes = KEY) -> int:
    """An encrypted local file of `body` (as the cache dir holds it); its fd."""
    cipher = keys(volume_id, data_key).of_file(data_key, 1, file_id)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    write_new(fd, cipher, body)
    return fd


def link(fd: int, name: str = NAME, *, volume_id: bytes = VOLUME_ID, data_key: bytes = KEY,
         file_id: bytes = FILE_ID, length: int = len(BODY)) -> int:
    """What the sealing process does: tag the body, append index and tail."""
    tail = linked.tail_of(key_id=1, file_id=file_id, frame_size=FS, body_length=length)
    mac = Cipher(linked.mac_key(data_key, volume_id=volume_id, name=name, file_id=file_id,
                                body_length=length))
    index = linked.make_index(lambda s, n: os.pread(fd, n, HEADER_SIZE + s), mac, tail)
    return linked.append(fd, tail, index)


def sealed(tmp_path, body: bytes = BODY, name: str = NAME, **kw) -> bytes:
    path = tmp_path / f"obj-{hashlib.sha256(name.encode() + repr(kw).encode()).hexdigest()[:8]}"
    fd = local_file(path, body, **kw)
    try:
        link(fd, name, length=len(body), **kw)
    finally:
        os.close(fd)
    return path.read_bytes()


def open_whole(data: bytes, name: str = NAME, *, volume_id: bytes = VOLUME_ID,
               data_key: bytes = KEY) -> bytes:
    def layout(tail, index, raw):
        mac = Cipher(linked.mac_key(data_key, volume_id=volume_id, name=name,
                                    file_id=tail.object_id, body_length=tail.plain_length))
        return linked.LinkedLayout(name, tail, linked.ObjectKeys(
            mac, keys(volume_id, data_key).of_file(data_key, tail.key_id, tail.object_id)),
            index, raw)

    return bytes(objects.open_whole(data, name=name, volume_id=volume_id,
                                    framer_for=lambda t: Framer(None), linked=layout))


# The object of BODY made once: a change to the format fails here first.
GOLDEN_TAIL = ("4c5342444f424a31" "0200" "01" "00" "01000000"
               "6465666768696a6b6c6d6e6f70717273" "00400000" "03000000"
               "409c000000000000" "40000000" "0000000000000000" "ccfcdfcf")
GOLDEN_SHA256 = "acdfabe55d2fffd2df06b30659d68b5d46e73d9a9039fc2b7ff6e65e5b4eb391"


def test_golden_bytes(tmp_path):
    data = sealed(tmp_path)
    assert len(data) == HEADER_SIZE + len(BODY) + 16 * 4 + 64 == linked.stored_size(len(BODY), FS)
    header = data[:HEADER_SIZE]
    assert header[:8] == b"LSBDLOC1" and header[8:12] == (1).to_bytes(4, "little")
    assert header[12:28] == FILE_ID
    # the body is the local file's, byte for byte: AES-256-CTR under the file key
    fkey = keys().of_file(KEY, 1, FILE_ID)
    assert fkey.xor(0, [data[HEADER_SIZE:HEADER_SIZE + len(BODY)]]) == BODY
    # frame i's tag: AES-GCM, no plaintext, the frame's ciphertext as associated data,
    # under HKDF(data key, salt = file id, info = "lsbd frame mac" | volume id | length | name)
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    mac_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=FILE_ID,
                   info=b"lsbd frame mac" + VOLUME_ID + len(BODY).to_bytes(8, "little")
                   + NAME.encode()).derive(KEY)
    gcm = AESGCM(mac_key)
    body = data[HEADER_SIZE:HEADER_SIZE + len(BODY)]
    index = data[HEADER_SIZE + len(BODY):-64]
    for i in range(3):
        assert index[16 * i:16 * i + 16] == gcm.encrypt(i.to_bytes(12, "big"), b"",
                                                        body[i * FS:(i + 1) * FS])
    tail = data[-64:]
    assert index[48:] == gcm.encrypt(b"\xff" * 12, b"", tail[:48] + index[:48])
    assert tail.hex() == GOLDEN_TAIL
    assert hashlib.sha256(data).hexdigest() == GOLDEN_SHA256
    assert open_whole(data) == BODY


@pytest.mark.parametrize("where, offset", [
    ("header", 9), ("body", HEADER_SIZE + 5), ("body", HEADER_SIZE + FS + 100),
    ("body", HEADER_SIZE + len(BODY) - 1), ("tag", HEADER_SIZE + len(BODY) + 17),
    ("index tag", HEADER_SIZE + len(BODY) + 50), ("tail", -64 + 20), ("tail", -64 + 40)])
def test_a_flipped_bit_anywhere_fails_naming_object_and_offset(tmp_path, where, offset):
    data = bytearray(sealed(tmp_path))
    data[offset] ^= 0x10
    with pytest.raises(FrameError) as e:
        open_whole(bytes(data))
    assert NAME in str(e.value)
    assert e.value.key == NAME
    if where == "body":
        frame = (offset - HEADER_SIZE) // FS
        assert e.value.offset == HEADER_SIZE + frame * FS
        assert f"frame {frame} at stored offset {HEADER_SIZE + frame * FS} fails " \
               "authentication" in str(e.value)
    elif where in ("tag", "index tag"):     # the index tag covers every tag
        assert "index fails authentication" in str(e.value)
    elif where == "header":
        assert e.value.offset == 0
    else:   # the tail: its checksum
        assert "checksum" in str(e.value)


def test_a_tail_changed_with_its_checksum_fails_the_index_tag(tmp_path):
    """The tail's fields (length, count, key id, file id) are bound by the
    index tag, not only by a CRC anyone can recompute."""
    data = sealed(tmp_path)
    tail = objects.decode_tail(data, where=NAME)
    for change in ({"key_id": 2}, {"object_id": bytes(16)}, {"plain_length": len(BODY) - 1}):
        forged = data[:-64] + attrs.evolve(tail, **change).pack()
        with pytest.raises(FrameError, match="index fails authentication"):
            open_whole(forged)


def test_cut_or_grown_objects_fail(tmp_path):
    data = sealed(tmp_path)
    for bad in (data[:-1], data[1:], data + b"\0", data[:HEADER_SIZE] + data[HEADER_SIZE + 1:]):
        with pytest.raises(FrameError):
            open_whole(bad)


def test_frames_swapped_between_positions_objects_and_volumes_fail(tmp_path):
    body = os.urandom(3 * FS)
    data = bytearray(sealed(tmp_path, body))
    assert open_whole(bytes(data)) == body
    a, b = HEADER_SIZE, HEADER_SIZE + FS
    # two frames swapped within the object (their tags too: then the index fails)
    swapped = bytearray(data)
    swapped[a:b], swapped[b:b + FS] = data[b:b + FS], data[a:b]
    with pytest.raises(FrameError, match="frame 0 at stored offset 32 fails"):
        open_whole(bytes(swapped))
    tags = HEADER_SIZE + len(body)
    swapped[tags:tags + 16], swapped[tags + 16:tags + 32] = \
        data[tags + 16:tags + 32], data[tags:tags + 16]
    with pytest.raises(FrameError, match="index fails authentication"):
        open_whole(bytes(swapped))
    # a frame of another object of the same volume, under the same file id
    other = sealed(tmp_path, os.urandom(3 * FS), "volumes/v/seg/0000000000000008")
    moved = bytearray(data)
    moved[a:b] = other[a:b]
    with pytest.raises(FrameError, match="frame 0 at stored offset 32 fails"):
        open_whole(bytes(moved))
    # the same object under another name (a seq replayed), or read as another volume's
    with pytest.raises(FrameError, match="index fails"):
        open_whole(bytes(data), "volumes/v/seg/0000000000000008")
    with pytest.raises(FrameError, match="index fails"):
        open_whole(bytes(data), volume_id=bytes(16))
    other_volume = sealed(tmp_path, body, volume_id=bytes(16))
    with pytest.raises(FrameError, match="index fails"):
        open_whole(other_volume)


def test_tagging_again_writes_the_same_bytes(tmp_path):
    """A sealing cut short and done again (the store was down; a crash)
    writes what the first one wrote: a key tags each position once."""
    path = tmp_path / "f"
    fd = local_file(path)
    try:
        first = link(fd)
        data = path.read_bytes()
        # cut while appending: grown to its final size, the index half written
        os.ftruncate(fd, HEADER_SIZE + len(BODY))
        os.ftruncate(fd, first)
        os.pwrite(fd, data[HEADER_SIZE + len(BODY):-40], HEADER_SIZE + len(BODY))
        assert linked.complete_tail(fd) is None
        assert link(fd) == first
        assert path.read_bytes() == data
        assert linked.complete_tail(fd).plain_length == len(BODY)
    finally:
        os.close(fd)


@pytest.mark.parametrize("length", [0, 1, FS - 1, FS, FS + 1, 64 * FS, 2048 * FS + 77])
def test_the_body_length_is_found_from_the_object_size(length):
    assert linked.body_length_for(linked.stored_size(length, FS), FS) == length
    for near in (1, 2, 15, 16, 17):
        got = linked.body_length_for(linked.stored_size(length, FS) + near, FS)
        assert got is None or linked.stored_size(got, FS) != linked.stored_size(length, FS)
