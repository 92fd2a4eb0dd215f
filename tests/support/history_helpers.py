"""Helpers for the history tests (snapshots, points in time, restore, clone,
diff): a byte model of a volume, the `lsbd` command as a subprocess, and
engine-level writes that go through a real Volume."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from datetime import UTC, datetime, timezone
from pathlib import Path

from engine_helpers import BS, LSBD, PYTHON, REPO, VENV_BIN, MiB  # noqa: F401
from engine_helpers import assert_usage_error, assert_user_error  # noqa: F401
from engine_helpers import blocks, read_all, run_cli
from engine_helpers import open_test_store as open_url  # noqa: F401

from lsbd.engine.volume import Volume
from lsbd.store import Store


def pattern(tag: int, lba: int, n: int = 1, bs: int = BS) -> bytes:
    """n blocks whose every 16 bytes name (tag, block): a block from the wrong
    write or the wrong place is recognizable, and no block is all zeros."""
    return blocks(tag + 1, lba, n, bs)


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
        return read_all(vol)
    finally:
        vol.close()


def run(store_url: str, cache, *args, check: bool = False, timeout: float = 120,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """`lsbd --store URL --cache-dir CACHE ARGS...` as a subprocess (text mode)."""
    return run_cli(*args, store=store_url, cache=cache, check=check, timeout=timeout, env=env)


def run_json(store_url: str, cache, *args):
    proc = run(store_url, cache, *args, "--json", check=True)
    return json.loads(proc.stdout)


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
