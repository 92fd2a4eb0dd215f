"""Crash tests (DESIGN invariant 3, prefix consistency, and invariant 4, atomic
requests): a child process writes under load and is killed with SIGKILL at a
random moment; the volume is reopened and compared with a model of the
writes it acknowledged.

The child is tests/support/crash_writer.py; its operations are a pure function of the
seed, so the check regenerates them and needs from the child only how far it
got (the last acknowledged operation, the last completed flush)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Callable

import crash_writer as cw
import pytest
from engine_helpers import PYTHON, MiB, open_test_store, read_all, wipe

from lsbd import names
from lsbd.engine import sealer as sealer_mod
from lsbd.meta.config import create_volume
from lsbd.format.segment import RECORD
from lsbd.engine import testing
from lsbd.engine.volume import Volume
from lsbd.names import cache_dir_for
from lsbd.segments import checkpoints as ckpt

VOLUME_SIZE = 64 * MiB
SEGMENT_SIZE = 256 * 1024
WRITER = os.path.join(os.path.dirname(__file__), "..", "support", "crash_writer.py")


@pytest.fixture(autouse=True)
def _bounded_store_waits(monkeypatch):
    """A checkpoint or store flush that cannot finish gives up after 10 s, not 120."""
    monkeypatch.setattr(sealer_mod, "STORE_FLUSH_TIMEOUT", 10.0)


def _observe(data: bytes) -> list[int]:
    """Which operation each block of the volume came from (0: reads as zeros).
    Fails on a block that no operation wrote whole at that place."""
    bs = cw.BS
    zero = bytes(bs)
    out = []
    for lba in range(len(data) // bs):
        blk = data[lba * bs:(lba + 1) * bs]
        if blk == zero:
            out.append(0)
            continue
        index = int.from_bytes(blk[:8], "little")
        where = int.from_bytes(blk[8:16], "little")
        assert where == lba and index > 0 and blk == cw.content(index, lba), \
            f"block {lba} holds data no write put there (torn or misplaced): {blk[:32].hex()}"
        out.append(index)
    return out


def valid_prefixes(observed: list[int], ops: list[cw.Op], initial: list[int] | None = None,
                   ) -> list[int]:
    """Every k such that the volume equals the state after ops[:k] (as
    operation numbers; 0 or first-1 for none) applied on `initial` (default:
    an empty volume)."""
    model = list(initial) if initial is not None else [0] * len(observed)
    mismatches = sum(1 for m, v in zip(model, observed) if m != v)
    before = ops[0].index - 1 if ops else 0
    valid = [before] if mismatches == 0 else []
    for op in ops:
        for piece in op.pieces:
            for lba in range(piece.lba, piece.lba + piece.nblocks):
                new = op.index if piece.kind == cw.DATA and not cw.is_zero_block(op.index, lba) else 0
                old = model[lba]
                if old == new:
                    continue
                mismatches += (old == observed[lba]) - (new == observed[lba])
                model[lba] = new
        if mismatches == 0:
            valid.append(op.index)
    return valid


def _progress(path: str) -> tuple[int, int, bool]:
    """(last acknowledged op, the op a completed flush covered, ready?) from the child's stdout."""
    acked = flushed = 0
    ready = False
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break  # a torn last line: the kill cut it
            parts = line.split()
            if parts == ["R"]:
                ready = True
            elif len(parts) == 2 and parts[0] == "W":
                acked = int(parts[1])
            elif len(parts) == 2 and parts[0] == "F":
                flushed = int(parts[1])
    return acked, flushed, ready


