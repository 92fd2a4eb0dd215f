"""S3-compatible servers that are not AWS: ranges ignored or cut short,
conditional creates ignored, PUT bodies over HTTPS.  lsbd must read and
write correctly on all of them (issue #17)."""

from __future__ import annotations

import json
import random
import subprocess
import time

import pytest
from conftest import S3RVER_KEY, create_bucket, start_s3rver, stop
from engine_helpers import (
    BS,
    MiB,
    block,
    blocks,
    fenced_writer,
    open_test_store,
    read_all,
    read_from_store,
    wipe,
)
from s3_quirks import NO_CONDITIONAL, NO_RANGE, SHORT_RANGE

from lsbd import names
from lsbd.meta.config import create_volume
from lsbd.meta.lease import Lease
from lsbd.engine.volume import Volume
from lsbd.errors import LeaseHeld, StoreError
from lsbd.store import settle as settle_mod
from lsbd.store.faulty import FaultyStore
from lsbd.store.local import LocalStore
from lsbd.store.s3 import S3Store

QUIRKY_RANGES = pytest.mark.parametrize("quirky_s3_url", [NO_RANGE, SHORT_RANGE], indirect=True)


@QUIRKY_RANGES
def test_ranged_reads_when_the_server_ignores_or_cuts_the_range(quirky_s3_url):
    store = open_test_store(quirky_s3_url)
    data = bytes(range(256)) * 40  # 10240 bytes
    store.put("obj", data)
    assert store.get("obj", 100, 50) == data[100:150]
    assert store.get("obj", 0, 1) == data[:1]
    assert store.get("obj", 5) == data[5:]
    assert store.get("obj", 10000, 1000) == data[10000:]
    assert store.get("obj", 10240) == b""
    assert store.get("obj", 20000, 10) == b""
    assert store.get("obj", -100) == data[-100:]
    assert store.get("obj", -20000) == data
    big = random.Random(3).randbytes(3 * MiB + 17)
    store.put("big", big)
    assert store.get("big", 1 * MiB + 5, 1 * MiB) == big[1 * MiB + 5:2 * MiB + 5]
    assert store.get("big", -80) == big[-80:]
    store.put("empty", b"")
    assert store.get("empty", 0, 10) == b"" and store.get("empty", -4) == b""
    store.close()


@QUIRKY_RANGES
def test_cache_loss_round_trip_when_the_server_ignores_or_cuts_ranges(quirky_s3_url, tmp_path):
    store = open_test_store(quirky_s3_url)
    create_volume(store, "vol", 16 * MiB, segment_size=1 * MiB)
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "w"))
    rng = random.Random(7)
    for tag in range(40):
        n = rng.randint(1, 40)
        lba = rng.randrange(0, 16 * MiB // BS - n)
        vol.write(lba * BS, blocks(tag, lba, n))
    expected = read_all(vol)
    vol.close()
    try:
        assert read_from_store(store, tmp_path / "r") == expected
    finally:
        store.close()


def test_s3rver_suffix_ranges_are_not_trusted(s3rver_url):
    """s3rver answers `bytes=-N` with the object's first N+1 bytes; the store
    notices from Content-Range and reads the tail explicitly."""
    store = open_test_store(s3rver_url)
    data = random.Random(5).randbytes(200_000)
    store.put("obj", data)
    assert store.get("obj", -80) == data[-80:]
    assert store.get("obj", 0, 1) == data[:1]     # s3rver sends it all for bytes=0-0
    store.close()


# --- checksums of PUT bodies ------------------------------------------------------------


def test_checksums_only_when_required_for_endpoints_that_are_not_aws(monkeypatch):
    monkeypatch.delenv("AWS_REQUEST_CHECKSUM_CALCULATION", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)

    def setting(**kw) -> str:
        store = S3Store("bucket", "p", **kw)
        try:
            return store._client.meta.config.request_checksum_calculation
        finally:
            store.close()

    assert setting(endpoint_url="http://127.0.0.1:9000") == "when_required"
    assert setting(endpoint_url="https://minio.example.net") == "when_required"
    assert setting() == "when_supported"                      # AWS itself
    assert setting(endpoint_url="https://s3.eu-west-1.amazonaws.com") == "when_supported"
    assert setting(endpoint_url="http://127.0.0.1:9000", checksums="when_supported") \
        == "when_supported"
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_supported")
    assert setting(endpoint_url="http://127.0.0.1:9000") == "when_supported"  # the user's word
    with pytest.raises(StoreError):
        S3Store("bucket", "p", endpoint_url="http://127.0.0.1:9000", checksums="always")


def test_the_endpoint_from_the_environment_s3s_own_variable_first(monkeypatch):
    """AWS_ENDPOINT_URL_S3 wins over AWS_ENDPOINT_URL, as in AWS's own
    tools, whichever way the store is opened; an explicit endpoint wins
    over both."""
    from lsbd.store.open import open_store

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9001")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9002")
    for store in (S3Store("bucket", "p"), open_store("s3://bucket/p", retry=False, seal=False)):
        try:
            assert store.endpoint_url == "http://127.0.0.1:9002"
        finally:
            store.close()
    store = open_store("s3://bucket/p", endpoint_url="http://127.0.0.1:9003", retry=False,
                       seal=False)
    assert store.endpoint_url == "http://127.0.0.1:9003"
    store.close()
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    store = open_store("s3://bucket/p", retry=False, seal=False)
    assert store.endpoint_url == "http://127.0.0.1:9001"
    store.close()



