"""No input makes `lsbd` print a traceback: every command gets bad values for
each of its arguments and options, and answers with an exit status and, when
it refuses, one line on stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from engine_helpers import MiB, run_cli

NOWHERE = "/proc/nonexistent/x"         # a path that cannot be created, even by root
BAD_VALUES = ["", "-5", "abc", "1e999", "nan", "99999999999999999999999", NOWHERE, "0x",
              "../x", "a/b", "\u00e9\u00e9", "0000000000000014"]

DRIVER = r'''
import contextlib, io, json, signal, sys, traceback
from lsbd.cli import main as cli

cases = json.loads(sys.stdin.read())
results = []

def timeout(signum, frame):
    raise TimeoutError("the command did not finish")

signal.signal(signal.SIGALRM, timeout)
for argv in cases:
    out, err = io.StringIO(), io.StringIO()
    rc, exc = None, None
    signal.alarm(30)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    except BaseException:
        exc = traceback.format_exc()
    finally:
        signal.alarm(0)
    results.append({"argv": argv, "rc": rc, "stderr": err.getvalue(), "exc": exc})
print(json.dumps(results))
'''


def _commands():
    """(command words, parser) for every command."""
    from lsbd.cli.args import all_parsers
    from lsbd.cli.main import build_parser

    root = build_parser()
    for p in all_parsers(root):
        if p is root or any(a.__class__.__name__ == "_SubParsersAction" for a in p._actions):
            continue
        yield p.prog.split()[1:], p


def _cases(tmp_path) -> list[list[str]]:
    raw = tmp_path / "disk.raw"
    good = {"volume": "v", "new_volume": "w", "name": "s2", "duration": "1h", "size": "32M",
            "volumes": "v", "mountpoint": NOWHERE + "/mnt", "file": str(raw), "slot": "2",
            "key_id": "1"}
    cases = []
    for words, parser in _commands():
        positionals = [a for a in parser._actions if not a.option_strings]
        options = [a for a in parser._actions
                   if a.option_strings and a.nargs != 0 and a.dest != "help"]
        base = [good[a.dest] for a in positionals]
        extra = []
        if words == ["serve"]:
            extra = ["--read-only", "--socket", NOWHERE + ".sock"]   # never starts serving
        if words == ["export"]:
            base = ["v", str(tmp_path / "out.raw")]
        for i in range(len(positionals)):
            for value in BAD_VALUES:
                cases.append([*words, *base[:i], value, *base[i + 1:], *extra])
        if words == ["delete"]:
            continue        # with good arguments it would delete the volume the others use
        for action in options:
            for value in BAD_VALUES:
                flag = action.option_strings[-1]
                rest = [x for x in extra if not (action.dest == "socket" and x.startswith(
                    ("--socket", NOWHERE)))]
                cases.append([*words, *base, *rest, f"{flag}={value}"])
    return cases


def test_no_input_ends_in_a_traceback(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    url = f"file://{store}"
    (tmp_path / "disk.raw").write_bytes(os.urandom(MiB))
    # Uncompressed: about 40 of the cases are imports the parser accepts, and a
    # compressed volume starts a sealing process at each open (half the time).
    for argv in (["create", "v", "--size", "32M", "--compress", "none"],
                 ["import", "v", tmp_path / "disk.raw"], ["snapshot", "create", "v", "s1"]):
        assert run_cli(*argv, store=url, cache=tmp_path / "cache").returncode == 0
    cases = _cases(tmp_path)
    assert len(cases) > 1000
    argvs = [["--store", url, "--cache-dir", str(tmp_path / "cache"), *c] for c in cases]
    proc = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(argvs), text=True,
                          capture_output=True, timeout=1800, env={**os.environ, "COLUMNS": "200"},
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    bad = []
    for r in results:
        lines = [ln for ln in r["stderr"].splitlines() if ln.strip()]
        if r["exc"] or "Traceback" in r["stderr"]:
            bad.append(f"{r['argv'][4:]}: {r['exc'] or r['stderr']}")
        elif r["rc"] not in (0, None) and not (lines and lines[-1].startswith("lsbd: ")):
            bad.append(f"{r['argv'][4:]}: exit {r['rc']} without a line: {r['stderr']!r}")
    assert not bad, f"{len(bad)} of {len(results)} cases:\n" + "\n".join(bad[:20])
    if os.environ.get("LSBD_DUMP_ACCEPTED"):
        with open(os.environ["LSBD_DUMP_ACCEPTED"], "w") as f:
            f.writelines(" ".join(r["argv"][4:]) + "\n" for r in results if r["rc"] in (0, None))
    # Most are refused; some values are good for the option they meet (any
    # string is a cache dir, and a clone may be called "abc").
    refused = sum(1 for r in results if r["rc"] not in (0, None))
    assert refused > 0.75 * len(results)
    accepted = {tuple(r["argv"][4:]) for r in results if r["rc"] in (0, None)}
    for argv in [("mount", "v", ""), ("umount", ""), ("retain", "v", "nan"),
                 ("compact", "v", "--threshold=nan"), ("export", "v", ""),
                 ("resize", "v", "1e999")]:
        assert argv not in accepted
    assert not os.path.exists(NOWHERE)


@pytest.mark.parametrize("argv,needles", [
    (["serve", "v", "--port", "99999"], ["--port", "99999"]),
    (["serve", "v", "--socket", NOWHERE + ".sock"], [NOWHERE + ".sock"]),
    (["export", "v", "/dev/full"], ["/dev/full", "No space left"]),
    (["export", "v", NOWHERE], [NOWHERE]),
    (["import", "v", "/dev/zero"], ["/dev/zero", "not a regular file or a block device"]),
    (["resize", "v", "1e999"], ["1e999"]),
    (["create", "x", "--size", "inf"], ["inf"]),
    (["retain", "v", "nan"], ["nan"]),
    (["compact", "v", "--threshold", "2"], ["threshold"]),
    # A negative value after a space is the option's value, not an option.
    (["create", "x", "--size", "-1G"], ["-1G"]),
    (["compact", "v", "--threshold", "-0.5"], ["-0.5"]),
])
def test_bad_values_are_named(tmp_path, argv, needles):
    store = tmp_path / "store"
    store.mkdir()
    url = f"file://{store}"
    assert run_cli("create", "v", "--size", "1M", store=url, cache=tmp_path / "c").returncode == 0
    proc = run_cli(*argv, store=url, cache=tmp_path / "c")
    assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lsbd: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_a_mistyped_store_path_is_not_created(tmp_path):
    """Only `create` makes a new local store; the others say there is none."""
    url = f"file://{tmp_path}/stroe"
    for argv in (["info", "v"], ["log", "v"], ["export", "v", tmp_path / "o"], ["delete", "v"],
                 ["snapshot", "list", "v"], ["verify", "v"], ["stats", "v"], ["list"],
                 ["list", "--json"], ["verify", "v", "--json"]):
        proc = run_cli(*argv, store=url, cache=tmp_path / "c")
        lines = proc.stderr.splitlines()
        assert proc.returncode == 1 and lines == [f"lsbd: no store at {tmp_path}/stroe: check "
                                                  "--store or $LSBD_STORE (`lsbd create` makes "
                                                  "a new one)"], (argv, proc.stderr)
        assert proc.stdout == "", (argv, proc.stdout)
    assert not (tmp_path / "stroe").exists()
    proc = run_cli("create", "v", "--size", "1M", store=url, cache=tmp_path / "c",
                   env={"COLUMNS": "40"})
    # A note is one line, however narrow the output.
    assert proc.returncode == 0 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert (tmp_path / "stroe").is_dir()
    # A missing volume in a store that exists: one line too.
    for argv in (["info", "nv"], ["verify", "nv"], ["stats", "nv"], ["info", "nv", "--json"]):
        proc = run_cli(*argv, store=url, cache=tmp_path / "c")
        assert proc.returncode == 1 and proc.stderr.splitlines() == [
            f"lsbd: no volume 'nv' in file://{tmp_path}/stroe"], (argv, proc.stderr)
    proc = run_cli("list", "--json", store=url, cache=tmp_path / "c")
    assert proc.returncode == 0 and [r["name"] for r in json.loads(proc.stdout)] == ["v"]


def test_an_unusable_cache_dir_is_named(tmp_path):
    """A cache dir that is a file, or cannot be made: one line that names the
    cache dir and how to choose another, from a command that opens a volume
    here, from serve, and from mount before its serving process forks."""
    store = tmp_path / "store"
    store.mkdir()
    url = f"file://{store}"
    assert run_cli("create", "v", "--size", "1M", store=url, cache=tmp_path / "c").returncode == 0
    (tmp_path / "mnt").mkdir()
    not_a_dir = tmp_path / "cachefile"
    not_a_dir.write_bytes(b"")
    commands = (["export", "v", tmp_path / "out.raw"], ["verify", "v"],
                ["serve", "v", "--socket", tmp_path / "s.sock"], ["mount", "v", tmp_path / "mnt"])
    for cache, needle in ((not_a_dir, f"the cache dir {not_a_dir} is not a directory"),
                          (NOWHERE, f"cannot use the cache dir {NOWHERE}: ")):
        for argv in commands:
            proc = run_cli(*argv, store=url, cache=cache)
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            assert proc.returncode == 1 and len(lines) == 1, (argv, proc.stderr)
            assert lines[0].startswith(f"lsbd: {needle}"), (argv, lines[0])
            assert lines[0].endswith("choose another with --cache-dir or $LSBD_CACHE_DIR")
    assert not_a_dir.read_bytes() == b"" and not os.path.exists(NOWHERE)
    assert not (tmp_path / "s.sock").exists() and not os.path.ismount(tmp_path / "mnt")


def test_every_help_example_parses_as_typed_in_a_shell():
    """An example is copied into a shell: nothing in it may turn into a
    comment (`--from #20` reached lsbd as a bare `--from`), and what the
    shell passes on must parse."""
    import shlex

    from lsbd.cli.main import parse

    examples = []
    for _words, parser in _commands():
        lines = (parser.epilog or "").split("examples:\n", 1)[-1].splitlines()
        examples += [line.strip() for line in lines if line.strip().startswith("lsbd ")]
    assert len(examples) > 30, "the scan finds the examples"
    for example in examples:
        argv = shlex.split(example, comments=True)
        assert argv == shlex.split(example), f"part of {example!r} is a shell comment"
        parse(argv[1:])


def test_a_bare_lsbd_shows_its_commands():
    """`lsbd` alone lists what it can do (a new user's first try), on
    stderr with the usage exit code; `lsbd --store URL` alone still says
    that a command is missing."""
    bare = run_cli()
    assert bare.returncode == 2
    assert bare.stderr.startswith("usage: lsbd") and "create a volume" in bare.stderr
    assert bare.stdout == ""
    partial = run_cli(store="file:///nowhere")
    assert partial.returncode == 2 and "COMMAND" in partial.stderr.splitlines()[-1]
