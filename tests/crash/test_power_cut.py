"""Power cuts (issue #16, DESIGN invariant 3): writers run under load, the
power is cut at a random moment (tests/support/powercut.py keeps only what was
synced), the volume is reopened and must be a prefix of the acknowledged
writes holding every write flushed before the cut.  Both flush modes, both
store kinds.  Unlike SIGKILL, this sees a missing fsync."""

from __future__ import annotations

import os
import random
import threading
import time

import crash_writer as cw
import pytest
from engine_helpers import BS, MiB, blocks, open_test_store, read_all
from powercut import PowerCut, remove_tree
from test_crash import _observe, valid_prefixes

from lsbd.engine import sealer as sealer_mod
from lsbd.engine import opening, recovery, testing
from lsbd.engine.volume import Volume
from lsbd.errors import TransientStoreError
from lsbd.format.segment import RECORD
from lsbd.map.blockmap import BlockMap
from lsbd.meta.config import create_volume
from lsbd.names import cache_dir_for
from lsbd.segments.journal import OpenSegment
from lsbd.segments.uploader import Uploader
from lsbd.store.faulty import FaultyStore

VOLUME_SIZE = 64 * MiB
SEGMENT_SIZE = 256 * 1024


@pytest.fixture(autouse=True)
def _bounded_store_waits(monkeypatch):
    monkeypatch.setattr(sealer_mod, "STORE_FLUSH_TIMEOUT", 10.0)


