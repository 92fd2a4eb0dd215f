"""One way to write a seq: every seq `lsbd` prints for people, pasted back
into --seq, names exactly the state it was printed for; seqs that could be
read two ways are refused."""

from __future__ import annotations

import re

import pytest
from history_helpers import BS, MiB, Model, assert_usage_error, open_url, run, run_json, write_and_close

SIZE = 4 * MiB
STEPS = 22      # more than 16 segments: hex and decimal spellings differ from seq 10 on


@pytest.fixture
def volume(tmp_path):
    """A volume with one segment per step (seq i holds step i's state), two
    snapshots and a checkpoint; returns (run, states: seq -> bytes)."""
    url = "file://" + str(tmp_path / "store")
    cache = tmp_path / "cache"
    store = open_url(url)

    def lsbd(*args, check=True):
        return run(url, cache, *args, check=check)

    lsbd("create", "v", "--size", "4M")
    model = Model(SIZE)
    states = {0: model.bytes()}
    for step in range(1, STEPS + 1):
        write_and_close(store, "v", cache, model, [("write", step * 7 % 1000, 3, step)])
        seq = run_json(url, cache, "info", "v")["newest_seq"]
        assert seq == step, "each step should be one segment"
        states[seq] = model.bytes()
        if step in (11, 17):
            lsbd("snapshot", "create", "v", f"s{step}")
    store.close()
    return lsbd, url, cache, states


def _cells(table: str, label: str) -> str:
    """The value cell of row `label` in a two-column rich table."""
    for line in table.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line) if c.strip()]
        if len(cells) >= 2 and cells[0] == label:
            return cells[1]
    raise AssertionError(f"no row {label!r} in:\n{table}")


def test_every_printed_seq_pasted_back_gives_that_state(volume, tmp_path):
    lsbd, url, cache, states = volume
    printed: list[tuple[str, str, int]] = []   # (where, text as printed, the seq it stands for)

    # info: the newest seq and the checkpoints.
    info_json = run_json(url, cache, "info", "v")
    table = lsbd("info", "v").stdout
    printed.append(("info newest seq", _cells(table, "newest seq"), info_json["newest_seq"]))
    texts = _cells(table, "checkpoints").split(", ")
    assert len(texts) == len(info_json["checkpoints"])
    printed += [("info checkpoints", t, s) for t, s in zip(texts, info_json["checkpoints"])]

    # snapshot list.
    snaps = run_json(url, cache, "snapshot", "list", "v")
    rows = lsbd("snapshot", "list", "v").stdout
    for snap in snaps:
        line = next(ln for ln in rows.splitlines() if f" {snap['name']} " in ln)
        cells = [c.strip() for c in re.split(r"[│┃|]", line) if c.strip()]
        printed.append(("snapshot list", cells[1], snap["seq"]))

    # log: the first and last seq of every range.
    ranges = run_json(url, cache, "log", "v")["ranges"]
    log = lsbd("log", "v").stdout
    shown = [m.group(1) for m in re.finditer(r"^\S?\s*(\d+(?:\.\.\d+)?)\s+[│┃|]", log, re.M)]
    assert len(shown) == len(ranges), log
    for text, r in zip(shown, ranges):
        first, _, last = text.partition("..")
        printed += [("log", first, r["first"]), ("log", last or first, r["last"])]

    # checkpoint (on stderr).
    proc = lsbd("checkpoint", "v")
    m = re.search(r"at seq (\S+)", proc.stderr)
    printed.append(("checkpoint", m.group(1), info_json["newest_seq"]))

    # restore --dry-run: the target, the checkpoint it starts from, the segments it replays.
    plan = run_json(url, cache, "restore", "v", "--seq", "19", "--to", "x", "--dry-run")
    text = lsbd("restore", "v", "--seq", "19", "--to", "x", "--dry-run").stdout
    printed.append(("restore target", re.search(r"target seq (\S+)", text).group(1),
                    plan["target_seq"]))
    if plan["checkpoint"] is not None:
        printed.append(("restore checkpoint", re.search(r"checkpoint (\S+)", text).group(1),
                        plan["checkpoint"]))
    if plan["segments"]:
        lo, hi = re.search(r"segments (\S+)\.\.(\S+)", text).groups()
        printed += [("restore replay", lo, plan["segments"][0]),
                    ("restore replay", hi, plan["segments"][-1])]

    assert any(seq >= 16 for _w, _t, seq in printed)
    exported: dict[str, bytes] = {}
    for where, text, seq in printed:
        if text not in exported:
            path = tmp_path / f"at-{len(exported)}.img"
            lsbd("export", "v", path, "--seq", text)
            exported[text] = path.read_bytes()
        assert exported[text] == states[seq], f"{where}: {text!r} does not give seq {seq}"
        # The plan for it names that seq too.
        assert f"target seq {seq}\n" in lsbd("restore", "v", "--seq", text, "--to", "x",
                                             "--dry-run").stdout


def test_hex_needs_0x_and_ambiguous_seqs_are_refused(volume, tmp_path):
    lsbd, _url, _cache, states = volume
    out = tmp_path / "x.img"
    lsbd("export", "v", out, "--seq", "0x14")
    assert out.read_bytes() == states[20]
    for text, needle in [("0000000000000014", "ambiguous"), ("000000000000000b", "0x"),
                         ("0b", "0x"), ("014", "ambiguous"), ("twenty", "decimal"),
                         ("0xzz", "hex digits"), ("-3", "seq")]:
        proc = lsbd("export", "v", out, f"--seq={text}", check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and text in lines[0], proc.stderr
    # The one-word form of diff and export --from reads seqs the same way.
    assert_usage_error(lsbd("diff", "v", "--from", "#0000000000000014", check=False),
                       "argument --from: ambiguous")
    assert BS == 4096
