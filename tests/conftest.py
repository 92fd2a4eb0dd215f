"""Shared test fixtures."""

from __future__ import annotations

import logging
import os
import threading
import urllib.request
import uuid

import pytest

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
    app = _AtomicConditionalPuts(DomainDispatcherApplication(create_backend_app))
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
def s3_url(s3_bucket):
    """A store URL in a fresh bucket, with a prefix."""
    return f"s3://{s3_bucket}/lsbd-test"


@pytest.fixture(params=["file", "s3"])
def store_url(request, tmp_path):
    """A fresh, empty store URL of each kind: file:///.../store and s3://bucket/prefix."""
    if request.param == "file":
        return "file://" + str(tmp_path / "store")
    return request.getfixturevalue("s3_url")


@pytest.fixture
def any_store(store_url):
    """An opened store (as open_store builds it, with retries) for each kind."""
    from lsbd.store import open_store

    endpoint = os.environ.get("AWS_ENDPOINT_URL") if store_url.startswith("s3://") else None
    store = open_store(store_url, endpoint_url=endpoint)
    yield store
    store.close()
