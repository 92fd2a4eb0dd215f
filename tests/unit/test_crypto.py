"""The compression, encryption and key modules (lsbd/crypto) on bytes alone:
golden bytes of every layout, one case per kind of tampering, and the key
slots' life (add, change, remove, rotate, retire)."""

from __future__ import annotations

import itertools
import os

import pytest

from lsbd.crypto import compress, keyring as kr, keystore
from lsbd.crypto.aead import Argon2Params, AuthenticationFailed, Cipher
from lsbd.crypto.frames import Framer, FrameError, Place, frame_length, object_cipher
from lsbd.errors import UserError
from lsbd.store.local import LocalStore

VOLUME_ID = bytes(range(16))
OBJECT_ID = bytes(range(100, 116))
KEY = bytes(range(32))
#: Argon2id at its smallest, so the tests run fast; the format is the same.
CHEAP = Argon2Params(memory_kib=64, iterations=1, lanes=1)
TEXT = b"lsbd keeps every write in a log; " * 128       # 4224 bytes, compresses well


NAME = "volumes/v/seg/0000000000000007"


def place(position: int = 4, **changes) -> Place:
    fields = dict(volume_id=VOLUME_ID, name=NAME, object_id=OBJECT_ID, position=position,
                  extra=0)
    fields.update(changes)
    return Place(**fields)


def counter_rand():
    """Deterministic 'random' bytes: 0, 1, 2, ... for golden outputs."""
    numbers = itertools.count()

    def rand(n: int) -> bytes:
        return bytes(next(numbers) % 256 for _ in range(n))
    return rand


# --- AEAD and compression -----------------------------------------------------------


def test_cipher_round_trip_and_tampering():
    c = Cipher(KEY)
    sealed = c.seal(bytes(12), b"secret", b"aad")
    assert c.open(bytes(12), sealed, b"aad") == b"secret"
    for bad in (sealed[:-1] + bytes([sealed[-1] ^ 1]), sealed[:-1]):
        with pytest.raises(AuthenticationFailed):
            c.open(bytes(12), bad, b"aad")
    with pytest.raises(AuthenticationFailed):
        c.open(bytes(12), sealed, b"aae")
    with pytest.raises(AuthenticationFailed):
        Cipher(bytes(32)).open(bytes(12), sealed, b"aad")


def test_compression_stores_raw_unless_it_saves_an_eighth():
    z = compress.Compressor(3)
    codec, stored = z.compress(TEXT)
    assert codec == compress.ZSTD and len(stored) < len(TEXT) // 4
    assert compress.decompress(codec, stored, len(TEXT)) == TEXT
    noise = os.urandom(4096)
    assert z.compress(noise) == (compress.RAW, noise)
    # Half noise, half zeros saves about half: compressed.  7/8 noise: not enough.
    assert z.compress(os.urandom(2048) + bytes(2048))[0] == compress.ZSTD
    assert z.compress(os.urandom(3700) + bytes(396))[0] == compress.RAW
    with pytest.raises(compress.DecompressionFailed):
        compress.decompress(compress.ZSTD, stored, len(TEXT) - 1)
    with pytest.raises(compress.DecompressionFailed):
        compress.decompress(9, stored, len(TEXT))


def test_compression_setting_parsing():
    assert compress.parse_setting("zstd") == ("zstd", 1)
    assert compress.parse_setting("zstd:19") == ("zstd", 19)
    assert compress.parse_setting("none") == ("none", 0)
    for bad in ("zstd:0", "zstd:20", "zstd:x", "gzip", "none:1", ""):
        with pytest.raises(ValueError):
            compress.parse_setting(bad)


# --- frames -------------------------------------------------------------------------


def test_frame_golden_bytes_plain():
    frame = Framer(None).seal(b"hello", place())
    assert frame.hex() == ("00000000" "05000000" "09000000" + "00" * 12
                           + b"hello".hex() + "04365475")
    assert Framer(None).open(frame, place()) == b"hello"
    assert frame_length(frame[:24]) == len(frame)


