"""TLS for NBD: STARTTLS with certificates and with pre-shared keys, spoken
to by real clients (nbdinfo, nbdcopy, qemu-img) over nbds+unix:// and
nbds://, and the refusals of --tls=require seen over raw sockets."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess

import pytest
from fakes import FakeVolume
from nbd_helpers import (LsbdStore, ProtocolClosed, RawClient, require_tools, run_tool, running_server,
                         short_tempdir)

from lsbd_nbd import protocol as p
from lsbd_nbd.tls import ServerTLS, TLSConfigError, read_psk_file

pytestmark = pytest.mark.nbd

MiB = 1024 * 1024
SIZE = 16 * MiB
PSK_USER = "alice"


# --- credentials ------------------------------------------------------------------


def make_certificates(directory: str) -> None:
    """A CA, and a server certificate it signed for localhost and 127.0.0.1,
    in the file names nbdkit, qemu and libnbd use."""
    require_tools("openssl")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=lsbd test CA", "-keyout", "ca-key.pem", "-out", "ca-cert.pem",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
            "-keyout", "server-key.pem", "-out", "server.csr")
    with open(os.path.join(directory, "ext.cnf"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                "basicConstraints=CA:FALSE\n"
                "keyUsage=digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
            "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", "server-cert.pem")


@pytest.fixture(scope="module")
def certs():
    directory = short_tempdir()
    try:
        make_certificates(directory)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def psk_file():
    """A key file made by GnuTLS's psktool, as users make them."""
    require_tools("psktool")
    directory = short_tempdir()
    path = os.path.join(directory, "keys.psk")
    subprocess.run(["psktool", "-u", PSK_USER, "-p", path], check=True, capture_output=True)
    try:
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def tls_uri(server, export: str = "", *, certs: str | None = None,
            psk: str | None = None, tcp: bool = False) -> str:
    # libnbd takes the PSK username from the URI's user part.
    user = "" if certs else f"{PSK_USER}@"
    if tcp:
        base = f"nbds://{user}localhost:{server.tcp_address[1]}/{export}?"
    else:
        base = f"nbds+unix://{user}/{export}?socket={server.socket_path}&"
    if certs:
        return base + f"tls-certificates={certs}"
    return base + f"tls-psk-file={psk}"


def random_file(path: str, size: int) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(size))


# --- configuration ------------------------------------------------------------------


def test_psk_file_parsing(tmp_path):
    good = tmp_path / "good.psk"
    good.write_text("# comment\nalice:00ff\n\nbob:0102030405\n")
    assert read_psk_file(str(good)) == {b"alice": b"\x00\xff", b"bob": b"\x01\x02\x03\x04\x05"}
    bad = tmp_path / "bad.psk"
    bad.write_text("alice:zz-secret\n")
    with pytest.raises(TLSConfigError) as e:
        read_psk_file(str(bad))
    assert "line 1" in str(e.value) and "secret" not in str(e.value)
    with pytest.raises(TLSConfigError):
        read_psk_file(str(tmp_path / "missing.psk"))


def test_tls_settings_are_checked(certs, psk_file, tmp_path):
    with pytest.raises(TLSConfigError):
        ServerTLS("require")                       # no credentials
    with pytest.raises(TLSConfigError):
        ServerTLS("on", certificates=certs, psk_file=psk_file)
    with pytest.raises(TLSConfigError, match="server-cert.pem"):
        ServerTLS("on", certificates=str(tmp_path))
    assert ServerTLS("require", certificates=certs).required
    assert ServerTLS("on", psk_file=psk_file).offered
    assert not ServerTLS("off").offered


# --- the protocol over raw sockets ------------------------------------------------


@pytest.fixture
def volumes():
    return {"vol": FakeVolume("vol", SIZE)}


