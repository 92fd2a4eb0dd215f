"""The Store contract, run on every kind of store (a local directory, and S3 over
real HTTP against a moto server), plus the retry and fault-injection wrappers."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

import pytest

from lsbd import names
from lsbd.errors import ObjectExists, ObjectNotFound, StoreError, TransientStoreError, UserError
from lsbd.store import open_store
from lsbd.store.faulty import FaultyStore
from lsbd.store import openfds
from lsbd.store.local import LocalStore
from lsbd.store.openfds import OpenObjects
from lsbd.store.retry import RetryingStore


@pytest.fixture
def local_store(tmp_path):
    """A file:// store in a folder of its own (tmp_path/store), closed after
    the test: the one the file:// specifics and the wrappers' tests use."""
    store = LocalStore(str(tmp_path / "store"))
    yield store
    store.close()


# --- the contract, on both kinds of store ---------------------------------------------


def test_put_get_roundtrip(any_store):
    any_store.put("vol/seg/0001", b"hello world")
    any_store.put("empty", b"")
    assert any_store.get("vol/seg/0001") == b"hello world"
    assert any_store.get("empty") == b""
    assert any_store.head("vol/seg/0001") == 11
    assert any_store.head("empty") == 0
    assert any_store.exists("vol/seg/0001")
    assert not any_store.exists("vol/seg/0002")


def test_overwrite_when_not_exclusive(any_store):
    any_store.put("lease", b"first")
    any_store.put("lease", b"second, longer")
    assert any_store.get("lease") == b"second, longer"
    assert any_store.head("lease") == len(b"second, longer")


def test_exclusive_create_fails_and_keeps_the_original(any_store):
    any_store.put("seg/7", b"original", exclusive=True)
    with pytest.raises(ObjectExists) as info:
        any_store.put("seg/7", b"intruder", exclusive=True)
    assert info.value.key == "seg/7"
    assert isinstance(info.value, FileExistsError)
    assert any_store.get("seg/7") == b"original"


