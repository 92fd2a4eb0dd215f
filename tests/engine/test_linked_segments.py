"""Sealing by link on a whole volume (lsbd.crypto.linked): an encrypted
volume's segments of random writes are stored as their local files are,
with a tag per frame appended; compressible ones as before.  On file://
the object is the cache dir's own file, made read-only; on s3:// it is
uploaded, counted whole by the cache and listed in the map summary.  A
crash before the upload or during the append loses nothing, and tampering
is named by object and offset."""

from __future__ import annotations

import os
import shutil
import stat
import time

import pytest
from engine_helpers import BS, MiB

from lsbd import names
from lsbd.crypto import keyring as kr
from lsbd.crypto import keystore, linked, objects
from lsbd.crypto.aead import Argon2Params, random_bytes
from lsbd.crypto.localfile import HEADER_SIZE
from lsbd.engine import testing
from lsbd.engine.volume import Volume
from lsbd.errors import TransientStoreError
from lsbd.segments.locallength import local_segment_size
from lsbd.meta.config import create_volume
from lsbd.segments import summary
from lsbd.store import open_store
from lsbd.store.local import LocalStore

SECRET = kr.Secret(kr.PASSPHRASE, b"sealing by link test passphrase")
SIZE = 32 * MiB


def new_store(url: str):
    endpoint = os.environ.get("AWS_ENDPOINT_URL") if url.startswith("s3://") else None
    store = open_store(url, endpoint_url=endpoint, secret=lambda _v: SECRET)
    keystore.save(store.inner, "vol", kr.new_keyring(
        random_bytes(16), SECRET, params=Argon2Params(memory_kib=64, iterations=1, lanes=1)))
    create_volume(store, "vol", SIZE, segment_size=MiB, compression="zstd:1",
                  encryption="aes-256-gcm")
    return store


def reopen(store):
    url = store.url
    endpoint = os.environ.get("AWS_ENDPOINT_URL") if url.startswith("s3://") else None
    store.close()
    return open_store(url, endpoint_url=endpoint, secret=lambda _v: SECRET)


def write(vol, model: dict, first: int, count: int, *, text: bool = False) -> None:
    """`count` blocks from block `first`: random, or text that compresses."""
    for lba in range(first, first + count):
        data = (b"block %d of text " % lba * 300)[:BS] if text else os.urandom(BS)
        vol.write(lba * BS, data)
        model[lba] = data


def check(vol, model: dict) -> None:
    for lba, data in model.items():
        assert vol.read(lba * BS, BS) == data, lba


def stored_versions(store) -> dict[str, int]:
    out = {}
    for info in store.inner.list(names.segment_prefix("vol")):
        tail = objects.decode_tail(store.inner.get(info.key, -objects.TAIL.size), where=info.key)
        out[info.key] = tail.version
    return out


def test_random_segments_are_the_cache_files_read_only_on_file_store(tmp_path):
    store = new_store(f"file://{tmp_path / 'store'}")
    model: dict[int, bytes] = {}
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "cache"))
    write(vol, model, 0, 600)                 # random: about two segments by link
    write(vol, model, 1000, 400, text=True)   # compresses: sealed in frames
    vol.flush_to_store()
    files = testing.local_files(vol)
    versions = stored_versions(store)
    assert sorted(set(versions.values())) == [1, 2], versions
    for key, version in versions.items():
        seq = names.parse_seq(key)
        obj = os.stat(store.inner.object_file(key))
        if version == 2:
            local = os.stat(files.path(seq))
            assert (obj.st_ino, obj.st_dev) == (local.st_ino, local.st_dev)
            # nobody but root writes the one inode the store and the cache share
            assert stat.S_IMODE(obj.st_mode) == 0o400
            assert obj.st_size == linked.stored_size(files.plain_size(seq), 16384)
        else:
            assert obj.st_ino != os.stat(files.path(seq)).st_ino
    check(vol, model)
    assert vol.verify() == []
    vol.close()
    for cache in ("cache", "fresh"):          # the cache dir's files, and the store alone
        vol = Volume.open(store, "vol", cache_root=str(tmp_path / cache))
        try:
            check(vol, model)
        finally:
            vol.close()


