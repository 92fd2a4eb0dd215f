"""TLS for NBD: the server's credentials (X.509 certificates or pre-shared
keys) and a socket-like TLS session that the handshake and the
transmission phase use in place of the plain socket after NBD_OPT_STARTTLS.

TLS comes from pyOpenSSL.  Python's own ssl module serves pre-shared keys
only from Python 3.13 on, and the NBD ecosystem (nbdkit, qemu-nbd, libnbd)
offers PSK next to certificates; pyOpenSSL is kept by the same people as
`cryptography` and runs on the same OpenSSL.  It has no PSK call of its
own, so the one OpenSSL function that sets the server's PSK callback is
called through the binding pyOpenSSL itself is built on.

The session runs on memory BIOs under a lock: OpenSSL forbids using one
TLS session from two threads at once, and a connection reads requests on
one thread while replies go out from others.  No socket I/O happens under
that lock, so a reader waiting for the client never holds up a reply.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterable

from OpenSSL import SSL
from cryptography.hazmat.bindings.openssl.binding import Binding

from lsbd_nbd.errors import Disconnect, ProtocolError

MODES = ("off", "on", "require")
CA_CERT = "ca-cert.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"

#: Bytes read from the socket at a time (encrypted records).
_RECV = 256 * 1024
#: Bytes taken out of the outgoing BIO at a time.
_DRAIN = 1 << 20

_ffi = Binding.ffi
_lib = Binding.lib


class TLSConfigError(ValueError):
    """Credentials that cannot be used; the message is one line for the user."""


def read_psk_file(path: str) -> dict[bytes, bytes]:
    """Identity -> key from a psktool file: one `username:hexkey` a line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise TLSConfigError(f"cannot read the PSK file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise TLSConfigError(f"the PSK file {path} is not text") from None
    keys: dict[bytes, bytes] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hexkey = line.rpartition(":")
        try:
            key = bytes.fromhex(hexkey)
        except ValueError:
            key = b""
        if not sep or not user or not key:
            # Never echo the line: it holds a key.
            raise TLSConfigError(f"{path}, line {number}: expected username:hexkey "
                                 "(as psktool writes)")
        keys[user.encode()] = key
    if not keys:
        raise TLSConfigError(f"the PSK file {path} holds no key")
    return keys


class ServerTLS:
    """What a server needs to accept TLS: the mode and an OpenSSL context
    with either certificates or pre-shared keys."""

    def __init__(self, mode: str, *, certificates: str | None = None,
                 psk_file: str | None = None, verify_peer: bool = False):
        if mode not in MODES:
            raise TLSConfigError(f"--tls must be one of {', '.join(MODES)}")
        self.mode = mode
        self.context: SSL.Context | None = None
        self._psk_callback = None     # kept alive as long as the context
        if mode == "off":
            if certificates or psk_file:
                raise TLSConfigError("TLS credentials given with --tls=off")
            return
        if bool(certificates) == bool(psk_file):
            raise TLSConfigError(f"--tls={mode} needs either --tls-certificates DIR "
                                 "or --tls-psk FILE")
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_options(SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_COMPRESSION)
        if certificates:
            self._load_certificates(ctx, certificates, verify_peer)
            self.kind = "x509"
        else:
            assert psk_file is not None
            if verify_peer:
                raise TLSConfigError("--tls-verify-peer goes with certificates, not PSK")
            self._load_psk(ctx, read_psk_file(psk_file))
            self.kind = "psk"
        self.context = ctx

    @property
    def required(self) -> bool:
        return self.mode == "require"

    @property
    def offered(self) -> bool:
        return self.mode != "off"

    @staticmethod
    def _load_certificates(ctx: SSL.Context, directory: str, verify_peer: bool) -> None:
        cert = os.path.join(directory, SERVER_CERT)
        key = os.path.join(directory, SERVER_KEY)
        ca = os.path.join(directory, CA_CERT)
        for path in (cert, key):
            if not os.path.isfile(path):
                raise TLSConfigError(f"{path} is missing (--tls-certificates needs "
                                     f"{SERVER_CERT} and {SERVER_KEY})")
        try:
            ctx.use_certificate_chain_file(cert)
        except SSL.Error:
            raise TLSConfigError(f"{cert} is not a PEM certificate") from None
        try:
            ctx.use_privatekey_file(key)
            ctx.check_privatekey()
        except SSL.Error:
            raise TLSConfigError(f"{key} is not the PEM private key of {cert}") from None
        if os.path.isfile(ca):
            try:
                ctx.load_verify_locations(ca)
            except SSL.Error:
                raise TLSConfigError(f"{ca} is not a PEM certificate") from None
        if verify_peer:
            if not os.path.isfile(ca):
                raise TLSConfigError(f"--tls-verify-peer needs {ca}")
            ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)

    def _load_psk(self, ctx: SSL.Context, keys: dict[bytes, bytes]) -> None:
        # PSK suites only: without certificates the others cannot complete.
        # TLS 1.3 uses the same callback (OpenSSL's PSK support there).
        ctx.set_cipher_list(b"ECDHE-PSK:DHE-PSK:PSK:!aNULL:!eNULL:!MD5:!RC4:!3DES")

        def server_callback(ssl, identity, out, max_len):
            key = keys.get(_ffi.string(identity)) if identity != _ffi.NULL else None
            if key is None or len(key) > max_len:
                return 0                 # unknown identity: the handshake fails
            _ffi.memmove(out, key, len(key))
            return len(key)

        self._psk_callback = _ffi.callback(
            "unsigned int(SSL *, const char *, unsigned char *, unsigned int)",
            server_callback, error=0)
        _lib.SSL_CTX_set_psk_server_callback(ctx._context, self._psk_callback)