def test_racing_exclusive_creators_exactly_one_wins(any_store):
    threads_per_key = 12
    for round_no in range(4):
        key = f"race/{round_no}"
        barrier = threading.Barrier(threads_per_key)
        winners, losers, other = [], [], []

        # The round's objects bound as defaults: each thread uses its own round's.
        def create(i, key=key, barrier=barrier, winners=winners, losers=losers, other=other):
            data = f"writer {i}".encode() * 100
            barrier.wait()
            try:
                any_store.put(key, data, exclusive=True)
                winners.append(data)
            except ObjectExists:
                losers.append(i)
            except Exception as e:  # noqa: BLE001 - reported below
                other.append(e)

        threads = [threading.Thread(target=create, args=(i,)) for i in range(threads_per_key)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert other == []
        if not any_store.conditional_writes:
            # A server that ignores If-None-Match may let several through
            # (the engine guards against that: test_lease.py).  s3rver even
            # interleaves the bytes of concurrent puts of one key, so nothing
            # can be said of the object.
            assert winners
            continue
        assert len(winners) == 1, f"{len(winners)} winners for {key}"
        assert len(losers) == threads_per_key - 1
        assert any_store.get(key) == winners[0]


def test_ranged_reads(any_store):
    data = bytes(range(256)) * 40  # 10240 bytes
    any_store.put("obj", data)
    assert any_store.get("obj", 100, 50) == data[100:150]
    assert any_store.get("obj", 0, 1) == data[:1]
    assert any_store.get("obj", 5) == data[5:]
    assert any_store.get("obj", 10000, 1000) == data[10000:]      # cut short at the end
    assert any_store.get("obj", 10239, 5) == data[-1:]
    assert any_store.get("obj", 10240) == b""                      # starts at the end
    assert any_store.get("obj", 20000, 10) == b""                  # starts past the end
    assert any_store.get("obj", 0, 0) == b""
    assert any_store.get("obj", -100) == data[-100:]               # suffix
    assert any_store.get("obj", -20000) == data                    # suffix longer than object
    with pytest.raises(ValueError):
        any_store.get("obj", -5, 3)
    with pytest.raises(ObjectNotFound):
        any_store.get("missing", 10, 10)
    with pytest.raises(ObjectNotFound):
        any_store.get("missing", 0, 0)
    with pytest.raises(ObjectNotFound):
        any_store.get("missing", -10)


def test_several_ranges_of_an_object_read_in_one_call(any_store):
    """get_ranges gives each range as get gives it, in the order asked (cut
    short at the end, empty from it on), for a segment object (a local
    store's kept descriptor) and any other; a missing object is
    ObjectNotFound."""
    data = bytes(range(256)) * 40  # 10240 bytes
    ranges = [(100, 50), (0, 1), (10000, 1000), (10239, 5), (10240, 10), (20000, 10),
              (0, 0), (5000, 3000), (100, 50), (0, 10240)]
    for key in (names.segment_key("vol", 3), "obj"):
        any_store.put(key, data)
        assert any_store.get_ranges(key, ranges) == [data[s:s + n] for s, n in ranges], key
        assert any_store.get_ranges(key, []) == []
    with pytest.raises(ObjectNotFound):
        any_store.get_ranges("missing", [(0, 10), (20, 10)])


def test_local_get_ranges_reads_them_through_one_descriptor(local_store, monkeypatch):
    """A file:// store reads all the ranges of one get_ranges through one
    descriptor, a pread each: a read after random writes takes a few
    ranges of each stored segment in one call."""
    store = local_store
    key = names.segment_key("vol", 9)
    store.put(key, bytes(range(256)) * 20)
    opened: list[str] = []
    preads: list[int] = []
    real_open, real_pread = os.open, os.pread
    monkeypatch.setattr(os, "open", lambda path, *a, **kw: opened.append(path) or
                        real_open(path, *a, **kw))
    monkeypatch.setattr(os, "pread", lambda fd, n, off: preads.append(fd) or
                        real_pread(fd, n, off))
    assert store.get_ranges(key, [(0, 3), (4000, 2), (300, 1)]) == [b"\0\1\2", b"\xa0\xa1",
                                                                    b"\x2c"]
    assert len(opened) == 1 and len(preads) == 3 and len(set(preads)) == 1


def test_ranged_reads_of_an_empty_object(any_store):
    any_store.put("empty", b"")
    assert any_store.get("empty", 0, 10) == b""
    assert any_store.get("empty", 3) == b""
    assert any_store.get("empty", -4) == b""


def test_missing_objects(any_store):
    with pytest.raises(ObjectNotFound) as info:
        any_store.get("nope/1")
    assert info.value.key == "nope/1"
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(ObjectNotFound):
        any_store.head("nope/1")
    # A missing key must not be mistaken for a missing bucket, or the reverse.
    any_store.put("nope/2", b"x")
    with pytest.raises(ObjectNotFound):
        any_store.head("nope/1")


def test_an_object_written_again_lists_with_another_etag(any_store):
    """A store that tags objects (S3's ETag) tags each version apart: the map
    summary (lsbd.segments.summary) uses an entry only for the very object
    it was taken from.  Other stores give no tag, never a misleading one."""
    any_store.put("t/a", b"one")
    first = [i.etag for i in any_store.list("t/")]
    any_store.put("t/a", b"two")
    second = [i.etag for i in any_store.list("t/")]
    if getattr(any_store, "lists_etags", False):
        assert first[0] and second[0] and first != second
    else:
        assert first == second == [""]


def test_list_is_sorted_and_prefix_filtered(any_store):
    objects = {"a/bc": b"12", "a/b": b"1", "a/c/x": b"123", "ab": b"1234", "b": b"",
               "v/seg/0002": b"22", "v/seg/0001": b"1", "v/seg2/0001": b"333"}
    for key in ["v/seg2/0001", "b", "a/c/x", "v/seg/0002", "ab", "a/bc", "v/seg/0001", "a/b"]:
        any_store.put(key, objects[key])

    everything = list(any_store.list())
    assert [(i.key, i.size) for i in everything] == [(k, len(objects[k])) for k in sorted(objects)]
    assert [i.key for i in any_store.list("a/b")] == ["a/b", "a/bc"]
    assert [i.key for i in any_store.list("a/bc")] == ["a/bc"]
    assert [i.key for i in any_store.list("a/")] == ["a/b", "a/bc", "a/c/x"]
    assert [i.key for i in any_store.list("a")] == ["a/b", "a/bc", "a/c/x", "ab"]
    assert [i.key for i in any_store.list("v/seg/")] == ["v/seg/0001", "v/seg/0002"]
    assert [i.key for i in any_store.list("v/seg")] == ["v/seg/0001", "v/seg/0002", "v/seg2/0001"]
    assert list(any_store.list("zzz")) == []
    assert list(any_store.list("v/seg/0003")) == []


def test_list_of_an_empty_store(any_store):
    assert list(any_store.list()) == []


def test_delete_is_idempotent(any_store):
    any_store.put("d/1", b"x")
    any_store.put("d/2", b"y")
    any_store.delete("d/1")
    with pytest.raises(ObjectNotFound):
        any_store.get("d/1")
    any_store.delete("d/1")          # again: not an error
    any_store.delete("never/was")    # never existed: not an error
    assert [i.key for i in any_store.list()] == ["d/2"]


def test_bad_keys_are_rejected(any_store):
    for key in ["", "/abs", "a/../b", ".."]:
        with pytest.raises(ValueError):
            any_store.put(key, b"x")


def test_large_object_roundtrip(any_store):
    data = os.urandom(8 << 20)
    any_store.put("big", data, exclusive=True)
    assert any_store.head("big") == len(data)
    assert any_store.get("big") == data
    assert any_store.get("big", (8 << 20) - 4096, 8192) == data[-4096:]
    assert any_store.get("big", 3 << 20, 1 << 20) == data[3 << 20:4 << 20]


def test_concurrent_puts_and_gets(any_store):
    errors = []

    def worker(t):
        try:
            for i in range(12):
                key = f"c/{t:02d}/{i:02d}"
                data = os.urandom(1000 + 37 * i + t)
                any_store.put(key, data, exclusive=(i % 2 == 0))
                if any_store.get(key) != data:
                    errors.append(f"{key}: read back different data")
                if any_store.get(key, 10, 20) != data[10:30]:
                    errors.append(f"{key}: ranged read differs")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    keys = [i.key for i in any_store.list("c/")]
    assert len(keys) == 16 * 12
    assert keys == sorted(keys)


def test_local_segment_reads_see_the_object_written_again_or_deleted(local_store, tmp_path):
    """A file:// store keeps its segment objects' files open between reads
    (lsbd.store.openfds): a key it writes again (put, put_file) or deletes
    is read afresh, never from the file of the object it replaced."""
    store = local_store
    key = names.segment_key("vol", 7)
    store.put(key, b"first" * 100)
    assert store.get(key, 5, 5) == b"first"
    assert len(store._kept_open) == 1                # kept open for the next read
    store.put(key, b"again" * 100)
    assert store.get(key, 0, 5) == b"again"
    linked = tmp_path / "sealed"
    linked.write_bytes(b"linked" * 100)
    store.put_file(key, str(linked))
    assert store.get(key, 6, 6) == b"linked"
    store.delete(key)
    with pytest.raises(ObjectNotFound):
        store.get(key, 0, 5)
    store.put(key, b"third" * 100, exclusive=True)
    assert store.get(key, -5) == b"third" and store.get(key) == b"third" * 100
    # Other objects (a lease, a config) are opened for each read: another
    # process may write them again.
    store.put("vol/lease", b"mine")
    assert store.get("vol/lease") == b"mine"
    LocalStore(store.root).put("vol/lease", b"theirs")
    assert store.get("vol/lease") == b"theirs"
    assert len(store._kept_open) == 1
    store.close()
    assert len(store._kept_open) == 0


def test_open_objects_close_a_file_only_once_no_read_holds_it(tmp_path, monkeypatch):
    """The least recently used file is dropped past `kept`, and a file
    dropped (or forgotten) while a read holds it stays open until that read
    gives it back.  A file opened while its key was written again is not
    kept."""
    paths = {}
    for name in "abcd":
        paths[name] = tmp_path / name
        paths[name].write_bytes(name.encode() * 10)
    held = OpenObjects(kept=2)

    def closed(fd: int) -> bool:
        try:
            os.fstat(fd)
            return False
        except OSError:
            return True

    a = held.acquire("a", str(paths["a"]))
    for name in "bc":
        held.release(held.acquire(name, str(paths[name])))
    assert len(held) == 2                              # "a" dropped, but still held
    assert os.pread(a.fd, 3, 0) == b"aaa"
    held.release(a)
    assert closed(a.fd)
    b = held.acquire("b", str(paths["b"]))
    assert held.acquire("b", str(paths["b"])) is b     # one file for both reads
    held.forget("b")
    assert os.pread(b.fd, 3, 0) == b"bbb"
    held.release(b)
    assert not closed(b.fd)
    held.release(b)
    assert closed(b.fd)
    real_open = os.open

    def open_as_it_is_written(path, flags, *args):
        fd = real_open(path, flags, *args)
        held.forget("d")                               # a put of "d" meanwhile
        return fd

    monkeypatch.setattr(openfds.os, "open", open_as_it_is_written)
    d = held.acquire("d", str(paths["d"]))
    monkeypatch.undo()
    assert os.pread(d.fd, 3, 0) == b"ddd"
    held.release(d)
    assert closed(d.fd) and "d" not in held._held
    c = held.acquire("c", str(paths["c"]))
    held.release(c)
    held.close()
    assert closed(c.fd) and len(held) == 0


# --- S3 specifics ----------------------------------------------------------------------


def test_local_put_file_links_the_file_even_an_unnamed_one(local_store, tmp_path):
    """put_file on a file:// store is a hard link, not a copy: of a named
    file, and of an unnamed one (O_TMPFILE) through /proc/self/fd/N, which
    is how a sealed segment's scratch file reaches the store."""
    store = local_store
    named = tmp_path / "segment"
    named.write_bytes(b"named" * 1000)
    store.put_file("vol/seg/1", str(named), exclusive=True)
    assert os.stat(store._path("vol/seg/1")).st_ino == os.stat(named).st_ino
    fd = os.open(tmp_path, os.O_TMPFILE | os.O_RDWR, 0o600)
    try:
        os.write(fd, b"unnamed" * 1000)
        store.put_file("vol/seg/2", f"/proc/self/fd/{fd}", exclusive=True)
        assert os.stat(store._path("vol/seg/2")).st_ino == os.fstat(fd).st_ino
        with pytest.raises(ObjectExists):
            store.put_file("vol/seg/2", f"/proc/self/fd/{fd}", exclusive=True)
    finally:
        os.close(fd)
    assert store.get("vol/seg/2") == b"unnamed" * 1000


def test_will_need_is_a_hint_that_never_fails(any_store):
    any_store.put("a/hinted", b"x" * 1000)
    any_store.will_need("a/hinted", [(0, 100), (-10, None), (990, None), (5000, 10)])
    any_store.will_need("a/missing", [(0, 100)])
    any_store.will_need("../outside", [(0, 100)])
    assert any_store.get("a/hinted", 990) == b"x" * 10


def test_local_will_need_asks_the_kernel_for_each_range(local_store, monkeypatch):
    """A file:// store hands each range (a suffix too) to the kernel, to be
    read now."""
    store = RetryingStore(local_store)
    store.put("seg/1", b"x" * 1000)
    asked: list[tuple[int, int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise",
                        lambda _fd, off, n, advice: asked.append((off, n, advice)))
    store.will_need("seg/1", [(0, 100), (-10, None), (200, None)])
    need = os.POSIX_FADV_WILLNEED
    assert asked == [(0, 100, need), (990, 0, need), (200, 0, need)]


def test_local_will_need_of_a_segment_uses_the_descriptor_its_gets_keep(local_store,
                                                                          monkeypatch):
    """A segment object's descriptor, kept open by its gets, is the one its
    will_need advises through: a hint opens no file of its own."""
    store = RetryingStore(local_store)
    key = names.segment_key("vol", 9)
    store.put(key, b"s" * 5000)
    assert store.get(key, 0, 10) == b"s" * 10
    opened: list[str] = []
    real_open = os.open

    def counting_open(path, *a, **kw):
        opened.append(str(path))
        return real_open(path, *a, **kw)

    asked: list[int] = []
    monkeypatch.setattr(os, "open", counting_open)
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, _off, _n, _advice: asked.append(fd))
    store.will_need(key, [(0, 100), (4000, 1000)])
    assert opened == [] and len(asked) == 2
    assert store.get(key, 4990) == b"s" * 10
    assert opened == []


def test_s3_prefixes_do_not_leak(s3_bucket, moto_server):
    from lsbd.store.s3 import S3Store

    one = S3Store(s3_bucket, "vol", endpoint_url=moto_server)
    other = S3Store(s3_bucket, "vol2", endpoint_url=moto_server)
    root = S3Store(s3_bucket, "", endpoint_url=moto_server)
    one.put("k", b"1")
    other.put("k", b"2")
    assert [i.key for i in one.list()] == ["k"]
    assert one.get("k") == b"1" and other.get("k") == b"2"
    assert [i.key for i in root.list()] == ["vol/k", "vol2/k"]
    assert one.url == f"s3://{s3_bucket}/vol" and root.url == f"s3://{s3_bucket}"


def test_s3_missing_bucket_is_a_clear_store_error(moto_server):
    from lsbd.store.s3 import S3Store

    store = S3Store("no-such-bucket-here", "p", endpoint_url=moto_server)
    for call in (lambda: store.get("k"), lambda: store.head("k"), lambda: store.put("k", b"x"),
                 lambda: list(store.list()), lambda: store.delete("k")):
        with pytest.raises(StoreError) as info:
            call()
        assert not isinstance(info.value, (ObjectNotFound, TransientStoreError))
        assert "no-such-bucket-here" in str(info.value)
        assert "does not exist" in str(info.value)


def test_s3_unreachable_endpoint_fails_fast_and_clearly(monkeypatch):
    from lsbd.store.s3 import S3Store

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSHOULDNOTAPPEAR")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-should-not-appear")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    store = RetryingStore(S3Store("mybucket", "p", endpoint_url="http://127.0.0.1:1"),
                          attempts=2, base_delay=0.01)
    started = time.monotonic()
    with pytest.raises(StoreError) as info:
        store.get("k")
    assert time.monotonic() - started < 15
    message = str(info.value)
    assert "cannot reach" in message and "127.0.0.1:1" in message and "mybucket" in message
    assert "gave up after 2 attempts" in message
    assert "AKIDSHOULDNOTAPPEAR" not in message and "secret-should-not-appear" not in message


