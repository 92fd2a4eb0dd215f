"""A volume's history through the `lsbd` command, run as a subprocess:
snapshots, export of past states, --at, restore, clone, diff, incremental
export, log, retain, and a snapshot of a volume another process is writing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from history_helpers import (
    BS,
    PYTHON,
    REPO,
    MiB,
    Model,
    apply_ops,
    assert_usage_error,
    assert_user_error,
    export,
    iso_local,
    iso_offset,
    iso_utc_z,
    next_second,
    open_url,
    pattern,
    run,
    run_json,
    store_keys,
    wipe,
    write_and_close,
)

from lsbd import names

SIZE = 16 * MiB

OPS_A = [("write", 0, 8, 1), ("write", 100, 16, 2), ("write", 3000, 4, 3)]
OPS_B = [("write", 4, 8, 11), ("trim", 100, 4), ("write", 2000, 3, 12)]
OPS_C = [("write", 0, 2, 21), ("zero", 106, 2), ("write", 4090, 6, 22)]


class Env:
    def __init__(self, store_url: str, tmp: Path):
        self.url = store_url
        self.tmp = tmp
        self.cache = tmp / "cache"
        self.store = open_url(store_url)
        self._n = 0

    def lsbd(self, *args, **kw):
        return run(self.url, self.cache, *args, **kw)

    def ok(self, *args):
        return self.lsbd(*args, check=True)

    def json(self, *args):
        return run_json(self.url, self.cache, *args)

    def file(self, label: str = "img") -> Path:
        self._n += 1
        return self.tmp / f"{label}-{self._n}.img"

    def export(self, volume: str, *point: str) -> bytes:
        return export(self.url, self.cache, volume, self.file(), *point)

    def write(self, volume: str, model: Model | None, ops) -> None:
        write_and_close(self.store, volume, self.cache, model, ops)


@pytest.fixture
def env(store_url, tmp_path):
    e = Env(store_url, tmp_path)
    yield e
    e.store.close()


@pytest.fixture
def fenv(tmp_path):
    """A local store only: for the tests whose subject is not the store."""
    e = Env("file://" + str(tmp_path / "store"), tmp_path)
    yield e
    e.store.close()


def _abc(env: Env, volume: str = "vol"):
    """Write A, snapshot s1, write B, snapshot s2, write C; returns the three models."""
    env.ok("create", volume, "--size", "16M")
    model = Model(SIZE)
    env.write(volume, model, OPS_A)
    a = model.copy()
    env.ok("snapshot", "create", volume, "s1")
    env.write(volume, model, OPS_B)
    ab = model.copy()
    env.ok("snapshot", "create", volume, "s2")
    env.write(volume, model, OPS_C)
    return a, ab, model


# ----------------------------------------------------------------- snapshots and export

def test_export_snapshots_and_live_state(env):
    a, ab, abc = _abc(env)
    assert a.bytes() != ab.bytes() != abc.bytes()
    for _round in range(2):
        img = env.export("vol", "--snapshot", "s1")
        assert len(img) == SIZE and img == a.bytes()
        assert env.export("vol", "--snapshot", "s2") == ab.bytes()
        assert env.export("vol") == abc.bytes()
        wipe(env.cache)  # the store alone defines every state


def test_export_of_a_past_state_is_sparse(fenv):
    _abc(fenv)
    path = fenv.file()
    fenv.ok("export", "vol", path, "--snapshot", "s1")
    st = os.stat(path)
    assert st.st_size == SIZE
    written = sum(n for _k, _lba, n, _t in OPS_A) * BS
    assert st.st_blocks * 512 < written + 1 * MiB  # holes stay holes


def test_export_by_seq(fenv):
    a, ab, abc = _abc(fenv)
    snaps = {s["name"]: s["seq"] for s in fenv.json("snapshot", "list", "vol")}
    assert fenv.export("vol", "--seq", str(snaps["s1"])) == a.bytes()
    assert fenv.export("vol", "--seq", hex(snaps["s2"])) == ab.bytes()
    newest = fenv.json("info", "vol")["newest_seq"]
    assert fenv.export("vol", "--seq", str(newest)) == abc.bytes()
    assert_user_error(fenv.lsbd("export", "vol", fenv.file(), "--seq", str(newest + 1)),
                      "no seq")


# ----------------------------------------------------------------- points in time

def test_export_at_points_in_time(fenv):
    fenv.ok("create", "vol", "--size", "16M")
    created_by = time.time()
    model = Model(SIZE)
    states = [(created_by, model.bytes())]  # (a time the state held, the state)
    batches = [OPS_A, OPS_B, OPS_C]
    for ops in batches:
        time.sleep(1.1)
        fenv.write("vol", model, ops)   # closing uploads: sealed at about now
        states.append((time.time(), model.bytes()))
    formats = [iso_local, iso_utc_z, iso_offset, iso_local]
    for i, (t, expected) in enumerate(states):
        # The first whole second after the state was durable, which is before
        # the next batch started (each batch waits 1.1 s).
        when = formats[i](next_second(t))
        got = fenv.export("vol", "--at", when)
        assert got == expected, f"--at {when} (state {i})"
    # Points between the batches, to the second, with restore and clone too.
    when = iso_local(next_second(states[2][0]))
    fenv.ok("restore", "vol", "--at", when, "--to", "back")
    assert fenv.export("back") == states[2][1]
    fenv.ok("clone", "vol", "fork", "--at", iso_utc_z(next_second(states[1][0])))
    assert fenv.export("fork") == states[1][1]
    fenv.ok("restore", "vol", "--at", iso_local(next_second(states[0][0])), "--to", "blank")
    assert fenv.export("blank") == bytes(SIZE)

    # Relative: a second ago is the newest state (nothing was written since).
    time.sleep(1.2)
    assert fenv.export("vol", "--at", "-1s") == states[-1][1]
    assert fenv.export("vol", "--at=-1s") == states[-1][1]
    assert fenv.export("vol", "--at", "now") == states[-1][1]


def test_at_before_creation_or_in_the_future_is_a_clear_error(fenv):
    fenv.ok("create", "vol", "--size", "16M")
    fenv.write("vol", None, OPS_A)
    created = fenv.json("info", "vol")["created"]
    out = fenv.file()
    for when in (iso_local(created - 5), iso_utc_z(created - 3600), "-15m", "-1d"):
        assert_user_error(fenv.lsbd("export", "vol", out, "--at", when),
                          "before the volume was created")
        assert not out.exists()
    for when in (iso_local(time.time() + 3600), iso_utc_z(time.time() + 86400 * 30)):
        assert_user_error(fenv.lsbd("export", "vol", out, "--at", when), "in the future")
    assert_usage_error(fenv.lsbd("export", "vol", out, "--at", "last tuesday"),
                       "argument --at: bad time 'last tuesday'")
    assert_user_error(fenv.lsbd("restore", "vol", "--at", "-15m", "--to", "x"),
                      "before the volume was created")
    assert_user_error(fenv.lsbd("diff", "vol", "--from", "@-15m"), "before the volume was created")
    assert fenv.lsbd("info", "x").returncode == 1  # nothing was created


# ----------------------------------------------------------------- restore

def test_restore_snapshot_to_a_new_volume(fenv):
    a, _ab, abc = _abc(fenv)
    fenv.ok("restore", "vol", "--snapshot", "s1", "--to", "new")
    assert fenv.export("new") == a.bytes()
    info = fenv.json("info", "new")
    assert info["parent"] is None and info["size"] == SIZE
    # An independent volume: writing to it leaves the source alone, and it
    # does not depend on the source's segments.
    fenv.write("new", a, [("write", 1, 1, 90)])
    assert fenv.export("new") == a.bytes()
    assert fenv.export("vol") == abc.bytes()
    assert fenv.export("vol", "--snapshot", "s1") != a.bytes()
    fenv.ok("delete", "vol")  # a restore is no clone: the source may go
    wipe(fenv.cache)
    assert fenv.export("new") == a.bytes()


def test_restore_never_overwrites(fenv):
    _abc(fenv)
    fenv.ok("create", "other", "--size", "8M")
    other = Model(8 * MiB)
    fenv.write("other", other, [("write", 0, 3, 77)])
    before = store_keys(fenv.store, names.volume_prefix("other"))
    config_before = fenv.store.get(names.config_key("other"))
    for extra in ([], ["--dry-run"]):
        proc = fenv.lsbd("restore", "vol", "--snapshot", "s1", "--to", "other", *extra)
        assert_user_error(proc, "already exists")
    assert store_keys(fenv.store, names.volume_prefix("other")) == before
    assert fenv.store.get(names.config_key("other")) == config_before
    assert fenv.export("other") == other.bytes()


def test_restore_dry_run_prints_the_plan_and_creates_nothing(fenv):
    _abc(fenv)
    snaps = {s["name"]: s["seq"] for s in fenv.json("snapshot", "list", "vol")}
    proc = fenv.ok("restore", "vol", "--snapshot", "s2", "--to", "new", "--dry-run")
    out = proc.stdout
    assert f"target seq {snaps['s2']}\n" in out
    assert "checkpoint" in out or "empty volume" in out
    assert "replay" in out and "would create volume new" in out
    from lsbd.segments.checkpoints import list_checkpoints
    from lsbd.plans.restore import plan_restore
    from lsbd.segments.remote import store_segment_seqs

    plan = plan_restore(list_checkpoints(fenv.store, "vol"),
                        store_segment_seqs(fenv.store, "vol"), snaps["s2"])
    for line in plan.describe():
        assert line in out
    checkpoints = fenv.json("info", "vol")["checkpoints"]
    usable = [c for c in checkpoints if c <= snaps["s2"]]
    if usable:
        assert f"start from checkpoint {max(usable)}\n" in out
    assert store_keys(fenv.store, names.volume_prefix("new")) == {}
    assert fenv.lsbd("info", "new").returncode == 1
    # A dry run of an unknown snapshot fails like the real thing.
    assert_user_error(fenv.lsbd("restore", "vol", "--snapshot", "nope", "--to", "new",
                                "--dry-run"), "no snapshot 'nope'")


# ----------------------------------------------------------------- clone

def test_clone_shares_a_snapshot_and_diverges(fenv):
    fenv.ok("create", "vol", "--size", "16M")
    vol = Model(SIZE)
    fenv.write("vol", vol, OPS_A)
    fenv.ok("snapshot", "create", "vol", "s1")
    a = vol.copy()
    fenv.write("vol", vol, OPS_B)
    fenv.ok("clone", "vol", "new", "--snapshot", "s1")
    new = a.copy()
    assert fenv.export("new") == new.bytes()
    # No data copied: the clone has no segments of its own yet.
    assert fenv.json("info", "new")["segments"] == 0

    fenv.write("new", new, [("write", 6, 4, 40), ("write", 4000, 2, 41)])
    fenv.write("vol", vol, [("write", 7, 4, 50), ("write", 3500, 2, 51)])
    assert fenv.export("new") == new.bytes()
    assert fenv.export("vol") == vol.bytes()
    assert fenv.export("vol", "--snapshot", "s1") == a.bytes()

    # A clone of the clone, from a snapshot of the clone.
    fenv.ok("snapshot", "create", "new", "n1")
    n1 = new.copy()
    fenv.write("new", new, [("write", 8, 1, 60)])
    fenv.ok("clone", "new", "newer", "--snapshot", "n1")
    newer = n1.copy()
    fenv.write("newer", newer, [("write", 9, 2, 70), ("write", 100, 1, 71)])
    assert fenv.export("newer") == newer.bytes()
    assert fenv.export("new") == new.bytes()

    wipe(fenv.cache)
    assert fenv.export("newer") == newer.bytes()
    assert fenv.export("new") == new.bytes()
    assert fenv.export("new", "--snapshot", "n1") == n1.bytes()
    assert fenv.export("vol") == vol.bytes()

    # A volume with clones cannot be deleted; leaves first.
    assert_user_error(fenv.lsbd("delete", "vol"), "clones", "new")
    assert_user_error(fenv.lsbd("delete", "new"), "clones", "newer")
    assert fenv.export("vol") == vol.bytes() and fenv.export("new") == new.bytes()
    fenv.ok("delete", "newer")
    fenv.ok("delete", "new")
    fenv.ok("delete", "vol")
    assert list(fenv.store.list(names.VOLUMES)) == []


def test_clone_of_the_live_state(fenv):
    _a, ab, abc = _abc(fenv)
    fenv.ok("clone", "vol", "live")
    assert fenv.export("live") == abc.bytes()
    fenv.ok("clone", "vol", "then", "--seq",
            str(fenv.json("snapshot", "list", "vol")[1]["seq"]))
    assert fenv.export("then") == ab.bytes()


def test_failed_clone_onto_an_existing_name_changes_nothing(fenv):
    fenv.ok("create", "vol", "--size", "16M")
    fenv.write("vol", None, OPS_A)
    fenv.ok("create", "other", "--size", "16M")
    assert_user_error(fenv.lsbd("clone", "vol", "other"), "already exists")
    assert fenv.json("info", "other")["parent"] is None
    assert store_keys(fenv.store, names.clone_prefix("vol")) == {}
    fenv.ok("delete", "vol")


# ----------------------------------------------------------------- diff and incremental export

BETWEEN = [
    ("write", 2, 2, 100),            # over A's data
    ("write", 10, 4, 101), ("write", 14, 2, 102),   # adjacent new data: one range 10..16
    ("zero", 40, 4),                 # A's data zeroed
    ("write", 500, 1, 103),          # a hole gets data
    ("zero", 2500, 4), ("trim", 2600, 8),           # holes stay holes: no change
]
CHANGED = [(2, 4), (10, 16), (40, 44), (500, 501)]


def test_diff_is_exactly_what_changed_and_incremental_export_applies_it(env):
    env.ok("create", "vol", "--size", "16M")
    model = Model(SIZE)
    env.write("vol", model, [("write", 0, 64, 1), ("write", 1000, 8, 2)])
    env.ok("snapshot", "create", "vol", "s1")
    s1 = model.copy()
    env.write("vol", model, BETWEEN[:3])
    env.write("vol", model, BETWEEN[3:])
    env.ok("snapshot", "create", "vol", "s2")
    s2 = model.copy()
    env.write("vol", model, [("write", 1000, 2, 200), ("trim", 60, 4)])

    d = env.json("diff", "vol", "--from", "s1", "--to", "s2")
    assert d["block_size"] == BS
    assert [(r["offset"], r["length"]) for r in d["ranges"]] == \
        [(lo * BS, (hi - lo) * BS) for lo, hi in CHANGED]
    assert d["changed_bytes"] == sum(hi - lo for lo, hi in CHANGED) * BS
    snaps = {s["name"]: s["seq"] for s in env.json("snapshot", "list", "vol")}
    assert (d["from_seq"], d["to_seq"]) == (snaps["s1"], snaps["s2"])

    # The same with the other ways to name points; to the live state by default.
    assert env.json("diff", "vol", "--from", f"#{snaps['s1']}", "--to",
                    f"seq:{snaps['s2']}")["ranges"] == d["ranges"]
    live = env.json("diff", "vol", "--from", "s2")
    assert [(r["offset"] // BS, (r["offset"] + r["length"]) // BS) for r in live["ranges"]] == \
        [(60, 64), (1000, 1002)]
    assert env.json("diff", "vol", "--from", "s2", "--to", "s2")["ranges"] == []
    assert_user_error(env.lsbd("diff", "vol", "--from", "s2", "--to", "s1"), "newer")
    # The text form: offset<TAB>length lines.
    text = env.ok("diff", "vol", "--from", "s1", "--to", "s2").stdout.split()
    assert [int(x) for x in text] == [v for lo, hi in CHANGED for v in (lo * BS, (hi - lo) * BS)]

    # Incremental export: an image of s1 brought up to s2, then to live.
    img = env.file("s1")
    env.ok("export", "vol", img, "--snapshot", "s1")
    assert img.read_bytes() == s1.bytes()
    env.ok("export", "vol", img, "--from", "s1", "--snapshot", "s2")
    assert img.read_bytes() == s2.bytes()
    env.ok("export", "vol", img, "--from", "s2")
    assert img.read_bytes() == model.bytes()
    # --from needs an existing image.
    assert_user_error(env.lsbd("export", "vol", env.tmp / "missing.img", "--from", "s1"),
                      "--from needs an image")


def test_incremental_export_across_a_resize(fenv):
    fenv.ok("create", "vol", "--size", "16M")
    model = Model(SIZE)
    fenv.write("vol", model, [("write", 0, 4, 1)])
    fenv.ok("snapshot", "create", "vol", "s1")
    s1 = model.copy()
    img = fenv.file()
    fenv.ok("export", "vol", img, "--snapshot", "s1")
    from lsbd.engine.volume import Volume

    with Volume.open(fenv.store, "vol", cache_root=str(fenv.cache)) as vol:
        vol.resize(20 * MiB)
        model.grow(20 * MiB)
        apply_ops(vol, model, [("write", 20 * MiB // BS - 2, 2, 5), ("write", 1, 1, 6)])
    fenv.ok("export", "vol", img, "--from", "s1")
    assert img.stat().st_size == 20 * MiB
    assert img.read_bytes() == model.bytes()
    # The past state keeps its past size.
    assert fenv.export("vol", "--snapshot", "s1") == s1.bytes()


# ----------------------------------------------------------------- snapshot list/delete, log, retain

def test_snapshot_list_and_delete(fenv):
    _abc(fenv)
    snaps = fenv.json("snapshot", "list", "vol")
    assert [s["name"] for s in snaps] == ["s1", "s2"]
    assert 0 < snaps[0]["seq"] < snaps[1]["seq"]
    assert all(abs(s["created"] - time.time()) < 120 for s in snaps)
    assert [{"name": s["name"], "seq": s["seq"]} for s in snaps] == \
        fenv.json("info", "vol")["snapshots"]
    assert_user_error(fenv.lsbd("snapshot", "create", "vol", "s1"), "already has a snapshot")
    assert_usage_error(fenv.lsbd("snapshot", "create", "vol", "bad/name"),
                       "argument NAME: bad snapshot name")
    assert [s["name"] for s in fenv.json("snapshot", "list", "vol")] == ["s1", "s2"]

    fenv.ok("snapshot", "delete", "vol", "s1")
    assert [s["name"] for s in fenv.json("snapshot", "list", "vol")] == ["s2"]
    out = fenv.file()
    assert_user_error(fenv.lsbd("export", "vol", out, "--snapshot", "s1"), "no snapshot 's1'")
    assert_user_error(fenv.lsbd("restore", "vol", "--snapshot", "s1", "--to", "x"),
                      "no snapshot 's1'")
    assert_user_error(fenv.lsbd("clone", "vol", "x", "--snapshot", "s1"), "no snapshot 's1'")
    assert_user_error(fenv.lsbd("diff", "vol", "--from", "s1"), "no snapshot 's1'")
    assert_user_error(fenv.lsbd("snapshot", "delete", "vol", "s1"), "no snapshot 's1'")
    assert fenv.lsbd("info", "x").returncode == 1
    assert store_keys(fenv.store, names.clone_prefix("vol")) == {}
    # The name can be used again, for the current state.
    fenv.ok("snapshot", "create", "vol", "s1")
    assert [s["name"] for s in fenv.json("snapshot", "list", "vol")] == ["s2", "s1"]


def test_log_covers_every_segment_and_marks_snapshots(fenv):
    _abc(fenv)
    log = fenv.json("log", "vol")
    seqs = sorted(int(k.rsplit("/", 1)[-1], 16)
                  for k in store_keys(fenv.store, names.segment_prefix("vol")))
    assert seqs == list(range(1, len(seqs) + 1))
    rows = log["ranges"]
    covered = [s for r in rows for s in range(r["first"], r["last"] + 1)]
    assert covered == seqs  # in order, no overlap, no gap
    assert sum(r["segments"] for r in rows) == len(seqs)
    assert all(r["segments"] == r["last"] - r["first"] + 1 for r in rows)
    assert all(r["from"] <= r["to"] for r in rows)
    assert [r["from"] for r in rows] == sorted(r["from"] for r in rows)
    sizes = store_keys(fenv.store, names.segment_prefix("vol"))
    assert sum(r["bytes"] for r in rows) == sum(sizes.values())
    snaps = {s["name"]: s["seq"] for s in fenv.json("snapshot", "list", "vol")}
    for name, seq in snaps.items():
        holding = [r for r in rows if r["first"] <= seq <= r["last"]]
        assert len(holding) == 1 and name in holding[0]["snapshots"]
    assert sorted(n for r in rows for n in r["snapshots"]) == sorted(snaps)
    cps = fenv.json("info", "vol")["checkpoints"]
    assert sorted(c for r in rows for c in r["checkpoints"]) == sorted(cps)
    assert log["retain_seconds"] == 86400
    # The table form names the snapshots too.
    text = fenv.ok("log", "vol").stdout
    assert "snapshot s1" in text and "snapshot s2" in text


def test_snapshot_of_a_volume_never_written(fenv):
    fenv.ok("create", "vol", "--size", "16M")
    fenv.ok("snapshot", "create", "vol", "empty")
    model = Model(SIZE)
    fenv.write("vol", model, [("write", 3, 2, 1)])
    assert fenv.export("vol", "--snapshot", "empty") == bytes(SIZE)
    d = fenv.json("diff", "vol", "--from", "empty")
    assert [(r["offset"], r["length"]) for r in d["ranges"]] == [(3 * BS, 2 * BS)]
    fenv.ok("restore", "vol", "--snapshot", "empty", "--to", "blank")
    assert fenv.export("blank") == bytes(SIZE)


def test_log_of_an_empty_volume(fenv):
    fenv.ok("create", "vol", "--size", "16M")
    assert fenv.json("log", "vol")["ranges"] == []
    assert fenv.ok("log", "vol").returncode == 0


def test_retain_and_create_retain(fenv):
    fenv.ok("create", "vol", "--size", "16M")
    assert fenv.json("info", "vol")["retain_seconds"] == 86400
    fenv.ok("retain", "vol", "7d")
    assert fenv.json("info", "vol")["retain_seconds"] == 604800
    assert fenv.json("log", "vol")["retain_seconds"] == 604800
    assert "keeps every point of the last 90m" in fenv.ok("retain", "vol", "90m").stderr
    assert fenv.json("info", "vol")["retain_seconds"] == 5400
    assert "keeps no past points but its snapshots" in fenv.ok("retain", "vol", "0").stderr
    assert fenv.json("info", "vol")["retain_seconds"] == 0
    assert_usage_error(fenv.lsbd("retain", "vol", "soon"), "argument DURATION: bad duration")
    assert fenv.json("info", "vol")["retain_seconds"] == 0
    assert_user_error(fenv.lsbd("retain", "nope", "7d"), "no volume 'nope'")

    fenv.ok("create", "zero", "--size", "16M", "--retain", "0")
    assert fenv.json("info", "zero")["retain_seconds"] == 0
    fenv.ok("create", "week", "--size", "16M", "--retain", "1w")
    assert fenv.json("info", "week")["retain_seconds"] == 604800
    # Other settings survive a retain change.
    before = fenv.json("info", "week")
    fenv.ok("retain", "week", "24h")
    after = fenv.json("info", "week")
    assert after["retain_seconds"] == 86400
    assert {k: v for k, v in after.items() if k != "retain_seconds"} == \
        {k: v for k, v in before.items() if k != "retain_seconds"}


# ----------------------------------------------------------------- snapshot of a volume in use

CHILD = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    from history_helpers import apply_ops, open_url
    from lsbd.engine.volume import Volume

    store = open_url({url!r})
    vol = Volume.open(store, "vol", cache_root={cache!r})
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "write":
            apply_ops(vol, None, [("write", int(cmd[1]), int(cmd[2]), int(cmd[3]))])
            print("ok", flush=True)
        elif cmd[0] == "quit":
            break
    vol.close()
    print("closed", flush=True)
""")


