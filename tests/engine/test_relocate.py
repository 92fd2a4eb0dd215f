"""Volume.relocate (compaction's copy of live blocks) follows the same rules
as every other append: a failed roll-back stops writes, and a full segment
meets the sealing back-pressure."""

import threading

import pytest

from engine_helpers import BS, MiB, blocks, open_test_store
from lsbd.engine import testing
from lsbd.engine.sealer import MAX_SEALING
from lsbd.engine.volume import Volume
from lsbd.errors import StoreError
from lsbd.meta.config import create_volume


@pytest.fixture
def vol(tmp_path):
    store = open_test_store("file://" + str(tmp_path / "store"))
    create_volume(store, "vol", 64 * MiB, segment_size=64 * 1024)
    v = Volume.open(store, "vol", cache_root=str(tmp_path / "cache"))
    yield v
    v.abandon()


def test_a_relocation_whose_roll_back_fails_stops_writes(vol):
    vol.write(0, blocks(1, 0, 4))
    testing.seal_now(vol)
    extents = list(vol.extents())
    vol.write(64 * BS, blocks(2, 64, 1))            # an open journal to break
    seg = testing.journal(vol)

    def broken(*_a, **_k):
        raise OSError(5, "the disk went away")

    seg.append = broken          # the append fails ...
    seg.rollback = broken        # ... and so does undoing it: the journal's state is unknown
    with pytest.raises(OSError):
        vol.relocate(extents)
    del seg.append, seg.rollback
    with pytest.raises(StoreError, match="stopped taking writes"):
        vol.write(128 * BS, blocks(3, 128, 1))


def test_a_relocation_that_fills_a_segment_waits_for_the_sealer(vol):
    vol.write(0, blocks(1, 0, 48))                  # three segments' worth, mapped
    testing.seal_now(vol)
    extents = list(vol.extents())
    testing.pause_sealer(vol)
    for i in range(MAX_SEALING + 1):                # the sealer far behind
        vol.write((1000 + i) * BS, blocks(2, 1000 + i, 1))
        testing.seal_queued(vol)
    assert len(testing.sealing(vol)) > MAX_SEALING
    returned = threading.Event()

    def run():
        try:
            vol.relocate(extents)                   # fills the open segment: it seals
        except StoreError:
            pass                                    # the volume closed under it
        returned.set()

    threading.Thread(target=run, daemon=True).start()
    assert not returned.wait(1.0), "relocate went on past a full sealing queue"
    vol.abandon()                                   # lets the waiting writer go
    assert returned.wait(10)
