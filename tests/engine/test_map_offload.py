"""The map's own process (lsbd.map.offload): sealed segments enter the map
there, a batch it committed is never applied twice, and a process that dies
loses nothing."""

from __future__ import annotations

import os
import random
import signal

from engine_helpers import BS, MiB

from lsbd.format.segment import DATA, Record
from lsbd.map import blockmap, merge
from lsbd.map import testing as map_testing
from lsbd.map.blockmap import BlockMap, SegmentInfo
from lsbd.engine import testing


def _info(seq: int, n: int) -> SegmentInfo:
    return SegmentInfo(seq=seq, state=blockmap.PENDING, sealed_ns=0, size=1, live_blocks=0,
                       data_blocks=n, trailer_crc=0)


def _segment(seq: int, lbas: list[int]) -> tuple[SegmentInfo, list[Record]]:
    return _info(seq, len(lbas)), [Record(DATA, 0, lba, 1, BS * (i + 1), b"")
                                   for i, lba in enumerate(lbas)]


def _live(bm: BlockMap) -> dict[int, int]:
    return {s.seq: s.live_blocks for s in bm.segments()}


def test_segments_applied_in_the_maps_process_are_as_applied_here(tmp_path, monkeypatch):
    monkeypatch.setattr(merge, "STAGE_SEGMENTS", 3)     # merged in the child
    rng = random.Random(5)
    batches = [[_segment(seq, [rng.randrange(4096) for _ in range(300)])] for seq in range(1, 9)]
    here = BlockMap(str(tmp_path / "here"), BS)
    there = BlockMap(str(tmp_path / "there"), BS)
    there.offload_writes()
    try:
        for batch in batches:
            seq = batch[0][0].seq
            a = here.apply_segments(batch, applied_seq=str(seq).encode())
            b = there.apply_segments([(_info(seq, 300), batch[0][1])],
                                     applied_seq=str(seq).encode())
            assert a == b
        assert there.offload_cpu_seconds > 0          # the child merged
        assert list(here.iter_extents()) == list(there.iter_extents())
        here.merge_all()
        there.merge_all()
        assert list(here.iter_extents()) == list(there.iter_extents())
        assert _live(here) == _live(there)
        assert there.get_int("applied_seq") == 8
    finally:
        here.close()
        there.close()


def test_a_batch_the_map_already_records_is_not_applied_again(tmp_path):
    """The map's process may die after its commit, before its reply: the
    parent then applies the batch itself, which must change nothing."""
    bm = BlockMap(str(tmp_path / "map"), BS)
    try:
        bm.apply_segments([_segment(1, [1, 2, 3])], applied_seq=b"1")
        bm.apply_segments([_segment(2, [2, 3, 4])], applied_seq=b"2")
        before = (list(bm.iter_extents()), _live(bm))
        assert bm.apply_segments([_segment(2, [2, 3, 4])], applied_seq=b"2") == []
        assert (list(bm.iter_extents()), _live(bm)) == before
        assert before[1] == {1: 1, 2: 3}
    finally:
        bm.close()


def test_a_batch_of_longer_records_the_map_already_records_is_not_applied_again(tmp_path):
    """As above for a segment that is applied, not staged (a record longer
    than a block): its blocks are not counted twice."""
    bm = BlockMap(str(tmp_path / "map"), BS)
    try:
        bm.apply_segments([_segment(1, [1, 2, 3])], applied_seq=b"1")
        longer = (_info(2, 3), [Record(DATA, 0, 2, 2, BS, b""), Record(DATA, 0, 4, 1, 3 * BS, b"")])
        bm.apply_segments([longer], applied_seq=b"2")
        before = (list(bm.iter_extents()), _live(bm))
        assert bm.apply_segments([longer], applied_seq=b"2") == []
        assert (list(bm.iter_extents()), _live(bm)) == before
        assert before[1] == {1: 1, 2: 3}
    finally:
        bm.close()


def test_the_maps_process_killed_while_writing_loses_nothing(make_volume):
    vol = make_volume(segment_size=MiB)
    data = {}
    for i in range(24):
        off = (i * 7 % 48) * MiB
        data[off] = bytes([i + 1]) * MiB
        vol.write(off, data[off])
        if i == 8:
            testing.seal_now(vol)
            proc = testing.map_process(vol)
            assert proc is not None and proc.poll() is None
            os.kill(proc.pid, signal.SIGKILL)
    testing.seal_now(vol)
    for off, want in data.items():
        assert vol.read(off, MiB) == want
    # A new process took over after the one killed.
    proc = testing.map_process(vol)
    assert proc is not None and proc.poll() is None


def test_a_map_process_that_cannot_start_leaves_the_writes_here(tmp_path, monkeypatch):
    from lsbd.map import offload

    def cannot(self):
        raise OSError(2, "no such interpreter")

    monkeypatch.setattr(offload.MapProcess, "_start", cannot)
    monkeypatch.setattr(merge, "STAGE_SEGMENTS", 1)     # merged at once
    bm = BlockMap(str(tmp_path / "map"), BS)
    bm.offload_writes()
    try:
        for seq in range(1, 6):
            bm.apply_segments([_segment(seq, [seq, seq + 100])], applied_seq=str(seq).encode())
        assert not map_testing.has_map_process(bm)      # given up after a few tries
        assert _live(bm) == {seq: 2 for seq in range(1, 6)}
        assert bm.get_int("applied_seq") == 5
    finally:
        bm.close()


def test_lookups_see_what_the_maps_process_committed(tmp_path):
    """The serving process keeps a read transaction between lookups: after
    the child's commit it must start a new one, or reads miss the segment
    that has just left the sealing queue."""
    bm = BlockMap(str(tmp_path / "map"), BS)
    bm.offload_writes()
    try:
        bm.apply_segments([_segment(1, [5])], applied_seq=b"1")
        assert bm.lookup_block(5) == (1, BS)          # a read transaction kept
        bm.apply_segments([_segment(2, [7, 5])], applied_seq=b"2")
        assert bm.lookup_block(5) == (2, 2 * BS)
        assert bm.lookup_block(7) == (2, BS)
    finally:
        bm.close()
