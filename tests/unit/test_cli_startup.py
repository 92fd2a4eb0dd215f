"""Building the argument parser stays light (#17): `lsbd --help` and every
`lsbd COMMAND --help` import no store client, no block map and no engine.
Each command imports what it needs when it runs, so a command starts without
paying for the others' libraries.  Run in a fresh interpreter, since the test
process itself has imported everything."""

import json
import os
import subprocess
import sys

import pytest

from lsbd.cli.main import build_parser

HEAVY = ("boto3", "botocore", "lmdb", "cryptography", "zstandard",
         "lsbd.engine", "lsbd.map", "lsbd.segments", "lsbd.history", "lsbd.service",
         "lsbd.store.s3")

PROBE = """
import json, sys
from lsbd.cli.main import main
for argv in json.loads(sys.argv[1]):
    try:
        main(argv)
    except SystemExit:
        pass
print(json.dumps(sorted(sys.modules)))
"""


def loaded_by(*argvs: list[str]) -> list[str]:
    """The heavy modules loaded after running these command lines."""
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argvs)],
                         check=True, capture_output=True, text=True).stdout
    modules = json.loads(out.splitlines()[-1])
    return [m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)]


def commands() -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return list(sub.choices)


def test_commands_are_found():
    assert {"create", "info", "mount", "serve", "key", "log"} <= set(commands())


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["info", "--help"],
                                  ["key", "add", "--help"]])
def test_light_invocation_imports_no_heavy_module(argv):
    assert loaded_by(argv) == []


def test_no_command_help_imports_a_heavy_module():
    assert loaded_by(*[[c, "--help"] for c in commands()]) == []


def test_a_command_that_runs_does_import_what_it_needs(tmp_path):
    # The probe can see heavy modules: `lsbd list` on a file store opens it.
    assert "lsbd.service.volumes" in loaded_by(["--store", f"file://{tmp_path}", "list"])


def imported_by(*argvs: list[str], prefixes: tuple[str, ...]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argvs)],
                         check=True, capture_output=True, text=True).stdout
    return [m for m in json.loads(out.splitlines()[-1]) if m.startswith(prefixes)]


def test_parsing_loads_neither_rich_nor_the_package_metadata():
    # rich comes in with the first line printed (or while `lsbd mount`
    # waits for its serving process), the package metadata with --version.
    assert imported_by(["mount", "--help"], ["info", "--help"],
                       prefixes=("rich", "importlib.metadata")) == []
    assert imported_by(["--version"], prefixes=("importlib.metadata",))


def test_version_is_printed_on_stdout():
    proc = subprocess.run([sys.executable, "-m", "lsbd.cli.main", "--version"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("lsbd ") and not proc.stderr


def test_numpy_starts_no_blas_threads_under_the_cli():
    """The CLI asks numpy's OpenBLAS for one thread (lsbd does no linear
    algebra): otherwise it starts one per core at import, busy-waiting on
    the cores a volume is opening on."""
    probe = ("import os, lsbd.cli.main, numpy; "
             "print(os.environ['OPENBLAS_NUM_THREADS'], len(os.listdir('/proc/self/task')))")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                         text=True, env=env).stdout.split()
    assert out == ["1", "1"]


LEAVE_PROBE = """
import atexit, sys
from lsbd.cli import main as cli, ui

build = cli.build_parser

def with_probe():
    parser = build()
    sub = next(a for a in parser._actions if a.dest == "command")
    p = sub.add_parser("leave-probe")
    cli.add_global_options(p, suppress=True)

    def run(args, ctx):
        ui.print_json({"said": "all of it"})     # buffered: stdout is a pipe
        sys.stderr.write("and a note\\n")
        return cli.LeaveAtOnce(3)

    p.set_defaults(func=run)
    return parser

cli.build_parser = with_probe
atexit.register(lambda: sys.stderr.write("torn down\\n"))
sys.argv = ["lsbd", "--store", "file:///nonexistent", "leave-probe"]
sys.exit(cli.main())
"""


def test_a_command_that_leaves_at_once_flushes_its_output_and_skips_the_teardown():
    """`lsbd mount` ends its process past the interpreter's teardown once the
    serving process is up (lsbd.cli.main.leave): what it printed, buffered
    on a pipe, still gets out, with its exit code."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    r = subprocess.run([sys.executable, "-c", LEAVE_PROBE], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 3, r.stderr
    assert json.loads(r.stdout) == {"said": "all of it"}
    assert "and a note" in r.stderr
    assert "torn down" not in r.stderr, "the interpreter's teardown ran"


def test_the_command_modules_add_the_commands_listed():
    from lsbd.cli.main import COMMANDS

    for module, names in COMMANDS.items():
        sub = next(a for a in build_parser({module: names})._actions if a.dest == "command")
        assert tuple(sub.choices) == names, module


def test_the_command_is_found_past_the_global_options():
    from lsbd.cli.main import command_module

    assert command_module(["--store", "s3://b/p", "-v", "--cache-dir", "list",
                           "umount", "/mnt"]) == "mount"
    assert command_module(["--store=s3://b/p", "log", "vol"]) == "history"
    assert command_module(["nosuch", "vol"]) is None
    assert command_module(["--help", "mount"]) is None
    assert command_module(["--store", "s3://b/p"]) is None


def test_parsing_a_command_builds_only_its_own_parser():
    """`lsbd mount ...` builds the parser of mount (and umount) alone: the
    other commands' parsers and modules are 15-20 ms of every start."""
    probe = ("import json, sys\n"
             "from lsbd.cli.main import parse\n"
             "args = parse(['--store', 's3://b/p', 'mount', 'vol', '/mnt', '--read-only'])\n"
             "print(json.dumps([args.func.__name__, args.read_only, args.store,\n"
             "                  sorted(m for m in sys.modules if m.startswith('lsbd.cli.cmd_'))]))\n")
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                         text=True).stdout
    assert json.loads(out) == ["run_mount", True, "s3://b/p", ["lsbd.cli.cmd_mount"]]


def test_a_line_the_command_parser_does_not_take_is_parsed_by_the_whole_parser(capsys):
    from lsbd.cli.main import parse

    # an abbreviated global option whose value looks like a command
    args = parse(["--cache", "list", "umount", "/mnt"])
    assert args.cache_dir == "list" and args.func.__name__ == "run_umount"
    # errors are the whole parser's, printed once
    with pytest.raises(SystemExit):
        parse(["mount", "vol"])
    err = capsys.readouterr().err
    assert err.count("lsbd: ") == 1 and "MOUNTPOINT" in err, err