def test_s3_missing_credentials_is_a_clear_store_error(moto_server, s3_bucket, monkeypatch, tmp_path):
    from lsbd.store.s3 import S3Store

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = S3Store(s3_bucket, "p", endpoint_url=moto_server)
    with pytest.raises(StoreError) as info:
        store.get("k")
    assert not isinstance(info.value, (ObjectNotFound, TransientStoreError))
    assert "credentials" in str(info.value) and s3_bucket in str(info.value)


def test_s3_endpoint_reaches_subprocesses(s3_url):
    # A CLI run as a subprocess inherits AWS_ENDPOINT_URL and the fake credentials.
    code = f"from lsbd.store import open_store; open_store({s3_url!r}).put('from/child', b'hi')"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert open_store(s3_url).get("from/child") == b"hi"


class _FakeClient:
    """Stands in for the boto3 client: every call raises the given error."""

    def __init__(self, error):
        self.error = error

    def __getattr__(self, name):
        def call(**kwargs):
            raise self.error
        return call


def _s3_failing_with(code, status):
    """An S3Store whose every call fails with this S3 error code and status."""
    from lsbd.store import s3

    store = s3.S3Store("mapbucket", "", endpoint_url="http://127.0.0.1:1")
    store._client = _FakeClient(s3.botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": f"{code} happened"},
         "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"))
    return store


