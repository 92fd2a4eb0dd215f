"""Helpers for the history tests (snapshots, points in time, restore, clone,
diff): a byte model of a volume, the `lsbd` command as a subprocess, and
engine-level writes that go through a real Volume."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from datetime import UTC, datetime, timezone
from pathlib import Path

from engine_helpers import BS, LSBD, PYTHON, REPO, VENV_BIN, MiB  # noqa: F401
from engine_helpers import open_test_store as open_url  # noqa: F401

from lsbd.engine.volume import Volume
from lsbd.store import Store


def pattern(tag: int, lba: int, n: int = 1, bs: int = BS) -> bytes:
    """n blocks whose every 16 bytes name (tag, block): a block from the wrong
    write or the wrong place is recognizable, and no block is all zeros."""
    return b"".join(((tag + 1).to_bytes(8, "little") + (lba + i).to_bytes(8, "little")) * (bs // 16)
                    for i in range(n))


class Model:
    """What the volume should read as: a bytearray, written block-wise."""

    def __init__(self, size: int):
        self.data = bytearray(size)

    def copy(self) -> Model:
        m = Model(len(self.data))
        m.data[:] = self.data
        return m

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset:offset + len(data)] = data

    def zero(self, offset: int, length: int) -> None:
        self.data[offset:offset + length] = bytes(length)

    def grow(self, size: int) -> None:
        self.data.extend(bytes(size - len(self.data)))

    def bytes(self) -> bytes:
        return bytes(self.data)


def apply_ops(vol: Volume, model: Model | None, ops) -> None:
    """Apply [("write", lba, nblocks, tag) | ("zero", lba, n) | ("trim", lba, n)]
    (block units) to an open writable volume and to the model."""
    for op in ops:
        if op[0] == "write":
            _k, lba, n, tag = op
            data = pattern(tag, lba, n)
            vol.write(lba * BS, data)
            if model is not None:
                model.write(lba * BS, data)
        elif op[0] == "zero":
            _k, lba, n = op
            vol.write_zeroes(lba * BS, n * BS)
            if model is not None:
                model.zero(lba * BS, n * BS)
        elif op[0] == "trim":
            _k, lba, n = op
            vol.trim(lba * BS, n * BS)
            if model is not None:
                model.zero(lba * BS, n * BS)
        else:
            raise ValueError(op)


def write_and_close(store: Store, name: str, cache: str, model: Model | None, ops, **open_kw) -> None:
    """Open `name` as the writer, apply ops, close (which uploads everything
    and so makes it durable in the store)."""
    vol = Volume.open(store, name, cache_root=str(cache), **open_kw)
    try:
        apply_ops(vol, model, ops)
    finally:
        vol.close()


def read_volume(store: Store, name: str, cache: str, *, at_seq: int | None = None) -> bytes:
    vol = Volume.open(store, name, cache_root=str(cache), read_only=True, at_seq=at_seq)
    try:
        return b"".join(vol.read(off, min(8 * MiB, vol.size - off))
                        for off in range(0, vol.size, 8 * MiB))
    finally:
        vol.close()


def run(store_url: str, cache, *args, check: bool = False, timeout: float = 120,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """`lsbd --store URL --cache-dir CACHE ARGS...` as a subprocess (text mode)."""
    cmd = [LSBD, "--store", store_url, "--cache-dir", str(cache), *[str(a) for a in args]]
    full_env = dict(os.environ)
    full_env["COLUMNS"] = "200"
    if env:
        full_env.update(env)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                          check=False)
    if check:
        assert proc.returncode == 0, \
            f"{' '.join(cmd[1:])} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def run_json(store_url: str, cache, *args):
    proc = run(store_url, cache, *args, "--json", check=True)
    return json.loads(proc.stdout)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 1, one clear line on stderr starting with 'lsbd:', no traceback;
    returns that line."""
    assert proc.returncode == 1, f"expected exit 1, got {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{proc.stderr}"
    assert lines[0].startswith("lsbd: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def export(store_url: str, cache, volume: str, path, *point: str) -> bytes:
    """`lsbd export` into `path` and return the file's bytes."""
    run(store_url, cache, "export", volume, path, *point, check=True)
    return Path(path).read_bytes()


def iso_local(t: float) -> str:
    """ISO 8601, local time, no zone, to the second."""
    return datetime.fromtimestamp(t).strftime("%Y-%m-%dT%H:%M:%S")


def iso_utc_z(t: float) -> str:
    return datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def iso_offset(t: float) -> str:
    """ISO 8601 with an explicit offset (a zone that is not the local one)."""
    from datetime import timedelta

    zone = timezone(timedelta(hours=5, minutes=30))
    return datetime.fromtimestamp(t, tz=zone).isoformat(timespec="seconds")


def next_second(t: float) -> int:
    """The first whole second at or after t."""
    return math.ceil(t)


def wipe(path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def store_keys(store: Store, prefix: str) -> dict[str, int]:
    return {i.key: i.size for i in store.list(prefix)}
