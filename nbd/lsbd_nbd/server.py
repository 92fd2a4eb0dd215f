"""The NBD server: listening sockets, one thread per client connection, a
shared pool for engine calls that block, and an orderly shutdown.

The server holds a mapping export name -> BlockDevice and reads it at every
lookup, so exports can be added or removed while it runs (add_export /
remove_export: a read-only snapshot or point in time is just another
BlockDevice with read_only=True).  It does not own the devices: whoever
created them flushes and closes them after close() returns.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import stat
import threading
import time
from collections.abc import MutableMapping
from concurrent.futures import ThreadPoolExecutor

from lsbd.engine.api import BlockDevice
from lsbd_nbd.errors import Disconnect, ProtocolError
from lsbd_nbd.handshake import Handshake
from lsbd_nbd.tls import ServerTLS, TLSSocket
from lsbd_nbd.transmission import Connection

log = logging.getLogger("lsbd.nbd")

DEFAULT_PORT = 10809
#: Send buffer asked for a Unix connection (the kernel caps it at
#: net.core.wmem_max).  With the default (about 200 KiB) a 1 MiB reply
#: goes out a piece at a time, the sending thread asleep until the client
#: has read the piece before; with room for a few whole replies it hands
#: each to the kernel in one go and is free for the next request at once
#: (TCP sizes its own buffers).  As root, SO_SNDBUFFORCE gets it past the
#: cap (Linux's default cap is about 200 KiB).
SEND_BUFFER = 4 << 20
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)   # Linux; not in Python's module


def _ask_send_buffer(sock: socket.socket) -> None:
    """SEND_BUFFER for an accepted Unix connection: past net.core.wmem_max
    when the server may (root), else as far as the cap allows."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, SEND_BUFFER)
    except OSError:      # not root (EPERM), or not Linux
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)


class SocketStream:
    """Exact reads and plain sends for the handshake.  It reads nothing
    ahead, so whatever a client pipelines right after NBD_OPT_GO is still in
    the socket for the transmission phase (and nothing sent after
    NBD_OPT_STARTTLS is read as plain text).  `sock` is a TLSSocket once TLS
    is on."""

    def __init__(self, sock: socket.socket | TLSSocket):
        self.sock = sock

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            r = self.sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
            if not r:
                if not got:
                    raise Disconnect()
                raise ProtocolError("connection closed in the middle of a message")
            got += r
        return bytes(buf)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


