"""A read-only view (export, verify, diff, `serve --read-only`, snapshots)
of a plain volume in a file:// store links the store's segment files into
its private folder and reads them as local copies, instead of reading every
piece through the store; sealed objects (compressed or encrypted) are not
the segment files' bytes and are read through the store as before."""

from __future__ import annotations

import os
import random

import pytest
from engine_helpers import BS, MiB, block, object_path, open_test_store

from lsbd import names
from lsbd.engine.volume import Volume
from lsbd.meta.config import create_volume

SIZE = 16 * MiB


def _written(tmp_path, **options) -> tuple[str, bytes]:
    """A volume of 256 KiB segments written at random; its URL and contents."""
    url = "file://" + str(tmp_path / "store")
    store = open_test_store(url)
    create_volume(store, "vol", SIZE, segment_size=256 * 1024, **options)
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "cache"))
    model = bytearray(SIZE)
    rng = random.Random(7)
    for i in range(400):
        lba = rng.randrange(SIZE // BS)
        vol.write(lba * BS, block(i, lba))
        model[lba * BS:(lba + 1) * BS] = block(i, lba)
    vol.close()
    store.close()
    return url, bytes(model)


def _view_files(view) -> list[str]:
    folder = os.path.join(view.folder, "segments")
    return [os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".seg")]


def test_a_read_only_view_links_a_plain_volumes_segments(tmp_path):
    url, model = _written(tmp_path)
    store = open_test_store(url)
    view = Volume.open(store, "vol", cache_root=str(tmp_path / "reader"), read_only=True)
    try:
        assert view.read(0, SIZE) == model
        files = _view_files(view)
        assert len(files) >= 3
        for path in files:
            seq = int(os.path.basename(path)[:-4], 16)
            stored = object_path(url, names.segment_key("vol", seq))
            assert os.path.samefile(path, stored), path     # a link, not a copy
    finally:
        view.close()
        store.close()
    # Closing the view removes its links only.
    assert view.read_only and not os.path.exists(view.folder)
    store = open_test_store(url)
    again = Volume.open(store, "vol", cache_root=str(tmp_path / "reader2"), read_only=True)
    try:
        assert again.read(0, SIZE) == model
    finally:
        again.close()
        store.close()


@pytest.mark.parametrize("options", [{"compression": "zstd:1"}], ids=["compressed"])
def test_sealed_objects_are_never_linked(tmp_path, options):
    url, model = _written(tmp_path, **options)
    store = open_test_store(url)
    view = Volume.open(store, "vol", cache_root=str(tmp_path / "reader"), read_only=True)
    try:
        assert view.read(0, SIZE) == model
        for path in _view_files(view):
            seq = int(os.path.basename(path)[:-4], 16)
            stored = object_path(url, names.segment_key("vol", seq))
            assert not os.path.samefile(path, stored), path
    finally:
        view.close()
        store.close()
