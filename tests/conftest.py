"""Shared test fixtures."""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

# The shared helpers (tests/support) are imported by module name from every tier.
_sys.path.insert(0, str(_Path(__file__).resolve().parent / "support"))

# numpy imported whole before any test runs: lsbd.numpyload imports it in a
# thread of its own, and hypothesis looks at sys.modules["numpy"] while it
# draws examples, where a half-done import has no `ndarray` yet (a model
# test failed with "partially initialized module 'numpy'").
import numpy  # noqa: F401

import logging
import os
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from s3_quirks import S3Quirks

# --- S3 over real HTTP: a moto server ------------------------------------------------

_FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_AWS_ENV_TO_CLEAR = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE",
                     "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL_S3")


class _AtomicConditionalPuts:
    """WSGI middleware: run conditional PUTs (If-None-Match) one at a time.

    moto checks "does the key exist?" and then stores the object as two steps
    with no lock between them, so two racing creators could both win there,
    unlike on S3 where a conditional create is atomic.  Serializing those
    requests makes moto behave like S3 for our race tests; other requests
    still run concurrently."""

    def __init__(self, app):
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        if environ.get("REQUEST_METHOD") == "PUT" and environ.get("HTTP_IF_NONE_MATCH"):
            with self.lock:
                return self.app(environ, start_response)
        return self.app(environ, start_response)


@pytest.fixture(scope="session")
def moto_server():
    """A moto S3 server over real HTTP on 127.0.0.1 (a free port), for the whole
    session.  Sets fake AWS credentials in the environment; yields the endpoint URL."""
    from moto.moto_server.werkzeug_app import (DomainDispatcherApplication, MotoRequestHandler,
                                               create_backend_app)
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log per request
    mp = pytest.MonkeyPatch()
    for name, value in _FAKE_AWS_ENV.items():
        mp.setenv(name, value)
    for name in _AWS_ENV_TO_CLEAR:
        mp.delenv(name, raising=False)
    app = S3Quirks(_AtomicConditionalPuts(DomainDispatcherApplication(create_backend_app)))
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, name="moto-server", daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()
        mp.undo()


def _http(method: str, url: str) -> None:
    with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=30) as r:
        r.read()


@pytest.fixture
def s3_bucket(moto_server, monkeypatch):
    """A fresh, empty bucket on the moto server; removed afterwards.

    Exports AWS_ENDPOINT_URL, so `lsbd --store s3://...` run as a subprocess in
    the test reaches the moto server too (the fake credentials are already in
    the environment)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    name = "lsbd-test-" + uuid.uuid4().hex[:16]
    _http("PUT", f"{moto_server}/{name}")
    yield name
    try:
        from lsbd.store.s3 import S3Store

        store = S3Store(name, "", endpoint_url=moto_server)
        for info in list(store.list()):
            store.delete(info.key)
        store.close()
        _http("DELETE", f"{moto_server}/{name}")
    except Exception:  # noqa: BLE001 - cleanup only; the server dies with the session
        pass


@pytest.fixture
def quirky_s3_url(request, moto_server, monkeypatch):
    """A store URL in a fresh moto bucket with one of the quirks of
    tests/support/s3_quirks.py: the test names it with indirect parametrization
    (NO_RANGE, SHORT_RANGE or NO_CONDITIONAL)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    name = request.param + uuid.uuid4().hex[:16]
    _http("PUT", f"{moto_server}/{name}")
    return f"s3://{name}/lsbd-test"


@pytest.fixture
def s3_url(s3_bucket):
    """A store URL in a fresh bucket, with a prefix."""
    return f"s3://{s3_bucket}/lsbd-test"


# --- a second S3 implementation: s3rver (npm, installed by `make nodedeps`) -------------

REPO = Path(__file__).resolve().parent.parent
S3RVER = Path(os.environ.get("LSBD_S3RVER") or REPO / ".node" / "node_modules" / ".bin" / "s3rver")
S3RVER_KEY = "S3RVER"   # s3rver's built-in account: access key id and secret alike


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"s3rver exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"s3rver did not listen on port {port} within {timeout} s")


