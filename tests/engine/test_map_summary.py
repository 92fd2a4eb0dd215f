"""The map summary (lsbd.segments.summary, lsbd.engine.summaries): a clean
close after segments were stored writes the indexes of the segments after
the last checkpoint into one object, and an open on a new cache dir reads
it instead of one GET per segment.  It is a hint: segments newer than it,
or written again since, are read from the store; a damaged one is ignored;
an encrypted volume's is sealed; a writer that lost its lease writes none."""

from __future__ import annotations

import logging
import os
import threading

import pytest
from engine_helpers import BS, MiB, blocks, open_test_store, read_all

from lsbd import names
from lsbd.crypto import keyring as kr
from lsbd.crypto import keystore, objects
from lsbd.crypto.aead import random_bytes
from lsbd.crypto.keyring import Argon2Params
from lsbd.engine import summaries
from lsbd.engine.volume import Volume
from lsbd.errors import CorruptionError
from lsbd.format.segment import TRAILER
from lsbd.meta.config import create_volume
from lsbd.segments import summary
from lsbd.store import ObjectInfo, open_store
from lsbd.store.faulty import FaultyStore
from lsbd.store.s3 import S3Store

SIZE = 16 * MiB
SECRET = kr.Secret(kr.PASSPHRASE, b"map summary test passphrase")


@pytest.fixture
def gets(monkeypatch):
    """Every GET the S3 store sends: (key, start, length)."""
    seen: list[tuple[str, int, int | None]] = []
    lock = threading.Lock()
    get = S3Store.get

    def counted(self, key, start=0, length=None):
        with lock:
            seen.append((key, start, length))
        return get(self, key, start, length)

    monkeypatch.setattr(S3Store, "get", counted)
    return seen


def new_store(url: str, kind: str):
    if kind == "encrypted":
        store = open_store(url, endpoint_url=os.environ["AWS_ENDPOINT_URL"],
                           secret=lambda _v: SECRET)
        keystore.save(store.inner, "vol", kr.new_keyring(
            random_bytes(16), SECRET, params=Argon2Params(memory_kib=64, iterations=1, lanes=1)))
        create_volume(store, "vol", SIZE, segment_size=MiB, compression="zstd:1",
                      encryption="aes-256-gcm")
        return store
    store = open_test_store(url)
    create_volume(store, "vol", SIZE, segment_size=MiB, compression=kind)
    return store


def reopen(store, url: str, kind: str):
    """The same store as a new process opens it (no layouts kept)."""
    if kind == "encrypted":
        return open_store(url, endpoint_url=os.environ["AWS_ENDPOINT_URL"],
                          secret=lambda _v: SECRET)
    return open_test_store(url)


def write_session(store, cache, tag: int, first: int, count: int) -> None:
    """A writer session on `cache`: `count` runs of 64 blocks from block
    `first` (a segment about every four), closed cleanly."""
    vol = Volume.open(store, "vol", cache_root=str(cache))
    for i in range(count):
        lba = first + i * 64
        vol.write(lba * BS, blocks(tag, lba, 64))
    vol.close()


def index_gets(seen, volume="vol") -> list[str]:
    """The segment keys read other than whole (an index, a layout, a range)."""
    prefix = names.segment_prefix(volume)
    return [k for k, start, length in seen
            if prefix in k and not (start == 0 and length is None)]


def cold_open(store, tmp_path, name: str) -> tuple[Volume, bytes]:
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / name))
    return vol, read_all(vol)


def expected_image(tmp_path, store) -> bytes:
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "w"))
    try:
        return read_all(vol)
    finally:
        vol.close()


@pytest.mark.parametrize("kind", ["none", "zstd:1", "encrypted"])
def test_a_cold_open_reads_the_summary_not_each_segments_index(s3_url, tmp_path, gets, kind):
    store = new_store(s3_url, kind)
    write_session(store, tmp_path / "w", 1, 0, 16)
    expected = expected_image(tmp_path, store)
    segments = list(store.list(names.segment_prefix("vol")))
    assert len(segments) >= 3, "the test needs a few segments"
    raw = store.inner.get(names.summary_key("vol"))
    if kind == "none":
        assert raw.startswith(summary.MAGIC)
    else:
        # Sealed like a checkpoint; an encrypted volume's holds no index in the clear.
        tail = objects.decode_tail(raw, where="summary")
        assert tail.encrypted == (kind == "encrypted")
        if kind == "encrypted":
            assert summary.MAGIC not in raw

    store = reopen(store, s3_url, kind)
    gets.clear()
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "cold"))
    try:
        opening = list(gets)
        assert [k for k, *_ in opening].count(names.summary_key("vol")) == 1
        assert index_gets(opening) == [], "an index or layout read despite the summary"
        if kind != "none":
            # Its first ranged read needs no GET of the object's tail either.
            assert all(store.layout_raw(i.key) for i in segments)
        gets.clear()
        assert read_all(vol) == expected
        # A sealed volume's ranged reads found their layouts in the summary:
        # no read of an object's tail (a suffix range) before its frames.
        assert [k for k, start, _n in gets if start < 0] == []
    finally:
        vol.close()