def test_frame_golden_bytes_encrypted():
    cipher = object_cipher(KEY, volume_id=VOLUME_ID, name=NAME, object_id=OBJECT_ID)
    framer = Framer(cipher, nonce=lambda n: bytes(range(0xa0, 0xa0 + n)))
    frame = framer.seal(b"hello", place())
    assert frame.hex() == ("00010000" "05000000" "15000000"
                           "a0a1a2a3a4a5a6a7a8a9aaab"
                           "8f65189482" "792e034996d838493baad62bd7bba70f")
    assert framer.open(frame, place()) == b"hello"


# A zstd-compressed, encrypted frame of TEXT made once: whatever zstandard's
# version compresses to later, this one must keep opening.
GOLDEN_ZSTD_FRAME = bytes.fromhex(
    "01010000" "80100000" "43000000" "a0a1a2a3a4a5a6a7a8a9aaab"
    "cfb55b05ed2b6e061b9c1925558de59330f555212db21794839237d5f30f83be2366501759add9"
    "ebbafcd6245325bba80b313e3c7a3d1abe593f98475bc9380af25030")

GOLDEN_DATA_KEY = "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"
GOLDEN_KEYS = b"""{
 "cipher": "aes-256-gcm",
 "format": 1,
 "generation": 1,
 "keyring": {
  "nonce": "c0c1c2c3c4c5c6c7c8c9cacb",
  "sealed": "7b6a4412050af330ecfbc7820380c87427169a4c1ed83fe151e12878521c0bd3d8c9f9d450e16532ff7d6429c9f455b9bd55ef4ae2fd9029b41502f0c08e5f3f370cba11c9e417c91bb7223cd6652fb47474989df53f11bf961c8221817e2bf0f9b31195243ea89a6539f73d3ee126faeb64b74444d2878c2618664f9d08df2502476a703bb079f0144150540a3d8637d2cdf277499a69fb87403a8ee063a07571"
 },
 "slots": [
  {
   "created_ns": 1700000000000000000,
   "kdf": {
    "iterations": 1,
    "lanes": 1,
    "memory_kib": 64,
    "name": "argon2id",
    "salt": "404142434445464748494a4b4c4d4e4f"
   },
   "kind": "passphrase",
   "nonce": "505152535455565758595a5b",
   "slot": 1,
   "wrapped": "c7229b270ae6b5064ce977f2356eeb68d2c995848c08a5b9dfa032297e42fa620948bc504f95b41c6611d9459c50168d"
  }
 ],
 "volume_id": "000102030405060708090a0b0c0d0e0f"
}
"""  # noqa: E501


def test_object_key_is_the_documented_hkdf():
    # HKDF-SHA256 (RFC 5869) written out with hmac, as docs/format.md gives it.
    import hashlib
    import hmac
    info = b"lsbd object key" + VOLUME_ID + NAME.encode()
    prk = hmac.new(OBJECT_ID, KEY, hashlib.sha256).digest()
    okm = hmac.new(prk, info + b"\x01", hashlib.sha256).digest()
    frame = Framer(Cipher(okm), nonce=lambda n: bytes(n)).seal(b"x", place())
    cipher = object_cipher(KEY, volume_id=VOLUME_ID, name=NAME, object_id=OBJECT_ID)
    assert Framer(cipher).open(frame, place()) == b"x"


def test_frame_with_zstd_opens_and_records_codec():
    cipher = object_cipher(KEY, volume_id=VOLUME_ID, name=NAME, object_id=OBJECT_ID)
    framer = Framer(cipher, compress.Compressor(3))
    frame = framer.seal(TEXT, place())
    assert frame[0] == compress.ZSTD and len(frame) < len(TEXT) // 4
    assert framer.open(frame, place()) == TEXT
    assert framer.open(GOLDEN_ZSTD_FRAME, place()) == TEXT
    # The codec is per frame: a reader with another compressor (or none) opens it.
    assert Framer(cipher).open(frame, place()) == TEXT
    noise = os.urandom(4096)
    assert framer.open(framer.seal(noise, place()), place()) == noise