def test_tampering_with_a_linked_object_is_named_by_verify(tmp_path):
    store = new_store(f"file://{tmp_path / 'store'}")
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "cache"))
    write(vol, {}, 0, 300)
    vol.flush_to_store()
    vol.close()
    key = next(k for k, v in stored_versions(store).items() if v == 2)
    path = store.inner.object_file(key)
    shutil.rmtree(tmp_path / "cache")         # the store's own inode, alone
    os.chmod(path, 0o600)
    with open(path, "r+b") as f:
        f.seek(HEADER_SIZE + 3 * 16384 + 100)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "fresh"))
    try:
        problems = vol.verify()
        assert problems == [f"{key}: frame 3 at stored offset {HEADER_SIZE + 3 * 16384} "
                            "fails authentication"], problems
    finally:
        vol.close()


def test_on_s3_uploaded_whole_counted_by_the_cache_and_in_the_map_summary(tmp_path, s3_url):
    store = new_store(s3_url)
    model: dict[int, bytes] = {}
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "cache"))
    write(vol, model, 0, 900)
    vol.flush_to_store()
    files = testing.local_files(vol)
    stored = {i.key: i.size for i in store.inner.list(names.segment_prefix("vol"))}
    linked_keys = [k for k, v in stored_versions(store).items() if v == 2]
    assert len(linked_keys) >= 2
    for key in linked_keys:
        seq = names.parse_seq(key)
        length = files.plain_size(seq)
        # the upload is the local file, index and tail included ...
        with open(files.path(seq), "rb") as f:
            assert store.inner.get(key) == f.read()
        assert stored[key] == linked.stored_size(length, 16384) == os.path.getsize(files.path(seq))
    # ... and so is what the cache counts of it (about 1 KiB more a MiB)
    on_disk = sum(os.path.getsize(files.path(s)) for s in files.local_seqs()
                  if names.segment_key("vol", s) in stored)
    assert files.cache_state()["cache_bytes"] == on_disk
    assert on_disk > sum(files.plain_size(s) for s in files.local_seqs()
                         if names.segment_key("vol", s) in stored)
    vol.close()
    # the map summary lists them, index and tail as stored
    store = reopen(store)
    entries = summary.read(store, "vol", _volume_id(store))
    by_key = {names.segment_key("vol", e.seq): e for e in entries}
    for key in linked_keys:
        raw = by_key[key].layout
        tail = objects.decode_tail(raw, where=key)
        assert tail.version == 2 and len(raw) == tail.index_length + objects.TAIL.size
    # the cache dir lost: everything read back from s3://
    shutil.rmtree(tmp_path / "cache")
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "cold"))
    try:
        assert all(store.layout_raw(k) for k in linked_keys)     # from the summary
        check(vol, model)
        assert vol.verify() == []
    finally:
        vol.close()


def _volume_id(store) -> bytes:
    import json
    import uuid

    doc = json.loads(store.inner.get(names.config_key("vol")))
    return uuid.UUID(hex=doc["volume_id"]).bytes


@pytest.mark.parametrize("state", ["not tagged", "grown, nothing written", "index half written",
                                   "tagged, not stored"])
def test_a_crash_before_the_upload_or_during_the_append_loses_nothing(tmp_path, monkeypatch,
                                                                      state):
    """Segments sealed, the store refusing them: then the local file of one
    is left as a power cut during its append leaves it (grown to its final
    size in one step, its index and tail partly or not written), or before
    it.  The next open reads it, uploads it, and the object authenticates."""
    store = new_store(f"file://{tmp_path / 'store'}")
    refuse = {"on": True}
    real = LocalStore.put_file

    def put_file(self, key, path, **kw):
        if refuse["on"] and "/seg/" in key:
            raise TransientStoreError(f"put {key}: the store is down")
        return real(self, key, path, **kw)

    monkeypatch.setattr(LocalStore, "put_file", put_file)
    model: dict[int, bytes] = {}
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "cache"))
    write(vol, model, 0, 600)
    vol.flush()
    files = testing.local_files(vol)
    deadline = time.monotonic() + 30
    sealed: list[int] = []
    while not sealed and time.monotonic() < deadline:      # its first upload, refused
        time.sleep(0.05)
        sealed = [s for s in files.local_seqs() if testing.segment(vol, s) is not None
                  and _tagged(files.path(s))]
    vol.abandon()                              # as a crash leaves it
    assert sealed, "the sealing process tagged no segment before the store refused it"
    seq = sealed[0]
    path = files.path(seq)
    whole = open(path, "rb").read()
    tail = objects.decode_tail(whole, where=path)
    body_end = HEADER_SIZE + tail.plain_length
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o400
    os.chmod(path, 0o600)
    with open(path, "r+b") as f:
        if state == "not tagged":
            f.truncate(body_end)
        elif state == "grown, nothing written":
            f.truncate(body_end)
            f.truncate(len(whole))
        elif state == "index half written":
            f.seek(len(whole) - 64 - 500)
            f.write(bytes(564))
    with open(path, "rb") as f:
        from lsbd.crypto.localfile import LocalReader
        keys = files.keys
        r = LocalReader(f.fileno(), keys.from_header(f.read(HEADER_SIZE), where=path))
        assert local_segment_size(r) == tail.plain_length
    refuse["on"] = False
    store = reopen(store)
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "cache"))
    try:
        check(vol, model)
        vol.flush_to_store()
        assert open(path, "rb").read() == whole
        assert stored_versions(store)[names.segment_key("vol", seq)] == 2
        assert vol.verify() == []
    finally:
        vol.close()
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "fresh"))
    try:
        check(vol, model)
    finally:
        vol.close()