def test_require_refuses_options_before_starttls(volumes, certs):
    tls = ServerTLS("require", certificates=certs)
    with running_server(volumes, tls=tls) as srv:
        client = RawClient(srv.connect())
        client.greeting()
        for option in (p.OPT_LIST, p.OPT_STRUCTURED_REPLY, p.OPT_GO):
            data = client.info_data("vol") if option == p.OPT_GO else b""
            client.option(option, data)
            assert client.option_replies()[-1][0] == p.REP_ERR_TLS_REQD
        client.option(p.OPT_STARTTLS, b"x")           # STARTTLS carries no data
        assert client.option_replies()[-1][0] == p.REP_ERR_INVALID
        # NBD_OPT_EXPORT_NAME cannot carry an error: the connection closes.
        client.option(p.OPT_EXPORT_NAME, b"vol")
        assert client.is_closed()
        client.close()


def _accepted_starttls(srv) -> RawClient:
    """A raw client the server has just said yes to STARTTLS to (its socket
    not wrapped yet)."""
    client = RawClient(srv.connect())
    client.greeting()
    client.option(p.OPT_STARTTLS)
    assert client.option_replies() == [(p.REP_ACK, b"")]
    return client


def test_starttls_then_transmission_over_raw_client(volumes, certs):
    tls = ServerTLS("require", certificates=certs)
    with running_server(volumes, tls=tls) as srv:
        client = _accepted_starttls(srv)
        sock = client.sock
        context = ssl.create_default_context(cafile=os.path.join(certs, "ca-cert.pem"))
        client.sock = context.wrap_socket(sock, server_hostname="localhost")
        client.option(p.OPT_STARTTLS)                 # a second time is invalid
        assert client.option_replies()[-1][0] == p.REP_ERR_INVALID
        client.structured_replies()
        client.go("vol")
        data = os.urandom(300 * 1024)                 # large: sent in pieces
        client.write(4096, data)
        assert client.read(4096, len(data)) == data
        client.disconnect()
    assert volumes["vol"].read(4096, len(data)) == data


def test_on_mode_still_serves_plain_clients(volumes, certs):
    with running_server(volumes, tls=ServerTLS("on", certificates=certs)) as srv:
        client = RawClient(srv.connect())
        client.connect_export("vol")
        client.write(0, b"p" * 4096)
        assert client.read(0, 4096) == b"p" * 4096
        client.disconnect()


def test_a_bad_tls_handshake_loses_only_that_connection(volumes, certs):
    with running_server(volumes, tls=ServerTLS("require", certificates=certs)) as srv:
        client = _accepted_starttls(srv)
        client.send(b"\x16\x03\x01\x00\x05hello")      # not a ClientHello
        assert client.is_closed()
        client.close()
        _accepted_starttls(srv).close()               # the next connection is served


def test_verify_peer_refuses_a_client_without_certificate(volumes, certs):
    tls = ServerTLS("require", certificates=certs, verify_peer=True)
    with running_server(volumes, tls=tls) as srv:
        client = _accepted_starttls(srv)
        sock = client.sock
        context = ssl.create_default_context(cafile=os.path.join(certs, "ca-cert.pem"))
        with pytest.raises((ssl.SSLError, ConnectionError, ProtocolClosed)):
            client.sock = context.wrap_socket(sock, server_hostname="localhost")
            client.option(p.OPT_LIST)      # TLS 1.3 reports it at the first read
            client.option_replies()
        sock.close()


def test_starttls_is_unsupported_without_tls(volumes):
    with running_server(volumes) as srv:
        client = RawClient(srv.connect())
        client.greeting()
        client.option(p.OPT_STARTTLS)
        assert client.option_replies()[-1][0] == p.REP_ERR_UNSUP
        client.close()


