"""The BlockDevice contract (lsbd/engine/api.py), one suite run on every
device: the engine's Volume and PastVolume, and the FakeVolume that the
front-end tests and the NBD benchmark stand on.  What the fake gets wrong
here, the front-end tests would wrongly believe."""

import inspect

import pytest

from engine_helpers import open_test_store
from fakes import FakeVolume
from lsbd.engine.api import MAX_REQUEST, Allocation, BlockDevice
from lsbd.engine.volume import Volume
from lsbd.errors import InvalidRequest, ReadOnlyError, WouldBlock
from lsbd.meta.config import create_volume

BS = 4096
SIZE = 16 * 1024 * 1024


def _pattern(tag: int, n: int) -> bytes:
    return bytes((tag + i) % 251 + 1 for i in range(n))


@pytest.fixture(params=["fake", "volume"])
def dev(request, tmp_path):
    if request.param == "fake":
        yield FakeVolume(size=SIZE)
        return
    store = open_test_store("file://" + str(tmp_path / "store"))
    create_volume(store, "vol", SIZE)
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "cache"))
    yield vol
    vol.close()


@pytest.fixture(params=["fake", "past"])
def ro_dev(request, tmp_path):
    if request.param == "fake":
        yield FakeVolume(size=SIZE, read_only=True)
        return
    store = open_test_store("file://" + str(tmp_path / "store"))
    create_volume(store, "vol", SIZE)
    with Volume.open(store, "vol", cache_root=str(tmp_path / "cache")) as vol:
        vol.write(0, _pattern(1, BS))
    past = Volume.open(store, "vol", cache_root=str(tmp_path / "cache"), read_only=True)
    yield past
    past.close()


def test_it_has_every_call_of_the_protocol_with_its_keywords(dev):
    for name in ("read", "write", "write_many", "write_zeroes", "trim"):
        assert "nowait" in inspect.signature(getattr(dev, name)).parameters, name
    for name in ("write", "write_zeroes", "trim"):
        assert "fua" in inspect.signature(getattr(dev, name)).parameters, name
    for name in dir(BlockDevice):
        if not name.startswith("_"):
            assert hasattr(dev, name), name
    assert dev.supports_nowait is True and dev.read_only is False
    assert dev.size == SIZE and dev.block_size == BS


def test_writes_read_back_and_the_rest_reads_as_zeros(dev):
    dev.write(BS, _pattern(1, 2 * BS))
    assert dev.read(0, 4 * BS) == bytes(BS) + _pattern(1, 2 * BS) + bytes(BS)
    dev.write(BS + 100, b"xyz")                        # a partial block: read-modify-write
    assert dev.read(BS + 98, 7) == _pattern(1, 2 * BS)[98:100] + b"xyz" + _pattern(1, 2 * BS)[103:105]


def test_zeroes_and_trims_read_as_zeros_and_are_holes(dev):
    dev.write(0, _pattern(2, 8 * BS))
    dev.write_zeroes(BS, 2 * BS)
    dev.trim(5 * BS, BS)
    dev.write_zeroes(7 * BS + 10, 20)                  # inside a block
    want = bytearray(_pattern(2, 8 * BS))
    want[BS:3 * BS] = bytes(2 * BS)
    want[5 * BS:6 * BS] = bytes(BS)
    want[7 * BS + 10:7 * BS + 30] = bytes(20)
    assert dev.read(0, 8 * BS) == bytes(want)
    runs = dev.allocation(0, 8 * BS)
    assert Allocation(BS, 2 * BS, False) in runs and Allocation(5 * BS, BS, False) in runs


def test_allocation_covers_the_range_with_merged_runs(dev):
    dev.write(2 * BS, _pattern(3, 2 * BS))
    runs = dev.allocation(BS, 4 * BS)
    assert runs == [Allocation(BS, BS, False), Allocation(2 * BS, 2 * BS, True),
                    Allocation(4 * BS, BS, False)]
    assert dev.allocation(0, 0) == []


def test_write_many_does_all_in_order_or_nothing(dev):
    dev.write_many([(0, _pattern(4, BS)), (0, _pattern(5, BS)), (2 * BS, _pattern(6, 2 * BS))])
    assert dev.read(0, 4 * BS) == _pattern(5, BS) + bytes(BS) + _pattern(6, 2 * BS)
    for bad in [(100, _pattern(7, BS)), (0, b"x" * 100), (SIZE, _pattern(7, BS))]:
        with pytest.raises(InvalidRequest):
            dev.write_many([(8 * BS, _pattern(7, BS)), bad])
    assert dev.read(8 * BS, BS) == bytes(BS), "a refused batch wrote nothing"


def test_bad_ranges_are_invalid_requests(dev):
    for call in (lambda: dev.read(SIZE - BS, 2 * BS), lambda: dev.read(-1, BS),
                 lambda: dev.write(SIZE, b"x"), lambda: dev.write_zeroes(SIZE - BS, 2 * BS),
                 lambda: dev.trim(-BS, BS), lambda: dev.read(0, MAX_REQUEST + BS),
                 lambda: dev.allocation(SIZE, BS)):
        with pytest.raises(InvalidRequest):
            call()


def test_a_nowait_call_that_needs_an_fsync_would_block(dev):
    with pytest.raises(WouldBlock):
        dev.write(0, _pattern(8, 3 * BS), fua=True, nowait=True)
    dev.write(0, _pattern(8, BS), nowait=True)          # local only: done at once
    assert bytes(dev.read(0, BS, nowait=True)) == _pattern(8, BS)


def test_fua_and_flush_return_and_keep_the_data(dev):
    dev.write(0, _pattern(9, BS), fua=True)
    dev.trim(BS, BS, fua=True)
    dev.flush()
    assert dev.read(0, BS) == _pattern(9, BS)


def test_it_grows_and_never_shrinks(dev):
    dev.resize(SIZE + 4 * BS)
    assert dev.size == SIZE + 4 * BS
    dev.write(SIZE, _pattern(10, BS))
    assert dev.read(SIZE, BS) == _pattern(10, BS)
    for bad in (SIZE, SIZE + 100):
        with pytest.raises(InvalidRequest):
            dev.resize(bad)


def test_a_read_only_device_reads_and_refuses_every_write(ro_dev):
    assert ro_dev.read_only is True
    assert len(ro_dev.read(0, 2 * BS)) == 2 * BS
    for call in (lambda: ro_dev.write(0, b"x" * BS), lambda: ro_dev.write_many([(0, b"x" * BS)]),
                 lambda: ro_dev.write_zeroes(0, BS), lambda: ro_dev.trim(0, BS)):
        with pytest.raises(ReadOnlyError):
            call()