class Writer(threading.Thread):
    """Applies the seed's operations until the volume fails under it."""

    def __init__(self, vol, seed: int, first: int, power: PowerCut):
        super().__init__(daemon=True)
        self.vol, self.seed, self.first, self.power = vol, seed, first, power
        self.acked = first - 1
        self.flushed = first - 1
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for op in cw.operations(self.seed, VOLUME_SIZE // cw.BS, self.first):
                cw.apply_op(self.vol, op)
                self.acked = op.index
                if op.flush_after:
                    self.vol.flush()
                    with self.power.lock:
                        # A flush that returned while the power was on.
                        if not self.power.frozen:
                            self.flushed = op.index
        except BaseException as e:  # noqa: BLE001 - the cut ends it
            self.error = e


def run_with_cuts(tmp_path, store_url: str, seed: int, *, flush_mode: str, cuts: int,
                  cache_limit: int = 1 << 20, encrypted: bool = False) -> None:
    """`cuts` rounds of: open, write under load, cut the power at a random
    moment, reopen and check.  A small cache limit makes uploaded segments
    leave the cache dir (so the map, not the files, must say what is where).
    encrypted: a compressed, encrypted volume, whose cache dir is encrypted
    too (journals are copied under a new key at recovery)."""
    options: dict = {}
    if encrypted:
        from lsbd.crypto import keyring as kr
        from lsbd.crypto import keystore
        from lsbd.crypto.aead import Argon2Params, random_bytes
        from lsbd.crypto.store import SealingStore, volume_resolver

        secret = kr.Secret(kr.PASSPHRASE, b"power cut passphrase")
        from lsbd.store import open_store

        inner = FaultyStore(open_store(store_url, seal=False))
        keystore.save(inner, "vol", kr.new_keyring(
            random_bytes(16), secret, params=Argon2Params(memory_kib=64, iterations=1, lanes=1)))
        store = SealingStore(inner, volume_resolver(inner, lambda _v: secret))
        options = {"compression": "zstd:1", "encryption": "aes-256-gcm"}
    else:
        store = FaultyStore(open_test_store(store_url))
    create_volume(store, "vol", VOLUME_SIZE, segment_size=SEGMENT_SIZE, seal_interval=0.3,
                  checkpoint_segments=8, flush_mode=flush_mode, **options)
    cache = str(tmp_path / "cache")
    rng = random.Random(seed)
    state: list[int] | None = None
    first = 1
    with PowerCut(cache) as power:
        try:
            for round_ in range(cuts):
                vol = Volume.open(store, "vol", cache_root=cache, cache_limit=cache_limit)
                if state is not None:
                    assert _observe(read_all(vol)) == state, "reopening changed the volume"
                # In journal mode every other round runs with the store down
                # (nothing uploads, so the cache dir alone must hold it all).
                store_down = flush_mode == "journal" and round_ % 2 == 1
                if store_down:
                    store.fail(op="put", times=None, error=TransientStoreError)
                writer = Writer(vol, seed * 1000 + round_, first, power)
                writer.start()
                time.sleep(rng.uniform(0.1, 1.2))
                power.cut(vol.abandon)
                store.heal()
                writer.join(30)
                assert not writer.is_alive()
                acked, flushed = writer.acked, writer.flushed
                assert acked >= first, f"nothing acknowledged before the cut: {writer.error}"

                vol = Volume.open(store, "vol", cache_root=cache, cache_limit=cache_limit)
                try:
                    observed = _observe(read_all(vol))
                finally:
                    vol.close()
                ops = []
                for op in cw.operations(seed * 1000 + round_, VOLUME_SIZE // cw.BS, first):
                    if op.index > acked + 1:
                        break
                    ops.append(op)
                valid = valid_prefixes(observed, ops, state)
                assert any(flushed <= k <= acked + 1 for k in valid), (
                    f"seed {seed} round {round_} ({flush_mode}): after a power cut the volume "
                    f"is not a prefix {flushed}..{acked + 1} of the writes (acked {acked}, "
                    f"flushed {flushed}); prefixes that match: {valid[-5:]}")
                state = observed
                first = acked + 2
        finally:
            store.close()


# Two seeds per flush mode and store here; test_power_cut_soak runs 20 more of
# each, six cuts apiece (`make test-slow`).
@pytest.mark.parametrize("flush_mode", ["journal", "store"])
@pytest.mark.parametrize("seed", [1, 2])
def test_power_cut_under_load_keeps_every_flushed_write(tmp_path, store_url, seed, flush_mode):
    run_with_cuts(tmp_path, store_url, seed, flush_mode=flush_mode, cuts=2)


@pytest.mark.parametrize("flush_mode", ["journal", "store"])
@pytest.mark.parametrize("seed", [4, 5])
def test_power_cut_on_an_encrypted_volume(tmp_path, seed, flush_mode):
    """The same on a volume whose cache dir is encrypted: a journal torn by
    the cut is copied under a new key, and nothing flushed is lost."""
    run_with_cuts(tmp_path, "file://" + str(tmp_path / "store"), seed, flush_mode=flush_mode,
                  cuts=3, encrypted=True)


class Stall:
    """Holds one thread (`thread`) at the start of cls.name until released,
    so that a power cut lands exactly inside the call that thread makes."""

    def __init__(self, monkeypatch, cls, name: str):
        self.thread: threading.Thread | None = None
        self.reached = threading.Event()
        self.release = threading.Event()
        real = getattr(cls, name)

        def held(obj, *args, **kwargs):
            if threading.current_thread() is self.thread:
                self.reached.set()
                self.release.wait(30)
            return real(obj, *args, **kwargs)

        monkeypatch.setattr(cls, name, held)


@pytest.mark.parametrize("flush_mode,how", [("journal", "flush"), ("journal", "fua"),
                                            ("store", "flush")])
def test_a_flush_the_power_cut_overtakes_never_returns_success(tmp_path, store_url, monkeypatch,
                                                                flush_mode, how):
    """The cut lands inside a flush: in mode journal after it took its list
    of journals and before it synced them; in mode store, with the store
    down, after the map has its segment and before it waits for the store.
    The volume stops under it (a crash stop closes the journals unsynced);
    when the flush goes on it must fail, or what it covers must survive
    the cut (in mode store: be in the store, the cache dir lost too).  In
    mode journal it used to return success with its writes gone: the
    failure #16 saw once in test_power_cut_under_load_keeps_every_flushed_write
    (acked N, flushed N, the writes since the last real sync missing)."""
    store = FaultyStore(open_test_store(store_url))
    create_volume(store, "vol", VOLUME_SIZE, segment_size=SEGMENT_SIZE, seal_interval=3600.0,
                  flush_mode=flush_mode)
    stall = Stall(monkeypatch, OpenSegment, "sync") if flush_mode == "journal" \
        else Stall(monkeypatch, Uploader, "wait_durable")
    cache = str(tmp_path / "cache")
    before, covered = blocks(1, 0, 8), blocks(2, 8, 8)
    outcome: dict = {}
    try:
        with PowerCut(cache) as power:
            vol = Volume.open(store, "vol", cache_root=cache)
            try:
                vol.write(0, before)
                vol.flush()
                if flush_mode == "store":
                    store.fail(op="put", times=None, error=TransientStoreError)
                if how == "flush":
                    vol.write(8 * BS, covered)

                def flush() -> None:
                    try:
                        if how == "fua":
                            vol.write(8 * BS, covered, fua=True)
                        else:
                            vol.flush()
                        outcome["returned"] = True
                    except Exception as e:  # noqa: BLE001 - the cut may fail it
                        outcome["error"] = e

                flusher = threading.Thread(target=flush, daemon=True)
                stall.thread = flusher
                flusher.start()
                assert stall.reached.wait(30), "the flush never got to the stall"
                power.cut(vol.abandon)
            finally:
                stall.release.set()
            flusher.join(30)
            assert not flusher.is_alive()
            store.heal()
            if flush_mode == "store":
                remove_tree(cache)      # the cache dir lost: only the store counts
                power.settle()
            data = _read_after_open(store, cache, 16 * BS)
    finally:
        store.close()
    assert data[:8 * BS] == before, "a write flushed before the cut was lost"
    if "returned" in outcome:
        assert data[8 * BS:] == covered, \
            "the flush returned success, yet the write it covered is gone after the cut"


def _read_after_open(store, cache: str, length: int) -> bytes:
    """The volume's first `length` bytes, as the next open finds them."""
    vol = Volume.open(store, "vol", cache_root=cache)
    try:
        return vol.read(0, length)
    finally:
        vol.close()


@pytest.mark.parametrize("seed", [6, 7])
def test_power_cuts_with_stalled_flushes(tmp_path, monkeypatch, seed):
    """The random cuts of the tests above, with the writer's journal syncs
    held up to 50 ms now and then: under load a flush is often overtaken
    by the cut this way (#16; before the fix nearly every run failed)."""
    rng = random.Random(seed)
    real = OpenSegment.sync

    def slow_sync(seg: OpenSegment) -> None:
        if isinstance(threading.current_thread(), Writer) and rng.random() < 0.5:
            time.sleep(rng.uniform(0, 0.05))
        real(seg)

    monkeypatch.setattr(OpenSegment, "sync", slow_sync)
    run_with_cuts(tmp_path, "file://" + str(tmp_path / "store"), seed, flush_mode="journal",
                  cuts=3)


@pytest.mark.parametrize("cut_during", ["the open", "the next writes"])
@pytest.mark.parametrize("newer_sealed", [False, True])
def test_a_discarded_journal_stays_discarded_after_the_next_cut(tmp_path, monkeypatch,
                                                                  newer_sealed, cut_during):
    """Recovery discards a journal that follows one cut short (its writes
    came after the lost tail: tests/crash/test_crash.py).  That removal must
    be durable before the one cut short is sealed (sealed, it no longer
    shows it was cut short) and before the volume goes on: otherwise a cut
    brings the discarded journal back, and the next open replays it onto
    the recovered one, a state no prefix of the writes.  The cut lands
    just after recovery sealed the older journal, or after the open, before
    anything is flushed."""
    store = FaultyStore(open_test_store("file://" + str(tmp_path / "store")))
    create_volume(store, "vol", VOLUME_SIZE)
    cache = str(tmp_path / "cache")
    a, b, c = blocks(1, 0, 1), blocks(2, 1, 1), blocks(3, 2, 1)

    class PowerGone(Exception):
        pass

    try:
        with PowerCut(cache) as power:
            vol = Volume.open(store, "vol", cache_root=cache)
            testing.pause_sealer(vol)   # sealed segments stay queued: never synced or mapped
            vol.write(0, a)
            vol.write(BS, b)
            older = testing.seal_queued(vol)
            assert older is not None
            vol.write(2 * BS, c)
            if newer_sealed:
                testing.seal_queued(vol)
            newer_path = testing.local_path(vol, older.seq + 1)
            second = older.records[1]
            vol.abandon()
            with open(older.path, "r+b") as f:  # the older journal lost its tail
                f.truncate(second.data_offset - RECORD.size - 4 * second.nblocks)
            power.settle()      # the rest reached the disk unasked, names included
            if cut_during == "the open":
                real = opening.recover_journal_file

                def recover_then_cut(path, **kw):
                    result = real(path, **kw)
                    if kw["seq"] == older.seq:
                        raise PowerGone
                    return result

                monkeypatch.setattr(opening, "recover_journal_file", recover_then_cut)
                with pytest.raises(PowerGone):
                    Volume.open(store, "vol", cache_root=cache)
                monkeypatch.setattr(opening, "recover_journal_file", real)
                power.cut(lambda: None)
            else:
                vol = Volume.open(store, "vol", cache_root=cache)
                assert not os.path.exists(newer_path), "recovery discards the newer journal"
                assert vol.read(0, 3 * BS) == a + bytes(2 * BS)
                power.cut(vol.abandon)      # before anything is flushed
            data = _read_after_open(store, cache, 3 * BS)
    finally:
        store.close()
    assert data == a + bytes(2 * BS), \
        "a journal that recovery discarded came back after the next cut and was replayed"


@pytest.mark.slow
@pytest.mark.parametrize("flush_mode", ["journal", "store"])
@pytest.mark.parametrize("seed", range(10, 30))
def test_power_cut_soak(tmp_path, store_url, seed, flush_mode):
    run_with_cuts(tmp_path, store_url, seed, flush_mode=flush_mode, cuts=6)


def test_the_double_drops_what_was_not_synced(tmp_path):
    """The double itself: a synced file survives, an unsynced tail, an
    unsynced name and an unsynced removal do not."""
    import os

    from lsbd import fileio

    root = tmp_path / "cache"
    root.mkdir()
    (root / "old").write_bytes(b"old")
    with PowerCut(str(root)) as power:
        fd = os.open(root / "a", os.O_RDWR | os.O_CREAT)
        os.write(fd, b"synced")
        fileio.fdatasync(fd)
        os.write(fd, b" and not")
        os.close(fd)
        power.cut(lambda: None)
        assert not (root / "a").exists(), "a name whose directory was never synced survived"
        fd = os.open(root / "b", os.O_RDWR | os.O_CREAT)
        os.write(fd, b"synced")
        fileio.fdatasync(fd)
        fileio.fsync_dir(str(root))
        os.write(fd, b" and not")
        os.close(fd)
        os.unlink(root / "old")
        power.cut(lambda: None)
        assert (root / "b").read_bytes() == b"synced"
        assert (root / "old").read_bytes() == b"old", "an unsynced removal stuck"


def test_the_double_never_gives_a_name_the_bytes_of_another_file_that_had_its_inode(tmp_path):
    """ext4 hands a freed inode to the next new file at once.  The double
    tells files apart by inode and generation, so a name never comes back
    with another file's bytes: neither a removed name (its removal never
    synced) with those of the file that took its inode and was synced, nor
    a new name (its directory synced, its bytes not) with those of the
    removed file whose inode it took.  Both showed in the power-cut soak as
    a local segment file the map does not describe."""
    import os

    from lsbd import fileio

    def reusing(root, freed: int, tag: str) -> str | None:
        """A new file of root that took inode `freed` (other processes may
        take it first), its name; None if none did."""
        for i in range(16):
            name = f"{tag}-{i}"
            fd = os.open(root / name, os.O_RDWR | os.O_CREAT)
            took = os.fstat(fd).st_ino == freed
            os.write(fd, tag.encode())
            if took and tag == "synced":
                fileio.fdatasync(fd)
            os.close(fd)
            if took:
                return name
        return None

    root = tmp_path / "cache"
    root.mkdir()
    with PowerCut(str(root)) as power:
        fd = os.open(root / "old", os.O_RDWR | os.O_CREAT)
        os.write(fd, b"old")
        fileio.fdatasync(fd)
        fileio.fsync_dir(str(root))
        freed = os.fstat(fd).st_ino
        os.close(fd)
        os.unlink(root / "old")
        if reusing(root, freed, "synced") is None:
            pytest.skip("this file system did not reuse the inode")
        power.cut(lambda: None)
        assert sorted(os.listdir(root)) == ["old"]
        assert (root / "old").read_bytes() == b"old"

        fd = os.open(root / "gone", os.O_RDWR | os.O_CREAT)
        os.write(fd, b"gone")
        fileio.fdatasync(fd)
        fileio.fsync_dir(str(root))
        freed = os.fstat(fd).st_ino
        os.close(fd)
        os.unlink(root / "gone")
        name = reusing(root, freed, "unsynced")
        if name is None:
            pytest.skip("this file system did not reuse the inode")
        fileio.fsync_dir(str(root))
        power.cut(lambda: None)
        assert "gone" not in os.listdir(root)
        assert (root / name).read_bytes() == b"", "a new name took a removed file's bytes"


def test_the_double_undoes_the_last_map_commit_only(tmp_path):
    """The double's map, as LMDB with sync and without metasync promises:
    a cut undoes the last commit, never more; the first commit after a cut
    goes back to the map the cut left; a new map's only commit leaves no
    map; a map synced whole keeps its last commit."""
    from lsbd.map.blockmap import BlockMap

    root = tmp_path / "cache"
    folder = str(root / "map")
    root.mkdir()
    with PowerCut(str(root)) as power:
        def commits(*values: bytes) -> BlockMap:
            bm = BlockMap(folder, BS)
            for v in values:
                bm.set_meta(n=v)
            return bm

        def after_cut() -> bytes | None:
            bm = BlockMap(folder, BS)
            try:
                return bm.get_meta("n")
            finally:
                bm.close()

        bm = commits(b"1")
        power.cut(bm.close)
        assert after_cut() is None, "a new map's only commit survived the cut"
        bm = commits(b"1", b"2", b"3")
        power.cut(bm.close)
        assert after_cut() == b"2"
        bm = commits(b"4")
        power.cut(bm.close)
        assert after_cut() == b"2", "the first commit after a cut survived the next cut"
        bm = commits(b"5")
        bm.sync()
        power.cut(bm.close)
        assert after_cut() == b"5"


@pytest.mark.parametrize("cut_after", ["the checkpoint", "a segment after it"])
def test_a_map_cut_short_while_built_from_the_store_is_rebuilt(tmp_path, monkeypatch,
                                                                cut_after):
    """A new cache dir's map is built from the store (a checkpoint, then
    the segments after it), and the cache dir's identity is written only
    once the map is whole.  A power cut half way leaves a map without it,
    which the next open rebuilds rather than trusts."""
    store = open_test_store("file://" + str(tmp_path / "store"))
    create_volume(store, "vol", VOLUME_SIZE, segment_size=SEGMENT_SIZE, seal_interval=3600.0)
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "first"))
    vol.write(0, blocks(1, 0, 4))
    vol.flush_to_store()
    vol.checkpoint(force=True)
    for tag in (2, 3, 4):       # one segment each, over the checkpoint's blocks
        vol.write((tag - 2) * BS, blocks(tag, tag - 2, 1))
        vol.flush_to_store()
    vol.close()
    expected = blocks(2, 0, 1) + blocks(3, 1, 1) + blocks(4, 2, 1) + blocks(1, 3, 1)
    cache = str(tmp_path / "cache")

    class PowerGone(Exception):
        pass

    if cut_after == "the checkpoint":
        owner, name = recovery, "load_checkpoint"
    else:
        owner, name = BlockMap, "apply_segment"
    real = getattr(owner, name)

    def then_cut(*args, **kw):
        real(*args, **kw)
        raise PowerGone

    monkeypatch.setattr(owner, name, then_cut)
    try:
        with PowerCut(cache) as power:
            with pytest.raises(PowerGone):
                Volume.open(store, "vol", cache_root=cache)
            monkeypatch.setattr(owner, name, real)
            power.cut(lambda: None)
            bm = BlockMap(os.path.join(cache_dir_for(cache, store, "vol"), "map"), BS)
            try:
                assert bm.get_meta("volume_id") is None, \
                    "a map half built from the store holds the cache dir's identity"
            finally:
                bm.close()
            data = _read_after_open(store, cache, 4 * BS)
    finally:
        store.close()
    assert data == expected