@pytest.mark.parametrize("code,status,expected", [
    ("PreconditionFailed", 412, ObjectExists),
    ("ConditionalRequestConflict", 409, TransientStoreError),
    ("SlowDown", 503, TransientStoreError),
    ("InternalError", 500, TransientStoreError),
    ("AccessDenied", 403, StoreError),
    ("NoSuchBucket", 404, StoreError),
])
def test_s3_error_mapping_for_exclusive_put(code, status, expected):
    store = _s3_failing_with(code, status)
    with pytest.raises(StoreError) as info:
        store.put("k", b"x", exclusive=True)
    assert type(info.value) is expected
    if expected is StoreError:
        assert "mapbucket" in str(info.value)


@pytest.mark.parametrize("code,status,expected", [
    ("NoSuchKey", 404, ObjectNotFound),
    ("SlowDown", 503, TransientStoreError),
    ("ServiceUnavailable", 503, TransientStoreError),
    ("AccessDenied", 403, StoreError),
    ("InvalidAccessKeyId", 403, StoreError),
])
def test_s3_error_mapping_for_get(code, status, expected):
    store = _s3_failing_with(code, status)
    with pytest.raises(StoreError) as info:
        store.get("k")
    assert type(info.value) is expected
    if code == "AccessDenied":
        assert "access denied" in str(info.value) and "mapbucket" in str(info.value)


