"""bench/evicted_read_bench.py --spy DIR: a missing DIR is made, and a
missing py-spy is refused in one line before anything is built (py-spy's
errors went to /dev/null, and the profiles were just not there)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent.parent / "bench" / "evicted_read_bench.py"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("evicted_read_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_spy_dir_is_made(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "_py_spy", lambda: "/bin/true")
    folder = tmp_path / "profiles" / "run1"
    bench._check_spy(str(folder))
    assert folder.is_dir()


def test_no_py_spy_is_refused_in_one_line(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "_py_spy", lambda: str(tmp_path / "no-py-spy"))
    with pytest.raises(SystemExit) as refused:
        bench._check_spy(str(tmp_path / "profiles"))
    assert "py-spy not found" in str(refused.value.code)


def test_what_py_spy_says_is_kept(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "_py_spy", lambda: "/bin/echo")
    path = str(tmp_path / "this-first.txt")
    bench._spy(99999, path).wait()
    said = (tmp_path / "this-first.txt.log").read_text()
    assert said.startswith("record -p 99999 -o " + path)


def test_the_bench_refuses_before_building(bench, tmp_path, monkeypatch):
    def build(*args, **kw):
        raise AssertionError("built a state before checking --spy")

    monkeypatch.setattr(bench, "build", build)
    monkeypatch.setattr(bench, "_py_spy", lambda: str(tmp_path / "no-py-spy"))
    monkeypatch.setattr(sys, "argv", ["evicted_read_bench.py", "--spy", str(tmp_path / "p"),
                                      "--state", str(tmp_path / "state")])
    with pytest.raises(SystemExit) as refused:
        bench.main()
    assert "py-spy not found" in str(refused.value.code)