@pytest.mark.parametrize("kind", ["none", "zstd:1"])
def test_a_store_wrapped_to_inject_faults_takes_the_summary_path_too(s3_url, tmp_path, gets,
                                                                    kind):
    """A wrapper store tells what its inner store can do: through the tests'
    fault injector (FaultyStore) a clean close writes the summary and a cold
    open reads it, layouts and all, as through the store itself; a test
    through the wrapper takes the path the store would."""
    store = FaultyStore(new_store(s3_url, kind))
    write_session(store, tmp_path / "w", 1, 0, 16)
    expected = expected_image(tmp_path, store)
    assert store.exists(names.summary_key("vol")), "the close wrote no summary"
    segments = list(store.list(names.segment_prefix("vol")))

    store = FaultyStore(reopen(store, s3_url, kind))
    gets.clear()
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "cold"))
    try:
        assert index_gets(gets) == [], "an index or layout read despite the summary"
        if kind != "none":      # the layouts it holds, kept for the first ranged reads
            assert all(store.layout_raw(i.key) for i in segments)
        gets.clear()
        assert read_all(vol) == expected
        assert [k for k, start, _n in gets if start < 0] == []   # no tail read for a layout
    finally:
        vol.close()


def test_segments_newer_than_the_summary_are_read_from_the_store(s3_url, tmp_path, gets):
    store = new_store(s3_url, "none")
    write_session(store, tmp_path / "w", 1, 0, 12)
    old = store.get(names.summary_key("vol"))
    before = {i.key for i in store.list(names.segment_prefix("vol"))}
    write_session(store, tmp_path / "w", 2, 64, 12)     # over some, beside others
    newer = {i.key for i in store.list(names.segment_prefix("vol"))} - before
    assert newer
    store.put(names.summary_key("vol"), old)            # the summary of the first session
    expected = expected_image(tmp_path, store)

    gets.clear()
    vol, image = cold_open(store, tmp_path, "cold")
    try:
        assert image == expected
        assert set(index_gets(gets)) >= newer
    finally:
        vol.close()


def test_a_segment_written_again_since_the_summary_is_read_from_the_store(s3_url, tmp_path):
    """A seq written again (a writer that lost its lease had written it;
    the next one removed it as an orphan and wrote its own) is another
    object: its entry in an older summary is not used."""
    store = new_store(s3_url, "none")
    write_session(store, tmp_path / "w", 1, 0, 8)
    top = max(names.parse_seq(i.key) for i in store.list(names.segment_prefix("vol")))
    write_session(store, tmp_path / "x", 2, 0, 4)       # X: top + 1 (and on)
    theirs = store.get(names.summary_key("vol"))
    sizes = sorted((names.parse_seq(i.key), i.size)
                   for i in store.list(names.segment_prefix("vol")))
    for seq, _size in sizes:
        if seq > top:
            store.delete(names.segment_key("vol", seq))
    store.delete(names.summary_key("vol"))
    write_session(store, tmp_path / "y", 3, 512, 4)     # Y: the same seqs and sizes, other blocks
    assert sorted((names.parse_seq(i.key), i.size)
                  for i in store.list(names.segment_prefix("vol"))) == sizes
    expected = expected_image(tmp_path, store)
    store.put(names.summary_key("vol"), theirs)         # X's summary is back

    vol, image = cold_open(store, tmp_path, "cold")
    try:
        assert image == expected
        assert image[:BS] == blocks(1, 0, 1) and image[512 * BS:513 * BS] == blocks(3, 512, 1)
    finally:
        vol.close()


