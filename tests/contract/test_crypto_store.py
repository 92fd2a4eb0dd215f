"""The sealing store wrapper: segments and checkpoints of a compressed or
encrypted volume are sealed objects in the store, read back as plain bytes
(ranges included), and every kind of tampering is an error naming the
object."""

from __future__ import annotations

import os

import pytest

from lsbd import names
from lsbd.crypto import keyring as kr
from lsbd.crypto import objects
from lsbd.crypto.aead import Argon2Params
from lsbd.crypto.compress import Compressor
from lsbd.crypto.frames import FrameError
from lsbd.crypto.store import SealingStore, VolumeSealing
from lsbd.errors import ObjectExists
from lsbd.store.local import LocalStore

CHEAP = Argon2Params(memory_kib=64, iterations=1, lanes=1)
PASS = kr.Secret(kr.PASSPHRASE, b"pw")


def plain_data(n: int) -> bytes:
    words = b"the quick brown fox jumps over the lazy dog %d "
    out = bytearray()
    i = 0
    while len(out) < n:
        out += words % i
        i += 1
    out[n // 2:n // 2 + 4096] = os.urandom(4096)
    return bytes(out[:n])


@pytest.fixture
def stores(tmp_path):
    inner = LocalStore(str(tmp_path / "store"))
    rings = {name: kr.new_keyring(os.urandom(16), PASS, params=CHEAP) for name in ("a", "b")}
    settings = {name: VolumeSealing(volume_id=ring.volume_id, keyring=ring,
                                    compressor=Compressor(1), frame_size=16384)
                for name, ring in rings.items()}
    settings["z"] = VolumeSealing(volume_id=os.urandom(16), compressor=Compressor(1))
    return inner, SealingStore(inner, settings.get)


def seg(volume: str, seq: int) -> str:
    return names.segment_key(volume, seq)


def reopened(store: SealingStore) -> SealingStore:
    """Another sealing store over the same objects and settings, with no
    layouts kept: it reads them as a new process would."""
    return SealingStore(store.inner, store._resolve)


def layout_of(store: SealingStore, key: str) -> objects.Layout:
    """The layout of the sealed object `key` (where its frames start), read afresh."""
    return reopened(store)._layout(key, store.sealing(key))


def replace(inner: LocalStore, key: str, content: bytes) -> None:
    """Write `key` again behind the sealing store's back (as another writer,
    or damage, would)."""
    inner.delete(key)
    inner.put(key, content)


@pytest.mark.parametrize("volume", ["a", "z"])
def test_round_trip_whole_and_ranges(stores, volume):
    inner, store = stores
    data = plain_data(200_000)
    store.put(seg(volume, 1), data, exclusive=True)
    assert store.get(seg(volume, 1)) == data
    assert store.head(seg(volume, 1)) == len(data)
    raw = inner.get(seg(volume, 1))
    assert objects.is_sealed(raw) and len(raw) < len(data) // 2      # compressed
    assert b"quick brown fox" not in raw or volume == "z"
    for start, length in ((0, 1), (16383, 2), (100_000, 4096), (0, None), (150_000, None),
                          (199_999, 10), (250_000, 5)):
        end = None if length is None else start + length
        assert store.get(seg(volume, 1), start, length) == data[start:end]
    assert store.get(seg(volume, 1), -80) == data[-80:]
    assert store.get(seg(volume, 1), -300_000) == data
    # Other keys pass through untouched.
    store.put(names.config_key(volume), b"{}")
    assert inner.get(names.config_key(volume)) == b"{}"


def test_empty_object(stores):
    _inner, store = stores
    store.put(seg("a", 1), b"")
    assert store.get(seg("a", 1)) == b"" and store.get(seg("a", 1), -10) == b""


def expect_failure(store, key: str) -> None:
    fresh = reopened(store)      # no layouts kept
    with pytest.raises(FrameError) as e:
        fresh.get(key)
    assert key in str(e.value)
    with pytest.raises(FrameError):          # the ranged path reads every frame too
        fresh.get(key, 1, 1 << 30)


def test_tampering(stores):
    inner, store = stores
    data = plain_data(100_000)
    for seq in (1, 2):
        store.put(seg("a", seq), data[::-1] if seq == 2 else data)
    store.put(seg("b", 1), data)
    raw = inner.get(seg("a", 1))
    starts = layout_of(store, seg("a", 1)).starts

    # a flipped byte, in a frame and in the tail
    for pos in (10, starts[1] + 30, len(raw) - 70, len(raw) - 5):
        bad = bytearray(raw)
        bad[pos] ^= 1
        replace(inner, seg("a", 1), bytes(bad))
        expect_failure(store, seg("a", 1))
    # two frames swapped (the index still gives each frame's length: swap equal ones)
    f0, f1 = raw[starts[0]:starts[1]], raw[starts[1]:starts[2]]
    replace(inner, seg("a", 1), raw[:starts[0]] + f1 + f0 + raw[starts[2]:])
    expect_failure(store, seg("a", 1))
    # cut short
    replace(inner, seg("a", 1), raw[:-1])
    expect_failure(store, seg("a", 1))
    replace(inner, seg("a", 1), raw[:starts[3]])
    expect_failure(store, seg("a", 1))
    # another segment of the same volume (an older one replayed as a newer seq)
    replace(inner, seg("a", 1), inner.get(seg("a", 2)))
    expect_failure(store, seg("a", 1))
    # a segment of another volume opened with the same passphrase
    replace(inner, seg("a", 1), inner.get(seg("b", 1)))
    expect_failure(store, seg("a", 1))
    # a checkpoint part swapped with another part
    store.put(names.checkpoint_part_key("a", 5, 0), b"part zero" * 100)
    store.put(names.checkpoint_part_key("a", 5, 1), b"part one" * 100)
    replace(inner, names.checkpoint_part_key("a", 5, 0),
            inner.get(names.checkpoint_part_key("a", 5, 1)))
    expect_failure(store, names.checkpoint_part_key("a", 5, 0))
    # a plain object where a sealed one belongs
    replace(inner, seg("a", 1), data)
    expect_failure(store, seg("a", 1))
    # ... and the untouched ones still read back
    assert store.get(seg("a", 2)) == data[::-1]


def test_rewritten_object_is_read_afresh(stores):
    _inner, store = stores
    store.put(seg("a", 1), b"x" * 50_000)
    assert store.get(seg("a", 1), 100, 10) == b"x" * 10
    store.inner.delete(seg("a", 1))            # behind the wrapper's back
    other = reopened(store)
    other.put(seg("a", 1), b"y" * 50_000)
    assert store.get(seg("a", 1), 100, 10) == b"y" * 10


def test_rotated_key_reads_old_objects(stores):
    inner, store = stores
    store.put(seg("a", 1), b"old" * 10_000)
    sealing = store.sealing(seg("a", 1))
    ring = kr.rotate(sealing.keyring)
    rotated = SealingStore(inner, lambda v: VolumeSealing(volume_id=ring.volume_id,
                                                          keyring=ring, compressor=None))
    rotated.put(seg("a", 2), b"new" * 10_000)
    assert objects.decode_tail(inner.get(seg("a", 2)), where="").key_id == 2
    assert objects.decode_tail(inner.get(seg("a", 1)), where="").key_id == 1
    assert rotated.get(seg("a", 1)) == b"old" * 10_000
    assert rotated.get(seg("a", 2), 3, 3) == b"new"


@pytest.mark.parametrize("volume", ["a", "z"])
@pytest.mark.parametrize("in_process", [False, True])
def test_put_file_seals_a_segment_file(stores, tmp_path, monkeypatch, volume, in_process):
    """A segment file is sealed by the sealing process into a scratch file
    the store takes, or, when that process is unavailable, here: the same
    object either way, and no scratch file is left next to the segment.  A
    file:// store on the same file system links the scratch file rather
    than copy it (a copy read and wrote every segment again)."""
    from lsbd.crypto import worker

    inner, store = stores
    calls = []
    real = worker.seal
    copies = []
    monkeypatch.setattr(inner, "put", lambda key, data, **kw: copies.append(key))

    def seal(job):
        calls.append(job.name)
        if in_process:
            raise worker.WorkerUnavailable("not today")
        return real(job)

    monkeypatch.setattr(worker, "seal", seal)
    folder = tmp_path / "segments"
    folder.mkdir()
    data = plain_data(3 * 1024 * 1024 + 5)       # several batches of frames
    path = folder / "0000000000000001.seg"
    path.write_bytes(data)
    store.put_file(seg(volume, 1), str(path), exclusive=True)
    assert calls == [seg(volume, 1)]
    assert copies == []
    monkeypatch.undo()
    assert store.get(seg(volume, 1)) == data
    assert store.get(seg(volume, 1), 2_000_000, 4096) == data[2_000_000:2_004_096]
    raw = inner.get(seg(volume, 1))
    assert objects.is_sealed(raw) and len(raw) < len(data) // 2
    assert (b"quick brown fox" in raw) == (volume == "z")
    assert os.listdir(folder) == ["0000000000000001.seg"]
    with pytest.raises(ObjectExists):
        store.put_file(seg(volume, 1), str(path), exclusive=True)   # exclusive still holds


def test_put_file_without_room_for_the_scratch_file(stores, tmp_path, monkeypatch):
    """A full disk under the cache dir (the sealing process cannot write its
    scratch file): the segment is sealed in memory and stored all the same,
    rather than waiting for room that only its upload would make."""
    import errno

    from lsbd.crypto import worker

    inner, store = stores

    def full(job):
        raise OSError(errno.ENOSPC, "sealing process: OSError: No space left on device")

    monkeypatch.setattr(worker, "seal", full)
    data = plain_data(100_000)
    path = tmp_path / "0000000000000002.seg"
    path.write_bytes(data)
    store.put_file(seg("a", 2), str(path), exclusive=True)
    assert store.get(seg("a", 2)) == data
    assert b"quick brown fox" not in inner.get(seg("a", 2))
    assert sorted(os.listdir(tmp_path)) == ["0000000000000002.seg", "store"]


@pytest.mark.parametrize("volume", ["a", "z"])
@pytest.mark.parametrize("kind", ["text", "random"])
def test_a_tail_read_knowing_the_stored_size_is_one_get(stores, monkeypatch, volume, kind):
    """A cold open reads each segment's index from its tail: knowing the
    object's size from a listing, that is one GET of an explicit range (no
    suffix range), which brings the object's own index and the frames."""
    inner, store = stores
    data = plain_data(3 << 20) if kind == "text" else os.urandom(3 << 20)
    store.put(seg(volume, 1), data)
    size = inner.head(seg(volume, 1))
    fresh = reopened(store)      # no layouts kept
    calls: list[tuple[int, int | None]] = []
    real = inner.get
    monkeypatch.setattr(inner, "get", lambda k, s=0, n=None: calls.append((s, n)) or real(k, s, n))
    n = 128 * 1024
    assert fresh.get_tail(seg(volume, 1), n, stored_size=size) == data[-n:]
    assert len(calls) == 1 and calls[0][0] >= 0 and calls[0][0] + calls[0][1] == size
    # The object's layout is kept: a ranged read afterwards reads only frames.
    assert fresh.get(seg(volume, 1), 70_000, 5000) == data[70_000:75_000]
    assert len(calls) == 2
    assert fresh.get_tail(seg(volume, 1), 10**8, stored_size=size) == data   # all of it


@pytest.mark.parametrize("volume", ["a", "z"])
@pytest.mark.parametrize("kind", ["text", "random", "small"])
def test_a_tail_read_without_the_size_reads_the_end_once(stores, monkeypatch, volume, kind):
    """A stored segment's trailer read without its size (a read of a few
    blocks of it, lsbd.segments.local): one read of the object's end brings
    its layout and the trailer's frames; with the layout kept, the frames
    alone.  An object written again since its layout was kept is read
    afresh."""
    inner, store = stores
    data = {"text": plain_data(3 << 20), "random": os.urandom(3 << 20),
            "small": plain_data(5000)}[kind]
    store.put(seg(volume, 1), data)
    fresh = reopened(store)      # no layouts kept
    calls: list[tuple[int, int | None]] = []
    real = inner.get
    monkeypatch.setattr(inner, "get", lambda k, s=0, n=None: calls.append((s, n)) or real(k, s, n))
    assert fresh.get_tail(seg(volume, 1), 64) == data[-64:]
    assert len(calls) == 1 and calls[0][0] < 0
    assert fresh.get_tail(seg(volume, 1), 100) == data[-100:]
    assert len(calls) == 2 and calls[1][0] >= 0              # the frames only
    assert fresh.get_tail(seg(volume, 1), 10**8) == data      # all of it
    again = os.urandom(len(data) + 20_000)
    store.put(seg(volume, 1), again)
    assert fresh.get_tail(seg(volume, 1), 64) == again[-64:]
    assert reopened(store).get_tail(seg(volume, 1), 30_000) == again[-30_000:]


def test_a_tail_read_with_a_size_the_object_no_longer_has(stores):
    """A listing older than the object (a seq written again after a crash):
    the tail is read afresh, never taken from the wrong bytes."""
    inner, store = stores
    first, second = plain_data(300_000), os.urandom(200_000)
    store.put(seg("a", 1), first)
    old_size = inner.head(seg("a", 1))
    kept = reopened(store)
    assert kept.get_tail(seg("a", 1), 50_000, stored_size=old_size) == first[-50_000:]
    store.put(seg("a", 1), second)
    assert kept.get_tail(seg("a", 1), 50_000, stored_size=inner.head(seg("a", 1))) \
        == second[-50_000:]         # the layout it kept is the old object's
    for size in (old_size, old_size // 3, inner.head(seg("a", 1)) + 4096):
        fresh = reopened(store)
        assert fresh.get_tail(seg("a", 1), 50_000, stored_size=size) == second[-50_000:]


def test_the_layouts_kept_are_bounded_by_their_size(stores, monkeypatch):
    """A ranged read keeps the object's layout for the next, but the layouts
    of many objects stay within LAYOUT_BYTES, the oldest let go first."""
    from lsbd.crypto import store as sealing_store

    inner, store = stores
    data = plain_data(200_000)
    for seq in range(1, 21):
        store.put(seg("z", seq), data, exclusive=True)
    assert store.get(seg("z", 1), 10, 10) == data[10:20]
    one = store.layout_bytes          # the layouts of equal objects weigh the same
    assert 0 < one < 4096
    monkeypatch.setattr(sealing_store, "LAYOUT_BYTES", 5 * one)
    gets = []
    real = type(inner).get
    monkeypatch.setattr(type(inner), "get",
                        lambda self, key, *a, **kw: gets.append(key) or real(self, key, *a, **kw))
    for seq in range(1, 21):
        assert store.get(seg("z", seq), 70_000, 5000) == data[70_000:75_000]
        assert store.layout_bytes <= 5 * one
    assert store.layout_bytes == 5 * one
    gets.clear()
    assert store.get(seg("z", 20), 1000, 10) == data[1000:1010]     # kept: one GET
    assert store.get(seg("z", 1), 1000, 10) == data[1000:1010]      # let go: read again
    assert len(gets) == 3


def test_a_ranged_read_whose_frames_are_still_viewed_is_copied_out(stores, monkeypatch):
    """A ranged read cuts the frames it opened in place; if a view of them
    is still alive (a reference cycle not collected yet, a memory probe
    walking the heap) it copies the range out instead of failing the read
    (BufferError: a bytearray cannot be resized while viewed)."""
    from lsbd.crypto import objects

    inner, store = stores
    data = plain_data(200_000)
    store.put(seg("a", 1), data, exclusive=True)    # encrypted: opened frame by frame, then cut
    views = []
    real = objects.Layout.open_frames

    def open_and_keep_a_view(self, *a, **kw):
        out = real(self, *a, **kw)
        views.append(memoryview(out))
        return out

    monkeypatch.setattr(objects.Layout, "open_frames", open_and_keep_a_view)
    assert store.get(seg("a", 1), 70_000, 5000) == data[70_000:75_000]
    assert store.get(seg("a", 1), 0, 17) == data[:17]
    assert len(views) == 2


def mixed_data(frames: int) -> bytes:
    """Frames that compress and frames that do not (stored raw), in turn."""
    return b"".join(os.urandom(16384) if k % 3 == 1 else plain_data(16384)
                    for k in range(frames)) + plain_data(5000)


def test_ranges_of_an_object_in_the_clear_open_into_their_place(stores, monkeypatch):
    """A ranged read of a compressed, unencrypted object opens its frames
    straight into the range asked for (lsbd.crypto.frames.open_clear), not
    frame by frame and then cut: any range, across raw and compressed
    frames, reads back exactly, and the frame-by-frame path is not taken."""
    inner, store = stores
    data = mixed_data(40)
    store.put(seg("z", 1), data, exclusive=True)
    raw = inner.get(seg("z", 1))
    assert len(raw) < len(data) * 3 // 4         # compressed frames among raw ones
    slow = []
    real = objects.Layout.open_frames
    monkeypatch.setattr(objects.Layout, "open_frames",
                        lambda self, *a, **kw: slow.append(a) or real(self, *a, **kw))
    rng = __import__("random").Random(7)
    ranges = [(0, 1), (16383, 2), (16384, 16384), (3 * 16384 - 5, 40_000), (0, len(data)),
              (len(data) - 9, 9), (len(data) - 9, 100), (1000, 1 << 20)]
    ranges += [(rng.randrange(len(data)), rng.choice([1, 4096, 20_000, 300_000]))
               for _ in range(200)]
    for start, length in ranges:
        assert store.get(seg("z", 1), start, length) == data[start:start + length], (start, length)
    assert slow == []


def test_a_damaged_frame_in_the_clear_fails_a_ranged_read_naming_it(stores):
    """Every frame of an unencrypted object is checked against its CRC
    before any of its bytes are served, as before: a flipped byte anywhere
    in a frame (header, body or CRC) of the range fails the read, and the
    error names the object and the frame, as the frame-by-frame path names
    it."""
    inner, store = stores
    data = mixed_data(12)
    store.put(seg("z", 1), data, exclusive=True)
    raw = inner.get(seg("z", 1))
    starts = layout_of(store, seg("z", 1)).starts
    for k in range(12):
        # codec, reserved, plain length, nonce (checked by the CRC alone), body, CRC
        for pos in (starts[k], starts[k] + 2, starts[k] + 5, starts[k] + 15, starts[k] + 30,
                    (starts[k] + starts[k + 1]) // 2, starts[k + 1] - 1):
            bad = bytearray(raw)
            bad[pos] ^= 0x10
            replace(inner, seg("z", 1), bytes(bad))
            fresh = reopened(store)
            # the range starts two frames before and ends two after the damaged one
            start = max(0, (k - 2) * 16384 + 100)
            with pytest.raises(FrameError) as e:
                fresh.get(seg("z", 1), start, (k + 2) * 16384 - start)
            assert seg("z", 1) in str(e.value), (k, pos)
            assert f"frame {k}" in str(e.value) or "length" in str(e.value), (k, pos, e.value)
    replace(inner, seg("z", 1), raw)
    assert reopened(store).get(seg("z", 1), 5, 100_000) == data[5:100_005]


@pytest.mark.parametrize("volume", ["a", "z"])
def test_several_ranges_of_a_sealed_object_open_from_one_inner_call(stores, volume,
                                                                     monkeypatch):
    """get_ranges of a compressed (or encrypted) object gives each range as
    get gives it, with the object's layout looked up once and the frames of
    all the ranges read by one get_ranges of the inner store; an object in
    the clear opens them straight into place (no frame-by-frame path)."""
    inner, store = stores
    data = mixed_data(40)
    store.put(seg(volume, 1), data, exclusive=True)
    inner_calls: list[list] = []
    real_inner = LocalStore.get_ranges
    monkeypatch.setattr(LocalStore, "get_ranges", lambda self, key, ranges:
                        inner_calls.append(list(ranges)) or real_inner(self, key, ranges))
    slow = []
    real = objects.Layout.open_frames
    monkeypatch.setattr(objects.Layout, "open_frames",
                        lambda self, *a, **kw: slow.append(a) or real(self, *a, **kw))
    rng = __import__("random").Random(11)
    for _ in range(30):
        ranges = [(rng.randrange(len(data) + 100), rng.choice([0, 1, 4096, 4160, 40_000]))
                  for _ in range(rng.randrange(1, 6))]
        inner_calls.clear()
        got = store.get_ranges(seg(volume, 1), ranges)
        assert got == [data[s:s + n] for s, n in ranges], ranges
        assert len(inner_calls) == 1, ranges
    assert (slow == []) == (volume == "z")


def test_a_damaged_frame_fails_a_read_of_several_ranges_naming_it(stores):
    """A frame that fails its check in any range of a get_ranges fails the
    call with an error naming the object and the frame, as a get does:
    nothing of the other ranges is returned in its place."""
    inner, store = stores
    data = mixed_data(12)
    store.put(seg("z", 1), data, exclusive=True)
    raw = inner.get(seg("z", 1))
    starts = layout_of(store, seg("z", 1)).starts
    for k in (0, 5, 11):
        bad = bytearray(raw)
        bad[(starts[k] + starts[k + 1]) // 2] ^= 0x10
        replace(inner, seg("z", 1), bytes(bad))
        fresh = reopened(store)
        ranges = [(((k + 6) % 12) * 16384 + 10, 4096), (k * 16384 + 100, 4096)]
        with pytest.raises(FrameError) as e:
            fresh.get_ranges(seg("z", 1), ranges)
        assert seg("z", 1) in str(e.value) and f"frame {k}" in str(e.value), (k, e.value)
    replace(inner, seg("z", 1), raw)
    assert reopened(store).get_ranges(seg("z", 1), [(5, 100)]) == [data[5:105]]


def test_a_frame_in_the_clear_unlike_its_header_fails_a_ranged_read_naming_it(stores):
    """A frame whose CRC checks but whose codec is unknown, or whose zstd
    body opens to fewer bytes than its header says (a writer's bug), fails
    a ranged read and is named: what came out of it is never served."""
    import struct

    import zstandard

    from lsbd.crypto.frames import frame_crc, place_prefix
    inner, store = stores
    first = bytes(8384) + os.urandom(8000)        # compresses, to about half
    data = first + plain_data(3 * 16384)
    store.put(seg("z", 2), data, exclusive=True)
    raw = inner.get(seg("z", 2))
    layout = layout_of(store, seg("z", 2))
    a, b = layout.starts[0], layout.starts[1]
    assert raw[a] == 1                              # zstd
    place = place_prefix(layout.volume_id, layout.name, layout.tail.object_id) + \
        struct.pack("<QQ", 0, layout.tail.plain_length)
    # The same body length: a shorter frame, then a skippable frame as padding.
    short = zstandard.ZstdCompressor(level=1).compress(first[:-4000])
    pad = (b - a - 28) - len(short)
    assert pad >= 8
    forged = [(bytes([2]) + raw[a + 1:a + 24], raw[a + 24:b - 4]),          # codec 2
              (raw[a:a + 24], short + struct.pack("<II", 0x184D2A50, pad - 8) + bytes(pad - 8))]
    for header, body in forged:
        replace(inner, seg("z", 2), raw[:a] + header + body +
                struct.pack("<I", frame_crc(header, place, body)) + raw[b:])
        with pytest.raises(FrameError) as e:
            reopened(store).get(seg("z", 2), 100, 40_000)
        assert "frame 0" in str(e.value), e.value
    replace(inner, seg("z", 2), raw)
    assert reopened(store).get(seg("z", 2), 100, 40_000) == data[100:40_100]
