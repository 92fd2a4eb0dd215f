"""A model test: hypothesis drives the engine with random transactions,
flushes, checkpoints, closes and crashes (journal kept or lost) and compares
every read with a plain bytearray.

After a crash the volume must equal the model after some prefix of the
acknowledged transactions (invariant 3), never a half-applied transaction
(invariant 4), and the prefix must include everything acknowledged before
the last flush (when the journal survives) or everything known to be in
the store (when it does not).

The example counts here are the default tier's: tests/crash/test_soak.py runs
each of these models many times longer (`make test-slow`)."""

from __future__ import annotations

import shutil
from unittest.mock import patch

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from powercut import PowerCut

from lsbd.meta.config import create_volume
from lsbd.history import compactor as compact_mod
from lsbd.history.compactor import compact
from lsbd.history.restore import create_clone, restore_volume
from lsbd.engine.volume import Volume
from lsbd.store import open_store

BS = 4096
BLOCKS = 64
SIZE = BS * BLOCKS

offsets = st.integers(min_value=0, max_value=SIZE - 1)


@st.composite
def ranges(draw, max_len=6 * BS):
    offset = draw(offsets)
    length = draw(st.integers(min_value=1, max_value=min(max_len, SIZE - offset)))
    return offset, length


@st.composite
def operations(draw):
    kind = draw(st.sampled_from(["write", "write", "write", "zero", "trim"]))
    offset, length = draw(ranges())
    if kind == "write":
        fill = draw(st.sampled_from(["random", "zeros", "pattern"]))
        if fill == "zeros":
            data = bytes(length)
        elif fill == "pattern":
            data = bytes([draw(st.integers(1, 255))]) * length
        else:
            data = draw(st.binary(min_size=length, max_size=length))
        return ("write", offset, data)
    return (kind, offset, length)