def _run_and_kill(tmp_path, store_url: str, cache_root: str, seed: int,
                  flush_mode: str | None, first: int = 1,
                  kill_after: Callable[[], bool] | None = None) -> tuple[int, int]:
    out_path = str(tmp_path / f"writer-{first}.out")
    err_path = str(tmp_path / f"writer-{first}.err")
    args = [PYTHON, WRITER, store_url, "vol", cache_root, str(seed), flush_mode or "-", str(first)]
    with open(out_path, "w") as out, open(err_path, "w") as err:
        child = subprocess.Popen(args, stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + 30
        while not _progress(out_path)[2]:
            if child.poll() is not None or time.monotonic() > deadline:
                with open(err_path) as f:
                    pytest.fail(f"the writer did not start (rc {child.poll()}):\n{f.read()}")
            time.sleep(0.01)
        # A test about a stage of the writer's work (a delta checkpoint, a
        # sealed segment) kills only once that stage has begun: under load
        # the random delay alone can end before it.
        deadline = time.monotonic() + 60
        while kill_after is not None and not kill_after():
            if child.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the writer never reached the stage this test kills in")
            time.sleep(0.01)
        time.sleep(random.Random(seed * 31 + first).uniform(0.2, 1.5))
        if child.poll() is not None:
            with open(err_path) as f:
                pytest.fail(f"the writer died by itself:\n{f.read()}")
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()  # reap it: a zombie still looks like a live lease holder
    assert child.returncode == -signal.SIGKILL
    acked, flushed, _ready = _progress(out_path)
    assert acked >= first, "the writer acknowledged nothing before the kill"
    return acked, flushed


def _new_volume(tmp_path):
    store_url = "file://" + str(tmp_path / "store")
    store = open_test_store(store_url)
    create_volume(store, "vol", VOLUME_SIZE, segment_size=SEGMENT_SIZE, seal_interval=0.3,
                  checkpoint_segments=8)
    return store_url, store


def _check_crash(tmp_path, seed: int, *, lose_cache: bool, flush_mode: str | None = None,
                 first: int = 1, initial: list[int] | None = None, volume=None,
                 kill_after: Callable[[], bool] | None = None) -> list[int]:
    """One writer run killed, then checked; returns the state found (the
    operation each block comes from)."""
    store_url, store = volume or _new_volume(tmp_path)
    cache_root = str(tmp_path / "cache")
    acked, flushed = _run_and_kill(tmp_path, store_url, cache_root, seed, flush_mode, first,
                                   kill_after)
    if lose_cache:
        wipe(cache_dir_for(cache_root, store, "vol"))

    # The writer died on this machine: its lease is taken over without any flag.
    vol = Volume.open(store, "vol", cache_root=cache_root)
    try:
        data = read_all(vol)
    finally:
        vol.close()
    lease_kept = store.exists(names.lease_key("vol"))
    ops = []
    for op in cw.operations(seed, VOLUME_SIZE // cw.BS, first):
        if op.index > acked + 1:  # the one in flight at the kill may or may not be there
            break
        ops.append(op)
    observed = _observe(data)
    valid = valid_prefixes(observed, ops, initial)
    # Durable: every write acknowledged before the last completed flush (in
    # 'journal' mode only while the cache dir survives; in 'store' mode always).
    must_have = first - 1 if (lose_cache and flush_mode != "store") else max(flushed, first - 1)
    assert any(must_have <= k <= acked + 1 for k in valid), (
        f"seed {seed}: the volume is not the state after any prefix of the writes "
        f"{must_have}..{acked + 1} (acked {acked}, flushed {flushed}); prefixes that match: "
        f"{valid[-5:]}")

    # The recovered state reached the store: a machine with nothing but the
    # store reads the same bytes.
    reader = Volume.open(store, "vol", cache_root=str(tmp_path / "other-cache"), read_only=True)
    try:
        assert read_all(reader) == data, "the store alone does not give the recovered state"
    finally:
        reader.close()
    if volume is None:
        store.close()
    assert not lease_kept, "a clean close must release the lease"
    return observed


# Six kills here; test_soak.py's test_sigkill_staged_soak runs 100 more.
@pytest.mark.parametrize("seed", range(6))
def test_sigkill_while_staged_segments_merge_leaves_a_prefix(tmp_path, monkeypatch, seed):
    _check_staged_crash(tmp_path, monkeypatch, seed)


# Covers (lsbd.map.staged): a longer write or a trim among the one-block
# writes is laid over the extents at once and covers the staged writes
# in its blocks, so kills also land just after a cover and between the
# ranges of a merge that must leave covered writes out.
@pytest.mark.parametrize("seed", range(4))
def test_sigkill_among_staged_segments_and_covers_leaves_a_prefix(tmp_path, monkeypatch, seed):
    _check_staged_crash(tmp_path, monkeypatch, seed, covers=True)


def _check_staged_crash(tmp_path, monkeypatch, seed: int, covers: bool = False) -> None:
    """One-block writes only (`covers`: and a longer write or a trim now
    and then): segments are staged and merged into the
    extents every three, a range of 16 blocks a transaction, so kills land
    between staging, inside a merge and between its ranges.  The reopened
    volume is a prefix with every flushed write, and its live counts are
    the map's own recount."""
    import lmdb

    monkeypatch.setenv("LSBD_CRASH_SINGLES", "covers" if covers else "1")
    store_url, store = _new_volume(tmp_path)
    map_dir = os.path.join(cache_dir_for(str(tmp_path / "cache"), store, "vol"), "map")
    merged = []
    seen_covers: list[bool] = []

    def merges_ran() -> bool:
        """Segments were staged and some merged (the kill comes after a random delay)."""
        if not os.path.exists(os.path.join(map_dir, "data.mdb")):
            return False
        env = lmdb.open(map_dir, readonly=True, max_dbs=8, lock=True)
        try:
            with env.begin() as txn:
                staged = [int.from_bytes(k, "big") for k, _v in txn.cursor(db=env.open_db(
                    b"staged", txn=txn, create=False))] if txn.get(b"staged") else []
                applied = int(txn.get(b"applied_seq", b"0", db=env.open_db(
                    b"meta", txn=txn, create=False)))
                covered = txn.get(b"covers") is not None and bool(txn.stat(env.open_db(
                    b"covers", txn=txn, create=False))["entries"])
        finally:
            env.close()
        merged.append(bool(staged) and staged[0] > 3)
        seen_covers.append(covered)
        return bool(staged) and applied >= 6 and (covered or not covers)

    _check_crash(tmp_path, seed, lose_cache=False, volume=(store_url, store),
                 kill_after=merges_ran)
    assert any(merged)
    assert any(seen_covers) == covers
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "cache"))
    try:
        before = read_all(vol)
        testing.merge_staged(vol)
        assert read_all(vol) == before, "the merge changed what the volume reads"
        assert testing.staged_segments(vol) == 0
        assert testing.map_live_rows(vol) == testing.map_recount(vol)
    finally:
        vol.close()
        store.close()


