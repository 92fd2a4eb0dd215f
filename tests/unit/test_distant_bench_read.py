"""bench/distant_bench.py's cold read: the timed reader reads every file of
the mounted tree whole (and only that tree), and the untimed check after it
tells a changed byte."""

from __future__ import annotations

import importlib.util
import os
import pathlib

import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent.parent / "bench" / "distant_bench.py"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("distant_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree(root: pathlib.Path) -> int:
    """A file larger than the reader's 1 MiB chunk, small files in folders,
    an empty one; returns their bytes."""
    sizes = {"large.bin": (3 << 20) + 5, "small/d000/f00000": 4096, "small/d000/f00001": 1,
             "small/d001/f00200": 65536, "small/d001/empty": 0}
    for name, size in sizes.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
    return sum(sizes.values())


def test_the_reader_reads_every_file_whole(bench, tmp_path):
    size = _tree(tmp_path)
    got = bench.read_tree(str(tmp_path))
    assert (got["files"], got["bytes"]) == (5, size)


def test_the_reader_leaves_out_only_the_top_lost_and_found(bench, tmp_path):
    size = _tree(tmp_path)
    (tmp_path / "lost+found").mkdir()
    (tmp_path / "lost+found" / "#12").write_bytes(b"x" * 100)
    (tmp_path / "small" / "lost+found").mkdir()
    (tmp_path / "small" / "lost+found" / "kept").write_bytes(b"y" * 7)
    got = bench.read_tree(str(tmp_path))
    assert (got["files"], got["bytes"]) == (6, size + 7)


def test_the_check_tells_one_changed_byte(bench, tmp_path):
    src, copy = tmp_path / "src", tmp_path / "copy"
    src.mkdir()
    copy.mkdir()
    _tree(src)
    for path in src.rglob("*"):
        target = copy / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    (copy / "lost+found").mkdir()
    assert bench.same_tree(str(src), str(copy))
    large = bytearray((copy / "large.bin").read_bytes())
    large[2 << 20] ^= 1
    (copy / "large.bin").write_bytes(bytes(large))
    assert not bench.same_tree(str(src), str(copy))