@pytest.mark.parametrize("encrypted", [True, False])
def test_frame_tampering(encrypted):
    cipher = object_cipher(KEY, volume_id=VOLUME_ID, name=NAME, object_id=OBJECT_ID) if encrypted else None
    framer = Framer(cipher, compress.Compressor(3))
    frame = framer.seal(TEXT, place())
    # A flipped bit anywhere, header included.
    for i in range(len(frame)):
        bad = bytearray(frame)
        bad[i] ^= 0x10
        with pytest.raises(FrameError):
            framer.open(bytes(bad), place())
    # Cut short, or with a byte more.
    with pytest.raises(FrameError):
        framer.open(frame[:-1], place())
    with pytest.raises(FrameError):
        framer.open(frame + b"\0", place())
    # Moved: another position, object, seq, kind, volume, or a different bound value.
    for moved in (place(5), place(object_id=bytes(16)), place(name=NAME[:-1] + "8"),
                  place(volume_id=bytes(16)), place(extra=3)):
        with pytest.raises(FrameError):
            framer.open(frame, moved)


def test_frames_of_one_object_swapped():
    cipher = object_cipher(KEY, volume_id=VOLUME_ID, name=NAME, object_id=OBJECT_ID)
    framer = Framer(cipher)
    a, b = framer.seal(b"a" * 100, place(0)), framer.seal(b"b" * 100, place(1))
    with pytest.raises(FrameError):
        framer.open(b, place(0))
    with pytest.raises(FrameError):
        framer.open(a, place(1))


def test_object_keys_differ_by_object_id_name_and_data_key():
    cipher = object_cipher(KEY, volume_id=VOLUME_ID, name=NAME, object_id=OBJECT_ID)
    sealed = Framer(cipher).seal(b"x" * 64, place())
    for other in (dict(object_id=bytes(16)), dict(name=NAME[:-1] + "8"),
                  dict(volume_id=bytes(16))):
        args = dict(volume_id=VOLUME_ID, name=NAME, object_id=OBJECT_ID)
        args.update(other)
        with pytest.raises(FrameError):
            Framer(object_cipher(KEY, **args)).open(sealed, place())
    with pytest.raises(FrameError):
        Framer(object_cipher(bytes(32), volume_id=VOLUME_ID, name=NAME,
                             object_id=OBJECT_ID)).open(sealed, place())
    # An encrypted frame is never read as a plain one, nor the other way round.
    with pytest.raises(FrameError):
        Framer(None).open(sealed, place())


# --- key slots ----------------------------------------------------------------------


PASS = kr.Secret(kr.PASSPHRASE, b"correct horse battery staple")


def test_keyring_golden_object():
    ring = kr.new_keyring(VOLUME_ID, PASS, params=CHEAP, rand=counter_rand(),
                          now=lambda: 1_700_000_000_000_000_000)
    data = kr.encode(ring, rand=lambda n: bytes(range(0xc0, 0xc0 + n)))
    assert data == GOLDEN_KEYS
    opened = kr.unlock(kr.decode(GOLDEN_KEYS), PASS)
    assert opened.current == 1
    assert opened.data_key(1).hex() == GOLDEN_DATA_KEY
    assert opened.opened_with == 1