# Eight kills at random moments here; test_soak.py's test_sigkill_soak runs 200
# more of the same check (`make test-slow`).
@pytest.mark.parametrize("seed", range(8))
def test_sigkill_under_load_leaves_a_prefix_with_every_flushed_write(tmp_path, seed):
    _check_crash(tmp_path, seed, lose_cache=False)


@pytest.mark.parametrize("seed,flush_mode", [(100, "journal"), (101, "journal"), (102, "journal"),
                                             (103, "store"), (104, "store")])
def test_sigkill_and_lost_cache_dir_leaves_a_prefix(tmp_path, seed, flush_mode):
    """The journal is lost with the cache dir: the store alone holds a prefix
    of the segments.  With flush mode 'store', flushed writes are in it too."""
    _check_crash(tmp_path, seed, lose_cache=True, flush_mode=flush_mode)


@pytest.mark.parametrize("seed,lose_cache", [(300, True), (301, True), (302, False)])
def test_sigkill_while_delta_checkpoints_are_written(tmp_path, seed, lose_cache):
    """A checkpoint after every segment: the writer is nearly always writing
    a delta checkpoint when it is killed, and the store holds long chains."""
    store_url = "file://" + str(tmp_path / "store")
    store = open_test_store(store_url)
    create_volume(store, "vol", VOLUME_SIZE, segment_size=SEGMENT_SIZE, seal_interval=0.3,
                  checkpoint_segments=1)

    def a_delta_is_stored():
        return any(ckpt.read_manifest(store, "vol", s).is_delta
                   for s in ckpt.list_checkpoints(store, "vol"))

    try:
        _check_crash(tmp_path, seed, lose_cache=lose_cache, volume=(store_url, store),
                     kill_after=a_delta_is_stored)
        assert a_delta_is_stored()
    finally:
        store.close()


@pytest.mark.parametrize("seed,lose_cache", [(400, False), (401, True), (402, False)])
def test_sigkill_on_a_compressed_encrypted_volume(tmp_path, monkeypatch, seed, lose_cache):
    """The same checks on a volume whose segments and checkpoints are sealed
    (lsbd/crypto): recovery from the journal and from the store alone."""
    from lsbd.crypto import keyring as kr
    from lsbd.crypto import keystore
    from lsbd.crypto.aead import Argon2Params, random_bytes
    from lsbd.store import open_store

    secret = kr.Secret(kr.PASSPHRASE, b"crash test passphrase")
    monkeypatch.setenv("LSBD_TEST_PASSPHRASE", "crash test passphrase")
    store_url = "file://" + str(tmp_path / "store")
    store = open_store(store_url, secret=lambda _volume: secret)
    keystore.save(store.inner, "vol", kr.new_keyring(
        random_bytes(16), secret, params=Argon2Params(memory_kib=64, iterations=1, lanes=1)))
    create_volume(store, "vol", VOLUME_SIZE, segment_size=SEGMENT_SIZE, seal_interval=0.3,
                  checkpoint_segments=4, compression="zstd:1", encryption="aes-256-gcm")

    def a_segment_is_stored():
        return bool(store.inner.list("volumes/vol/seg/"))

    try:
        _check_crash(tmp_path, seed, lose_cache=lose_cache, volume=(store_url, store),
                     kill_after=a_segment_is_stored)
        sealed = [info.key for info in store.inner.list("volumes/vol/seg/")]
        assert sealed and all(store.inner.get(k, -64)[:8] == b"LSBDOBJ1" for k in sealed)
    finally:
        store.close()