# --- open_store ---------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["ftp://host/x", "http://example.com/b", "s3://", "s3:///prefix",
                                 "file://host/path"])
def test_open_store_rejects_bad_urls(url):
    with pytest.raises(UserError):
        open_store(url)


def test_open_store_builds_the_right_stores(tmp_path, monkeypatch):
    from lsbd.store.s3 import S3Store

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    from lsbd.crypto.store import SealingStore

    # The chain: sealing (compression, encryption) over retries over the backend.
    store = open_store(f"file://{tmp_path}/st")
    assert isinstance(store, SealingStore) and isinstance(store.inner, RetryingStore)
    assert isinstance(store.inner.inner, LocalStore)
    assert store.url == f"file://{tmp_path}/st"
    plain = open_store(str(tmp_path / "plain"), retry=False, seal=False)
    assert isinstance(plain, LocalStore)
    s3 = open_store("s3://bkt/pre/fix/", endpoint_url="http://127.0.0.1:1", seal=False)
    assert isinstance(s3.inner, S3Store)
    assert (s3.inner.bucket, s3.inner.prefix, s3.url) == ("bkt", "pre/fix/", "s3://bkt/pre/fix")
    assert s3.inner.endpoint_url == "http://127.0.0.1:1"


# --- RetryingStore, driven by FaultyStore ----------------------------------------------------


