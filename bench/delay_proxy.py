"""A TCP proxy that makes a local server look distant: every chunk of bytes
is forwarded a set time after it arrived, in each direction (this kernel has
no netem qdisc).  Chunks are delayed, not serialized: bandwidth stays what
the two ends and this process can move; only latency is added.

    proxy = DelayProxy(("127.0.0.1", upstream_port), delay=0.010)
    proxy.start(); ... proxy.port ...; proxy.bytes_up, proxy.bytes_down; proxy.stop()

bytes_up counts client -> server bytes (requests, PUT bodies), bytes_down
server -> client (responses, GET bodies).
"""

from __future__ import annotations

import collections
import socket
import threading
import time


class _Pipe:
    """One direction of one connection: a reader thread queues chunks with
    their due time, a writer thread sends each when it is due."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay: float, count):
        self.src, self.dst, self.delay, self.count = src, dst, delay, count
        self.queue: collections.deque = collections.deque()
        self.cond = threading.Condition()
        self.eof = False

    def start(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                chunk = self.src.recv(1 << 20)
                if not chunk:
                    break
                self.count(len(chunk))
                with self.cond:
                    self.queue.append((time.monotonic() + self.delay, chunk))
                    self.cond.notify()
        except OSError:
            pass
        with self.cond:
            self.eof = True
            self.cond.notify()

    def _write(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.queue and not self.eof:
                        self.cond.wait()
                    if not self.queue:
                        break
                    due, chunk = self.queue.popleft()
                pause = due - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                self.dst.sendall(chunk)
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            # Unblock the other direction's reader too once this side is done.
            for s in (self.src,):
                try:
                    s.shutdown(socket.SHUT_RD)
                except OSError:
                    pass


class DelayProxy:
    def __init__(self, upstream: tuple[str, int], delay: float, host: str = "127.0.0.1"):
        self.upstream = upstream
        self.delay = delay
        self._listener = socket.create_server((host, 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections = 0
        self._stopped = False

    def _up(self, n: int) -> None:
        with self._lock:
            self.bytes_up += n

    def _down(self, n: int) -> None:
        with self._lock:
            self.bytes_down += n

    def reset_counts(self) -> None:
        with self._lock:
            self.bytes_up = self.bytes_down = 0

    def start(self) -> "DelayProxy":
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.connections += 1
            _Pipe(client, server, self.delay, self._up).start()
            _Pipe(server, client, self.delay, self._down).start()

    def stop(self) -> None:
        self._stopped = True
        self._listener.close()
