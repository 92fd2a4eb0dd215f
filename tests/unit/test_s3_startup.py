"""Setting up an S3 client stays light (#17): every `lsbd` command that
talks to S3, and every mount's attach, pays for it before its first request.
Run in a fresh interpreter, since the test process has imported everything."""

import json
import subprocess
import sys

PROBE = r"""
import json, os, sys
listed = []
real_listdir = os.listdir
def listdir(path="."):
    listed.append(os.fspath(path))
    return real_listdir(path)
os.listdir = listdir
from lsbd.store.s3 import S3Store
store = S3Store("bucket", endpoint_url="http://127.0.0.1:9")
import botocore, botocore.httpsession, ssl
data = os.path.join(os.path.dirname(botocore.__file__), "data")
shim_loaded = "urllib3.contrib.pyopenssl" in sys.modules
openssl_loaded = "OpenSSL" in sys.modules
import urllib3.contrib.pyopenssl  # still importable: the block was lifted
print(json.dumps({
    "shim_loaded": shim_loaded, "openssl_loaded": openssl_loaded,
    "stdlib_context": botocore.httpsession.SSLContext is ssl.SSLContext,
    "listed": [os.path.relpath(p, data) for p in listed
               if os.path.abspath(p).startswith(data)],
    "api_version": store._client.meta.service_model.api_version,
    "search_paths": sys.modules["lsbd.store.s3"]._loader.search_paths,
}))
"""


def probe(monkeypatch, **env) -> dict:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.splitlines()[-1])


def test_botocore_comes_in_without_the_pyopenssl_shim(monkeypatch):
    got = probe(monkeypatch)
    assert not got["shim_loaded"] and not got["openssl_loaded"]
    # botocore falls back to the context it would have taken from the shim
    assert got["stdlib_context"]


def test_the_client_lists_no_folder_of_other_services(monkeypatch):
    got = probe(monkeypatch)
    assert got["api_version"] == "2006-03-01"
    # only S3's own folder is looked into (for its latest API version)
    assert got["listed"] and all(p == "s3" or p.startswith("s3/") for p in got["listed"]), \
        got["listed"]


def test_aws_data_path_is_still_searched(monkeypatch, tmp_path):
    got = probe(monkeypatch, AWS_DATA_PATH=str(tmp_path))
    assert got["search_paths"][0] == str(tmp_path)


def test_a_store_sets_up_one_botocore_session(monkeypatch, tmp_path):
    """The checksum setting is read from the store's own session, not from a
    second one (each costs about 10 ms of the start); the profile's setting
    still counts."""
    import botocore.session

    from lsbd.store.s3 import S3Store

    made = []

    class Counted(botocore.session.Session):
        def __init__(self, *args, **kwargs):
            made.append(self)
            super().__init__(*args, **kwargs)

    config = tmp_path / "config"
    config.write_text("[default]\nrequest_checksum_calculation = when_supported\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.delenv("AWS_REQUEST_CHECKSUM_CALCULATION", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setattr(botocore.session, "Session", Counted)
    store = S3Store("bucket", endpoint_url="http://127.0.0.1:9")
    try:
        assert len(made) == 1
        assert store.checksums == "when_supported"
    finally:
        store.close()