@pytest.mark.parametrize("seed", [200, 201])
def test_repeated_sigkills_on_one_volume(tmp_path, seed):
    """Three writers in turn on one volume, each killed: every recovery starts
    from the last one's state (history, checkpoints, a used cache dir)."""
    volume = _new_volume(tmp_path)
    state = None
    for round_no in range(3):
        state = _check_crash(tmp_path, seed + 1000 * round_no, lose_cache=False, volume=volume,
                             first=1 + 1_000_000 * round_no, initial=state)
    volume[1].close()


def test_valid_prefixes_checker_rejects_a_half_applied_write():
    """The checker itself: a state where only part of a multi-block write
    landed matches no prefix."""
    op1 = cw.Op(1, (cw.Piece(cw.DATA, 0, 4),), False)
    op2 = cw.Op(2, (cw.Piece(cw.DATA, 2, 4),), False)
    full = [1, 1, 2, 2, 2, 2]
    half = [1, 1, 2, 2, 0, 0]
    for state, want in ((full, [2]), (half, [])):
        observed = [0 if v and cw.is_zero_block(v, i) else v for i, v in enumerate(state)]
        got = valid_prefixes(observed, [op1, op2])
        assert (got[-1:] == want) if want else (2 not in got and 1 not in got), (state, got)


@pytest.mark.parametrize("length", [0, 10])
def test_journal_file_cut_before_its_header_is_discarded(tmp_path, length):
    """A kill right after the next journal file was created: it holds no
    committed record, so recovery must drop it, not refuse to open."""
    store = open_test_store("file://" + str(tmp_path / "store"))
    create_volume(store, "vol", VOLUME_SIZE)
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "cache"))
    vol.write(0, b"a" * cw.BS)
    vol.flush()
    testing.seal_now(vol)            # segment 1 is sealed ...
    path = testing.local_path(vol, vol.applied_seq + 1)
    vol.abandon()
    with open(path, "wb") as f:         # ... and segment 2's file was created, header not written
        f.write(b"LSBDSEG1\x01\x00"[:length])
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "cache"), break_lease=True)
    try:
        assert vol.read(0, cw.BS) == b"a" * cw.BS
    finally:
        vol.close()


@pytest.mark.parametrize("newer_sealed", [True, False], ids=["newer-sealed", "newer-open"])
def test_a_journal_after_one_cut_short_is_not_replayed(tmp_path, newer_sealed):
    """A power loss while two journal files wait for the sealer: the older
    lost its tail, the newer survived whole.  Replaying the newer would give
    a state that is no prefix of the writes (its write without the older
    one's last), so recovery stops where the older one was cut."""
    store = open_test_store("file://" + str(tmp_path / "store"))
    create_volume(store, "vol", VOLUME_SIZE)
    cache = str(tmp_path / "cache")
    vol = Volume.open(store, "vol", cache_root=cache)
    testing.pause_sealer(vol)   # sealed segments stay queued: never synced or mapped
    a, b, c = (bytes([x]) * cw.BS for x in b"abc")
    vol.write(0, a)
    vol.write(cw.BS, b)
    older = testing.seal_queued(vol)
    vol.write(2 * cw.BS, c)
    if newer_sealed:
        testing.seal_queued(vol)
    newer_path = testing.local_path(vol, older.seq + 1)
    second = older.records[1]
    cut = second.data_offset - RECORD.size - 4 * second.nblocks
    vol.abandon()
    with open(older.path, "r+b") as f:  # the older journal's tail never reached the disk
        f.truncate(cut)
    assert os.path.exists(newer_path)

    vol = Volume.open(store, "vol", cache_root=cache, break_lease=True)
    try:
        assert vol.read(0, cw.BS) == a
        assert vol.read(cw.BS, cw.BS) == bytes(cw.BS), "the older journal's cut write is lost"
        assert vol.read(2 * cw.BS, cw.BS) == bytes(cw.BS), "the newer journal must not replay"
        vol.write(3 * cw.BS, c)         # the history goes on from the cut
        vol.flush()
    finally:
        vol.close()
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "cache2"))  # from the store alone
    try:
        assert vol.read(0, 4 * cw.BS) == a + bytes(2 * cw.BS) + c
    finally:
        vol.close()