def test_small_puts_go_without_waiting_for_100_continue(s3_bucket, moto_server):
    """botocore asks every PutObject to wait for the server's "100 Continue"
    before its body: a round trip more for the lease, the probe and the
    config.  Only a large body still asks; every put lands, and a refused
    conditional create is still ObjectExists."""
    from lsbd.errors import ObjectExists
    from lsbd.store.s3 import EXPECT_CONTINUE_MIN

    store = S3Store(s3_bucket, "p", endpoint_url=moto_server)
    sent: dict[str, str | None] = {}

    def record(request, **kwargs):
        if request.method == "PUT":
            sent[request.url.rsplit("/", 1)[1]] = request.headers.get("Expect")

    store._client.meta.events.register("before-send.s3", record)
    try:
        large = random.Random(1).randbytes(EXPECT_CONTINUE_MIN)
        store.put("lease", b"{}", exclusive=True)
        store.put("small", large[:EXPECT_CONTINUE_MIN - 1])
        store.put("large", large)
        with pytest.raises(ObjectExists):
            store.put("lease", b"{}", exclusive=True)
        assert sent.pop("conditional-create", None) is None    # the probe's, if this one asked
        assert sent == {"lease": None, "small": None, "large": b"100-continue"}
        assert store.get("small") == large[:-1] and store.get("large") == large
        assert store.get("lease") == b"{}"
    finally:
        store.close()