def start_s3rver(data_dir: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    """Start s3rver on a free port of 127.0.0.1; (process, port)."""
    if not S3RVER.exists():
        if os.environ.get("CI"):
            pytest.fail(f"s3rver is not installed at {S3RVER}: run `make nodedeps`")
        pytest.skip("s3rver is not installed (make nodedeps)")
    port = _free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([str(S3RVER), "-d", str(data_dir), "-a", "127.0.0.1", "-p", str(port),
                             "-s", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_port(port, proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, port


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def s3rver_server(tmp_path_factory):
    """s3rver over real HTTP on 127.0.0.1 (a free port) for the whole session;
    yields the endpoint URL.  It honours neither suffix ranges nor
    If-None-Match: the store and the engine must not depend on either."""
    proc, port = start_s3rver(tmp_path_factory.mktemp("s3rver"))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def create_bucket(endpoint: str, name: str, key: str = S3RVER_KEY, ca: str | None = None) -> None:
    import boto3
    import botocore.config

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key,
                          aws_secret_access_key=key, region_name="us-east-1", verify=ca,
                          config=botocore.config.Config(s3={"addressing_style": "path"}))
    client.create_bucket(Bucket=name)
    client.close()


@pytest.fixture
def s3rver_url(s3rver_server, monkeypatch):
    """A store URL in a fresh s3rver bucket, with a prefix.  Sets s3rver's
    credentials and endpoint in the environment (for subprocesses too)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3RVER_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3RVER_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in _AWS_ENV_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3rver_server)
    name = "lsbd-test-" + uuid.uuid4().hex[:16]
    create_bucket(s3rver_server, name)
    return f"s3://{name}/lsbd-test"


# The tests that also run against s3rver: the store contract, the lease, and
# recovery from the store alone (the round trip after a lost cache dir).
# s3rver is slow and breaks under some concurrent loads (a LIST while objects
# are deleted fails with InternalError), so the rest run on file and moto.
S3RVER_MODULES = frozenset({"test_store_contract", "test_recovery", "test_lease"})


def pytest_generate_tests(metafunc):
    if "store_url" in metafunc.fixturenames:
        kinds = ["file", "s3"]
        if metafunc.module.__name__ in S3RVER_MODULES:
            kinds.append("s3rver")
        metafunc.parametrize("store_url", kinds, indirect=True)


@pytest.fixture
def store_url(request, tmp_path):
    """A fresh, empty store URL of each kind: file:///.../store, s3://bucket/prefix
    on moto, and (for S3RVER_MODULES) the same on s3rver."""
    if request.param == "file":
        return "file://" + str(tmp_path / "store")
    if request.param == "s3rver":
        return request.getfixturevalue("s3rver_url")
    return request.getfixturevalue("s3_url")


@pytest.fixture
def any_store(store_url):
    """An opened store (as open_store builds it, with retries) for each kind."""
    from lsbd.store import open_store

    endpoint = os.environ.get("AWS_ENDPOINT_URL") if store_url.startswith("s3://") else None
    store = open_store(store_url, endpoint_url=endpoint)
    yield store
    store.close()


# --- a volume to test on ------------------------------------------------------------

@pytest.fixture
def store_path(tmp_path):
    return "file://" + str(tmp_path / "store")


@pytest.fixture
def store(store_path):
    from engine_helpers import open_test_store

    s = open_test_store(store_path)
    yield s
    s.close()


@pytest.fixture
def in_page_cache():
    """in_page_cache(*paths): each file's pages read into the page cache and
    kept there, mapped, until the test ends, for the nowait reads
    (RWF_NOWAIT) that must find them.  The kernel drops no mapped page for
    a drop_caches, which benchmarks beside the suite write (after a sync)
    for their cold reads: a page read in and left unmapped, or written and
    synced, may be gone by the next line.  Pages a file gains later are not
    held."""
    import mmap

    held: list[mmap.mmap] = []

    def hold(*paths) -> None:
        for path in paths:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    continue
                pages = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
            held.append(pages)
            for i in range(0, len(pages), mmap.PAGESIZE):
                pages[i]        # the read is what brings the page in

    yield hold
    for pages in held:
        pages.close()


@pytest.fixture
def make_volume(store, tmp_path):
    """make_volume(**settings) -> an open writer on a new 64 MiB volume "vol"
    (closed after the test).  A test module's own `store` fixture overrides
    the file store here."""
    from lsbd.engine.volume import Volume
    from lsbd.meta.config import create_volume

    opened = []

    def make(size=64 * 1024 * 1024, *, store_=None, open_kw=None, **settings):
        s = store_ or store
        create_volume(s, "vol", size, **settings)
        vol = Volume.open(s, "vol", cache_root=str(tmp_path / "cache"), **(open_kw or {}))
        opened.append(vol)
        return vol

    yield make
    for vol in opened:
        try:
            vol.close()
        except Exception as e:  # noqa: BLE001 - cleanup; the test already reported
            print(f"closing the volume after the test failed: {e}")