class VolumeModel(RuleBasedStateMachine):
    """Runs against a local store; one volume per example."""

    root: str = ""
    #: Settings of the volume (VolumeModelSealed: compressed and encrypted).
    volume_options: dict = {}
    secret = None

    def before_create(self) -> None:
        pass
    segment_size = 16 * 1024

    @initialize()
    def setup(self):
        import tempfile

        self.tmp = tempfile.mkdtemp(prefix="lsbd-model-")
        self.store = open_store(f"file://{self.tmp}/store", secret=self.secret)
        self.cache = f"{self.tmp}/cache"
        self.before_create()
        # Tiny segments so that sealing, uploads and checkpoints happen often.
        create_volume(self.store, "m", SIZE, segment_size=self.segment_size, seal_interval=3600,
                      checkpoint_segments=5, retain_seconds=0, **self.volume_options)
        self.clone_states: dict[str, bytes] = {}
        # Syncs are seen by a double that drops everything else at a power cut.
        self.power = PowerCut(self.cache).install()
        self.vol = Volume.open(self.store, "m", cache_root=self.cache)
        self.model = bytearray(SIZE)
        self.history = [bytes(self.model)]   # the state after each acknowledged transaction
        self.flushed = 0                     # index in history covered by the last flush
        self.in_store = 0                    # index known to be in the store
        self.snapshots: dict[str, tuple[int, bytes]] = {}   # name -> (seq, state)
        self.clones = 0

    def teardown(self):
        try:
            if getattr(self, "vol", None) is not None:
                self.vol.close()
        finally:
            if getattr(self, "power", None) is not None:
                self.power.uninstall()
        shutil.rmtree(getattr(self, "tmp", "/nonexistent"), ignore_errors=True)

    def _apply(self, ops):
        for kind, offset, arg in ops:
            if kind == "write":
                self.model[offset:offset + len(arg)] = arg
            else:
                self.model[offset:offset + arg] = bytes(arg)
        self.history.append(bytes(self.model))

    @rule(op=operations())
    def single(self, op):
        kind, offset, arg = op
        if kind == "write":
            self.vol.write(offset, arg)
        elif kind == "zero":
            self.vol.write_zeroes(offset, arg)
        else:
            self.vol.trim(offset, arg)
        self._apply([op])

    @rule(ops=st.lists(operations(), min_size=2, max_size=5))
    def transaction(self, ops):
        with self.vol.transaction() as tx:
            for kind, offset, arg in ops:
                {"write": tx.write, "zero": tx.write_zeroes, "trim": tx.trim}[kind](offset, arg)
        self._apply(ops)

    @rule()
    def flush(self):
        self.vol.flush()
        self.flushed = len(self.history) - 1

    @rule()
    def checkpoint(self):
        self.vol.checkpoint()
        # A checkpoint uploads everything first.
        self.flushed = self.in_store = len(self.history) - 1

    @rule()
    def checkpoint_cut_short(self):
        """A checkpoint (often a delta) whose parts are written but whose
        manifest never is, as when the writer dies while writing it."""
        real_put = self.store.put

        def put(key, data, **kw):
            if key.endswith("/manifest"):
                raise OSError("cut short")
            return real_put(key, data, **kw)

        with patch.object(self.store, "put", put):
            try:
                self.vol.checkpoint()
            except OSError:
                pass
        # It uploaded everything before its manifest.
        self.flushed = self.in_store = len(self.history) - 1

    @rule()
    def close_and_reopen(self):
        self.vol.close()
        self.vol = Volume.open(self.store, "m", cache_root=self.cache)
        self.flushed = self.in_store = len(self.history) - 1

    @rule(lose_journal=st.booleans())
    def crash_and_reopen(self, lose_journal):
        self.vol.abandon()
        if lose_journal:
            shutil.rmtree(self.cache)
            self.power.settle()   # the disk is gone: nothing of it comes back
        self.vol = Volume.open(self.store, "m", cache_root=self.cache, break_lease=True)
        state = self.vol.read(0, SIZE)
        floor = self.in_store if lose_journal else self.flushed
        matches = [i for i in range(floor, len(self.history)) if self.history[i] == state]
        assert matches, (f"after a crash (journal {'lost' if lose_journal else 'kept'}) the "
                         f"volume is not the state after any prefix >= {floor} of "
                         f"{len(self.history) - 1} transactions")
        if not lose_journal:
            # The page cache survives a process crash: nothing acknowledged is lost.
            assert matches[-1] == len(self.history) - 1
        # Continue from the recovered state.
        self.model = bytearray(state)
        top = matches[-1]
        self.history = self.history[:top + 1]
        # Recovery sealed what it found: durable locally, in the store only if read from there.
        self.flushed = top
        self.in_store = top if lose_journal else min(self.in_store, top)

    @rule(flush_first=st.booleans())
    def power_cut_and_reopen(self, flush_first):
        """The machine loses power: only what was synced stays in the cache
        dir.  Every flushed transaction survives, the rest is a prefix.
        flush_first: the power goes right after a flush (or it might rarely
        find flushed writes that are not in the store yet)."""
        if flush_first:
            self.flush()
        self.power.cut(self.vol.abandon)
        self.vol = Volume.open(self.store, "m", cache_root=self.cache)
        state = self.vol.read(0, SIZE)
        matches = [i for i in range(self.flushed, len(self.history)) if self.history[i] == state]
        assert matches, (f"after a power cut the volume is not the state after any prefix "
                         f">= {self.flushed} (the last flush) of {len(self.history) - 1} "
                         "transactions")
        self.model = bytearray(state)
        top = matches[-1]
        self.history = self.history[:top + 1]
        self.flushed = top       # recovery synced what it kept
        self.in_store = min(self.in_store, top)

    @rule()
    def snapshot(self):
        name = f"s{len(self.snapshots)}"
        snap = self.vol.snapshot(name)
        self.snapshots[name] = (snap.seq, bytes(self.model))
        self.flushed = self.in_store = len(self.history) - 1

    @precondition(lambda self: getattr(self, "snapshots", None))
    @rule(data=st.data())
    def read_snapshot(self, data):
        name = data.draw(st.sampled_from(sorted(self.snapshots)))
        seq, state = self.snapshots[name]
        with Volume.open(self.store, "m", cache_root=self.cache, at_seq=seq) as past:
            assert past.read_only
            assert past.read(0, SIZE) == state, f"snapshot {name} (seq {seq}) changed"

    @precondition(lambda self: getattr(self, "snapshots", None))
    @rule(data=st.data(), op=operations())
    def clone_diverges(self, data, op):
        """A clone of a snapshot starts from its state, takes writes of its own,
        and neither it nor the source sees the other's writes."""
        name = data.draw(st.sampled_from(sorted(self.snapshots)))
        seq, state = self.snapshots[name]
        clone = f"c{self.clones}"
        self.clones += 1
        create_clone(self.store, self.vol.config, clone, seq, size=SIZE, cache_root=self.cache)
        expected = bytearray(state)
        kind, offset, arg = op
        with Volume.open(self.store, clone, cache_root=self.cache) as c:
            assert c.read(0, SIZE) == state
            if kind == "write":
                c.write(offset, arg)
                expected[offset:offset + len(arg)] = arg
            else:
                c.trim(offset, arg)
                expected[offset:offset + arg] = bytes(arg)
            assert c.read(0, SIZE) == bytes(expected)
        # Reopened from the store alone, the clone is still its own.
        shutil.rmtree(f"{self.cache}/{clone}-" + self.vol.folder.rsplit("-", 1)[-1],
                      ignore_errors=True)
        self.power.settle()
        with Volume.open(self.store, clone, cache_root=self.cache) as c:
            assert c.read(0, SIZE) == bytes(expected)
        self.clone_states[clone] = bytes(expected)

    @precondition(lambda self: getattr(self, "snapshots", None))
    @rule(data=st.data())
    def restore(self, data):
        """A restore of a snapshot is an independent volume with its state."""
        name = data.draw(st.sampled_from(sorted(self.snapshots)))
        seq, state = self.snapshots[name]
        target = f"r{self.clones}"
        self.clones += 1
        restore_volume(self.store, self.vol.config, seq, target, cache_root=self.cache)
        with Volume.open(self.store, target, cache_root=self.cache, read_only=True) as r:
            assert r.read(0, SIZE) == state, f"restore of {name} differs"
        self.clone_states[target] = state

    @rule(threshold=st.sampled_from([0.3, 0.6, 1.0]), defrag=st.booleans())
    def compact(self, threshold, defrag):
        # Windows of 8 blocks, defragmented from 3 pieces: the tiny volume has many.
        with patch.multiple(compact_mod, DEFRAG_WINDOW=8 * BS, DEFRAG_MIN_EXTENTS=3):
            compact(self.vol, threshold=threshold, defrag=defrag)
        self.flushed = self.in_store = len(self.history) - 1
        # Compaction of the source never breaks a clone.
        for clone, state in self.clone_states.items():
            with Volume.open(self.store, clone, cache_root=self.cache, read_only=True) as c:
                assert c.read(0, SIZE) == state, f"clone {clone} changed after compaction"

    @precondition(lambda self: hasattr(self, "vol"))
    @rule(r=ranges(max_len=SIZE))
    def read_range(self, r):
        offset, length = r
        assert self.vol.read(offset, length) == bytes(self.model[offset:offset + length])

    @precondition(lambda self: hasattr(self, "vol"))
    @rule(r=ranges(max_len=SIZE))
    def allocation_matches(self, r):
        offset, length = r
        runs = self.vol.allocation(offset, length)
        assert sum(a.length for a in runs) == length
        assert runs[0].offset == offset
        for a in runs:
            if not a.allocated:
                assert self.model[a.offset:a.offset + a.length] == bytes(a.length)

    @invariant()
    def whole_volume_matches(self):
        if hasattr(self, "vol"):
            assert self.vol.read(0, SIZE) == bytes(self.model)


