"""Incremental checkpoints (docs/format.md "Checkpoint"): bases and deltas,
opening from a chain, points in the past, snapshots and clones after many
deltas, what compaction keeps, a checkpoint cut short, and volumes whose
checkpoints were all written as format 1 bases."""

from __future__ import annotations

import json
import random

import pytest
from engine_helpers import BS, MiB, blocks, open_test_store, read_all, wipe

from lsbd import names
from lsbd.engine import testing
from lsbd.engine.volume import Volume
from lsbd.history.compactor import compact
from lsbd.history.restore import create_clone
from lsbd.meta.config import create_volume, load_config
from lsbd.names import cache_dir_for
from lsbd.plans.retention import deletable_checkpoints
from lsbd.segments import checkpoints as ckpt

SIZE = 16 * MiB


@pytest.fixture
def store(tmp_path):
    s = open_test_store("file://" + str(tmp_path / "store"))
    yield s
    s.close()


def _writes(vol, rng: random.Random, tag: int, count: int, max_n: int = 12) -> None:
    for i in range(count):
        kind = rng.random()
        n = rng.randint(1, max_n)
        lba = rng.randrange(0, SIZE // BS - n)
        if kind < 0.8:
            vol.write(lba * BS, blocks(tag * 1000 + i, lba, n))
        elif kind < 0.9:
            vol.trim(lba * BS, n * BS)
        else:
            vol.write_zeroes(lba * BS, n * BS)


def _manifests(store) -> dict[int, ckpt.Manifest]:
    return {s: ckpt.read_manifest(store, "vol", s) for s in ckpt.list_checkpoints(store, "vol")}


def test_pure_chain_rules():
    base = ckpt.Manifest(volume_id="v", seq=10, created_ns=0, volume_size=1, block_size=BS,
                         extents=1 << 20, parts=[])
    assert ckpt.choose_kind(base, base)
    assert not ckpt.choose_kind(None, None)
    long = ckpt.Manifest(volume_id="v", seq=20, created_ns=0, volume_size=1, block_size=BS,
                         extents=5, parts=[], prev=19, base=10, chain=ckpt.MAX_CHAIN)
    assert not ckpt.choose_kind(long, base)           # the chain is long enough
    heavy = ckpt.Manifest(volume_id="v", seq=20, created_ns=0, volume_size=1, block_size=BS,
                          extents=5, parts=[], prev=19, base=10, chain=1,
                          delta_entries=1 << 20)
    assert not ckpt.choose_kind(heavy, base)          # the deltas weigh as much as the base
    # Compaction keeps exactly the chains of the checkpoints it keeps.
    parents = {12: 11, 11: 10, 14: 13, 13: 10, 16: 15}
    cps = [5, 10, 11, 12, 13, 14, 15, 16, 17]
    gone = deletable_checkpoints(cps, pinned={12}, window=17, live_checkpoint=17,
                                 keep_recent=0, parents=parents)
    assert gone == [5, 13, 14, 15, 16]
    gone = deletable_checkpoints(cps, pinned=set(), window=17, live_checkpoint=16,
                                 keep_recent=0, parents=parents)
    assert gone == [5, 10, 11, 12, 13, 14]   # 17 is after the live one: never deleted here


@pytest.mark.parametrize("max_n,merge_every", [(12, 0), (1, 0), (1, 2)],
                         ids=["extents", "one_block", "one_block_merged"])
def test_many_deltas_read_back_exactly(store, tmp_path, monkeypatch, max_n, merge_every):
    """Checkpoint after every round: deltas with a base now and then.  The
    store alone, each past point, snapshots and a clone read back exactly.
    Every delta is built on arrays: one_block (every write, trim and
    zeroing one block long) an entry a block (newest_singles), extents a
    stretch of a record (newest_pieces).  merged: the map's staged
    segments merged every two, a few blocks a transaction."""
    from lsbd.engine import deltas
    from lsbd.map import merge

    if merge_every:
        monkeypatch.setattr(merge, "STAGE_SEGMENTS", merge_every)
        monkeypatch.setattr(merge, "MERGE_RANGE", 3)
        monkeypatch.setattr(merge, "MERGE_STEPS", 1)

    built, pieces, read = [], [], []
    monkeypatch.setattr(deltas, "newest_singles",
                        lambda *a, _f=deltas.newest_singles: built.append(1) or _f(*a))
    monkeypatch.setattr(deltas, "newest_pieces",
                        lambda *a, _f=deltas.newest_pieces: pieces.append(1) or _f(*a))
    monkeypatch.setattr(deltas, "decode_one_block_footer", lambda *a, _f=deltas.decode_one_block_footer,
                        **k: (lambda got: read.append(got is not None) or got)(_f(*a, **k)))
    create_volume(store, "vol", SIZE, segment_size=64 * 1024, checkpoint_segments=10_000,
                  seal_interval=3600)
    cache = str(tmp_path / "cache")
    vol = Volume.open(store, "vol", cache_root=cache)
    rng = random.Random(7)
    states: dict[int, bytes] = {}
    snaps: dict[str, tuple[int, bytes]] = {}
    kinds = []
    for r in range(1, 25):
        _writes(vol, rng, r, 30, max_n)
        seq = vol.checkpoint()
        states[seq] = read_all(vol)
        kinds.append(ckpt.read_manifest(store, "vol", seq).is_delta)
        if r % 6 == 0:
            snap = vol.snapshot(f"s{r}")
            snaps[snap.name] = (snap.seq, states[seq])
    expected = read_all(vol)
    vol.close()
    # Both kinds were written, and a base at least every MAX_CHAIN + 1.
    assert kinds.count(True) >= 12 and kinds.count(False) >= 2
    assert (len(built) >= 12) == (max_n == 1)     # which way the deltas were built
    assert (len(pieces) >= 12) == (max_n > 1)
    assert any(read) == (max_n == 1)              # segments of one-block writes on arrays
    run = 0
    for is_delta in kinds:
        run = run + 1 if is_delta else 0
        assert run <= ckpt.MAX_CHAIN
    # Every kept checkpoint's chain is whole.
    for m in _manifests(store).values():
        chain = ckpt.read_chain(store, "vol", m)
        assert not chain[0].is_delta and chain[-1].seq == m.seq

    wipe(cache_dir_for(cache, store, "vol"))
    vol = Volume.open(store, "vol", cache_root=cache)
    try:
        assert read_all(vol) == expected
        # A delta over the chain this open loaded goes on from it.
        _writes(vol, rng, 99, 20, max_n)
        seq = vol.checkpoint()
        states[seq] = expected = read_all(vol)
    finally:
        vol.close()
    for seq, state in states.items():
        with Volume.open(store, "vol", cache_root=cache, at_seq=seq) as past:
            assert read_all(past) == state, f"the point at seq {seq} differs"
    for name, (seq, state) in snaps.items():
        with Volume.open(store, "vol", cache_root=cache, at_seq=seq) as past:
            assert read_all(past) == state, f"snapshot {name} differs"
    seq, state = snaps["s18"]
    create_clone(store, load_config(store, "vol"), "cl", seq, size=SIZE, cache_root=cache)
    with Volume.open(store, "cl", cache_root=cache) as clone:
        assert read_all(clone) == state
        clone.write(0, blocks(5, 0, 3))
        clone_state = read_all(clone)
        clone.checkpoint()
    with Volume.open(store, "cl", cache_root=str(tmp_path / "fresh"), read_only=True) as c:
        assert read_all(c) == clone_state


def test_a_delta_reads_evicted_segments_from_the_store_on_arrays(store, tmp_path, monkeypatch):
    """A cache smaller than the segments between two checkpoints (the
    default 1 GiB holds about half of them at random 4 KiB writes): the
    indexes of the evicted ones are read from the store with numpy, no
    record decoded in Python, and every point reads back exactly from the
    store alone."""
    from lsbd.engine import deltas

    from_store, decoded = [], []
    monkeypatch.setattr(deltas, "store_segment_arrays",
                        lambda *a, _f=deltas.store_segment_arrays: from_store.append(a[2]) or _f(*a))
    monkeypatch.setattr(deltas, "record_arrays",
                        lambda *a, _f=deltas.record_arrays: decoded.append(1) or _f(*a))
    # Compressed: the store's objects are not linked in as the local copies
    # (as a plain volume's on a file:// store are), so they are evicted.
    create_volume(store, "vol", SIZE, segment_size=64 * 1024, checkpoint_segments=10_000,
                  seal_interval=3600, compression="zstd:1")
    cache = str(tmp_path / "cache")
    rng = random.Random(3)
    states: dict[int, bytes] = {}
    kinds = []
    with Volume.open(store, "vol", cache_root=cache, cache_limit=1) as vol:
        for r in range(1, 8):
            for i in range(60):
                lba = rng.randrange(SIZE // BS)
                vol.write(lba * BS, blocks(r * 1000 + i, lba, 1))
            seq = vol.checkpoint()
            states[seq] = read_all(vol)
            kinds.append(ckpt.read_manifest(store, "vol", seq).is_delta)
    assert kinds.count(True) >= 5
    assert len(set(from_store)) >= 10          # evicted ones, read from the store
    assert not decoded                         # ... on arrays, as the local ones
    wipe(cache_dir_for(cache, store, "vol"))
    for seq, state in states.items():
        with Volume.open(store, "vol", cache_root=cache, at_seq=seq) as past:
            assert read_all(past) == state, f"the point at seq {seq} differs"


def test_a_delta_of_relocated_reads_is_built_on_arrays_and_reads_back_exactly(
        store, tmp_path, monkeypatch):
    """Rounds of scattered one-block writes, 1 MiB reads that relocate them
    (records of many blocks), and writes over part of what was relocated,
    a checkpoint after each: every delta is built on arrays, none on the
    scratch map, and the volume read from the store alone, each point in
    the past and a snapshot read back exactly."""
    from lsbd.engine import deltas

    pieces, scratch = [], []
    monkeypatch.setattr(deltas, "newest_pieces",
                        lambda *a, _f=deltas.newest_pieces: pieces.append(1) or _f(*a))
    monkeypatch.setattr(deltas.BlockMap, "overlay",
                        lambda self, *a, _f=deltas.BlockMap.overlay: scratch.append(1) or _f(self, *a))
    create_volume(store, "vol", SIZE, segment_size=256 * 1024, checkpoint_segments=10_000,
                  seal_interval=3600)
    cache = str(tmp_path / "cache")
    rng = random.Random(12)
    states: dict[int, bytes] = {}
    relocated = 0
    with Volume.open(store, "vol", cache_root=cache) as vol:
        for r in range(1, 7):
            start = rng.randrange(0, SIZE // BS - 512)
            order = list(range(start, start + 512))
            rng.shuffle(order)
            for i, lba in enumerate(order):
                vol.write(lba * BS, blocks(r * 10_000 + i, lba, 1))
            testing.seal_now(vol)
            for off in range(start * BS, (start + 512) * BS, MiB):
                vol.read(off, min(MiB, (start + 512) * BS - off))
            assert testing.read_defrag(vol).drain()
            testing.seal_now(vol)
            for i in range(20):                       # over part of what was moved
                lba = start + rng.randrange(512 - 3)
                vol.write(lba * BS, blocks(r * 10_000 + 5_000 + i, lba, rng.randint(1, 3)))
            seq = vol.checkpoint()
            states[seq] = read_all(vol)
            if r == 4:
                snap = vol.snapshot("s4")
        relocated = vol.usage()["read_defrag_bytes"]
        expected = read_all(vol)
    assert relocated >= 6 * MiB
    assert len(pieces) >= 5 and not scratch        # relocated records, on arrays
    assert sum(ckpt.read_manifest(store, "vol", s).is_delta for s in states) >= 5
    wipe(cache_dir_for(cache, store, "vol"))
    with Volume.open(store, "vol", cache_root=cache, read_only=True) as v:
        assert read_all(v) == expected
    for seq, state in states.items():
        with Volume.open(store, "vol", cache_root=cache, at_seq=seq) as past:
            assert read_all(past) == state, f"the point at seq {seq} differs"
    with Volume.open(store, "vol", cache_root=cache, at_seq=snap.seq) as past:
        assert read_all(past) == states[snap.seq]


def test_compaction_keeps_exactly_the_chains_kept_points_need(store, tmp_path):
    create_volume(store, "vol", SIZE, segment_size=64 * 1024, checkpoint_segments=10_000,
                  seal_interval=3600, retain_seconds=0)
    cache = str(tmp_path / "cache")
    rng = random.Random(11)
    with Volume.open(store, "vol", cache_root=cache) as vol:
        snaps = {}
        for r in range(1, 15):
            _writes(vol, rng, r, 25)
            vol.checkpoint()
            if r in (4, 9):
                snaps[vol.snapshot(f"s{r}").seq] = read_all(vol)
        expected = read_all(vol)
        compact(vol, threshold=1.0)
        live = vol.checkpoint()
    manifests = _manifests(store)
    needed: set[int] = set()
    for point in (*snaps, live):
        needed |= {m.seq for m in ckpt.read_chain(store, "vol", manifests[point])}
    assert set(manifests) == needed
    assert any(m.is_delta for m in manifests.values())
    for seq, state in snaps.items():
        with Volume.open(store, "vol", cache_root=cache, at_seq=seq) as past:
            assert read_all(past) == state
    with Volume.open(store, "vol", cache_root=str(tmp_path / "fresh"), read_only=True) as v:
        assert read_all(v) == expected


@pytest.mark.parametrize("max_n", [1, 12], ids=["one-block", "mixed"])
def test_a_base_after_a_chain_is_the_map_without_reading_it(store, tmp_path, monkeypatch,
                                                             max_n):
    """Once the chain is long, the next base is the chain with the new
    segments laid over it, never a read of the live map; it holds exactly
    the map's extents, and opening from it alone reads back the volume.
    Small parts, so entries cross part boundaries; writes of one block
    (laid over on arrays) or of several (the general overlay)."""
    monkeypatch.setattr(ckpt, "PART_EXTENTS", 7)
    create_volume(store, "vol", SIZE, segment_size=64 * 1024, checkpoint_segments=10_000,
                  seal_interval=3600)
    cache = str(tmp_path / "cache")
    rng = random.Random(11)
    with Volume.open(store, "vol", cache_root=cache) as vol:
        for r in range(ckpt.MAX_CHAIN + 1):
            _writes(vol, rng, r, 25, max_n)
            vol.checkpoint()
        _writes(vol, rng, 50, 25, max_n)

        real_snapshot = testing.map_of(vol).snapshot

        def snapshot():
            snap = real_snapshot()

            def extents():
                raise AssertionError("a base after a chain read the live map")

            snap.extents = extents
            return snap

        monkeypatch.setattr(testing.map_of(vol), "snapshot", snapshot)
        seq = vol.checkpoint()
        manifest = ckpt.read_manifest(store, "vol", seq)
        assert not manifest.is_delta
        assert len(manifest.parts) > 3
        assert [tuple(e) for e in ckpt.read_extents(store, manifest)] == \
            testing.map_extents(vol)
        expected = read_all(vol)
    wipe(cache_dir_for(cache, store, "vol"))
    with Volume.open(store, "vol", cache_root=cache, read_only=True) as vol:
        assert read_all(vol) == expected


def test_a_delta_cut_short_is_never_read(store, tmp_path, monkeypatch):
    """The parts of a delta are in the store but its manifest never made it:
    opening from the store alone uses the checkpoint before it and replays."""
    # Compressed: the store's objects are not linked in as the local copies
    # (as a plain volume's on a file:// store are), so they are evicted.
    create_volume(store, "vol", SIZE, segment_size=64 * 1024, checkpoint_segments=10_000,
                  seal_interval=3600, compression="zstd:1")
    cache = str(tmp_path / "cache")
    rng = random.Random(3)
    vol = Volume.open(store, "vol", cache_root=cache)
    _writes(vol, rng, 1, 40)
    first = vol.checkpoint()
    _writes(vol, rng, 2, 40)
    real_put = store.put

    def put(key, data, **kw):
        if key.endswith("/manifest"):
            raise OSError("cut")
        return real_put(key, data, **kw)

    monkeypatch.setattr(store, "put", put)
    with pytest.raises(OSError):
        vol.checkpoint()
    monkeypatch.setattr(store, "put", real_put)
    assert ckpt.list_incomplete_checkpoints(store, "vol")
    assert ckpt.list_checkpoints(store, "vol") == [first]
    expected = read_all(vol)
    vol.abandon()
    wipe(cache_dir_for(cache, store, "vol"))
    vol = Volume.open(store, "vol", cache_root=cache, break_lease=True)
    try:
        assert read_all(vol) == expected
        _writes(vol, rng, 3, 10)
        seq = vol.checkpoint()     # a delta over `first` again; the leftovers go
        assert ckpt.read_manifest(store, "vol", seq).prev == first
        assert not ckpt.list_incomplete_checkpoints(store, "vol")
        expected = read_all(vol)
    finally:
        vol.close()
    with Volume.open(store, "vol", cache_root=str(tmp_path / "ro"), read_only=True) as v:
        assert read_all(v) == expected


def test_a_volume_with_format_1_checkpoints_only_still_opens(store, tmp_path, monkeypatch):
    """Checkpoints written before deltas existed are bases with a format 1
    manifest; a base written now is byte for byte the same kind of object."""
    create_volume(store, "vol", SIZE, segment_size=64 * 1024, checkpoint_segments=10_000,
                  seal_interval=3600)
    cache = str(tmp_path / "cache")
    rng = random.Random(5)
    monkeypatch.setattr(ckpt, "MAX_CHAIN", 0)          # the previous format: bases only
    with Volume.open(store, "vol", cache_root=cache) as vol:
        for r in range(4):
            _writes(vol, rng, r, 30)
            vol.checkpoint()
        expected = read_all(vol)
    for seq in ckpt.list_checkpoints(store, "vol"):
        body = json.loads(store.get(names.checkpoint_manifest_key("vol", seq)))["manifest"]
        assert sorted(body) == ["block_size", "created_ns", "extents", "format", "parts",
                                "seq", "top_crc", "volume_id", "volume_size"]
        assert body["format"] == 1
    monkeypatch.setattr(ckpt, "MAX_CHAIN", 8)
    wipe(cache_dir_for(cache, store, "vol"))
    with Volume.open(store, "vol", cache_root=cache) as vol:
        assert read_all(vol) == expected
        _writes(vol, rng, 9, 30)
        seq = vol.checkpoint()
        assert ckpt.read_manifest(store, "vol", seq).is_delta
        expected = read_all(vol)
    with Volume.open(store, "vol", cache_root=str(tmp_path / "ro"), read_only=True) as v:
        assert read_all(v) == expected


def _delta_of(tmp_path, records: list[list], monkeypatch, *, arrays: bool) -> list[tuple]:
    from lsbd.engine import deltas
    from lsbd.map.packed import Run

    scratch: list[int] = []
    monkeypatch.setattr(deltas.BlockMap, "overlay",
                        lambda self, *a, _f=deltas.BlockMap.overlay: scratch.append(1) or _f(self, *a))
    if not arrays:
        monkeypatch.setattr(deltas, "ARRAY_DELTA_BLOCKS", 0)
    out: list[tuple] = []
    with deltas.delta_entries(str(tmp_path), BS, lambda seq: records[seq - 1], 1,
                              len(records)) as entries:
        for e in entries:
            out.extend(e.entries() if isinstance(e, Run) else [tuple(e)])
    monkeypatch.undo()
    assert bool(scratch) != arrays                 # built the way asked
    return out


def _last_records_model(segments) -> dict[int, tuple]:
    """Each block's (seq, offset) after laying the segments' records over
    one another in order (offset 0 for a hole)."""
    from lsbd.format.segment import DATA, RESIZE

    model: dict[int, tuple] = {}
    for seq, records in enumerate(segments, 1):
        for r in records:
            if r.kind == RESIZE:
                continue
            for i in range(r.nblocks):
                model[r.lba + i] = (seq, r.data_offset + i * BS) if r.kind == DATA else (0, 0)
    return model


def _per_block(entries: list[tuple]) -> dict[int, tuple]:
    out: dict[int, tuple] = {}
    for lba, n, seq, off in entries:
        for i in range(n):
            assert lba + i not in out                # entries do not overlap
            out[lba + i] = (seq, off + i * BS if seq else 0)
    return out


def test_a_delta_of_one_block_records_is_what_the_scratch_map_makes(tmp_path, monkeypatch):
    """A delta of one-block records built on arrays holds what laying them
    over a scratch map one after the other gives: the newest record of each
    block (later segments, and later records in a segment, win), holes as
    seq 0, resizes ignored, each block an entry of its own."""
    from lsbd.engine import deltas
    from lsbd.format.segment import DATA, RESIZE, TRIM, ZERO, Record

    rng = random.Random(3)
    segments = []
    for _seq in range(1, 9):
        records = []
        for i in range(300):
            kind = rng.choice([DATA, DATA, DATA, ZERO, TRIM])
            lba = rng.randrange(200)               # blocks written again and again
            records.append(Record(kind, 0, lba, 1, 4096 * (i + 1) if kind == DATA else 0,
                                  b"\0" * 4 if kind == DATA else b""))
        records.insert(150, Record(RESIZE, 0, SIZE, 0, 0, b""))
        segments.append(records)
    by_arrays = _delta_of(tmp_path, segments, monkeypatch, arrays=True)
    by_scratch = _delta_of(tmp_path, segments, monkeypatch, arrays=False)
    assert by_arrays == by_scratch
    model = _last_records_model(segments)
    assert by_arrays == [(lba, 1, *model[lba]) for lba in sorted(model)]
    assert deltas.array_delta(lambda seq: deltas.record_arrays(segments[seq - 1]), 1, 8,
                              BS) is not None


def test_a_delta_of_longer_records_is_what_the_scratch_map_makes(tmp_path, monkeypatch):
    """Records longer than one block (relocated reads, sequential writes,
    long trims) mixed with one-block ones, overlapping each other within a
    segment and across segments: built on arrays, the delta is entry for
    entry what the scratch map makes (each record's stretches that no later
    record covers), and block for block what laying the records over one
    another gives."""
    from lsbd.engine import deltas
    from lsbd.format.segment import DATA, RESIZE, TRIM, ZERO, Record

    rng = random.Random(8)
    segments = []
    for _seq in range(1, 10):
        records, at = [], 0
        for _i in range(120):
            kind = rng.choice([DATA, DATA, DATA, ZERO, TRIM])
            n = rng.choice([1, 1, 2, 3, 8, 17, 64])
            lba = rng.randrange(400)
            records.append(Record(kind, 0, lba, n, 4096 * (at + 1) if kind == DATA else 0,
                                  b"\0" * 4 * n if kind == DATA else b""))
            at += n if kind == DATA else 0
        records.insert(60, Record(RESIZE, 0, SIZE, 0, 0, b""))
        records.insert(30, Record(TRIM, 0, 7, 0, 0, b""))       # an empty record
        segments.append(records)
    by_arrays = _delta_of(tmp_path, segments, monkeypatch, arrays=True)
    by_scratch = _delta_of(tmp_path, segments, monkeypatch, arrays=False)
    assert by_arrays == by_scratch
    assert any(n > 1 for _lba, n, _seq, _off in by_arrays)
    model = _last_records_model(segments)
    assert _per_block(by_arrays) == model
    # Packed runs of a few entries each: the pieces cross the runs' ends.
    monkeypatch.setattr(deltas, "newest_pieces",
                        lambda *a, _f=deltas.newest_pieces: _f(*a, per=7))
    assert _delta_of(tmp_path, segments, monkeypatch, arrays=True) == by_scratch


def test_a_delta_past_its_bound_in_blocks_goes_to_the_scratch_map(tmp_path, monkeypatch):
    """A long trim (or more blocks than ARRAY_DELTA_BLOCKS in all) is laid
    over the scratch map, with the same result."""
    from lsbd.engine import deltas
    from lsbd.format.segment import DATA, TRIM, Record

    segments = [[Record(DATA, 0, 5, 4, 4096, b"\0" * 16)],
                [Record(TRIM, 0, 0, 1 << 30, 0, b""), Record(DATA, 0, 6, 1, 4096, b"\0" * 4)]]
    assert deltas.array_delta(lambda seq: deltas.record_arrays(segments[seq - 1]), 1, 2,
                              BS) is None
    assert deltas.array_delta(lambda seq: deltas.record_arrays(segments[seq - 1]), 1, 1,
                              BS) is not None
    expected = [(0, 6, 0, 0), (6, 1, 2, 4096), (7, (1 << 30) - 7, 0, 0)]
    assert _delta_of(tmp_path, segments, monkeypatch, arrays=False) == expected
    monkeypatch.setattr(deltas, "ARRAY_DELTA_BLOCKS", 4)
    assert deltas.array_delta(lambda seq: deltas.record_arrays(segments[seq - 1]), 1, 1,
                              BS) is not None
    monkeypatch.setattr(deltas, "ARRAY_DELTA_BLOCKS", 3)
    assert deltas.array_delta(lambda seq: deltas.record_arrays(segments[seq - 1]), 1, 1,
                              BS) is None


def test_golden_delta_bytes(store):
    """docs/format.md's example delta: one block written, four trimmed."""
    from lsbd.map.blockmap import Extent

    base = ckpt.write_checkpoint(store, "vol", "v" * 32, 8, volume_size=SIZE, block_size=BS,
                                 extents=[], segments=[])
    m = ckpt.write_checkpoint(store, "vol", "v" * 32, 9, volume_size=SIZE, block_size=BS,
                              extents=[Extent(0x2a, 1, 9, 0x58), Extent(0x30, 4, 0, 0)],
                              segments=[], delta_of=base)
    key, kind, count, _crc = m.parts[0]
    body = ckpt._decode_part(store.get(key), seq=9, kind=ckpt.PART_DELTA_KIND, where=key)
    assert (kind, count) == (3, 2)
    assert body == bytes.fromhex("2a00000000000000" "01000000" "0900000000000000"
                                 "5800000000000000" "3000000000000000" "04000000"
                                 "0000000000000000" "0000000000000000")
    outer = json.loads(store.get(names.checkpoint_manifest_key("vol", 9)))
    assert {k: outer["manifest"][k] for k in ("format", "prev", "base", "chain",
                                             "delta_entries", "extents")} == {
        "format": 2, "prev": 8, "base": 8, "chain": 1, "delta_entries": 2, "extents": 2}
    assert list(ckpt.read_extents(store, m)) == [Extent(0x2a, 1, 9, 0x58), Extent(0x30, 4, 0, 0)]


def test_overlay_matches_a_block_model():
    """The one-pass merge that opens a chain, against block-by-block
    application of random layers (holes included)."""
    from lsbd.engine.deltas import lay_over, overlay

    rng = random.Random(21)
    for _ in range(300):
        n_blocks = rng.randint(1, 60)
        layers = []
        for layer in range(rng.randint(1, 10)):
            entries, at = [], 0
            while at < n_blocks:
                at += rng.randint(0, 5)
                if at >= n_blocks:
                    break
                n = rng.randint(1, min(8, n_blocks - at))
                seq = 0 if rng.random() < 0.3 else layer * 100 + at + 1
                entries.append((at, n, seq, 1000 * seq if seq else 0))
                at += n
            layers.append(entries)
        model: dict[int, tuple[int, int]] = {}
        for entries in layers:
            for lba, n, seq, off in entries:
                for i in range(n):
                    model[lba + i] = (seq, off + i * BS)
        merged = layers[0]
        for entries in layers[1:]:
            merged = list(overlay(merged, entries, BS))
        got: dict[int, tuple[int, int]] = {}
        last_end = -1
        for lba, n, seq, off in merged:
            assert lba >= last_end and n > 0
            last_end = lba + n
            for i in range(n):
                got[lba + i] = (seq, off + i * BS)
        assert {k: v for k, v in got.items() if v[0]} == {k: v for k, v in model.items() if v[0]}
        # Merging the upper layers pairwise first (how a chain opens) gives
        # the same entries.
        assert list(lay_over(layers, BS)) == list(merged)


def _random_layer(rng: random.Random, n_blocks: int, seq_base: int, holes: bool) -> list[tuple]:
    entries, at = [], 0
    while at < n_blocks:
        at += rng.randint(0, 5)
        if at >= n_blocks:
            break
        n = rng.randint(1, min(8, n_blocks - at)) if rng.random() < 0.5 else 1
        seq = 0 if holes and rng.random() < 0.3 else seq_base + rng.randint(1, 3)
        off = ((1 << 33) + at if rng.random() < 0.05 else rng.randrange(1 << 31)) if seq else 0
        entries.append((at, n, seq, off))
        at += n
    return entries


def _runs(entries: list[tuple], rng: random.Random) -> list:
    """entries in packed parts of random sizes."""
    from lsbd.map.packed import ENTRY, Part, Run

    runs, at = [], 0
    while at < len(entries):
        take = rng.randint(1, 9)
        body = b"".join(ENTRY.pack(*e) for e in entries[at:at + take])
        runs.append(Run(Part(body)))
        at += take
    return runs


def _expand(stream) -> list[tuple]:
    from lsbd.map.packed import Run

    out = []
    for e in stream:
        out.extend(e.entries() if isinstance(e, Run) else [e])
    return out


def test_packed_runs_merge_and_load_as_entries_do(tmp_path, monkeypatch):
    """A base in packed runs with deltas laid over it gives the same
    entries as the tuple merge, and loads the same map and live counts."""
    from lsbd.engine.deltas import keep_mapped, merge_layers, overlay, overlay_runs
    from lsbd.map import loading
    from lsbd.map.blockmap import BlockMap

    monkeypatch.setattr(loading, "_SHORT_RUN", 2)   # runs of one entry go one by one
    from lsbd.map.encoding import PENDING, SegmentInfo

    rng = random.Random(5)
    for trial in range(200):
        n_blocks = rng.randint(1, 80)
        base = _random_layer(rng, n_blocks, 0, holes=False)
        deltas = [_random_layer(rng, n_blocks, 10 * (k + 1), holes=True)
                  for k in range(rng.randint(0, 4))]
        want = list(overlay(base, merge_layers([list(d) for d in deltas], BS), BS))
        got = _expand(overlay_runs(_runs(base, rng), merge_layers([list(d) for d in deltas],
                                                                 BS), BS))
        assert got == want, f"trial {trial}"
        if trial % 20:
            continue
        segs = [SegmentInfo(seq=s, state=PENDING, sealed_ns=0, size=1, live_blocks=0,
                            data_blocks=1, trailer_crc=0) for s in range(1, 60)]
        maps = []
        for name, stream in (("t", [e for e in want if e[2]]),
                             ("r", keep_mapped(overlay_runs(
                                 _runs(base, rng), merge_layers(deltas, BS), BS)))):
            bm = BlockMap(str(tmp_path / f"{name}{trial}"), BS, scratch=True)
            bm.load(stream, segs, batch=3)
            maps.append(([tuple(e) for e in bm.iter_extents()],
                         {s.seq: s.live_blocks for s in bm.segments()}))
            bm.close()
        assert maps[0] == maps[1]


def _stored_chain(store, layers: list[list[tuple]], segs) -> ckpt.Manifest:
    """layers[0] as a base, the rest as deltas over it, in the store."""
    m = ckpt.write_checkpoint(store, "vol", "vid", 100, volume_size=SIZE, block_size=BS,
                              extents=layers[0], segments=segs)
    for k, layer in enumerate(layers[1:]):
        m = ckpt.write_checkpoint(store, "vol", "vid", 101 + k, volume_size=SIZE,
                                  block_size=BS, extents=layer, segments=segs, delta_of=m)
    return m


@pytest.mark.parametrize("one_block", [0.0, 0.97, 1.0], ids=["mixed", "mostly-one", "one"])
def test_a_chain_opens_as_its_layers_laid_over(tmp_path, monkeypatch, one_block):
    """chain_extents (by ranges of the base's parts: on arrays where every
    entry is one block long, the general overlay elsewhere) gives exactly
    the layers laid over each other in turn, holes dropped, and loads the
    same map and live counts; with one more delta (`then`) too.  Parts of
    a few entries, so ranges are many and entries cross them."""
    from lsbd.engine.deltas import chain_extents, keep_mapped, lay_over
    from lsbd.map.blockmap import BlockMap
    from lsbd.map.encoding import PENDING, SegmentInfo

    monkeypatch.setattr(ckpt, "PART_EXTENTS", 5)
    monkeypatch.setattr(ckpt, "PIECE_EXTENTS", 2)     # parts read in pieces
    segs = [SegmentInfo(seq=s, state=PENDING, sealed_ns=0, size=1, live_blocks=0,
                        data_blocks=1, trailer_crc=0) for s in range(1, 80)]
    rng = random.Random(17)
    for trial in range(40):
        store = open_test_store("file://" + str(tmp_path / f"s{trial}"))
        n_blocks = rng.randint(1, 120)

        def layer(seq_base: int, holes: bool, n_blocks: int = n_blocks) -> list[tuple]:
            entries = _random_layer(rng, n_blocks, seq_base, holes)
            return [(lba, 1, seq, off) if rng.random() < one_block else (lba, n, seq, off)
                    for lba, n, seq, off in entries]

        layers = [layer(0, False)] + [layer(10 * (k + 1), True)
                                      for k in range(rng.randint(0, 5))]
        then = layer(70, True) if trial % 2 else None
        manifest = _stored_chain(store, layers, segs)
        chain = ckpt.read_chain(store, "vol", manifest)
        want = [e for e in lay_over([*layers, *([then] if then else [])], BS) if e[2]]
        got = _expand(keep_mapped(chain_extents(store, chain, BS, then=then)))
        assert [tuple(e) for e in got] == want, f"trial {trial}"
        bm = BlockMap(str(tmp_path / f"m{trial}"), BS, scratch=True)
        bm.load(keep_mapped(chain_extents(store, chain, BS, then=then)), segs, batch=3)
        assert [tuple(e) for e in bm.iter_extents()] == want
        live = {s.seq: s.live_blocks for s in bm.segments() if s.live_blocks}
        expect: dict[int, int] = {}
        for _lba, n, seq, _off in want:
            expect[seq] = expect.get(seq, 0) + n
        assert live == expect
        bm.close()
        store.close()


def test_lay_single_replaces_adds_and_removes():
    """Laying one-block entries on arrays: a later layer wins on a block,
    a hole removes the block unless a later layer writes it again."""
    from lsbd.map.packed import ENTRY, Part, lay_single, single_blocks

    def body(*entries):
        return b"".join(ENTRY.pack(*e) for e in entries)

    base = Part(body((1, 1, 5, 10), (3, 1, 5, 11), (7, 1, 5, 12)))
    one = body((0, 1, 6, 1), (3, 1, 6, 2), (7, 1, 0, 0), (9, 1, 0, 0))
    two = body((3, 1, 0, 0), (7, 1, 7, 3), (8, 1, 7, 4))
    assert single_blocks(one) and not single_blocks(body((2, 2, 6, 1)))
    got = list(ENTRY.iter_unpack(lay_single(base, [[one], [two]]).body))
    assert got == [(0, 1, 6, 1), (1, 1, 5, 10), (7, 1, 7, 3), (8, 1, 7, 4)]
    assert lay_single(None, [[one]]).body == body((0, 1, 6, 1), (3, 1, 6, 2))
    assert lay_single(base, []).body == base.body


def test_a_chain_merged_ahead_raises_what_the_merge_raised():
    """Opening merges the chain in a thread of its own: an error there (a
    part that fails its check) is the caller's error, and a caller that
    stops early stops the thread."""
    import threading

    from lsbd.engine.deltas import produced_ahead
    from lsbd.errors import CorruptionError

    def failing():
        yield from range(10)
        raise CorruptionError("part 3 fails its check")

    got = []
    with pytest.raises(CorruptionError, match="part 3"):
        for x in produced_ahead(failing(), depth=1, batch=3):
            got.append(x)
    assert got == list(range(9)) or got == list(range(10))
    it = produced_ahead(iter(range(10**6)), depth=1, batch=2)
    assert next(it) == 0
    it.close()
    assert not [t for t in threading.enumerate() if t.name == "chain-merge"]


def test_parts_read_by_pieces_are_the_parts(store, monkeypatch):
    """A checkpoint read in pieces holds the same entries in the same order
    as read part by part; a part that unpacks to other than the count its
    manifest gives fails its check."""
    import attrs

    from lsbd.errors import CorruptionError

    monkeypatch.setattr(ckpt, "PART_EXTENTS", 1000)
    monkeypatch.setattr(ckpt, "INFLATE_STEP", 97)
    rng = random.Random(5)
    entries = sorted({(rng.randrange(1 << 30), 1, rng.randint(1, 9), rng.randrange(1 << 31))
                      for _ in range(3500)})
    m = ckpt.write_checkpoint(store, "vol", "vid", 7, volume_size=SIZE, block_size=BS,
                              extents=entries, segments=[])
    whole = _expand(ckpt.read_runs(store, m))
    assert [tuple(e) for e in whole] == entries
    for piece in (1, 7, 333, 1000, 5000):
        runs = list(ckpt.read_runs(store, m, piece=piece, ahead=1))
        assert max(len(r) for r in runs) <= piece
        assert _expand(runs) == whole
    for wrong in (-1, 1):
        key, kind, count, crc = m.parts[1]
        lying = attrs.evolve(m, parts=[m.parts[0], (key, kind, count + wrong, crc), *m.parts[2:]])
        with pytest.raises(CorruptionError, match="does not hold"):
            list(ckpt.read_runs(store, lying, piece=64))


def test_merging_a_chain_holds_pieces_not_parts(tmp_path, monkeypatch):
    """What merging a chain holds at once does not grow with the map: the
    peak of Python's allocations while a base and 8 deltas are merged is
    about the same for a base four times larger, and below one part's
    entries for each checkpoint of the chain (what reading whole parts
    held; its compressed bytes and a piece are held instead)."""
    import tracemalloc

    from lsbd.engine.deltas import chain_extents
    from lsbd.map.packed import _np

    _np()     # imported before measuring
    part = 1 << 14
    monkeypatch.setattr(ckpt, "PART_EXTENTS", part)
    monkeypatch.setattr(ckpt, "PIECE_EXTENTS", 1 << 9)
    rng = random.Random(3)
    space = 1 << 32

    def layer(count: int, seq: int) -> list[tuple]:
        return [(lba, 1, seq, rng.randrange(1 << 31))
                for lba in sorted(rng.sample(range(space), count))]

    peaks = []
    for base_entries in (4 * part, 16 * part):
        store = open_test_store("file://" + str(tmp_path / f"s{base_entries}"))
        layers = [layer(base_entries, 1)] + [layer(part, 2 + k) for k in range(ckpt.MAX_CHAIN)]
        chain = ckpt.read_chain(store, "vol", _stored_chain(store, layers, []))
        del layers
        tracemalloc.start()
        count = sum(len(e) if not isinstance(e, tuple) else 1
                    for e in chain_extents(store, chain, BS))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        store.close()
        assert count >= base_entries
    one_part = part * ckpt.EXTENT_ENTRY.size
    assert peaks[1] < 1.3 * peaks[0], peaks
    assert peaks[1] < (ckpt.MAX_CHAIN + 1) * one_part, (peaks, one_part)


def test_a_delta_holds_no_map_snapshot_while_it_waits_for_uploads(store, tmp_path):
    """A reader held while uploads are waited for keeps LMDB from reusing the
    pages the writer frees meanwhile, and the map file grows with writes."""
    create_volume(store, "vol", SIZE)
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "cache"))
    try:
        rng = random.Random(7)
        _writes(vol, rng, 1, 50)
        vol.checkpoint()                      # the base: read from the map
        _writes(vol, rng, 2, 50)
        up = testing.uploader(vol)
        held_while_waiting = []
        wait = up.wait_durable

        def watching(seq, timeout=None):
            held_while_waiting.append(testing.map_snapshots_held(vol))
            return wait(seq, timeout)

        up.wait_durable = watching
        seq = vol.checkpoint()
        assert _manifests(store)[seq].prev is not None, "the test needs a delta"
        assert held_while_waiting and not any(held_while_waiting), held_while_waiting
    finally:
        vol.close()