@pytest.fixture
def faulty(local_store):
    return FaultyStore(local_store)


def _retrying(inner, attempts=4):
    sleeps = []
    store = RetryingStore(inner, attempts=attempts, base_delay=0.01, max_delay=0.05,
                          sleep=sleeps.append)
    return store, sleeps


def test_retry_recovers_from_transient_errors(faulty, caplog):
    store, sleeps = _retrying(faulty)
    faulty.inner.put("k", b"data")
    faulty.fail(op="get", times=2)
    with caplog.at_level(logging.INFO, logger="lsbd.store.retry"):
        assert store.get("k") == b"data"
    assert faulty.calls["get"] == 3
    assert len(sleeps) == 2
    # Each retry is logged (at INFO: a retry that succeeds is not an error).
    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 2 and "get k" in retries[0].getMessage()


def test_retry_reads_several_ranges_again_after_a_transient_error(faulty):
    """A get_ranges that fails part way (here its second range) is retried
    whole, and gives every range."""
    store, sleeps = _retrying(faulty)
    faulty.inner.put("k", b"0123456789")
    faulty.fail(op="get", times=1, after=1)
    assert store.get_ranges("k", [(0, 2), (5, 3), (9, 5)]) == [b"01", b"567", b"9"]
    assert faulty.calls["get"] == 5 and len(sleeps) == 1


def test_a_slow_failed_attempt_is_retried_with_a_warning(faulty, caplog):
    """A store that takes connections and never answers fails each attempt
    only at the read timeout: the user hears why the command waits."""
    ticks = iter(range(0, 10_000, 30))      # every look at the clock: 30 s later
    store = RetryingStore(faulty, attempts=3, base_delay=0.01, sleep=lambda s: None,
                          clock=lambda: next(ticks))
    faulty.inner.put("k", b"data")
    faulty.fail(op="get", times=1)
    with caplog.at_level(logging.INFO, logger="lsbd.store.retry"):
        assert store.get("k") == b"data"
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "get k failed after 30s" in warned[0].getMessage()
    assert "retry 1/2" in warned[0].getMessage()


def test_a_quick_failed_attempt_is_retried_quietly(faulty, caplog):
    store, _ = _retrying(faulty)
    faulty.inner.put("k", b"data")
    faulty.fail(op="get", times=1)
    with caplog.at_level(logging.INFO, logger="lsbd.store.retry"):
        assert store.get("k") == b"data"
    assert [r.levelno for r in caplog.records if "retry" in r.getMessage()] == [logging.INFO]


def test_retry_gives_up_after_n_attempts(faulty):
    store, sleeps = _retrying(faulty, attempts=3)
    faulty.fail(op="head", times=None)
    with pytest.raises(TransientStoreError) as info:
        store.head("k")
    assert faulty.calls["head"] == 3
    assert len(sleeps) == 2
    assert "gave up after 3 attempts" in str(info.value)
    assert "injected fault: head k" in str(info.value)


class _SilentStore:
    """A store whose every head fails after `took` seconds of a fake clock."""

    def __init__(self, took: float):
        self.now = 0.0
        self.took = took
        self.calls = 0
        self.lists_etags = self.seals_objects = False
        self.url = "silent://"

    def head(self, key):
        self.calls += 1
        self.now += self.took
        raise TransientStoreError(f"head {key}: read timeout")


