"""Helpers shared by the engine, recovery, crash, corruption, lease and CLI tests."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from lsbd import names
from lsbd.store import Store, open_store
from lsbd.store.base import ObjectInfo

MiB = 1024 * 1024
BS = 4096
REPO = Path(__file__).resolve().parent.parent.parent
VENV_BIN = REPO / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
LSBD = str(VENV_BIN / "lsbd")


def open_test_store(url: str) -> Store:
    """open_store as the CLI does it (the endpoint of an s3:// URL from the environment)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL") if url.startswith("s3://") else None
    return open_store(url, endpoint_url=endpoint)


def block(tag: int, lba: int, bs: int = BS) -> bytes:
    """A block whose every 16 bytes name (tag, lba): cheap to make, and a block
    from the wrong write or the wrong place is recognizable."""
    return (tag.to_bytes(8, "little") + lba.to_bytes(8, "little")) * (bs // 16)


def blocks(tag: int, lba: int, n: int, bs: int = BS) -> bytes:
    return b"".join(block(tag, lba + i, bs) for i in range(n))


def overwrite(vol, model: bytearray, rng: random.Random, span: int,
              amount: int | None = None) -> None:
    """Random 4 KiB and 64 KiB writes into [0, span) until `amount` bytes
    (default: span) are written, mirrored into `model`.  The crash tests'
    seeds name runs of this exact sequence of draws."""
    amount = span if amount is None else amount
    written = 0
    while written < amount:
        n = BS if rng.random() < 0.5 else 64 * 1024
        off = rng.randrange(0, (span - n) // BS + 1) * BS
        data = rng.randbytes(n)
        vol.write(off, data)
        model[off:off + n] = data
        written += n


def live_bytes(model: bytes | bytearray) -> int:
    """Bytes of non-zero blocks: what a volume must keep (zero blocks are map entries)."""
    zero = bytes(BS)
    view = memoryview(model)
    return sum(BS for i in range(0, len(model), BS) if view[i:i + BS] != zero)


def fenced_writer(store: Store, cache_root, monkeypatch):
    """A writer of a new volume "vol" (flush_mode store, 256 KiB segments) on
    host old.example, which flushed block(1, 0) as segment 1 and then lost
    its lease, unaware: a writer on new.example broke it, wrote block(2, 0)
    as segment 2 and closed.  The caller abandons the returned Volume."""
    from lsbd.engine.volume import Volume
    from lsbd.meta.config import create_volume

    root = Path(cache_root)
    create_volume(store, "vol", 16 * MiB, segment_size=256 * 1024, flush_mode="store")
    monkeypatch.setenv("LSBD_HOST", "old.example")   # two machines
    old = Volume.open(store, "vol", cache_root=str(root / "old"))
    try:
        old.write(0, block(1, 0))
        old.flush()                                            # segment 1
        monkeypatch.setenv("LSBD_HOST", "new.example")
        new = Volume.open(store, "vol", cache_root=str(root / "new"), break_lease=True)
        new.write(0, block(2, 0))
        new.close()                                            # segment 2, the new writer's
    except BaseException:
        old.abandon()
        raise
    return old


def read_all(vol, chunk: int = 8 * MiB) -> bytes:
    parts = []
    for off in range(0, vol.size, chunk):
        parts.append(vol.read(off, min(chunk, vol.size - off)))
    return b"".join(parts)


def read_from_store(store: Store, cache_root, offset: int = 0, length: int | None = None,
                    volume: str = "vol") -> bytes:
    """What a reader with the cache dir `cache_root` reads (with a new one:
    what the store alone holds): all of `volume`, or `length` bytes at
    `offset`."""
    from lsbd.engine.volume import Volume

    with Volume.open(store, volume, cache_root=str(cache_root), read_only=True) as reader:
        return read_all(reader) if length is None else reader.read(offset, length)


def wipe(path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def segment_seqs(store: Store, volume: str) -> list[int]:
    return sorted(s for s in (names.parse_seq(i.key) for i in store.list(names.segment_prefix(volume)))
                  if s is not None)


def keys(store: Store, prefix: str = "") -> list[str]:
    return [i.key for i in store.list(prefix)]


class RecordingStore(Store):
    """Passes every call through and records (op, key, start) for each one."""

    def __init__(self, inner: Store):
        self.inner = inner
        self.log: list[tuple[str, str, int | None]] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:  # type: ignore[override]
        return self.inner.url

    def _note(self, op: str, key: str, start: int | None = None) -> None:
        with self._lock:
            self.log.append((op, key, start))

    def put(self, key, data, *, exclusive=False):
        self._note("put", key)
        return self.inner.put(key, data, exclusive=exclusive)

    @property
    def conditional_writes(self) -> bool:
        return self.inner.conditional_writes

    def get(self, key, start=0, length=None):
        data = self.inner.get(key, start, length)
        if start < 0 or (length is not None and start + length >= self.inner.head(key)):
            self._note("tail", key, start)   # the tail of the object: its index
        self._note("get", key, start)
        return data

    def head(self, key):
        self._note("head", key)
        return self.inner.head(key)

    def list(self, prefix=""):
        self._note("list", prefix)
        return iter([*self.inner.list(prefix)])

    def delete(self, key):
        self._note("delete", key)
        return self.inner.delete(key)

    def close(self):
        self.inner.close()

    def gets(self, prefix: str) -> list[tuple[str, int | None]]:
        return [(k, s) for op, k, s in self.log if op == "get" and k.startswith(prefix)]

    def tail_keys(self, prefix: str) -> set[str]:
        """Keys whose tail (a segment's index) was read."""
        return {k for op, k, _s in self.log if op == "tail" and k.startswith(prefix)}


def run_cli(*args: str, store: str | None = None, cache: str | None = None, env=None,
            timeout: float = 120, check: bool | None = None) -> subprocess.CompletedProcess:
    """Run the `lsbd` command; returns the CompletedProcess (text mode)."""
    cmd = [LSBD]
    if store is not None:
        cmd += ["--store", store]
    if cache is not None:
        cmd += ["--cache-dir", str(cache)]
    cmd += [str(a) for a in args]
    full_env = dict(os.environ)
    full_env["COLUMNS"] = "200"     # tables are not cut to a narrow terminal
    if env:
        full_env.update(env)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                          check=False)
    if check:
        assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _one_error_line(proc: subprocess.CompletedProcess, code: int, needles) -> str:
    """Exit `code`, one line on stderr starting with 'lsbd: ', no traceback,
    holding every needle; returns that line."""
    assert proc.returncode == code, (
        f"expected exit {code}, got {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{proc.stderr}"
    assert lines[0].startswith("lsbd: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 1, one clear line on stderr starting with 'lsbd:', no traceback;
    returns that line."""
    return _one_error_line(proc, 1, needles)


def assert_usage_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """A command line refused by the parser: exit 2, one line on stderr
    starting with 'lsbd: ', no traceback; returns that line."""
    return _one_error_line(proc, 2, needles)


def object_path(store_url: str, key: str) -> Path:
    """The file of an object in a file:// store."""
    assert store_url.startswith("file://")
    return Path(store_url[len("file://"):]) / key


__all__ = [
    "BS",
    "LSBD",
    "PYTHON",
    "MiB",
    "ObjectInfo",
    "RecordingStore",
    "assert_user_error",
    "block",
    "blocks",
    "keys",
    "object_path",
    "open_test_store",
    "read_all",
    "run_cli",
    "segment_seqs",
    "wipe",
]