class TLSSocket:
    """The part of a socket's interface the NBD server uses (recv_into,
    recv, sendall, sendmsg, shutdown, settimeout), over a TLS session on
    `raw`.  Reading is for one thread; sends may come from any thread."""

    def __init__(self, raw: socket.socket, tls: ServerTLS):
        assert tls.context is not None
        self.raw = raw
        self.family = raw.family
        self.conn = SSL.Connection(tls.context, None)
        self.conn.set_accept_state()
        self._lock = threading.Lock()        # the TLS session
        self._send_lock = threading.Lock()   # order of records on the wire
        self._eof = False

    # --- handshake -------------------------------------------------------------

    def handshake(self) -> None:
        while True:
            failed: SSL.Error | None = None
            done = False
            with self._lock:
                try:
                    self.conn.do_handshake()
                    done = True
                except SSL.WantReadError:
                    pass
                except SSL.Error as e:
                    failed = e
                out = self._take_output()
            if out:
                self.raw.sendall(out)       # a fatal alert, too, goes out
            if failed is not None:
                raise ProtocolError(f"TLS handshake failed: {_reason(failed)}")
            if done:
                return
            data = self.raw.recv(_RECV)
            if not data:
                raise Disconnect()
            with self._lock:
                self.conn.bio_write(data)

    def _take_output(self) -> bytes:
        """Encrypted bytes waiting to go out (call with _lock held)."""
        parts = []
        while True:
            try:
                parts.append(self.conn.bio_read(_DRAIN))
            except SSL.WantReadError:       # the outgoing BIO is empty
                return b"".join(parts)

    # --- receiving -------------------------------------------------------------

    def _recv_some(self, view: memoryview, n: int) -> int:
        """Up to n bytes into view; 0 at the end of the stream."""
        while True:
            with self._lock:
                try:
                    return self.conn.recv_into(view, n)
                except SSL.WantReadError:
                    pass
                except SSL.ZeroReturnError:
                    return 0                # the client's close_notify
                except SSL.Error as e:
                    raise OSError(f"TLS error: {_reason(e)}") from None
            self._send_output()             # e.g. a reply to a key update
            if self._eof:
                return 0
            data = self.raw.recv(_RECV)
            if not data:
                self._eof = True
                with self._lock:
                    self.conn.bio_shutdown()
                continue
            with self._lock:
                self.conn.bio_write(data)

    def recv_into(self, buffer, nbytes: int = 0, flags: int = 0) -> int:
        view = memoryview(buffer).cast("B")
        want = nbytes or len(view)
        if not flags & socket.MSG_WAITALL:
            return self._recv_some(view, want)
        got = 0
        while got < want:
            n = self._recv_some(view[got:], want - got)
            if not n:
                break
            got += n
        return got

    def recv(self, n: int, flags: int = 0) -> bytes:
        buf = bytearray(n)
        got = self.recv_into(buf, n, flags)
        del buf[got:]
        return bytes(buf)

    # --- sending ---------------------------------------------------------------

    def _send_output(self) -> None:
        with self._send_lock:
            with self._lock:
                out = self._take_output()
            if out:
                self.raw.sendall(out)

    def sendmsg(self, buffers: Iterable) -> int:
        total = 0
        with self._send_lock:
            with self._lock:
                try:
                    for data in buffers:
                        self.conn.sendall(data)   # into the memory BIO: never blocks
                        total += len(data)
                except SSL.Error as e:
                    raise OSError(f"TLS error: {_reason(e)}") from None
                out = self._take_output()
            self.raw.sendall(out)
        return total

    def sendall(self, data) -> None:
        self.sendmsg([data])

    # --- the socket underneath -----------------------------------------------

    def settimeout(self, timeout: float | None) -> None:
        self.raw.settimeout(timeout)

    def shutdown(self, how: int) -> None:
        self.raw.shutdown(how)

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        self.raw.close()


def _reason(error: SSL.Error) -> str:
    """The first OpenSSL reason in an error, or its text."""
    try:
        return str(error.args[0][0][2])
    except (IndexError, TypeError):
        return str(error) or type(error).__name__
