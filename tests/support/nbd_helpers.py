"""Helpers for the NBD front-end tests: an in-process server over fake
volumes, a raw-socket NBD client that can also misbehave, and tool checks."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping

import pytest

from lsbd_nbd import NBDServer
from lsbd_nbd import protocol as p

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tools(*names: str) -> None:
    """Skip when a client tool is missing, except in CI where it is a failure."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        message = f"missing NBD client tools: {', '.join(missing)}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def require_libnbd_python() -> None:
    """Debian's python3 with the libnbd binding (python3-libnbd)."""
    ok = os.path.exists("/usr/bin/python3") and subprocess.run(
        ["/usr/bin/python3", "-c", "import nbd"], cwd="/", capture_output=True).returncode == 0
    if not ok:
        message = "python3-libnbd is missing (/usr/bin/python3 cannot import nbd)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def require_root() -> None:
    """Loop mounts need root (and /dev/fuse for nbdfuse)."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        message = "needs root and /dev/fuse"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def short_tempdir() -> str:
    """A directory whose path is short enough for a Unix socket inside it."""
    return tempfile.mkdtemp(prefix="lsbd-nbd-", dir="/tmp")


class RunningServer:
    """An NBDServer on a background thread, listening on a Unix socket (and
    TCP on a free loopback port if asked)."""

    def __init__(self, exports: Mapping, *, tcp: bool = False, **options):
        self.dir = short_tempdir()
        self.socket_path = os.path.join(self.dir, "nbd.sock")
        self.server = NBDServer(exports, **options)
        self.server.listen_unix(self.socket_path)
        self.tcp_address = self.server.listen_tcp("127.0.0.1", 0) if tcp else None
        self.server.start()

    def uri(self, export: str = "") -> str:
        return f"nbd+unix:///{export}?socket={self.socket_path}"

    def tcp_uri(self, export: str = "") -> str:
        assert self.tcp_address
        return f"nbd://127.0.0.1:{self.tcp_address[1]}/{export}"

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(self.socket_path)
        return sock

    def close(self, timeout: float = 10) -> None:
        self.server.close(timeout=timeout)
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def running_server(exports: Mapping, **options) -> Iterator[RunningServer]:
    server = RunningServer(exports, **options)
    try:
        yield server
    finally:
        server.close()


class ProtocolClosed(Exception):
    """The server closed the connection."""


class RawClient:
    """A deliberately low-level NBD client: every step is explicit, so tests
    can stop half way or send nonsense."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.structured = False
        self.next_handle = 1

    # --- bytes ------------------------------------------------------------------

    def recv_exact(self, n: int) -> bytes:
        chunks = []
        while n:
            chunk = self.sock.recv(min(n, 1 << 20))
            if not chunk:
                raise ProtocolClosed()
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def is_closed(self, timeout: float = 5.0) -> bool:
        """True if the server closes the connection (EOF or reset) in time."""
        self.sock.settimeout(timeout)
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()

    # --- handshake -------------------------------------------------------------

    def greeting(self, client_flags: int = p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES) -> int:
        magic, opt_magic, flags = p.SERVER_GREETING.unpack(self.recv_exact(18))
        assert magic == p.NBDMAGIC and opt_magic == p.IHAVEOPT
        self.send(p.CLIENT_FLAGS.pack(client_flags))
        return flags

    def option(self, option: int, data: bytes = b"") -> None:
        self.send(p.OPTION_HEADER.pack(p.IHAVEOPT, option, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, option, reply, length = p.OPTION_REPLY.unpack(self.recv_exact(20))
        assert magic == p.REPLY_MAGIC
        return option, reply, self.recv_exact(length) if length else b""

    def option_replies(self) -> list[tuple[int, bytes]]:
        """Replies up to and including the final one (ACK or an error)."""
        replies = []
        while True:
            _option, reply, data = self.option_reply()
            replies.append((reply, data))
            if reply == p.REP_ACK or reply & p.REP_FLAG_ERROR:
                return replies

    @staticmethod
    def info_data(name: str, requests: tuple[int, ...] = ()) -> bytes:
        raw = name.encode()
        return (struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(requests))
                + b"".join(struct.pack(">H", r) for r in requests))

    @staticmethod
    def meta_data(name: str, queries: list[str]) -> bytes:
        raw = name.encode()
        out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
        for q in queries:
            out += struct.pack(">I", len(q.encode())) + q.encode()
        return out

    def structured_replies(self) -> None:
        self.option(p.OPT_STRUCTURED_REPLY)
        assert self.option_replies() == [(p.REP_ACK, b"")]
        self.structured = True

    def set_meta_context(self, name: str, queries: list[str]) -> list[tuple[int, bytes]]:
        self.option(p.OPT_SET_META_CONTEXT, self.meta_data(name, queries))
        return self.option_replies()

    def go(self, name: str = "", requests: tuple[int, ...] = (p.INFO_BLOCK_SIZE,)) -> dict:
        """NBD_OPT_GO; returns the decoded info replies (raises on error)."""
        self.option(p.OPT_GO, self.info_data(name, requests))
        replies = self.option_replies()
        final, data = replies[-1]
        if final != p.REP_ACK:
            raise AssertionError(f"NBD_OPT_GO failed: {final:#x} {data!r}")
        return decode_info(replies[:-1])

    def connect_export(self, name: str = "", *, structured: bool = True,
                       meta: bool = False) -> dict:
        self.greeting()
        if structured:
            self.structured_replies()
        if meta:
            self.set_meta_context(name, [p.META_BASE_ALLOCATION])
        return self.go(name)

    # --- transmission ----------------------------------------------------------

    def request(self, cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0,
                data: bytes = b"", handle: int | None = None) -> int:
        if handle is None:
            handle = self.next_handle
            self.next_handle += 1
        self.send(p.REQUEST.pack(p.REQUEST_MAGIC, flags, cmd, handle, offset, length) + data)
        return handle

    def reply(self, read_length: int | None = None) -> tuple[int, int, bytes]:
        """One whole reply: (handle, error, data).  With simple replies the
        caller says how long a successful READ's data is."""
        magic = struct.unpack(">I", self.recv_exact(4))[0]
        if magic == p.SIMPLE_REPLY_MAGIC:
            error, handle = struct.unpack(">IQ", self.recv_exact(12))
            # Once structured replies are on, READ data never comes in a simple reply.
            with_data = read_length and not error and not self.structured
            return handle, error, self.recv_exact(read_length) if with_data else b""
        assert magic == p.STRUCTURED_REPLY_MAGIC, hex(magic)
        data = b""
        error = 0
        while True:
            flags, rtype, handle, length = struct.unpack(">HHQI", self.recv_exact(16))
            payload = self.recv_exact(length)
            if rtype == p.REPLY_TYPE_OFFSET_DATA:
                data += payload[8:]
            elif rtype == p.REPLY_TYPE_BLOCK_STATUS:
                data += payload
            elif rtype & 0x8000:
                error = struct.unpack(">I", payload[:4])[0]
            if flags & p.REPLY_FLAG_DONE:
                return handle, error, data
            magic = struct.unpack(">I", self.recv_exact(4))[0]
            assert magic == p.STRUCTURED_REPLY_MAGIC

    def call(self, cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0,
             data: bytes = b"") -> tuple[int, bytes]:
        handle = self.request(cmd, offset, length, flags=flags, data=data)
        got, error, payload = self.reply(length if cmd == p.CMD_READ else None)
        assert got == handle
        return error, payload

    def read(self, offset: int, length: int, flags: int = 0) -> bytes:
        error, data = self.call(p.CMD_READ, offset, length, flags=flags)
        assert error == 0, error
        return data

    def write(self, offset: int, data: bytes, flags: int = 0) -> None:
        error, _ = self.call(p.CMD_WRITE, offset, len(data), flags=flags, data=data)
        assert error == 0, error

    def block_status(self, offset: int, length: int, flags: int = 0) -> list[tuple[int, int]]:
        error, payload = self.call(p.CMD_BLOCK_STATUS, offset, length, flags=flags)
        assert error == 0, error
        words = struct.unpack(f">{len(payload) // 4}I", payload)
        assert words[0] == p.META_BASE_ALLOCATION_ID
        return list(zip(words[1::2], words[2::2]))

    def disconnect(self) -> None:
        self.request(p.CMD_DISC)
        self.close()


def decode_info(replies: list[tuple[int, bytes]]) -> dict:
    info: dict = {}
    for reply, data in replies:
        assert reply == p.REP_INFO
        kind = struct.unpack(">H", data[:2])[0]
        if kind == p.INFO_EXPORT:
            _, info["size"], info["flags"] = p.INFO_EXPORT_PAYLOAD.unpack(data)
        elif kind == p.INFO_BLOCK_SIZE:
            _, *sizes = p.INFO_BLOCK_SIZE_PAYLOAD.unpack(data)
            info["block_size"] = tuple(sizes)
        elif kind == p.INFO_NAME:
            info["name"] = data[2:].decode()
        elif kind == p.INFO_DESCRIPTION:
            info["description"] = data[2:].decode()
    return info


class Background:
    """A well-behaved client that writes and reads back in a loop on its own
    connection, to show the server keeps serving while others misbehave."""

    def __init__(self, server: RunningServer, export: str, offset: int = 0):
        self.server = server
        self.export = export
        self.offset = offset
        self.rounds = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            client = RawClient(self.server.connect())
            client.connect_export(self.export)
            n = 0
            while not self._stop.is_set():
                data = struct.pack(">Q", n) * 512
                client.write(self.offset, data)
                assert client.read(self.offset, len(data)) == data
                n += 1
                self.rounds = n
            client.disconnect()
        except BaseException as e:  # noqa: BLE001 - reported by check()
            self.error = e

    def __enter__(self) -> Background:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def check(self, min_rounds: int = 1, timeout: float = 30.0) -> None:
        """The other connection kept working: it failed nothing, and it completes
        rounds (waiting for them, since a loaded machine may not have run it yet).
        Call it inside the `with`: leaving it stops the loop."""
        deadline = time.monotonic() + timeout
        while self.rounds < min_rounds and self.error is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.error:
            raise AssertionError(f"background client failed: {self.error!r}")
        assert self.rounds >= min_rounds, "background client made no progress"


# --- `lsbd serve` as a subprocess, over a local store -------------------------------

import re  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

READY = re.compile(r"^lsbd: serving (.*)$")


class LsbdStore:
    """A file:// store and a cache dir, driven through the `lsbd` command."""

    def __init__(self, root: str):
        self.root = root
        self.store = os.path.join(root, "store")
        self.cache = os.path.join(root, "cache")

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "lsbd.cli.main", "--store", f"file://{self.store}",
                "--cache-dir", self.cache, *args]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*args), capture_output=True, text=True, check=check,
                              timeout=120)

    def create(self, name: str, size: str, *options: str) -> None:
        self.run("create", name, "--size", size, *options)

    def serve(self, *volumes: str, options: tuple[str, ...] = ()) -> LsbdServe:
        return LsbdServe(self, volumes, options)