@pytest.mark.parametrize("took, attempts", [(5.0, 2), (60.0, 1), (0.2, 5)])
def test_retry_within_gives_up_on_a_request_failing_that_long(took, attempts):
    """A store that takes requests and never answers (5 s a small request,
    60 s a segment's transfer) gets two attempts, or one, within 8 s; quick
    failures (a refused connection) still get all five."""
    inner = _SilentStore(took)
    store = RetryingStore(inner, attempts=5, retry_within=8.0,  # type: ignore[arg-type]
                          sleep=lambda s: None, clock=lambda: inner.now)
    with pytest.raises(TransientStoreError) as info:
        store.head("k")
    assert inner.calls == attempts
    tries = "1 attempt" if attempts == 1 else f"{attempts} attempts"
    assert f"(gave up after {tries})" in str(info.value)


def test_retry_without_a_time_bound_makes_every_attempt():
    inner = _SilentStore(60.0)
    store = RetryingStore(inner, attempts=5, sleep=lambda s: None,  # type: ignore[arg-type]
                          clock=lambda: inner.now)
    with pytest.raises(TransientStoreError):
        store.head("k")
    assert inner.calls == 5


def test_retry_never_retries_permanent_errors(faulty):
    store, sleeps = _retrying(faulty)
    faulty.fail(op="put", error=StoreError)
    with pytest.raises(StoreError) as info:
        store.put("k", b"x")
    assert not isinstance(info.value, TransientStoreError)
    assert faulty.calls["put"] == 1
    with pytest.raises(ObjectNotFound):
        store.get("missing")
    assert faulty.calls["get"] == 1
    store.put("k", b"x")
    with pytest.raises(ObjectExists):
        store.put("k", b"x", exclusive=True)   # no unknown outcome: not even compared
    assert faulty.calls["get"] == 1
    assert sleeps == []


def test_retry_backoff_grows_and_is_capped(faulty):
    sleeps = []
    store = RetryingStore(faulty, attempts=8, base_delay=0.1, max_delay=0.5, sleep=sleeps.append)
    faulty.fail(op="delete", times=7)
    store.delete("k")
    assert len(sleeps) == 7
    for retry, pause in enumerate(sleeps, start=1):
        full = min(0.5, 0.1 * 2 ** (retry - 1))
        assert full / 2 <= pause <= full
    assert max(sleeps) <= 0.5


def test_retry_list_restarts_the_listing(faulty):
    store, _ = _retrying(faulty)
    for key in ["x/1", "x/2", "x/3"]:
        faulty.inner.put(key, b"1")
    faulty.fail(op="list", times=1)
    assert [i.key for i in store.list("x/")] == ["x/1", "x/2", "x/3"]
    assert faulty.calls["list"] == 2


def test_exclusive_put_after_unknown_outcome_counts_our_own_object(faulty):
    store, _ = _retrying(faulty)
    # The first put lands in the store but its reply is lost (a transient error).
    faulty.fail(op="put", lose_reply=True)
    store.put("seg/1", b"segment data", exclusive=True)
    assert faulty.calls["put"] == 2           # the retry got ObjectExists...
    assert faulty.calls["get"] == 1           # ...so it compared the stored object
    assert faulty.inner.get("seg/1") == b"segment data"


def test_exclusive_put_after_unknown_outcome_still_fails_on_other_content(faulty):
    store, _ = _retrying(faulty)
    faulty.inner.put("seg/1", b"someone else's segment")
    faulty.fail(op="put", times=1)            # transient, outcome unknown to the caller
    with pytest.raises(ObjectExists):
        store.put("seg/1", b"our segment", exclusive=True)
    assert faulty.calls["put"] == 2 and faulty.calls["get"] == 1
    assert faulty.inner.get("seg/1") == b"someone else's segment"


def test_retrying_store_forwards_url_and_attributes(faulty):
    store = RetryingStore(faulty)
    assert store.url == faulty.inner.url
    store.put("a", b"1")
    assert store.calls["put"] == 1            # FaultyStore's counter, through the wrapper
    assert "RetryingStore" in repr(store)


# --- FaultyStore itself ------------------------------------------------------------------------


def test_faulty_after_times_and_key_prefix(faulty):
    faulty.fail(op="put", key_prefix="seg/", after=2, times=1, error=StoreError)
    faulty.put("seg/1", b"1")
    faulty.put("other/1", b"1")               # does not match the prefix
    faulty.put("seg/2", b"2")
    with pytest.raises(StoreError):
        faulty.put("seg/3", b"3")             # the third matching put
    faulty.put("seg/4", b"4")                 # the rule is used up
    assert [i.key for i in faulty.list("seg/")] == ["seg/1", "seg/2", "seg/4"]
    assert faulty.calls["put"] == 5 and faulty.faults_injected == 1
    assert faulty.bytes_put == 5