def _tagged(path: str) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return linked.complete_tail(fd) is not None
    finally:
        os.close(fd)


def test_structure_only_checks_a_linked_objects_size(tmp_path):
    """Without the key, `verify --structure-only` finds a linked object cut
    short in its body: its tail is whole, its size is not the tail's."""
    from lsbd.crypto.keystore import check_structure

    store = new_store(f"file://{tmp_path / 'store'}")
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "cache"))
    write(vol, {}, 0, 300)
    vol.flush_to_store()
    vol.close()
    assert check_structure(store.inner, "vol")[1] == []
    key = next(k for k, v in stored_versions(store).items() if v == 2)
    data = store.inner.get(key)
    store.inner.delete(key)
    store.inner.put(key, data[:HEADER_SIZE] + data[HEADER_SIZE + 1:])
    _checked, problems = check_structure(store.inner, "vol")
    assert problems == [f"{key}: {len(data) - 1} bytes, not the {len(data)} its tail says"]


def test_clone_restore_and_compaction_of_linked_segments(tmp_path):
    """A clone reads its parent's segments with the parent's keys (a linked
    object's MAC key binds the parent's volume id and name); compaction and
    --defrag read linked segments and write new ones; all reads back."""
    import json
    import subprocess
    import sys

    store = tmp_path / "store"

    def lsbd(*args: str, cache: str = "cache") -> str:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("LSBD_")}
        environ["LSBD_PASSPHRASE"] = "a long enough passphrase"
        return subprocess.run([sys.executable, "-m", "lsbd.cli.main", "--store",
                               f"file://{store}", "--cache-dir", str(tmp_path / cache), *args],
                              check=True, capture_output=True, text=True, timeout=180,
                              env=environ, stdin=subprocess.DEVNULL).stdout

    images = [os.urandom(3 * MiB) for _ in range(3)]
    lsbd("create", "v", "--size", "4M", "--encrypt", "--retain", "0")
    for i, data in enumerate(images):
        (tmp_path / f"{i}.img").write_bytes(data)
        lsbd("import", "v", str(tmp_path / f"{i}.img"))
        if i == 0:
            lsbd("snapshot", "create", "v", "s")
    versions = []
    for dirpath, _dirs, files in os.walk(store / "volumes" / "v" / "seg"):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                fh.seek(-objects.TAIL.size, 2)
                versions.append(objects.decode_tail(fh.read(), where=f).version)
    assert 2 in versions, versions
    assert json.loads(lsbd("compact", "v", "--json"))["segments_deleted"] >= 1
    lsbd("compact", "v", "--defrag")
    lsbd("clone", "--snapshot", "s", "v", "kid")
    lsbd("restore", "v", "--snapshot", "s", "--to", "copy")
    for name, want in (("kid", images[0]), ("copy", images[0]), ("v", images[2])):
        out = tmp_path / f"{name}.out"
        lsbd("export", name, str(out), cache="fresh")
        assert out.read_bytes()[:len(want)] == want, name
    lsbd("verify", "v", cache="fresh2")
