"""Ctrl-C during `lsbd import` says what the volume holds: part of the file
(interrupted while copying), or all of it (interrupted while the close
uploads: the copy is whole in the journal, its upload waits for the next
open)."""

from __future__ import annotations

import argparse
import contextlib

import pytest

from lsbd.cli import cmd_import_export


class _Volume:
    name = "vol"


class _Context:
    def __init__(self, interrupt_close: bool):
        self.interrupt_close = interrupt_close
        self.store = None

    @contextlib.contextmanager
    def open_volume(self, name, **kw):
        yield _Volume()
        if self.interrupt_close:
            raise KeyboardInterrupt     # Ctrl-C while the close waits for uploads


@pytest.fixture
def args():
    return argparse.Namespace(volume="vol", file="disk.raw", raw=False, break_lease=False,
                              json=False)


@pytest.fixture(autouse=True)
def no_store(monkeypatch):
    monkeypatch.setattr("lsbd.meta.config.load_config", lambda store, name: None)


def test_interrupted_while_uploading_says_the_copy_is_whole(args, monkeypatch):
    monkeypatch.setattr("lsbd.service.images.import_image", lambda *a, **kw: 4096)
    with pytest.raises(KeyboardInterrupt) as stopped:
        cmd_import_export.run_import(args, _Context(interrupt_close=True))
    assert str(stopped.value).startswith("all of disk.raw is in vol;")
    assert "next open of vol uploads it" in str(stopped.value)


def test_interrupted_while_copying_says_part(args, monkeypatch):
    def copying(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr("lsbd.service.images.import_image", copying)
    with pytest.raises(KeyboardInterrupt) as stopped:
        cmd_import_export.run_import(args, _Context(interrupt_close=False))
    assert "holds the part of disk.raw copied so far" in str(stopped.value)