def test_keyring_slots_life():
    ring = kr.new_keyring(VOLUME_ID, PASS, params=CHEAP)
    data_key = ring.current_key().key
    other = kr.Secret(kr.PASSPHRASE, b"another one")
    keyfile = kr.Secret(kr.KEYFILE, os.urandom(32))
    with pytest.raises(kr.WrongSecret) as e:
        kr.unlock(kr.decode(kr.encode(ring)), other)
    assert "another one" not in str(e.value)

    ring = kr.add_slot(ring, other, params=CHEAP)
    ring = kr.add_slot(ring, keyfile)
    for secret in (PASS, other, keyfile):
        opened = kr.unlock(kr.decode(kr.encode(ring)), secret)
        assert opened.current_key().key == data_key

    # change: slot 1 opens with a new passphrase and not with the old one
    new = kr.Secret(kr.PASSPHRASE, b"new passphrase")
    ring = kr.change_slot(ring, 1, new, params=CHEAP)
    locked = kr.decode(kr.encode(ring))
    assert kr.unlock(locked, new).opened_with == 1
    assert kr.unlock(locked, other).opened_with == 2
    with pytest.raises(kr.WrongSecret):
        kr.unlock(locked, PASS)

    ring = kr.remove_slot(ring, 2)
    with pytest.raises(kr.WrongSecret):
        kr.unlock(kr.decode(kr.encode(ring)), other)
    ring = kr.remove_slot(ring, 3)
    with pytest.raises(UserError):
        kr.remove_slot(ring, 1)                    # the last one

    # rotate: a new current key, the old one kept until retired
    ring = kr.rotate(ring)
    assert ring.current == 2 and ring.current_key().key != data_key
    assert kr.unlock(kr.decode(kr.encode(ring)), new).data_key(1) == data_key
    with pytest.raises(UserError):
        kr.retire(ring, 2)                         # the current one
    ring = kr.retire(ring, 1)
    with pytest.raises(kr.KeysDamaged):
        kr.unlock(kr.decode(kr.encode(ring)), new).data_key(1)


def test_keyring_tampering_and_secrets_never_shown():
    ring = kr.new_keyring(VOLUME_ID, PASS, params=CHEAP)
    data = kr.encode(ring)
    assert PASS.value not in data and ring.current_key().key.hex().encode() not in data
    assert "correct" not in repr(PASS) and ring.ring_key.hex() not in repr(ring)
    # Another generation number: the key list no longer authenticates.
    bumped = data.replace(b'"generation": 1', b'"generation": 2')
    with pytest.raises(kr.KeysDamaged):
        kr.unlock(kr.decode(bumped), PASS)
    with pytest.raises(kr.KeysDamaged):
        kr.decode(b"{not json")
    with pytest.raises(UserError):
        kr.Secret(kr.KEYFILE, b"short")


def test_keystore_generations(tmp_path):
    store = LocalStore(str(tmp_path))
    with pytest.raises(keystore.KeysMissing):
        keystore.load(store, "vol")
    ring = kr.new_keyring(VOLUME_ID, PASS, params=CHEAP)
    keystore.save(store, "vol", ring)
    changed = kr.rotate(keystore.unlock(store, "vol", PASS))
    keystore.save(store, "vol", changed)
    assert keystore.generations(store, "vol") == [2]
    assert keystore.unlock(store, "vol", PASS).current == 2
    # A change made from the same older state elsewhere loses, changing nothing.
    with pytest.raises(UserError, match="same time"):
        keystore.save(store, "vol", kr.rotate(ring))
    assert keystore.unlock(store, "vol", PASS).current == 2