@pytest.fixture
def short_cache():
    """A cache dir with a short path: the control socket lives in it and
    AF_UNIX paths are limited to about 100 bytes."""
    path = tempfile.mkdtemp(prefix="lsbdh-", dir="/tmp")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def test_snapshot_of_a_volume_another_process_is_writing(env, short_cache):
    env.cache = short_cache
    env.ok("create", "vol", "--size", "16M")
    model = Model(SIZE)
    env.write("vol", model, [("write", 0, 4, 1)])
    child = subprocess.Popen(
        [PYTHON, "-c", CHILD.format(tests=str(REPO / "tests" / "support"), url=env.url,
                                    cache=str(short_cache))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def child_write(lba, n, tag):
            child.stdin.write(f"write {lba} {n} {tag}\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "ok", child.stderr.read()
            model.write(lba * BS, pattern(tag, lba, n))

        child_write(2, 4, 10)
        child_write(300, 8, 11)
        s1 = model.copy()
        env.ok("snapshot", "create", "vol", "s1")
        child_write(300, 2, 12)
        child_write(1000, 1, 13)
        env.ok("snapshot", "create", "vol", "s2")
        s2 = model.copy()
        # The writer answers for its volume: a taken name is refused by it.
        assert_user_error(env.lsbd("snapshot", "create", "vol", "s1"), "already has a snapshot")
        child_write(5, 1, 14)

        # The writer is still running (it holds the lease, never closed).
        assert child.poll() is None
        info = env.json("info", "vol")
        assert info["writer"] is not None
        # Read from another cache dir: the store alone holds both snapshots.
        other = env.tmp / "reader-cache"
        img = env.tmp / "s1.img"
        run(env.url, other, "export", "vol", img, "--snapshot", "s1", check=True)
        assert img.read_bytes() == s1.bytes()
        run(env.url, other, "export", "vol", img, "--snapshot", "s2", check=True)
        assert img.read_bytes() == s2.bytes()

        # Without the writer's control socket (another cache dir) it is a clear error.
        proc = run(env.url, other, "snapshot", "create", "vol", "s3")
        assert_user_error(proc, "in use")

        child.stdin.write("quit\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "closed"
        assert child.wait(60) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert env.export("vol") == model.bytes()
    assert [s["name"] for s in env.json("snapshot", "list", "vol")] == ["s1", "s2"]


# ----------------------------------------------------------------- history after compaction

def test_compaction_keeps_snapshots_and_clone_bases(fenv):
    """retain 0: compaction may reclaim every point except the live state,
    the snapshots and the clones' bases, and those stay exact."""
    fenv.ok("create", "vol", "--size", "16M", "--retain", "0")
    model = Model(SIZE)
    fenv.write("vol", model, [("write", 0, 32, 1)])
    fenv.ok("snapshot", "create", "vol", "s1")
    s1 = model.copy()
    fenv.write("vol", model, [("write", 0, 32, 2)])
    fenv.ok("snapshot", "create", "vol", "s2")
    fenv.ok("clone", "vol", "c", "--snapshot", "s2")
    fenv.ok("snapshot", "delete", "vol", "s2")  # the clone alone pins it now
    s2 = model.copy()
    for tag in (3, 4, 5):  # garbage: each overwrites the last
        fenv.write("vol", model, [("write", 0, 32, tag), ("write", 64, 1, tag)])
    report = json.loads(fenv.ok("compact", "vol", "--json").stdout)
    assert report["segments_deleted"] >= 1 and report["bytes_reclaimed"] > 0
    for _round in range(2):
        assert fenv.export("vol", "--snapshot", "s1") == s1.bytes()
        assert fenv.export("c") == s2.bytes()
        assert fenv.export("vol") == model.bytes()
        wipe(fenv.cache)
    log = fenv.json("log", "vol")
    assert any("s1" in r["snapshots"] for r in log["ranges"])
    # A point compaction removed is refused with a clear error.
    assert_user_error(fenv.lsbd("export", "vol", fenv.file(), "--seq", "4"),
                      "can no longer be rebuilt")
    # The clone goes on diverging from its base.
    c = s2.copy()
    fenv.write("c", c, [("write", 1, 1, 9)])
    assert fenv.export("c") == c.bytes()
    assert fenv.export("vol") == model.bytes()


def test_at_a_reclaimed_time_is_refused_not_zeros(fenv):
    fenv.ok("create", "vol", "--size", "16M", "--retain", "0")
    model = Model(SIZE)
    fenv.write("vol", model, [("write", 0, 16, 1)])
    a = model.copy()
    t1 = time.time()
    time.sleep(1.1)
    fenv.write("vol", model, [("write", 0, 16, 2)])   # every block of A overwritten
    fenv.ok("compact", "vol")
    path = fenv.file()
    proc = fenv.lsbd("export", "vol", path, "--at", iso_local(next_second(t1)))
    if proc.returncode == 0:
        assert path.read_bytes() == a.bytes(), "--at gave another state than the one at that time"
    else:
        assert_user_error(proc, "can no longer be rebuilt")


@pytest.fixture
def clone_with_a_quiet_start(fenv):
    """c: a clone of vol at s1 made at `t0`; its first own write comes 1.1 s later."""
    fenv.ok("create", "vol", "--size", "16M")
    model = Model(SIZE)
    fenv.write("vol", model, [("write", 0, 16, 1)])
    fenv.ok("snapshot", "create", "vol", "s1")
    s1 = model.copy()
    fenv.write("vol", model, [("write", 0, 4, 2)])
    fenv.ok("clone", "vol", "c", "--snapshot", "s1")
    t0 = time.time()
    time.sleep(1.1)
    fenv.write("c", None, [("write", 8, 4, 3)])
    return fenv, s1, iso_local(next_second(t0))


def test_export_of_a_clone_before_its_first_write(clone_with_a_quiet_start):
    fenv, s1, when = clone_with_a_quiet_start
    assert fenv.export("c", "--at", when) == s1.bytes()


def test_restore_of_a_clone_before_its_first_write(clone_with_a_quiet_start):
    fenv, s1, when = clone_with_a_quiet_start
    fenv.ok("restore", "c", "--at", when, "--to", "r")
    assert fenv.export("r") == s1.bytes()


def test_clone_of_a_clone_before_its_first_write(clone_with_a_quiet_start):
    fenv, s1, when = clone_with_a_quiet_start
    proc = fenv.lsbd("clone", "c", "cc", "--at", when)
    if proc.returncode == 0:
        assert fenv.export("cc") == s1.bytes()
    else:
        assert_user_error(proc)
        assert fenv.lsbd("info", "cc").returncode == 1  # refused: nothing half-made
