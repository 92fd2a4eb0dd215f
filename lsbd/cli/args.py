"""Argument parsing shared by every command: the parser class (one-line
errors), the global options (accepted before or after the command), and a
helper that adds a command with its examples."""

from __future__ import annotations

import argparse
import sys

from lsbd.errors import LsbdError

#: Exit status of a command line that does not parse (argparse's convention).
USAGE_ERROR = 2


class LeaveAtOnce(int):
    """The exit code of a command whose work goes on in another process
    (`lsbd mount`'s serving process): `lsbd` then ends past the
    interpreter's teardown (lsbd.cli.main.leave)."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr, like every
    other error of lsbd."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"lsbd: {message} (see `{self.prog} --help`)\n")
        sys.exit(USAGE_ERROR)

    def _get_value(self, action, arg_string):
        # A type= function may raise one of lsbd's own errors (a bad size, a bad
        # seq): make it an argument error rather than a traceback.
        try:
            return super()._get_value(action, arg_string)
        except LsbdError as e:
            raise argparse.ArgumentError(action, str(e)) from None


def path_arg(text: str) -> str:
    """A path given on the command line: never empty (which would mean the
    current directory to some system calls)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path")
    return text


def size_arg(text: str) -> int:
    """A size flag's value in bytes ('20G', '512MiB', '4096'): a bad one is
    an error that names the flag (the parser's `argument --size: ...`)."""
    from lsbd.sizes import parse_size   # here: only a command given a size pays for it

    return parse_size(text)


def store_url_arg(text: str) -> str:
    from lsbd.store.open import check_store_url

    return check_store_url(text)


def endpoint_url_arg(text: str) -> str:
    from lsbd.store.open import check_endpoint_url

    return check_endpoint_url(text)


def add_global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """--store, --endpoint-url, --cache-dir, --passphrase-file, --key-file, -v.  On a command's own parser
    (suppress=True) an option left out does not hide the one given before
    the command."""
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--store", default=default, metavar="URL", type=store_url_arg,
                        help="file:///path or s3://bucket/prefix (default: $LSBD_STORE, "
                             "else a directory under ~/.local/share/lsbd)")
    parser.add_argument("--endpoint-url", default=default, metavar="URL", type=endpoint_url_arg,
                        help="S3 endpoint (default: $AWS_ENDPOINT_URL_S3, else "
                             "$AWS_ENDPOINT_URL, else AWS)")
    parser.add_argument("--cache-dir", default=default, metavar="DIR",
                        help="local map, journal and segment cache (default: $LSBD_CACHE_DIR, "
                             "else ~/.cache/lsbd)")
    parser.add_argument("--passphrase-file", default=default, metavar="FILE",
                        help="the passphrase of an encrypted volume, on the file's first line "
                             "(default: $LSBD_PASSPHRASE, else a prompt)")
    parser.add_argument("--key-file", default=default, metavar="FILE",
                        help="a key file that opens an encrypted volume")
    parser.add_argument("-v", "--verbose", action="count",
                        default=argparse.SUPPRESS if suppress else 0,
                        help="more log output (-vv: tracebacks too)")


def command(sub, name: str, *, help: str, examples: list[str], description: str | None = None,
            json: bool = True) -> argparse.ArgumentParser:
    """Add command `name`, with its examples at the end of its help and,
    unless json=False, a --json option."""
    prog = sub._prog_prefix if hasattr(sub, "_prog_prefix") else "lsbd"
    epilog = "examples:\n" + "\n".join(f"  {prog} {name} {e}".rstrip() for e in examples)
    p = sub.add_parser(name, help=help, description=description or help[:1].upper() + help[1:] + ".",
                       epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    if json:
        p.add_argument("--json", action="store_true",
                       help="print the result as one JSON document on stdout")
    return p


def volume_arg(text: str) -> str:
    """A volume's name, checked by the parser: a bad one names its argument."""
    from lsbd.names import check_volume_name

    return check_volume_name(text)


def snapshot_name_arg(text: str) -> str:
    from lsbd.meta.snapshots import check_snapshot_name

    return check_snapshot_name(text)


def add_volume(parser: argparse.ArgumentParser, what: str = "the volume's name") -> None:
    parser.add_argument("volume", metavar="VOLUME", type=volume_arg, help=what)


#: The shortest new passphrase taken without --allow-short-passphrase
#: (NIST SP 800-63B's minimum for a memorised secret; see lsbd.cli.secrets).
MIN_PASSPHRASE = 8


def add_allow_short_passphrase(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--allow-short-passphrase", action="store_true",
                        help=f"{what} shorter than {MIN_PASSPHRASE} characters")


def add_break_lease(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--break-lease", action="store_true",
                        help="take over a volume whose writer is gone without releasing it")


def all_parsers(parser: argparse.ArgumentParser):
    """`parser` and every command parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield from all_parsers(child)