class LsbdServe:
    """`lsbd serve VOLUMES --socket PATH` (or with the TCP options given)."""

    def __init__(self, env: LsbdStore, volumes: tuple[str, ...], options: tuple[str, ...]):
        self.env = env
        self.dir = short_tempdir()
        self.socket_path = os.path.join(self.dir, "nbd.sock")
        tcp = "--port" in options or "--host" in options
        argv = env.argv("serve", *volumes, *options,
                        *(() if tcp else ("--socket", self.socket_path)))
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True,
                                     stdout=subprocess.DEVNULL)
        self.lines: list[str] = []
        self.ready_line: str | None = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        if not self._ready.wait(60):
            self.proc.kill()
            raise AssertionError(f"lsbd serve did not get ready: {self.stderr()}")
        if self.ready_line is None:
            raise AssertionError(f"lsbd serve failed: {self.stderr()}")

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if self.ready_line is None and READY.match(line):
                self.ready_line = line.rstrip("\n")
                self._ready.set()
        self._ready.set()

    def stderr(self) -> str:
        return "\n".join(self.lines)

    def uri(self, export: str = "") -> str:
        return f"nbd+unix:///{export}?socket={self.socket_path}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Signal the server and wait; returns its exit code."""
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._reader.join(30)   # the last lines after the exit
        shutil.rmtree(self.dir, ignore_errors=True)
        return code

    def kill(self) -> None:
        """SIGKILL: a crash."""
        self.proc.kill()
        self.proc.wait(30)
        self._reader.join(30)   # the last lines after the exit
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LsbdServe:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.stop()


def run_tool(*argv: str, timeout: float = 120, cwd: str | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    """Run a client tool; on failure the assertion shows its output."""
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {result.returncode}:\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def libnbd_python(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a script with Debian's python3 and its libnbd binding (it cannot be
    imported into the test's own interpreter), from outside the repository so
    that nothing there shadows the binding's `nbd` module."""
    return run_tool("/usr/bin/python3", "-c", script, *args, timeout=timeout, cwd="/")


def wait_for(predicate, timeout: float = 30, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
