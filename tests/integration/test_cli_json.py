"""Every command prints one JSON document on stdout with --json (and nothing
else there), every command's help has examples and describes its
arguments, global options go after the command too, and --version."""

from __future__ import annotations

import json
import os
import signal
import subprocess

from engine_helpers import LSBD, MiB, run_cli
from fuse_helpers import require_fuse

from lsbd.cli.args import all_parsers
from lsbd.cli.main import build_parser


def _leaf_commands() -> dict[str, object]:
    root = build_parser()
    out = {}
    for p in all_parsers(root):
        if p is root or any(a.__class__.__name__ == "_SubParsersAction" for a in p._actions):
            continue
        out[" ".join(p.prog.split()[1:])] = p
    return out


def test_every_command_has_examples_and_described_arguments():
    commands = _leaf_commands()
    assert len(commands) >= 25
    for name, parser in commands.items():
        text = parser.format_help()
        assert "examples:\n  lsbd " + name in text, name
        for action in parser._actions:
            if not action.option_strings:
                assert action.help, f"{name}: {action.dest} has no description"
        assert any("--json" in a.option_strings for a in parser._actions), name
        assert any("--store" in a.option_strings for a in parser._actions), name


def test_version_and_global_options_after_the_command(tmp_path):
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("lsbd ")
    (tmp_path / "s").mkdir()
    url = f"file://{tmp_path}/s"
    assert run_cli("create", "v", "--size", "1M", "--store", url,
                   "--cache-dir", tmp_path / "c").returncode == 0
    proc = run_cli("list", "--json", "--store", url)
    assert [v["name"] for v in json.loads(proc.stdout)] == ["v"]
    # Given both ways, the one after the command counts.
    proc = run_cli("--store", f"file://{tmp_path}/nothing", "info", "v", "--json",
                   "--store", url)
    assert proc.returncode == 0 and json.loads(proc.stdout)["name"] == "v"


def test_json_of_every_command_parses(tmp_path):
    require_fuse()
    (tmp_path / "store").mkdir()
    env = {"LSBD_STORE": f"file://{tmp_path}/store", "LSBD_CACHE_DIR": str(tmp_path / "cache"),
           "LSBD_PASSPHRASE": "correct horse battery", "LSBD_NEW_PASSPHRASE": "another one!"}
    src = tmp_path / "in.raw"
    src.write_bytes(os.urandom(2 * MiB))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    seen: dict[str, object] = {}

    def j(*args):
        proc = run_cli(*args, "--json", env=env, timeout=300)
        assert proc.returncode == 0, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        doc = json.loads(proc.stdout)      # one document, nothing else on stdout
        words = [a for a in args if isinstance(a, str) and not a.startswith("-")]
        name = words[0] if words[0] not in ("snapshot", "key") else " ".join(words[:2])
        seen[name] = doc
        return doc

    assert j("create", "v", "--size", "16M")["name"] == "v"
    assert j("list")[0]["name"] == "v"
    assert j("import", "v", src)["bytes"] == 2 * MiB
    assert j("export", "v", tmp_path / "out.raw")["bytes"] == 16 * MiB
    assert j("checkpoint", "v")["seq"] >= 1
    assert j("verify", "v")["ok"] is True
    seq = j("snapshot", "create", "v", "s1")["seq"]
    assert j("snapshot", "list", "v")[0]["seq"] == seq
    assert j("log", "v")["ranges"]
    assert j("retain", "v", "2h")["retain_seconds"] == 7200
    assert j("restore", "v", "--snapshot", "s1", "--to", "r", "--dry-run")["target_seq"] == seq
    assert j("restore", "v", "--snapshot", "s1", "--to", "r")["to"] == "r"
    assert j("clone", "v", "c", "--snapshot", "s1")["clone"] == "c"
    assert j("diff", "v", "--from", "s1")["changed_bytes"] == 0
    assert j("compact", "v", "--dry-run")["dry_run"] is True
    assert "why" in j("compact", "v")
    assert j("resize", "v", "32M")["size"] == 32 * MiB
    assert j("stats", "v")["size"] == 32 * MiB
    assert j("info", "v")["size"] == 32 * MiB
    assert j("snapshot", "delete", "v", "s1")["deleted"] is True
    assert j("delete", "c")["objects_deleted"] > 0
    assert j("mount", "v", mnt)["image"] == str(mnt / "v.img")
    try:
        assert (mnt / "v.img").stat().st_size == 32 * MiB
    finally:
        assert j("umount", mnt)["unmounted"] is True
    # Encrypted: the key commands.
    assert j("create", "e", "--size", "1M", "--encrypt")["encrypted"] is True
    assert j("key", "list", "e")["slots"]
    assert len(j("key", "add", "e")["slots"]) == 2
    assert j("key", "rotate", "e")["current_key"] == 2
    assert j("key", "remove", "e", "2")["slots"]
    assert j("key", "retire", "e", "1")["data_keys"] == [2]
    assert j("key", "change", "e")["slots"] == [1]     # LSBD_NEW_PASSPHRASE opens it now
    # serve: one document once it serves, then the usual notes on stderr.
    sock = tmp_path / "nbd.sock"
    server = subprocess.Popen([LSBD, "serve", "v", "--socket", sock, "--json"],
                              env={**os.environ, **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not (lines and lines[-1] == "}\n"):
            lines.append(server.stdout.readline())
            assert lines[-1], server.stderr.read()
        doc = json.loads("".join(lines))
        assert doc["exports"][0]["uri"].startswith("nbd+unix:///v?socket=")
        seen["serve"] = doc
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    assert server.stdout.read() == "", "serve printed more than one document"
    missing = set(_leaf_commands()) - set(seen)
    assert not missing, f"commands not run with --json: {sorted(missing)}"