def test_faulty_corrupt_next_get(faulty):
    data = bytes(100)
    faulty.put("k", data)
    faulty.corrupt_next_get()
    bad = faulty.get("k")
    assert len(bad) == len(data) and bad != data
    assert sum(a != b for a, b in zip(bad, data)) == 1
    assert faulty.get("k") == data            # only the next one
    assert faulty.bytes_got == 200


def test_faulty_drop_puts_after_simulates_a_dead_network(faulty):
    store, sleeps = _retrying(faulty)
    faulty.drop_puts_after(2)
    store.put("a", b"1")
    store.put("b", b"2")
    for _ in range(2):
        with pytest.raises(StoreError) as info:
            store.put("c", b"3")
        assert not isinstance(info.value, TransientStoreError)
    assert store.get("a") == b"1"             # reads still work
    assert sleeps == []                       # a permanent error is not retried
    faulty.heal()
    store.put("c", b"3")
    assert [i.key for i in store.list()] == ["a", "b", "c"]


def test_faulty_rejects_unknown_ops(faulty):
    with pytest.raises(ValueError):
        faulty.fail(op="rename")


class _Telling(LocalStore):
    """A local store that says it tags its listings and seals objects, and
    notes the calls that reach it which it may do its own way."""

    lists_etags = True
    seals_objects = True

    def __init__(self, root: str):
        super().__init__(root)
        self.reached: list[tuple] = []

    def put_file(self, key, path, *, exclusive=False, length=None):
        self.reached.append(("put_file", key, exclusive, length))
        super().put_file(key, path, exclusive=exclusive, length=length)

    def get_tail(self, key, n, *, stored_size=None):
        self.reached.append(("get_tail", key, n, stored_size))
        return super().get_tail(key, n, stored_size=stored_size)

    def exists(self, key):
        self.reached.append(("exists", key))
        return super().exists(key)

    def will_need(self, key, ranges):
        self.reached.append(("will_need", key, ranges))

    def layout_raw(self, key):
        self.reached.append(("layout_raw", key))
        return b"raw"

    def prime_layout(self, key, raw, stored_size):
        self.reached.append(("prime_layout", key, raw, stored_size))
        return 7


def test_faulty_passes_on_what_its_inner_store_does(tmp_path):
    """The wrapper tells what its inner store can do and passes on every
    call the inner store may make its own way, so that a test through it
    takes the store's paths (a file:// store links a segment file, a
    sealing store seals it in its worker and keeps its layout, a listing's
    ETags bring the map summary); those that reach the store are counted,
    and fail, as puts, gets and heads.  Its object_file stays None: reads
    go through it, not through a link (lsbd.segments.copies)."""
    inner = _Telling(str(tmp_path / "store"))
    store = FaultyStore(inner)
    assert store.lists_etags and store.seals_objects
    src = tmp_path / "segment"
    src.write_bytes(b"0123456789")
    store.put_file("s/1", str(src), exclusive=True, length=10)
    assert store.get_tail("s/1", 4, stored_size=10) == b"6789"
    assert store.exists("s/1") and not store.exists("s/2")
    store.will_need("s/1", [(0, 4)])
    assert store.layout_raw("s/1") == b"raw"
    assert store.prime_layout("s/1", b"raw", 10) == 7
    assert inner.reached == [("put_file", "s/1", True, 10), ("get_tail", "s/1", 4, 10),
                             ("exists", "s/1"), ("exists", "s/2"), ("will_need", "s/1", [(0, 4)]),
                             ("layout_raw", "s/1"), ("prime_layout", "s/1", b"raw", 10)]
    assert store.calls == {"put": 1, "get": 1, "head": 2}
    assert (store.bytes_put, store.bytes_got) == (10, 4)
    assert store.object_file("s/1") is None and inner.object_file("s/1") is not None
    store.fail(op="put")
    with pytest.raises(TransientStoreError):
        store.put_file("s/3", str(src))
    store.fail(op="get")
    with pytest.raises(TransientStoreError):
        store.get_tail("s/1", 4)
    store.fail(op="head", error=ObjectNotFound)
    assert not store.exists("s/1")          # as Store.exists takes a head's ObjectNotFound
    assert not inner.exists("s/3")
