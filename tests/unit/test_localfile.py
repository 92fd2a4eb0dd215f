"""Encrypted local segment files (lsbd.crypto.localfile): the header's
golden bytes, reads at any offset, and the rule a counter mode lives by: a
journal never writes two different plaintexts at one offset under one key
(a roll-back and a recovery copy the file under a new file id)."""

from __future__ import annotations

import os
import struct

import pytest

from lsbd.checksum import masked_crc
from lsbd.crypto import localfile
from lsbd.crypto.aead import Stream
from lsbd.crypto.localfile import HEADER_SIZE, LocalKeys
from lsbd.engine.recovery import recover_journal_file
from lsbd.errors import CorruptionError
from lsbd.format.segment import DATA, block_crcs, read_sealed_index_from
from lsbd.segments.journal import OpenSegment

BS = 4096
VOLID = bytes(range(16))
MARK = b"LOCAL-FILE-PLAINTEXT-MARKER-0123456789abcdef-0123456789abcdef!!"


def keys(current: int = 1, known=(1, 2)) -> LocalKeys:
    data = {k: bytes([k]) * 32 for k in known}
    return LocalKeys(VOLID, lambda k: data[k], lambda: (current, data[current]))


def marked(i: int) -> bytes:
    return (MARK * (BS // len(MARK)))[:BS - 4] + struct.pack("<I", i)


def file_id(path) -> bytes:
    with open(path, "rb") as f:
        return f.read(HEADER_SIZE)[12:28]


def test_header_golden_bytes():
    c = keys().new_file()
    h = c.header
    assert len(h) == HEADER_SIZE == 32
    assert h[:8] == b"LSBDLOC1"
    assert struct.unpack("<I", h[8:12]) == (1,)
    assert h[12:28] == c.file_id and len(c.file_id) == 16
    assert struct.unpack("<I", h[28:32]) == (masked_crc(h[:28]),)
    # The same header opens the same key: what one wrote, another reads.
    again = keys().from_header(h, where="f")
    assert again.key == c.key and again.xor(5, [c.xor(5, [b"abc"])]) == b"abc"


def test_file_keys_differ_by_file_id_and_data_key():
    k = keys()
    a, b = k.new_file(), k.new_file()
    assert a.file_id != b.file_id and a.key != b.key
    c = keys(current=2).new_file()
    assert c.key_id == 2 and keys().from_header(c.header, where="f").key == c.key


@pytest.mark.parametrize("damage", ["magic", "crc", "key", "short"])
def test_a_bad_header_is_a_corruption_error(damage):
    h = bytearray(keys().new_file().header)
    if damage == "magic":
        h[0] ^= 1
    elif damage == "crc":
        h[20] ^= 1
    elif damage == "key":
        h = bytearray(keys(current=2).new_file().header)
    else:
        h = h[:20]
    with pytest.raises(CorruptionError):
        keys(known=(1,)).from_header(bytes(h), where="f")


def test_any_range_decrypts_on_its_own():
    s = Stream(bytes(32))
    plain = os.urandom(1000)
    whole = s.xor(0, [plain])
    assert whole != plain
    for lo, hi in [(0, 1), (1, 17), (15, 33), (16, 48), (100, 1000), (999, 1000)]:
        assert s.xor(lo, [whole[lo:hi]]) == plain[lo:hi]
        assert s.xor_one(lo, whole[lo:hi]) == plain[lo:hi]     # a small read's path
    assert s.xor(3, [plain[3:10], plain[10:50]]) == whole[3:50]


def _journal(path, k, n=3):
    seg = OpenSegment(str(path), volume_id=VOLID, seq=3, block_size=BS, keys=k)
    for i in range(n):
        d = marked(i)
        seg.append(DATA, i, 1, data=d, crcs=block_crcs(d, BS), commit=True)
    return seg


def test_an_encrypted_journal_holds_no_plaintext_and_reads_back(tmp_path):
    k = keys()
    path = tmp_path / "j.seg"
    seg = _journal(path, k)
    seg.append_many([(DATA, 10, 1, marked(10), block_crcs(marked(10), BS), True)])
    seg.seal(1 << 30, 0)
    seg.finish()
    raw = path.read_bytes()
    assert raw[:8] == b"LSBDLOC1" and MARK[:16] not in raw
    r = localfile.open_reader(str(path), k, where="j")
    try:
        _trailer, records = read_sealed_index_from(r.pread, r.size(), where="j")
        assert [rec.lba for rec in records] == [0, 1, 2, 10]
        for rec in records:
            assert r.pread(BS, rec.data_offset) == marked(rec.lba)
    finally:
        os.close(r.fd)
    with pytest.raises(CorruptionError):   # read in the clear, it is no segment
        read_sealed_index_from(lambda n, o: raw[o:o + n], len(raw), where="j")


def test_a_rollback_past_written_bytes_moves_to_a_new_key(tmp_path):
    k = keys()
    path = tmp_path / "j.seg"
    seg = _journal(path, k)
    replaced = []
    seg.on_replaced = replaced.append
    before = file_id(path)
    mark = seg.mark()
    d = marked(7)
    seg.append(DATA, 7, 1, data=d, crcs=block_crcs(d, BS), commit=True)
    assert seg.rollback(mark, failed=True)
    assert replaced == [3]
    assert file_id(path) != before, "bytes at the rolled-back offsets would be written again"
    assert os.path.getsize(path) == HEADER_SIZE + mark[0]
    # A roll-back of nothing written keeps the file.
    same = file_id(path)
    assert not seg.rollback(seg.mark(), failed=True) and file_id(path) == same
    seg.append(DATA, 8, 1, data=marked(8), crcs=block_crcs(marked(8), BS), commit=True)
    seg.seal(1 << 30, 0)
    seg.finish()
    r = localfile.open_reader(str(path), k, where="j")
    _t, records = read_sealed_index_from(r.pread, r.size(), where="j")
    assert [(rec.lba, r.pread(BS, rec.data_offset)) for rec in records] == \
        [(i, marked(i)) for i in (0, 1, 2, 8)]
    os.close(r.fd)


def test_a_rollback_without_room_for_the_copy_defers_it(tmp_path, monkeypatch):
    k = keys()
    path = tmp_path / "j.seg"
    seg = _journal(path, k)
    before = file_id(path)
    mark = seg.mark()
    seg.append(DATA, 7, 1, data=marked(7), crcs=block_crcs(marked(7), BS), commit=True)
    real = localfile.rewrite

    def full(*a, **kw):
        raise OSError(28, "no space")
    monkeypatch.setattr(localfile, "rewrite", full)
    seg.rollback(mark, failed=True)
    assert file_id(path) == before and os.path.getsize(path) == HEADER_SIZE + mark[0]
    with pytest.raises(OSError):       # still no room: the write fails, nothing written
        seg.append(DATA, 8, 1, data=marked(8), crcs=block_crcs(marked(8), BS), commit=True)
    assert os.path.getsize(path) == HEADER_SIZE + mark[0]
    monkeypatch.setattr(localfile, "rewrite", real)
    seg.append(DATA, 8, 1, data=marked(8), crcs=block_crcs(marked(8), BS), commit=True)
    assert file_id(path) != before
    seg.close_fd()


def test_recovery_of_a_torn_encrypted_journal_writes_a_new_file(tmp_path):
    k = keys()
    path = tmp_path / "j.seg"
    seg = _journal(path, k)
    committed = seg.end
    seg.append(DATA, 9, 1, data=marked(9), crcs=block_crcs(marked(9), BS), commit=False)
    seg.sync()
    seg.close_fd()
    os.truncate(path, HEADER_SIZE + seg.end - 100)   # torn in its last record
    before = file_id(path)
    trailer, records = recover_journal_file(str(path), volume_id=VOLID, seq=3, block_size=BS,
                                            volume_size=1 << 30, prev_crc=0, keys=k)
    assert [r.lba for r in records] == [0, 1, 2] and trailer.footer_offset == committed
    assert file_id(path) != before, "the index would be written where the torn tail was"
    assert MARK[:16] not in path.read_bytes()
    assert not any(n.endswith(".rekey") for n in os.listdir(tmp_path))
    # Recovering again reads the sealed file as it is.
    again = recover_journal_file(str(path), volume_id=VOLID, seq=3, block_size=BS,
                                 volume_size=1 << 30, prev_crc=0, keys=k)
    assert again is not None and [r.lba for r in again[1]] == [0, 1, 2]
    assert file_id(path) != before


def test_recovery_removes_a_journal_whose_header_never_landed(tmp_path):
    path = tmp_path / "j.seg"
    path.write_bytes(b"LSBDLO")
    assert recover_journal_file(str(path), volume_id=VOLID, seq=3, block_size=BS,
                                volume_size=1 << 30, prev_crc=0, keys=keys()) is None
    assert not path.exists()


def test_recovery_keeps_a_journal_whose_key_is_missing(tmp_path):
    """A whole header that names a key the volume lacks (an older keys
    object restored, say) is an error, never a reason to drop the journal."""
    path = tmp_path / "j.seg"
    seg = _journal(path, keys(current=2))
    seg.sync()
    seg.close_fd()
    size = os.path.getsize(path)
    with pytest.raises(CorruptionError):
        recover_journal_file(str(path), volume_id=VOLID, seq=3, block_size=BS,
                             volume_size=1 << 30, prev_crc=0, keys=keys(known=(1,)))
    assert os.path.getsize(path) == size


def test_reads_from_many_threads_at_once_decrypt_right():
    """The contexts a stream keeps for reuse are never shared by two threads."""
    import threading

    s = Stream(bytes(range(32)))
    plain = os.urandom(1 << 16)
    whole = s.xor(0, [plain])
    errors = []

    def reader(seed: int) -> None:
        import random
        rng = random.Random(seed)
        for _ in range(2000):
            lo = rng.randrange(len(plain) - 1)
            hi = rng.randrange(lo + 1, min(len(plain), lo + 9000) + 1)
            xor = s.xor_one if lo % 2 else lambda at, data: s.xor(at, [data])
            if xor(lo, whole[lo:hi]) != plain[lo:hi]:
                errors.append((lo, hi))

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.parametrize("nowait", [False, True])
def test_large_and_small_reads_of_an_encrypted_file(tmp_path, nowait, in_page_cache):
    """Reads from 64 KiB on are decrypted in the buffer they were read into;
    both ways give the plain bytes, and a read past the end is cut short."""
    from lsbd.segments.openfile import OpenFile

    k = keys()
    c = k.new_file()
    plain = os.urandom(300_000)
    path = tmp_path / "f.seg"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        localfile.write_new(fd, c, plain)
        f = OpenFile(localfile.reader_of(fd, k, where="f"))
        in_page_cache(path)    # for nowait reads
        for lo, n in [(0, 4096), (17, 5000), (1000, 128 * 1024), (64 * 1024, 64 * 1024),
                      (299_000, 4096), (200_000, 200_000)]:
            if nowait and lo + n > len(plain):
                continue     # cut short: a nowait read says WouldBlock, as in the clear
            assert bytes(f.read(n, lo, nowait)) == plain[lo:lo + n], (lo, n)
    finally:
        os.close(fd)


def test_a_file_replaced_under_a_new_key_reads_with_its_own_cipher(tmp_path):
    """An open descriptor keeps the cipher of the file it was opened on, and
    one opened on the file that replaced it (rewrite(): a new file id, a
    new key, perhaps the same descriptor number) reads with the new one:
    no cipher is reused across files."""
    from lsbd.segments.openfile import OpenFile

    k = keys()
    plain = os.urandom(64 * 1024)
    path = str(tmp_path / "f.seg")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    localfile.write_new(fd, k.new_file(), plain)
    old = OpenFile(localfile.reader_of(fd, k, where="f"))
    assert old.read(BS, 40, False) == plain[40:40 + BS]
    new_fd, _cipher = localfile.rewrite(path, old.reader, len(plain), k)
    os.close(new_fd)
    try:
        with open(path, "rb") as f:
            assert f.read(HEADER_SIZE)[12:28] != old.reader.cipher.file_id
        new = OpenFile(localfile.open_reader(path, k, where="f"))
        try:
            for lo in (0, 40, 4096 + 7, len(plain) - BS):
                assert new.read(BS, lo, False) == plain[lo:lo + BS], lo
                assert old.read(BS, lo, False) == plain[lo:lo + BS], lo   # the unlinked file
        finally:
            os.close(new.fd)
        os.close(fd)
        # The same descriptor number on the replaced file: its own cipher.
        again = OpenFile(localfile.open_reader(path, k, where="f"))
        try:
            assert again.read(BS, 40, False) == plain[40:40 + BS]
        finally:
            os.close(again.fd)
    except BaseException:
        try:
            os.close(fd)
        except OSError:
            pass
        raise


def test_small_reads_reuse_their_buffers_and_still_decrypt_right(tmp_path, monkeypatch,
                                                                in_page_cache):
    """An open file keeps a context and a buffer per concurrent small read:
    reads of every size and alignment, from several threads at once, one
    after another on the same buffers, each give the plain bytes; a read
    cut short at the end and one refused (nowait) spoil nothing."""
    import random
    import threading

    from lsbd.errors import WouldBlock
    from lsbd.segments import openfile
    from lsbd.segments.openfile import OpenFile

    # Nowait reads on, whatever a file system an earlier test met turned off.
    monkeypatch.setattr(openfile, "_RWF_NOWAIT", os.RWF_NOWAIT)
    k = keys()
    plain = os.urandom(1 << 20)
    path = tmp_path / "f.seg"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    errors = []
    try:
        localfile.write_new(fd, k.new_file(), plain)
        in_page_cache(path)    # for nowait reads
        f = OpenFile(localfile.reader_of(fd, k, where="f"))

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            for i in range(3000):
                n = rng.choice([BS, BS, 512, 5000, 1])
                lo = rng.randrange(len(plain) - n)
                if f.read(n, lo, i % 2 == 0) != plain[lo:lo + n]:
                    errors.append((lo, n))

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        # A context and a buffer go back once per read: never more of
        # them than reads at once.
        assert 1 <= len(f._idle) <= 4
        assert all(len(kept) <= 4 for kept in openfile._BUFFERS.values())
        end = len(plain) - 100
        assert f.read(BS, end, False) == plain[end:]          # cut short at the end
        with pytest.raises(WouldBlock):
            f.read(BS, end, True)
        for lo in (0, 7, BS + 16, end - BS):
            assert f.read(BS, lo, True) == plain[lo:lo + BS], lo
    finally:
        os.close(fd)