def test_a_damaged_summary_is_ignored_with_a_warning(s3_url, tmp_path, caplog):
    store = new_store(s3_url, "zstd:1")
    write_session(store, tmp_path / "w", 1, 0, 12)
    expected = expected_image(tmp_path, store)
    raw = bytearray(store.inner.get(names.summary_key("vol")))
    raw[len(raw) // 2] ^= 0x40
    store.inner.put(names.summary_key("vol"), bytes(raw))

    store = reopen(store, s3_url, "zstd:1")
    with caplog.at_level(logging.WARNING):
        vol, image = cold_open(store, tmp_path, "cold")
    try:
        assert image == expected
        assert "map summary not used" in caplog.text
    finally:
        vol.close()


def test_a_summary_holds_entries_up_to_its_size_the_rest_are_read_from_the_store(
        s3_url, tmp_path, gets, monkeypatch):
    monkeypatch.setattr(summaries, "SUMMARY_BYTES", 3 * 1024)
    store = new_store(s3_url, "none")
    write_session(store, tmp_path / "w", 1, 0, 16)
    expected = expected_image(tmp_path, store)
    segments = {i.key for i in store.list(names.segment_prefix("vol"))}
    raw = store.get(names.summary_key("vol"))
    entries = summary.decode(raw, _volume_id(store), where="summary")
    assert 0 < len(entries) < len(segments) and len(raw) <= 3 * 1024 + 64

    gets.clear()
    vol, image = cold_open(store, tmp_path, "cold")
    try:
        assert image == expected
        covered = {names.segment_key("vol", e.seq) for e in entries}
        assert set(index_gets(gets)) == segments - covered
    finally:
        vol.close()


def _volume_id(store) -> bytes:
    from lsbd.meta.config import load_config
    return load_config(store, "vol").volume_id_bytes


def test_a_writer_that_lost_its_lease_writes_no_summary(s3_url, tmp_path, monkeypatch):
    store = new_store(s3_url, "none")
    monkeypatch.setenv("LSBD_HOST", "old.example")   # two machines
    first = Volume.open(store, "vol", cache_root=str(tmp_path / "a"))
    try:
        for i in range(8):
            first.write(i * 64 * BS, blocks(1, i * 64, 64))
        first.flush_to_store()
        monkeypatch.setenv("LSBD_HOST", "new.example")
        other = Volume.open(store, "vol", cache_root=str(tmp_path / "b"), break_lease=True)
        other.close()       # stored nothing: no summary
    finally:
        first.close()       # stored segments, but no longer holds the lease
    assert not store.exists(names.summary_key("vol"))


def test_summary_entries_are_used_only_for_the_very_objects_they_were_taken_from():
    e = summary.Entry(5, 100, '"abc"', b"t", b"i")
    key = names.segment_key("vol", 5)
    assert summary.usable([e], {5: ObjectInfo(key, 100, '"abc"')}) == {5: e}
    assert summary.usable([e], {5: ObjectInfo(key, 100, '"abd"')}) == {}     # written again
    assert summary.usable([e], {5: ObjectInfo(key, 101, '"abc"')}) == {}
    assert summary.usable([e], {6: ObjectInfo(key, 100, '"abc"')}) == {}     # deleted
    untagged = summary.Entry(5, 100, "", b"t", b"i")
    assert summary.usable([untagged], {5: ObjectInfo(key, 100, "")}) == {}


def test_a_summary_decodes_only_whole_and_of_its_own_volume():
    vid = b"v" * 16
    e = summary.Entry(5, 100, '"abc"', b"t" * TRAILER.size, b"index", b"layout")
    buf = summary.encode(vid, [e])
    assert summary.decode(buf, vid, where="s") == [e]
    with pytest.raises(CorruptionError):
        summary.decode(buf, b"w" * 16, where="s")
    with pytest.raises(CorruptionError):
        summary.decode(buf[:-1], vid, where="s")
    damaged = bytearray(buf)
    damaged[30] ^= 1
    with pytest.raises(CorruptionError):
        summary.decode(bytes(damaged), vid, where="s")


def test_a_summary_is_laid_out_as_docs_format_md_says():
    """Golden bytes of a one-entry summary (docs/format.md, "Map summary"):
    a change to the layout is a format change, and shows here."""
    vid = bytes(range(16))
    trailer = bytes(range(TRAILER.size))
    e = summary.Entry(5, 0x0102, '"ab"', trailer, b"IDX", b"LY")
    expected = (b"LSBDSUM1" + vid + bytes.fromhex("01000000")
                + bytes.fromhex("0500000000000000")          # u64 seq
                + bytes.fromhex("0201000000000000")          # u64 stored size
                + bytes.fromhex("0400")                      # u16 etag length
                + bytes.fromhex("03000000")                  # u32 index length
                + bytes.fromhex("02000000")                  # u32 layout length
                + b'"ab"' + trailer + b"IDX" + b"LY"
                + bytes.fromhex("6978146f"))                 # masked CRC32C of the rest
    assert TRAILER.size == 80
    assert summary.encode(vid, [e]) == expected
    assert summary.decode(expected, vid, where="s") == [e]
