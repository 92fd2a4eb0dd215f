"""The cache dir of an encrypted volume holds no plaintext: journals, segments
waiting to upload, segments fetched back from the store; a cache dir left in
the clear by an older lsbd is encrypted when the volume opens.  The same
checks on a plain volume find the text, so they can fail."""

from __future__ import annotations

import logging
import os
import re
import struct

import pytest

from lsbd.crypto import keyring as kr
from lsbd.crypto import keystore
from lsbd.crypto.aead import Argon2Params, random_bytes
from lsbd.engine import opening, past, testing
from lsbd.engine.volume import Volume
from lsbd.meta.config import create_volume
from lsbd.store import open_store

BS = 4096
MiB = 1 << 20
MARK = b"CACHE-DIR-PLAINTEXT-MARKER:6f1c2a9e-4b7d-4e3a-9c55-0d2e7b8f1a34."
assert len(MARK) == 64
SECRET = kr.Secret(kr.PASSPHRASE, b"cache dir test passphrase")


def marked(i: int) -> bytes:
    return (MARK * (BS // 64))[:BS - 8] + struct.pack("<Q", i)


def files_holding(root, needle: bytes) -> list[str]:
    found = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as f:
                    if needle in f.read():
                        found.append(path)
            except OSError:
                pass
    return found


def new_volume(tmp_path, encrypted: bool):
    store = open_store("file://" + str(tmp_path / "store"), secret=lambda _v: SECRET)
    options = {"compression": "none"}
    if encrypted:
        keystore.save(store.inner, "vol", kr.new_keyring(
            random_bytes(16), SECRET, params=Argon2Params(memory_kib=64, iterations=1, lanes=1)))
        options = {"compression": "zstd:1", "encryption": "aes-256-gcm"}
    create_volume(store, "vol", 64 * MiB, segment_size=MiB, **options)
    return store


def open_volume(store, tmp_path) -> Volume:
    return Volume.open(store, "vol", cache_root=str(tmp_path / "cache"))


@pytest.mark.parametrize("encrypted", [True, False], ids=["encrypted", "plain"])
def test_the_cache_dir_holds_no_plaintext(tmp_path, encrypted):
    store = new_volume(tmp_path, encrypted)
    vol = open_volume(store, tmp_path)
    try:
        for i in range(600):                         # several sealed segments
            vol.write(i * BS, marked(i))
        vol.flush()
        seqs = list(range(1, testing.seal_now(vol) + 1))
        assert len(seqs) >= 3
        for seq in seqs:
            assert testing.wait_stored(vol, seq)
        # Fetched back whole from the store: the read cache's copies.
        files = testing.local_files(vol)
        for seq in seqs:
            files.forget(seq)
        assert not any(files.is_local(s) for s in seqs)
        for seq in seqs:
            files._fetch_whole(seq)
        assert any(files.is_local(s) for s in seqs)
        # Searched before any read: a read of a damaged local copy drops it.
        assert bool(files_holding(tmp_path / "cache", MARK)) is not encrypted
        for i in range(0, 600, 7):
            assert vol.read(i * BS, BS) == marked(i)
        # A roll-back, then more in the open journal, flushed but not sealed.
        for i in range(600, 610):
            vol.write(i * BS, marked(i))
        vol.flush()
        in_cache = files_holding(tmp_path / "cache", MARK)
        in_store = files_holding(tmp_path / "store", MARK)
        if encrypted:
            assert in_cache == [] and in_store == []
        else:
            assert in_cache and in_store       # the search can see the text
        for i in range(0, 610, 13):
            assert vol.read(i * BS, BS) == marked(i)
    finally:
        vol.close()
        store.close()
    # After a close too (journal sealed, checkpoint written).
    assert bool(files_holding(tmp_path / "cache", MARK)) is not encrypted


def test_a_clear_cache_dir_from_an_older_lsbd_is_encrypted_at_open(tmp_path, monkeypatch, caplog):
    store = new_volume(tmp_path, True)
    # What an lsbd without this file layer did: the cache dir in the clear.
    monkeypatch.setattr(opening, "local_keys", lambda _store, _config: None)
    vol = open_volume(store, tmp_path)
    for i in range(300):
        vol.write(i * BS, marked(i))
    vol.flush()
    assert testing.wait_stored(vol, 1)
    for i in range(300, 310):                  # left in the journal (a crash)
        vol.write(i * BS, marked(i))
    vol.flush()
    vol.abandon()                              # as a crash leaves it
    assert files_holding(tmp_path / "cache", MARK)
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING):
        vol = open_volume(store, tmp_path)
    try:
        assert "segment files in the clear" in caplog.text
        # Stored ones dropped, the journal (never uploaded) encrypted and replayed.
        assert re.search(r"[1-9]\d* already in the store were removed, [1-9]\d* encrypted",
                         caplog.text), caplog.text
        assert files_holding(tmp_path / "cache", MARK) == []
        for i in range(310):
            assert vol.read(i * BS, BS) == marked(i), i
    finally:
        vol.close()
        store.close()
    assert past.local_keys is opening.local_keys