VolumeModel.TestCase.settings = settings(
    max_examples=40, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TestVolumeModel = VolumeModel.TestCase


class VolumeModelRanges(VolumeModel):
    """The same model with every record longer than two blocks kept as a
    range in the open segment's index (the path sequential writes and a
    whole-disk discard take)."""

    @initialize()
    def setup(self):
        from lsbd.segments import journal

        self._big_range = journal.BIG_RANGE
        journal.BIG_RANGE = 2
        super().setup()

    def teardown(self):
        from lsbd.segments import journal

        try:
            super().teardown()
        finally:
            journal.BIG_RANGE = getattr(self, "_big_range", journal.BIG_RANGE)


VolumeModelRanges.TestCase.settings = settings(
    max_examples=25, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TestVolumeModelRanges = VolumeModelRanges.TestCase


class VolumeModelSealed(VolumeModel):
    """The same model on a compressed, encrypted volume: every segment and
    checkpoint goes through lsbd/crypto's sealing."""

    volume_options = {"compression": "zstd:1", "encryption": "aes-256-gcm"}

    @staticmethod
    def secret(_volume: str):
        from lsbd.crypto.keyring import PASSPHRASE, Secret

        return Secret(PASSPHRASE, b"model passphrase")

    def before_create(self) -> None:
        from lsbd.crypto import keyring as kr
        from lsbd.crypto import keystore
        from lsbd.crypto.aead import Argon2Params, random_bytes

        keystore.save(self.store.inner, "m", kr.new_keyring(
            random_bytes(16), self.secret("m"),
            params=Argon2Params(memory_kib=64, iterations=1, lanes=1)))


VolumeModelSealed.TestCase.settings = settings(
    max_examples=12, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TestVolumeModelSealed = VolumeModelSealed.TestCase


class VolumeModelLongJournal(VolumeModel):
    """The same model with segments larger than the volume: flushed writes
    stay in the open journal (not in the store) until a checkpoint, a
    snapshot, a compaction or a close seals it, so a power cut finds them
    there."""

    segment_size = 4 * 1024 * 1024


VolumeModelLongJournal.TestCase.settings = settings(
    max_examples=20, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TestVolumeModelLongJournal = VolumeModelLongJournal.TestCase


class VolumeModelStoreMode(VolumeModel):
    """The same model in flush mode `store`: a flush returns once everything
    before it is in the store, so even losing the cache dir keeps it."""

    volume_options = {"flush_mode": "store"}

    @rule()
    def flush(self):
        super().flush()
        self.in_store = self.flushed


VolumeModelStoreMode.TestCase.settings = settings(
    max_examples=20, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TestVolumeModelStoreMode = VolumeModelStoreMode.TestCase


class VolumeModelStaged(VolumeModel):
    """The same model with segments of one-block writes staged in the map
    and merged into its extents after every two, three blocks a
    transaction (lsbd.map.merge): crashes, power cuts, checkpoints,
    snapshots and compaction land between stagings and inside merges."""

    @initialize()
    def setup(self):
        from lsbd.map import merge

        self._merge_knobs = (merge.STAGE_SEGMENTS, merge.MERGE_RANGE, merge.MERGE_STEPS)
        merge.STAGE_SEGMENTS, merge.MERGE_RANGE, merge.MERGE_STEPS = 2, 3, 1
        super().setup()

    def teardown(self):
        from lsbd.map import merge

        try:
            super().teardown()
        finally:
            if hasattr(self, "_merge_knobs"):
                merge.STAGE_SEGMENTS, merge.MERGE_RANGE, merge.MERGE_STEPS = \
                    self._merge_knobs

    @rule(blocks=st.lists(st.integers(0, BLOCKS - 1), min_size=1, max_size=8),
          fill=st.integers(1, 255))
    def one_block_writes(self, blocks, fill):
        """Aligned 4 KiB writes: a segment of only these is staged."""
        for i, lba in enumerate(blocks):
            data = bytes([(fill + i) % 256 or 1]) * BS
            self.vol.write(lba * BS, data)
            self._apply([("write", lba * BS, data)])


VolumeModelStaged.TestCase.settings = settings(
    max_examples=25, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TestVolumeModelStaged = VolumeModelStaged.TestCase