class NBDServer:
    """Serve `exports` over NBD.

    workers: threads of the pool shared by every connection, for the
    requests that block (see dispatch.py).
    tls: credentials and mode (tls.ServerTLS); None or mode "off" answers
    NBD_OPT_STARTTLS with NBD_REP_ERR_UNSUP.
    """

    def __init__(self, exports: MutableMapping[str, BlockDevice] | None = None, *,
                 default_export: str | None = None, workers: int = 32,
                 handshake_timeout: float = 30.0, tls: ServerTLS | None = None):
        self.tls = tls if tls is not None and tls.offered else None
        # Not copied: the caller may add and remove exports in it too.
        self.exports: MutableMapping[str, BlockDevice] = exports if exports is not None else {}
        self._default = default_export
        self.handshake_timeout = handshake_timeout
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nbd-io")
        self._listeners: list[tuple[socket.socket, str | None]] = []   # (socket, unix path)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._stopping = False
        self._serving = threading.Event()
        self._lock = threading.Lock()
        self._clients: dict[socket.socket, threading.Thread] = {}
        self._thread: threading.Thread | None = None
        self._accepted = 0

    # --- exports ---------------------------------------------------------------

    def add_export(self, name: str, device: BlockDevice) -> None:
        self.exports[name] = device

    def remove_export(self, name: str) -> None:
        """New clients no longer see it; connected ones keep their device."""
        self.exports.pop(name, None)

    def default_export(self) -> str | None:
        if self._default is not None:
            return self._default
        return next(iter(self.exports), None)

    # --- listening -------------------------------------------------------------

    def listen_tcp(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> tuple[str, int]:
        """Listen on host:port (port 0 picks a free one); returns the address."""
        sock = socket.create_server((host, port), backlog=64)
        self._add_listener(sock, None)
        bound = sock.getsockname()
        return bound[0], bound[1]

    def listen_unix(self, path: str) -> str:
        """Listen on a Unix socket.  A stale socket file (nobody listening)
        is replaced; a live one is an error."""
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(mode):
                raise FileExistsError(f"{path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)          # stale
            else:
                raise OSError(f"{path}: another server is listening there")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(64)
        except BaseException:
            sock.close()
            raise
        self._add_listener(sock, path)
        return path

    def _add_listener(self, sock: socket.socket, path: str | None) -> None:
        sock.setblocking(False)
        self._listeners.append((sock, path))
        self._selector.register(sock, selectors.EVENT_READ)

    # --- running ---------------------------------------------------------------

    def serve_forever(self) -> None:
        """Accept clients until stop() is called (from a signal handler or
        another thread).  Returns without waiting for connected clients:
        close() does that."""
        self._serving.set()
        try:
            while not self._stopping:
                for key, _ in self._selector.select():
                    if key.fd == self._wake_r:
                        try:
                            os.read(self._wake_r, 512)
                        except BlockingIOError:
                            pass
                        continue
                    self._accept(key.fileobj)  # type: ignore[arg-type]  # only listeners are registered
        finally:
            self._serving.clear()

    def start(self) -> None:
        """serve_forever() on a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, name="nbd-accept", daemon=True)
        self._thread.start()
        self._serving.wait(5)

    def stop(self) -> None:
        """Stop accepting new clients.  Safe to call from a signal handler."""
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def close(self, timeout: float = 60.0) -> None:
        """Stop accepting, let every connection finish the requests it has
        read (new ones are not read), close the connections and listeners.
        Devices are left open for their owner to flush and close."""
        self.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        for sock, path in self._listeners:
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()
            if path:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        self._listeners.clear()
        with self._lock:
            clients = list(self._clients.items())
        for sock, _thread in clients:
            try:
                sock.shutdown(socket.SHUT_RD)   # the reader sees EOF; replies still go out
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for sock, thread in clients:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                # Still stuck, sending to a client that does not read: cut it off.
                log.warning("a client did not finish within %.0f s; disconnecting it", timeout)
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                thread.join(5)
        self.pool.shutdown(wait=True)
        self._selector.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> NBDServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- clients ---------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, addr = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.warning("accept failed: %s", e)
            time.sleep(0.1)          # out of file descriptors: do not spin
            return
        sock.setblocking(True)
        self._accepted += 1
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = f"{addr[0]}:{addr[1]}"
        else:
            peer = f"unix#{self._accepted}"
            _ask_send_buffer(sock)
        thread = threading.Thread(target=self._client, args=(sock, peer),
                                  name=f"nbd-{peer}", daemon=True)
        with self._lock:
            self._clients[sock] = thread
        thread.start()

    def _client(self, sock: socket.socket, peer: str) -> None:
        stream = SocketStream(sock)
        tls = self.tls
        secure: list[TLSSocket] = []

        def starttls() -> SocketStream:
            assert tls is not None
            secure.append(TLSSocket(sock, tls))
            secure[0].handshake()
            return SocketStream(secure[0])

        try:
            sock.settimeout(self.handshake_timeout)
            handshake = Handshake(stream, self.exports, self.default_export,
                                  lambda: self._stopping,
                                  starttls=starttls if tls is not None else None,
                                  tls_required=tls is not None and tls.required)
            session = handshake.run()
            if session is None:
                return
            sock.settimeout(None)
            log.debug("%s: connected to export %r%s", peer, session.export_name,
                      " over TLS" if handshake.in_tls else "")
            channel: socket.socket | TLSSocket = secure[0] if secure else sock
            Connection(channel, session, pool=self.pool, peer=peer).serve()
        except Disconnect:
            pass
        except ProtocolError as e:
            log.info("%s: dropping connection: %s", peer, e)
        except TimeoutError:
            log.info("%s: dropping connection: handshake timed out", peer)
        except OSError as e:
            log.debug("%s: connection ended: %s", peer, e)
        except Exception:
            log.exception("%s: unexpected error; dropping this connection", peer)
        finally:
            with self._lock:
                self._clients.pop(sock, None)
            try:
                sock.close()
            except OSError:
                pass
