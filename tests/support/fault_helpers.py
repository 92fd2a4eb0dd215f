"""Helpers of the fault tests: machines stood for by a cache dir and a host
name (LSBD_HOST), `lsbd serve` run as one of them, an NBD client."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time

from engine_helpers import LSBD, run_cli
from nbd_helpers import RawClient, short_tempdir

from lsbd_nbd import protocol as p


class Machine:
    """`lsbd` as run on one machine: its own host name and cache dir."""

    def __init__(self, name: str, cache: str, store_url: str, env: dict | None = None):
        self.name = name
        self.cache = str(cache)
        self.store_url = store_url
        self.env = {"LSBD_HOST": name, **(env or {})}

    def run(self, *args, timeout: float = 120, check: bool | None = None):
        return run_cli(*args, store=self.store_url, cache=self.cache, env=self.env,
                       timeout=timeout, check=check)

    def serve(self, volume: str, *options: str) -> "Served":
        return Served(self, volume, options)


class Served:
    """`lsbd serve VOLUME --socket S` on a machine, until stopped."""

    def __init__(self, machine: Machine, volume: str, options):
        self.dir = short_tempdir()
        self.socket_path = os.path.join(self.dir, "nbd.sock")
        argv = [LSBD, "--store", machine.store_url, "--cache-dir", machine.cache, "serve",
                volume, "--socket", self.socket_path, *options]
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     text=True, env={**os.environ, **machine.env})
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(60) or not any("serving" in x for x in self.lines):
            self.kill()
            raise AssertionError("lsbd serve did not start:\n" + self.stderr())

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if "serving" in line:
                self._ready.set()
        self._ready.set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return "\n".join(self.lines)

    def client(self, export: str = "") -> "Client":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.socket_path)
        c = Client(s)
        c.connect_export(export)
        return c

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            code = self.proc.wait(timeout)
        finally:
            self._cleanup()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self._cleanup()

    def _cleanup(self) -> None:
        self._reader.join(30)   # the last lines after the exit
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


class Client(RawClient):
    """An NBD client that reports errors instead of asserting."""

    def try_write(self, offset: int, data: bytes) -> int:
        return self.call(p.CMD_WRITE, offset, len(data), data=data)[0]

    def try_flush(self) -> int:
        return self.call(p.CMD_FLUSH)[0]


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class CuttableProxy:
    """A TCP proxy in front of a server (the moto S3 server) that a test can
    cut: while cut, every connection is reset at once, as a store that is
    down.  stalled: while stalled, nothing is forwarded and new connections
    are taken and left unanswered, as a store that hangs (each request then
    waits out the client's read timeout).  answer_delay: the server's every
    answer reaches the client this many seconds late, as a slow but healthy
    store.  `url` is the endpoint to give lsbd."""

    def __init__(self, target_url: str):
        host, port = target_url.rsplit("//", 1)[1].rsplit(":", 1)
        self.target = (host, int(port))
        self.cut = False
        self.stalled = False
        self.answer_delay = 0.0
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.url = "http://127.0.0.1:%d" % self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            if self.cut:
                _reset(conn)
                continue
            if self.stalled:
                with self._lock:
                    self._conns.add(conn)   # taken, never answered
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                _reset(conn)
                continue
            with self._lock:
                self._conns.update((conn, upstream))
            for a, b, answers in ((conn, upstream, False), (upstream, conn, True)):
                threading.Thread(target=self._pipe, args=(a, b, answers), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, answers: bool) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                while self.stalled and not self.cut:
                    time.sleep(0.05)
                if answers and self.answer_delay:
                    time.sleep(self.answer_delay)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def set_cut(self, cut: bool) -> None:
        """Cut (True) or restore (False) the store."""
        self.cut = cut
        if cut:
            with self._lock:
                conns, self._conns = list(self._conns), set()
            for s in conns:
                _reset(s)

    def set_stalled(self, stalled: bool) -> None:
        """Hang (True) or resume (False) the store."""
        self.stalled = stalled

    def close(self) -> None:
        self.set_cut(True)
        self._listener.close()


def _reset(s: socket.socket) -> None:
    import struct

    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        # Wakes the pipe thread blocked in recv on it: a close alone leaves
        # the socket open under that recv, and the client waits out its read
        # timeout (60 s) instead of seeing the store go away.
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