@pytest.fixture(scope="module")
def s3rver_tls(tmp_path_factory):
    """s3rver over HTTPS, with a certificate made for 127.0.0.1: (endpoint, CA file)."""
    folder = tmp_path_factory.mktemp("s3rver-tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    proc, port = start_s3rver(folder / "data", "--key", str(key), "--cert", str(cert))
    try:
        yield f"https://127.0.0.1:{port}", str(cert)
    finally:
        stop(proc)


def _fails_after(call) -> float:
    """Seconds until `call` fails with a store error."""
    from lsbd.errors import TransientStoreError

    began = time.monotonic()
    with pytest.raises(TransientStoreError):
        call()
    return time.monotonic() - began


def test_a_stalled_store_fails_small_requests_soon_and_large_transfers_later(
        s3_bucket, moto_server):
    """A store that takes requests and never answers: a small request (HEAD,
    LIST, DELETE, a small PUT or GET, a whole object read) gives up at the
    short read timeout; a segment's transfer (a PUT or ranged GET of more than
    LARGE_TRANSFER bytes) waits the long one.  A slow but healthy store's
    large PUT, answered after longer than the short timeout, still lands."""
    from fault_helpers import CuttableProxy

    from lsbd.store.s3 import LARGE_TRANSFER

    proxy = CuttableProxy(moto_server)
    store = S3Store(s3_bucket, "p", endpoint_url=proxy.url, read_timeout=4,
                    small_read_timeout=1)
    large = random.Random(2).randbytes(LARGE_TRANSFER + 4096)
    try:
        store.put("small", b"x")
        store.put("large", large)
        proxy.set_stalled(True)
        small = {"head": lambda: store.head("small"), "get": lambda: store.get("small"),
                 "get whole": lambda: store.get("large"),
                 "get a block": lambda: store.get("large", 4096, 4096),
                 "get a tail": lambda: store.get("large", -64),
                 "list": lambda: list(store.list("")), "put": lambda: store.put("s2", b"y"),
                 "delete": lambda: store.delete("small")}
        for what, call in small.items():
            took = _fails_after(call)
            assert 0.8 < took < 2.5, f"{what} gave up after {took:.1f}s"
        for what, call in {"put": lambda: store.put("l2", large),
                           "ranged get": lambda: store.get("large", 0, len(large))}.items():
            took = _fails_after(call)
            assert 3.5 < took < 7, f"large {what} gave up after {took:.1f}s"
        # Slow but healthy: every answer comes 2 s late, past the short
        # timeout but not the long one.
        proxy.set_stalled(False)
        proxy.answer_delay = 2
        store.put("l3", large)
        assert _fails_after(lambda: store.head("l3")) < 2.5
        proxy.answer_delay = 0
        assert store.get("l3") == large
    finally:
        proxy.set_stalled(False)
        store.close()
        proxy.close()


def test_puts_over_https_store_the_bytes_not_a_chunked_body(s3rver_tls, monkeypatch, tmp_path):
    """boto3 sends PUT bodies over HTTPS as aws-chunked with a trailing
    checksum by default; s3rver stores that framing as the object (other
    servers refuse it with 411).  lsbd's client must send plain bodies."""
    endpoint, ca = s3rver_tls
    monkeypatch.setenv("AWS_CA_BUNDLE", ca)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3RVER_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3RVER_KEY)
    monkeypatch.delenv("AWS_REQUEST_CHECKSUM_CALCULATION", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    create_bucket(endpoint, "lsbd-tls", ca=ca)
    store = open_test_store("s3://lsbd-tls/p")
    store.put("hello", b"hello world")
    assert store.get("hello") == b"hello world"
    create_volume(store, "vol", 4 * MiB, segment_size=1 * MiB)
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "w"))
    vol.write(0, block(1, 0))
    vol.close()
    try:
        assert read_from_store(store, tmp_path / "r", 0, BS) == block(1, 0)
    finally:
        store.close()


# --- stores that ignore conditional creates -----------------------------------------------


@pytest.fixture
def blind_store(tmp_path, monkeypatch):
    """A store whose exclusive puts overwrite, and that says so."""
    monkeypatch.setattr(settle_mod, "SETTLE_SECONDS", 0.05)
    store = FaultyStore(LocalStore(str(tmp_path / "store")))
    store.ignore_conditions()
    assert not store.conditional_writes
    return store


@pytest.mark.parametrize("quirky_s3_url", [NO_CONDITIONAL], indirect=True)
def test_servers_that_ignore_conditional_creates_are_detected(quirky_s3_url, s3_url):
    plain = open_test_store(quirky_s3_url)
    assert not plain.conditional_writes
    plain.put("x", b"1", exclusive=True)
    with pytest.raises(FileExistsError):   # looked for first
        plain.put("x", b"2", exclusive=True)
    assert plain.get("x") == b"1"
    plain.close()
    honest = open_test_store(s3_url)
    assert honest.conditional_writes
    honest.close()


def test_a_second_writer_is_refused_without_conditional_creates(blind_store, tmp_path):
    create_volume(blind_store, "vol", 4 * MiB)
    first = Volume.open(blind_store, "vol", cache_root=str(tmp_path / "a"))
    try:
        with pytest.raises(LeaseHeld):
            Volume.open(blind_store, "vol", cache_root=str(tmp_path / "b"))
        first.write(0, block(1, 0))
        first.flush_to_store()   # the refused writer did not take the lease from it
    finally:
        first.close()