# --- real clients ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["certificates", "psk"])
def test_nbdinfo_and_nbdcopy_over_tls(volumes, certs, psk_file, kind, tmp_path):
    require_tools("nbdinfo", "nbdcopy")
    if kind == "certificates":
        tls = ServerTLS("require", certificates=certs)
        creds = {"certs": certs}
    else:
        tls = ServerTLS("require", psk_file=psk_file)
        creds = {"psk": psk_file}
    source = str(tmp_path / "in.img")
    back = str(tmp_path / "out.img")
    random_file(source, SIZE)
    with running_server(volumes, tcp=True, tls=tls) as srv:
        for tcp in (False, True):
            uri = tls_uri(srv, "vol", tcp=tcp, **creds)
            info = run_tool("nbdinfo", uri).stdout
            assert "with TLS" in info, info
            assert str(SIZE) in info
            run_tool("nbdcopy", source, uri)
            run_tool("nbdcopy", uri, back)
            with open(source, "rb") as a, open(back, "rb") as b:
                assert a.read() == b.read()
            os.unlink(back)
        # A plain client is refused: libnbd reports the server requires TLS.
        plain = run_tool("nbdinfo", f"nbd+unix:///vol?socket={srv.socket_path}", check=False)
        assert plain.returncode != 0
        assert "tls" in (plain.stderr + plain.stdout).lower()


def test_wrong_psk_is_refused(volumes, psk_file, tmp_path):
    require_tools("nbdinfo")
    other = tmp_path / "other.psk"
    other.write_text(f"{PSK_USER}:{'17' * 32}\n")
    with running_server(volumes, tls=ServerTLS("require", psk_file=psk_file)) as srv:
        bad = run_tool("nbdinfo", tls_uri(srv, "vol", psk=str(other)), check=False)
        assert bad.returncode != 0
        good = run_tool("nbdinfo", tls_uri(srv, "vol", psk=psk_file))
        assert str(SIZE) in good.stdout


def test_qemu_img_with_tls_creds(volumes, certs, tmp_path):
    require_tools("qemu-img")
    source = str(tmp_path / "in.img")
    back = str(tmp_path / "out.img")
    random_file(source, 4 * MiB)
    with running_server(volumes, tcp=True, tls=ServerTLS("require", certificates=certs)) as srv:
        port = srv.tcp_address[1]
        creds = f"tls-creds-x509,id=tls0,endpoint=client,dir={certs}"
        target = f"driver=nbd,host=localhost,port={port},export=vol,tls-creds=tls0"
        run_tool("qemu-img", "convert", "-n", "--object", creds, "-f", "raw",
                 "--target-image-opts", source, target)
        run_tool("qemu-img", "convert", "--object", creds, "--image-opts",
                 target, "-O", "raw", back)
        with open(source, "rb") as a, open(back, "rb") as b:
            assert a.read() == b.read()[:4 * MiB]
        # Without tls-creds qemu-img is refused.
        plain = run_tool("qemu-img", "info", f"nbd://localhost:{port}/vol", check=False)
        assert plain.returncode != 0


# --- lsbd serve ---------------------------------------------------------------------------


def test_serve_with_tls_and_the_non_loopback_rule(tmp_path, certs, psk_file):
    require_tools("nbdinfo")
    env = LsbdStore(str(tmp_path))
    env.create("vol", "64M")
    with env.serve("vol", options=("--tls-psk", psk_file)) as srv:
        assert "nbds+unix://" in srv.ready_line
        uri = f"nbds+unix://{PSK_USER}@/vol?socket={srv.socket_path}&tls-psk-file={psk_file}"
        assert str(64 * MiB) in run_tool("nbdinfo", uri).stdout
        assert run_tool("nbdinfo", srv.uri("vol"), check=False).returncode != 0
    # Every interface without TLS: refused unless asked for, with a warning.
    refused = env.run("serve", "vol", "--host", "0.0.0.0", "--port", "0", check=False)
    assert refused.returncode != 0
    assert "--allow-unencrypted" in refused.stderr and "Traceback" not in refused.stderr
    with env.serve("vol", options=("--host", "0.0.0.0", "--port", "0",
                                   "--allow-unencrypted")) as srv:
        assert "warning" in srv.stderr() and "without TLS" in srv.stderr()
    bad = env.run("serve", "vol", "--tls-certificates", str(tmp_path), check=False)
    assert bad.returncode != 0 and "server-cert.pem" in bad.stderr
    assert "Traceback" not in bad.stderr
