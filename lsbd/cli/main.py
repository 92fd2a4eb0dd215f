"""`lsbd`: argument parsing and dispatch.  Each command lives in its own
module (lsbd/cli/cmd_*.py) with `register(subparsers)` that adds its parser
and sets `func`; the command gets (args, ctx) and returns an exit code."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lsbd.cli.context import Context
from lsbd.errors import LsbdError

# Listed in help order.  A module that is missing is skipped, so the CLI keeps
# working while a front end's dependencies are absent.
COMMANDS = [
    "create", "list", "info", "delete", "import_export", "checkpoint", "verify",
    "snapshot", "history", "compact", "resize_stats", "serve", "mount", "key",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lsbd", description="A transactional log-structured block store.")
    parser.add_argument("--store", default=None, metavar="URL",
                        help="file:///path or s3://bucket/prefix (default: $LSBD_STORE, "
                             "else a directory under ~/.local/share/lsbd)")
    parser.add_argument("--endpoint-url", default=None, metavar="URL",
                        help="S3 endpoint (default: $AWS_ENDPOINT_URL, else AWS)")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="local map, journal and segment cache (default: $LSBD_CACHE_DIR, "
                             "else ~/.cache/lsbd)")
    parser.add_argument("--passphrase-file", default=None, metavar="FILE",
                        help="the passphrase of an encrypted volume, on the file's first line "
                             "(default: $LSBD_PASSPHRASE, else a prompt)")
    parser.add_argument("--key-file", default=None, metavar="FILE",
                        help="a key file that opens an encrypted volume")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"lsbd.cli.cmd_{name}")
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("lsbd.cli.cmd_"):
                continue
            raise
        module.register(sub)
    return parser


def _join_negative_values(argv: list[str]) -> list[str]:
    """Let `--at -15m` mean `--at=-15m` (argparse takes -15m for an option)."""
    out = []
    i = 0
    while i < len(argv):
        if argv[i] in ("--at", "--from", "--to") and i + 1 < len(argv) \
                and argv[i + 1].startswith("-") and argv[i + 1][1:2].isdigit():
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_join_negative_values(sys.argv[1:] if argv is None else argv))
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="lsbd: %(levelname)s: %(message)s")
    ctx = Context(store_url=args.store, endpoint_url=args.endpoint_url, cache_dir=args.cache_dir,
                  key_file=args.key_file, passphrase_file=args.passphrase_file)
    try:
        return int(args.func(args, ctx) or 0)
    except KeyboardInterrupt:
        print("lsbd: interrupted", file=sys.stderr)
        return 130
    except LsbdError as e:
        # One clear line, no traceback (-vv shows it).
        if args.verbose >= 2:
            raise
        print(f"lsbd: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if args.verbose >= 2:
            raise
        print(f"lsbd: {e.strerror or e}{': ' + e.filename if getattr(e, 'filename', None) else ''}",
              file=sys.stderr)
        return 1
    finally:
        ctx.close()


if __name__ == "__main__":
    sys.exit(main())