def test_an_upload_that_reads_back_wrong_at_first_is_not_taken_for_another_writer(
        blind_store, tmp_path):
    """s3rver acknowledges a PUT before the object is whole on its disk, so
    the read-back of a segment's trailer can miss it once; only a trailer
    that stays foreign stops the writer."""
    create_volume(blind_store, "vol", 4 * MiB)
    vol = Volume.open(blind_store, "vol", cache_root=str(tmp_path / "a"))
    try:
        blind_store.corrupt_next_get(2, key_prefix=names.segment_prefix("vol"))
        vol.write(0, block(1, 0))
        vol.flush_to_store()
        vol.write(BS, block(2, 1))
        vol.flush_to_store()          # still ours: the writer did not stop
    finally:
        vol.close()
    wipe(tmp_path / "r")
    assert read_from_store(blind_store, tmp_path / "r", 0, 2 * BS) == block(1, 0) + block(2, 1)


def test_a_new_lease_is_read_back_only_once_a_racing_put_has_landed(blind_store, monkeypatch):
    """A rival's lease put that lands a moment after ours replaces it (the
    later put wins): the read-back must come after the store settled, or
    both writers would find their own token."""
    monkeypatch.setattr(settle_mod, "SETTLE_SECONDS", 0.5)
    key = names.lease_key("vol")
    rival = json.dumps({"host": "elsewhere", "pid": 1, "since": 0.0, "token": "rival"}).encode()
    landing = {"at": float("inf")}       # when the rival's put shows
    real_put, real_get = blind_store.put, blind_store.get

    def put(k, data, *, exclusive=False):
        real_put(k, data, exclusive=exclusive)
        if k == key and data != rival and landing["at"] == float("inf"):
            landing["at"] = time.monotonic() + settle_mod.SETTLE_SECONDS / 2

    def get(k, *args, **kw):
        if k == key and time.monotonic() >= landing["at"]:
            landing["at"] = float("nan")      # lands once
            real_put(key, rival)
        return real_get(k, *args, **kw)

    monkeypatch.setattr(blind_store, "put", put)
    monkeypatch.setattr(blind_store, "get", get)
    with pytest.raises(LeaseHeld, match="elsewhere"):
        Lease.acquire(blind_store, "vol")


def test_racing_writers_without_conditional_creates_one_wins(blind_store, tmp_path):
    """Two writers that both find no lease both put theirs: the read-back
    lets exactly one through."""
    create_volume(blind_store, "vol", 4 * MiB)
    results: list = []

    def open_one(i):
        try:
            results.append(Volume.open(blind_store, "vol", cache_root=str(tmp_path / f"w{i}")))
        except LeaseHeld as e:
            results.append(e)

    import threading

    threads = [threading.Thread(target=open_one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    opened = [r for r in results if isinstance(r, Volume)]
    try:
        assert len(opened) == 1, results
    finally:
        for v in opened:
            v.close()


def test_a_fenced_writer_cannot_get_segments_into_the_volume_without_conditional_creates(
        blind_store, tmp_path, monkeypatch):
    """The old writer's lease is broken; the store would let its uploads
    overwrite the new writer's segments.  It checks its lease first and stops."""
    store = blind_store
    old = fenced_writer(store, tmp_path, monkeypatch)
    try:
        new = Volume.open(store, "vol", cache_root=str(tmp_path / "new"))  # holds the lease
        with pytest.raises(StoreError):
            old.write(BS, block(3, 1))
            old.flush()                                        # would be segment 2 again
    finally:
        old.abandon()
    time.sleep(0.3)
    try:
        assert new.read(0, 2 * BS) == block(2, 0) + bytes(BS)
    finally:
        new.close()
    wipe(tmp_path / "r")
    assert read_from_store(store, tmp_path / "r", 0, 2 * BS) == block(2, 0) + bytes(BS), \
        "the fenced writer's segment replaced the new writer's"
