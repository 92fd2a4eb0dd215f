"""`lsbd`: argument parsing and dispatch.  Each command lives in its own
module (lsbd/cli/cmd_*.py) with `register(subparsers)` that adds its parser
and sets `func`; the command gets (args, ctx) and returns an exit code.

Output: what a command is asked for (a table, a listing, diff ranges, a
plan; with --json, one JSON document) goes to stdout.  Progress bars, notes
on what was done, warnings and errors go to stderr."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from typing import NoReturn

from lsbd import startahead

startahead.read_ahead()   # before the imports below: they are what it reads
startahead.watch_opens()  # and the data files they open, for the next start

from lsbd.cli import ui  # noqa: E402
from lsbd.cli.args import USAGE_ERROR, LeaveAtOnce, Parser, add_global_options, all_parsers  # noqa: E402
from lsbd.cli.context import Context  # noqa: E402
from lsbd.errors import LsbdError  # noqa: E402

# lsbd uses numpy for arrays (opening a volume decodes segment indexes with
# it), never for linear algebra; numpy's OpenBLAS would start a thread per
# core at import that busy-waits for work (60 ms of CPU in its first second,
# measured), while a volume opens on the same cores.  Set before any import
# of numpy, in every command and the processes it starts.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# Each command module (lsbd/cli/cmd_NAME.py) and the commands it adds,
# listed in help order.  A module that is missing is skipped, so the CLI
# keeps working while a front end's dependencies are absent.
COMMANDS = {
    "create": ("create",), "list": ("list",), "info": ("info",), "delete": ("delete",),
    "import_export": ("import", "export"), "checkpoint": ("checkpoint",),
    "verify": ("verify",), "snapshot": ("snapshot",),
    "history": ("log", "retain", "restore", "clone", "diff"), "compact": ("compact",),
    "resize_stats": ("resize", "stats"), "serve": ("serve",), "mount": ("mount", "umount"),
    "key": ("key",),
}
MODULE_OF = {command: module for module, commands in COMMANDS.items() for command in commands}
#: Commands that keep retrying a failing store request (5 attempts, as
#: long as they take): a serving process has a cache dir and its users'
#: writes to protect, and a copy or compaction hours of work done.
PATIENT_COMMANDS = frozenset({"serve", "mount", "import", "export", "verify", "compact",
                              "restore", "clone"})
#: Every other command is a question or a small change someone waits for:
#: a request still failing after this many seconds is not tried again, so
#: a store that takes requests and never answers fails it in about 10 s
#: (two attempts at the 5 s read timeout of small requests), not 26 s.
ONE_SHOT_RETRY_WITHIN = 8.0
#: The global options that take a value (lsbd.cli.args.add_global_options).
GLOBAL_VALUE_OPTIONS = frozenset({"--store", "--endpoint-url", "--cache-dir",
                                  "--passphrase-file", "--key-file"})


def version() -> str:
    from importlib import metadata  # only for --version: it reads the installed packages

    try:
        return metadata.version("lsbd")
    except metadata.PackageNotFoundError:
        return "unknown"


class _VersionAction(argparse.Action):
    """--version, with the version looked up only when it is asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="show the version and exit"):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        sys.stdout.write(f"lsbd {version()}\n")
        parser.exit()


def build_parser(modules=COMMANDS, parser_class: type[Parser] = Parser,
                 ) -> argparse.ArgumentParser:
    """The parser of every command, or of the commands of `modules` only."""
    parser = parser_class(
        prog="lsbd", description="A transactional log-structured block store.",
        epilog="Global options are accepted before or after the command. "
               "`lsbd COMMAND --help` shows a command's options and examples.")
    parser.add_argument("--version", action=_VersionAction)
    add_global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in modules:
        try:
            module = importlib.import_module(f"lsbd.cli.cmd_{name}")
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("lsbd.cli.cmd_"):
                continue
            raise
        module.register(sub)
    for p in all_parsers(parser):
        if p is not parser and not any(isinstance(a, argparse._SubParsersAction)
                                       for a in p._actions):
            add_global_options(p, suppress=True)
    return parser