def test_compress_many_samples_before_compressing(monkeypatch):
    """A batch is compressed whole only when every eighth frame, tried
    first at zstd's fast level, saves at least 1/16 of its bytes: noise
    and data that barely compresses are stored raw without trying the
    other frames (a sampled frame that compressed keeps its bytes of the
    fast level); text stops the sample at its first frame and is all
    compressed at the compressor's level."""
    z = compress.Compressor(1, threads=1)
    sampled, tried = [], []
    real_sample, real = z._sample, z.compress
    monkeypatch.setattr(z, "_sample", lambda c: sampled.append(bytes(c[:8])) or real_sample(c))
    monkeypatch.setattr(z, "compress", lambda c: tried.append(bytes(c[:8])) or real(c))
    size = 16384
    noise = [os.urandom(size) for _ in range(64)]
    assert [codec for codec, _ in z.compress_many(noise)] == [compress.RAW] * 64
    assert sampled == [noise[i][:8] for i in range(0, 64, 8)] and tried == []
    # One sampled frame saves a quarter, the rest nothing: 1/32 of the sample.
    marginal = list(noise)
    marginal[8] = os.urandom(size * 3 // 4) + bytes(size // 4)
    marginal[9] = marginal[8][::-1]                  # compressible, not sampled
    sampled.clear()
    out = z.compress_many(marginal)
    assert len(sampled) == 8 and tried == []
    assert [i for i, (codec, _) in enumerate(out) if codec != compress.RAW] == [8]
    assert compress.decompress(*out[8], size) == marginal[8]
    assert [bytes(s) for _, s in out[:8]] == marginal[:8]
    # Text: one frame sampled, then every frame compressed at level 1.
    text = [(TEXT * (size // len(TEXT) + 1))[:size] for _ in range(64)]
    sampled.clear()
    out = z.compress_many(text)
    assert len(sampled) == 1 and len(tried) == 64
    assert all(codec == compress.ZSTD for codec, _ in out)
    assert all(compress.decompress(c, s, size) == text[0] for c, s in out)
    assert out[0][1] == compress.Compressor(1).compress(text[0])[1]


def test_any_compressed_tells_from_the_sample_alone(monkeypatch):
    """The sealing process's choice (seal, or seal by link): whether
    compress_many would store any chunk compressed, from its sample alone
    and stopping at the first that passes, without compressing the batch
    the sealing then compresses itself."""
    z = compress.Compressor(1, threads=1)
    size = 16384
    noise = [os.urandom(size) for _ in range(64)]
    marginal = list(noise)
    marginal[8] = os.urandom(size * 3 // 4) + bytes(size // 4)    # sampled, passes 1/8
    unsampled = list(noise)
    unsampled[9] = marginal[8]                                    # not sampled
    text = [(TEXT * (size // len(TEXT) + 1))[:size] for _ in range(64)]
    batches = {"noise": noise, "marginal": marginal, "unsampled": unsampled, "text": text,
               "short noise": noise[:5], "short text": noise[:4] + text[:1]}
    want = {name: any(codec != compress.RAW for codec, _ in z.compress_many(chunks))
            for name, chunks in batches.items()}
    assert want == {"noise": False, "marginal": True, "unsampled": False, "text": True,
                    "short noise": False, "short text": True}
    tried = []
    real_sample, real = z._sample, z.compress
    monkeypatch.setattr(z, "_sample", lambda c: tried.append(len(c)) or real_sample(c))
    monkeypatch.setattr(z, "compress", lambda c: tried.append(len(c)) or real(c))
    for name, chunks in batches.items():
        tried.clear()
        assert z.any_compressed(chunks) == want[name], name
        if name == "text":
            assert len(tried) == 1                # the first sampled chunk passes
        elif not name.startswith("short"):
            assert len(tried) <= 64 // compress.SAMPLE_EVERY, name


def test_sealed_objects_written_past_the_page_cache_read_back_whole(tmp_path):
    """The sealing process writes a sealed object through one aligned buffer
    with O_DIRECT: any length, in parts of any size, reads back exactly (the
    last block padded on the disk, then the file cut to its length)."""
    from lsbd.directio import DirectOutput

    for total in (0, 1, 4095, 4096, 4097, DirectOutput.SIZE, 2 * DirectOutput.SIZE + 4100):
        data = os.urandom(total)
        path = tmp_path / f"sealed-{total}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
        except OSError:      # a file system without O_DIRECT: the same bytes, buffered
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            out = DirectOutput(fd)
            parts = [data[i:i + 16424] for i in range(0, total, 16424)]
            out.write(parts[:3])
            out.write([memoryview(p) for p in parts[3:]])
            out.finish()
        finally:
            os.close(fd)
        assert path.read_bytes() == data, total


def test_the_sealing_process_reads_an_encrypted_local_file_in_the_clear(tmp_path):
    """The sealing process deciphers a segment's local file where it reads
    it: any range, from any offset, gives the plain bytes there, and a
    range past the end gives what there is."""
    from lsbd.crypto.localfile import HEADER_SIZE, FileCipher, write_new
    from lsbd.crypto.worker import source_reader

    key = os.urandom(32)
    cipher = FileCipher(key, key_id=1, file_id=os.urandom(16))
    plain = os.urandom(3 * 65536 + 123)
    path = tmp_path / "segment"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        write_new(fd, cipher, plain)
        read = source_reader(fd, key, HEADER_SIZE)
        for start, size in ((0, 16), (0, len(plain)), (5, 4096), (65536, 65536),
                            (4099, 1 << 20), (len(plain) - 7, 100)):
            assert bytes(read(start, size)) == plain[start:start + size], (start, size)
        assert bytes(source_reader(fd, None, HEADER_SIZE)(5, 10)) != plain[5:15]
    finally:
        os.close(fd)


def test_frames_enciphered_in_place_are_the_same_bytes(tmp_path):
    """The sealing process enciphers frames straight into its output buffer
    (Framer.seal_to, DirectOutput.reserve): the object is byte for byte the
    one seal() makes, golden frame included, and opens."""
    from lsbd.crypto import objects
    from lsbd.directio import DirectOutput

    cipher = object_cipher(KEY, volume_id=VOLUME_ID, name=NAME, object_id=OBJECT_ID)
    fixed = Framer(cipher, nonce=lambda n: bytes(range(0xa0, 0xa0 + n)))
    out = bytearray(64)
    n = fixed.seal_to(lambda k: memoryview(out)[:k], b"hello", place().pack(),
                      compressed=(compress.RAW, b"hello"))
    assert bytes(out[:n]) == fixed.seal(b"hello", place())

    plain = (TEXT * 3000)[:700_000] + os.urandom(300_000)    # frames of both codecs
    nonces = itertools.count()

    def framer():    # the same nonces each time, in order
        return Framer(cipher, compress.Compressor(1, threads=1),
                      nonce=lambda n: next(nonces).to_bytes(n, "little"))

    args = dict(name=NAME, volume_id=VOLUME_ID, key_id=1, object_id=OBJECT_ID, frame_size=16384)
    expected = objects.seal(plain, framer=framer(), **args)
    nonces = itertools.count()
    path = tmp_path / "sealed"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        direct = DirectOutput(fd)
        objects.seal_into(lambda start, k: plain[start:start + k], len(plain), direct.write,
                          framer=framer(), reserve=direct.reserve, **args)
        direct.finish()
    finally:
        os.close(fd)
    assert path.read_bytes() == expected
    assert objects.open_whole(expected, name=NAME, volume_id=VOLUME_ID,
                              framer_for=lambda tail: Framer(cipher)) == plain


def test_the_sealing_process_runs_below_its_parent(tmp_path):
    """Sealing gives way to the threads that answer requests: the sealing
    process runs at nice +NICE from its parent, and seals all the same."""
    from lsbd.crypto import worker

    source = tmp_path / "segment"
    source.write_bytes(TEXT * 10)
    dest = tmp_path / "sealed"
    dest.touch()
    child = worker._Child()
    try:
        n = child.run(worker.SealJob(source=str(source), length=len(TEXT) * 10, dest=str(dest),
                                     name=NAME, volume_id=VOLUME_ID, object_key=KEY, key_id=1,
                                     object_id=OBJECT_ID, frame_size=16384, level=1))
        assert n == (1, dest.stat().st_size) and n[1] > 0
        assert os.getpriority(os.PRIO_PROCESS, child.proc.pid) == \
            min(19, os.getpriority(os.PRIO_PROCESS, 0) + worker.NICE)
    finally:
        child.stop()


@pytest.mark.parametrize("encrypted", [False, True])
def test_a_whole_object_opens_into_one_buffer(encrypted):
    """Opening a fetched segment takes memory for its plain bytes once:
    frames opened straight into their place, not collected and then
    joined (a 32 MiB segment took two more copies of itself at once).
    Frames of both codecs, and the checks still hold."""
    import tracemalloc

    from lsbd.crypto import objects

    cipher = Cipher(KEY) if encrypted else None
    plain = (TEXT * 1000)[:1 << 20] + os.urandom(3 << 20)         # 4 MiB
    args = dict(name=NAME, volume_id=VOLUME_ID, key_id=1, object_id=OBJECT_ID, frame_size=16384)
    sealed = objects.seal(plain, framer=Framer(cipher, compress.Compressor(1, threads=1)),
                          **args)

    def open_whole(data: bytes) -> bytes:
        return objects.open_whole(data, name=NAME, volume_id=VOLUME_ID,
                                  framer_for=lambda tail: Framer(cipher))
    tracemalloc.start()
    try:
        opened = open_whole(sealed)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert opened == plain
    assert peak < len(plain) + (256 << 10), peak
    damaged = bytearray(sealed)
    damaged[(2 << 20) + 7] ^= 1                                    # a bit in a raw frame
    with pytest.raises(FrameError):
        open_whole(bytes(damaged))


@pytest.mark.parametrize("with_numpy", [True, False])
def test_frame_starts_are_the_running_sum_of_the_stored_lengths(monkeypatch, with_numpy):
    """A layout's frame offsets (objects._frame_starts), summed in numpy
    once it is loaded, in Python before: 0, then each frame's end; 8 bytes
    an offset once they pass 4 GiB."""
    import array

    import numpy

    from lsbd import numpyload
    from lsbd.crypto.objects import _frame_starts

    monkeypatch.setattr(numpyload, "loaded", lambda: numpy if with_numpy else None)
    monkeypatch.setattr(numpyload, "imported", lambda: numpy if with_numpy else None)
    lengths = array.array("I", [5, 16_400, 1, 9_000])
    small = _frame_starts(b"head" + lengths.tobytes(), 4)
    assert small.typecode == "I" and list(small) == [0, 5, 16_405, 16_406, 25_406]
    assert list(_frame_starts(b"head", 4)) == [0]
    big = _frame_starts(array.array("I", [4_000_000_000] * 2).tobytes(), 0)
    assert big.typecode == "q" and list(big) == [0, 4_000_000_000, 8_000_000_000]


def test_numpy_is_asked_for_only_once_many_frames_were_summed_without_it(monkeypatch):
    """A few layouts (a small volume's cold read) are summed in Python and
    never start numpy's import; once PYTHON_FRAMES frames were, the next
    layout asks for it (lsbd.numpyload), and one loaded meanwhile by
    anything else is used at once."""
    import array

    import numpy

    from lsbd import numpyload
    from lsbd.crypto import objects

    asked: list[int] = []
    have: list = [None]
    monkeypatch.setattr(numpyload, "loaded", lambda: asked.append(1) or have[0])
    monkeypatch.setattr(numpyload, "imported", lambda: have[0])
    monkeypatch.setattr(objects, "_summed", 0)
    monkeypatch.setattr(objects, "PYTHON_FRAMES", 10)
    plain = array.array("I", [7, 8, 9, 10]).tobytes()
    for _ in range(3):                       # 12 frames summed, 8 before the third
        assert list(objects._frame_starts(plain, 0)) == [0, 7, 15, 24, 34]
    assert asked == []
    assert list(objects._frame_starts(plain, 0)) == [0, 7, 15, 24, 34]
    assert asked == [1]                      # past PYTHON_FRAMES: the import starts
    monkeypatch.setattr(objects, "_summed", 0)
    have[0] = numpy                          # loaded by another caller
    sums: list[int] = []
    frombuffer = numpy.frombuffer
    monkeypatch.setattr(numpy, "frombuffer", lambda *a, **k: sums.append(1) or frombuffer(*a, **k))
    assert list(objects._frame_starts(plain, 0)) == [0, 7, 15, 24, 34]
    assert sums == [1] and asked == [1]      # used at once, never asked for
