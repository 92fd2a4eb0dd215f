"""A restore leaves a whole new volume or none (lsbd.service.volumes.restore_whole):
interrupted (Ctrl-C) or failing halfway, the new volume is deleted again,
the source is untouched, and the next restore to that name goes ahead."""

from __future__ import annotations

import pytest
from engine_helpers import MiB, block

from lsbd import names
from lsbd.errors import VolumeExists
from lsbd.meta.config import load_config
from lsbd.service.volumes import restore_whole


def _source(make_volume):
    vol = make_volume(size=16 * MiB, segment_size=1 * MiB)
    for i in range(8):
        vol.write(i * 2 * MiB, block(i + 1, i) * 64)
    seq = vol.flush_to_store()
    vol.close()
    return vol.config, seq


def test_an_interrupted_restore_leaves_no_volume(make_volume, store, tmp_path):
    config, seq = _source(make_volume)
    calls = []

    def interrupt(done, total):
        calls.append(done)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        restore_whole(store, config, seq, "copy", cache_root=str(tmp_path / "cache"),
                      progress=interrupt)
    assert calls, "interrupted halfway, after the new volume was made"
    assert not store.exists(names.config_key("copy"))
    assert list(store.list(names.volume_prefix("copy"))) == []
    assert restore_whole(store, config, seq, "copy", cache_root=str(tmp_path / "cache")) \
        == 8 * 64 * 4096


def test_a_refused_restore_leaves_the_volume_of_that_name(make_volume, store, tmp_path):
    config, seq = _source(make_volume)
    with pytest.raises(VolumeExists):
        restore_whole(store, config, seq, "vol", cache_root=str(tmp_path / "cache"))
    assert load_config(store, "vol").volume_id == config.volume_id


def test_a_name_taken_meanwhile_is_not_deleted(make_volume, store, tmp_path, monkeypatch):
    """The name was free when the restore looked, taken when it created the
    volume (another process, meanwhile): the creation fails, and what the
    other process made stays."""
    config, seq = _source(make_volume)
    exists = store.exists
    monkeypatch.setattr(store, "exists",
                        lambda key: False if key == names.config_key("vol") else exists(key))
    with pytest.raises(VolumeExists):
        restore_whole(store, config, seq, "vol", cache_root=str(tmp_path / "cache"))
    monkeypatch.undo()
    assert load_config(store, "vol").volume_id == config.volume_id