def _join_negative_values(argv: list[str], takes_value: set[str]) -> list[str]:
    """Let `--at -15m` mean `--at=-15m` (argparse takes -15m for an option),
    and so for every option that takes a value: `--size -1G` is then a bad
    size, not a missing argument."""
    out = []
    i = 0
    while i < len(argv):
        if argv[i] in takes_value and i + 1 < len(argv) \
                and argv[i + 1].startswith("-") and argv[i + 1][1:2].isdigit():
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


class _NotParsed(Exception):
    pass


class _FirstTry(Parser):
    """The parser of the one command named: an error is not printed, the
    whole parser parses again and says it (as it always has)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _NotParsed(message)


def command_module(argv: list[str]) -> str | None:
    """The module of the command `argv` names, found without a parser: its
    first word that is neither an option nor a global option's value.
    None when help or the version is asked for, or no command is known."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if word in ("-h", "--help", "--version", "--"):
            return None
        if not word.startswith("-"):
            return MODULE_OF.get(word)
        i += 2 if word in GLOBAL_VALUE_OPTIONS else 1
    return None


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    takes_value = {o for p in all_parsers(parser) for a in p._actions if a.nargs != 0
                   for o in a.option_strings}
    return parser.parse_args(_join_negative_values(argv, takes_value))


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line parsed.  The parser of the command named is built
    alone first (every command's parser and modules cost 15-20 ms of each
    start, `lsbd mount`'s included); the whole parser parses a line that
    it does not take, and so gives every error and help as before."""
    if not argv:
        # A bare `lsbd`: the commands it has, rather than "COMMAND is required".
        build_parser().print_help(sys.stderr)
        sys.exit(USAGE_ERROR)
    module = command_module(argv)
    if module is not None:
        try:
            return _parse(build_parser({module: COMMANDS[module]}, _FirstTry), argv)
        except _NotParsed:
            pass
    return _parse(build_parser(), argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
    except LsbdError as e:
        print(f"lsbd: {e}", file=sys.stderr)
        return USAGE_ERROR
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="lsbd: %(levelname)s: %(message)s")
    said = _ErrorsSaid()
    for handler in logging.getLogger().handlers:
        handler.addFilter(said)
    ui.configure(json=getattr(args, "json", False))
    ctx = Context(store_url=args.store, endpoint_url=args.endpoint_url, cache_dir=args.cache_dir,
                  key_file=args.key_file, passphrase_file=args.passphrase_file,
                  create_store=getattr(args, "creates_store", False),
                  store_retry_within=None if args.command in PATIENT_COMMANDS
                  else ONE_SHOT_RETRY_WITHIN)
    try:
        result = args.func(args, ctx)
        code = int(result or 0)
    except KeyboardInterrupt as e:
        # A command may say what the interruption left (a partial copy).
        print(f"lsbd: interrupted{f': {e}' if str(e) else ''}", file=sys.stderr)
        return 130
    except LsbdError as e:
        # One clear line, no traceback (-vv shows it).
        if args.verbose >= 2:
            raise
        said.print_once(str(e))
        return 1
    except OSError as e:
        if args.verbose >= 2:
            raise
        said.print_once(ctx.cache_dir_error(e) or describe_os_error(e))
        return 1
    finally:
        ctx.close()
    if argv is None and code == 0:
        startahead.record()     # what the next start reads ahead
    if argv is None and isinstance(result, LeaveAtOnce):
        leave(code)     # the `lsbd` command itself, never a caller in this process
    return code


class _ErrorsSaid(logging.Filter):
    """The ERROR lines already shown: a command's last line does not say
    one again (an engine that refuses a write logs why, for a serving
    process's log, and raises the same words to the command)."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            self.errors.add(record.getMessage())
        return True

    def print_once(self, message: str) -> None:
        if message not in self.errors:
            print(f"lsbd: {message}", file=sys.stderr)


def leave(code: int) -> NoReturn:
    """End the process now, its output flushed, past the interpreter's
    teardown.  A command whose work goes on in another process (`lsbd
    mount`'s serving process) has nothing left to tear down here, and the
    teardown (botocore, rich and the rest of its modules) took 0.14-0.22 s
    of `lsbd mount`'s 1.1-1.5 s at 10 ms (docs/distant.md)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    logging.shutdown()
    os._exit(code)


def describe_os_error(e: OSError) -> str:
    what = e.strerror or str(e)
    filename = getattr(e, "filename", None)
    return f"{filename}: {what}" if filename else what


if __name__ == "__main__":
    sys.exit(main())
