"""Requests at the edges of what the formats hold: a discard or a zeroing
of a volume of 16 TiB or more (4 KiB blocks) is longer than one record's
32-bit length."""

from __future__ import annotations

import pytest

from lsbd.engine.volume import Volume
from lsbd.errors import InvalidRequest, UserError

TiB = 1 << 40
BS = 4096


def test_discards_and_zeroings_longer_than_a_record_can_say(make_volume, tmp_path):
    size = 64 * TiB             # 2^34 blocks
    vol = make_volume(size)
    for i in range(3):
        vol.write(i * 16 * TiB, bytes([65 + i]) * BS)
    vol.checkpoint()
    vol.write_zeroes(BS, size - 2 * BS)          # 2^34 - 2 blocks
    vol.write(size - BS, b"z" * BS)
    vol.checkpoint()
    vol.trim(0, size - BS)
    vol.write(16 * TiB, b"q" * BS)
    vol.flush()
    expected = {0: bytes(BS), 16 * TiB: b"q" * BS, 32 * TiB: bytes(BS), size - BS: b"z" * BS}
    assert {at: vol.read(at, BS) for at in expected} == expected
    vol.checkpoint()
    vol.close()
    # From the store alone: the checkpoints (a base, then deltas) and segments.
    again = Volume.open(vol.store, "vol", cache_root=str(tmp_path / "elsewhere"))
    try:
        assert {at: again.read(at, BS) for at in expected} == expected
    finally:
        again.close()


def test_a_volume_holds_no_more_blocks_than_the_map_can_name(make_volume, store):
    """The map's keys are 6 bytes: a volume of more than 2^48 blocks (over
    128 PiB of 512-byte blocks) would take a write to its last block and
    never read it back.  Creating or growing one is refused."""
    from lsbd.map.encoding import KEY_BYTES
    from lsbd.meta.config import create_volume

    most = 1 << (8 * KEY_BYTES)
    with pytest.raises(UserError, match="blocks"):
        create_volume(store, "huge", (most + 1) * 512, block_size=512)
    vol = make_volume(most * 512, block_size=512)     # the largest: it works
    vol.write(vol.size - 512, b"e" * 512)
    vol.flush()
    assert vol.read(vol.size - 512, 512) == b"e" * 512
    with pytest.raises(InvalidRequest, match="blocks"):
        vol.resize(vol.size + 512)
    assert vol.size == most * 512
