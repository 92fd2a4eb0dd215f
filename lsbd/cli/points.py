"""The options that name a point in a volume's history (--snapshot NAME,
--seq N, --at TIME) and those of a command that keeps a volume open for
writing (mount, serve).  Resolving them is lsbd.history.points."""

from __future__ import annotations

import math

from lsbd.cli.args import size_arg, snapshot_name_arg
from lsbd.errors import UserError
from lsbd.meta.config import FLUSH_MODES


def parse_seq(text: str) -> int:
    # lsbd.history.points pulls in the engine: import it only when a seq is given.
    from lsbd.history.points import parse_seq

    return parse_seq(text)


def point_arg(text: str) -> str:
    """A POINT (diff --from/--to, export --from), checked by the parser."""
    # lsbd.history.points pulls in the engine: import it only when a point is given.
    from lsbd.history.points import check_word

    return check_word(text)


def time_arg(text: str) -> str:
    """--at: checked here (a bad one names the flag), resolved when used
    (relative times count from then)."""
    from lsbd.plans.restore import parse_time

    parse_time(text)
    return text


def add_point_args(parser, *, required: bool = False, what: str = "the state") -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--snapshot", metavar="NAME", type=snapshot_name_arg,
                       help=f"{what} of a snapshot")
    group.add_argument("--seq", metavar="N", type=parse_seq,
                       help=f"{what} after segment N (decimal, or hex written 0x...)")
    group.add_argument("--at", metavar="TIME", type=time_arg,
                       help=f"{what} at a time: ISO 8601 or relative (-15m, -2h, -1d)")


def add_writer_args(parser) -> None:
    """The options of a command that opens a volume for writing and keeps it
    open (mount, serve)."""
    parser.add_argument("--break-lease", action="store_true",
                        help="take over a volume whose writer is gone without releasing it")
    parser.add_argument("--flush-mode", choices=FLUSH_MODES, default=None,
                        help="journal: a flush returns once the local journal is durable; "
                             "store: once the data is in the store (default: the volume's own, "
                             "set by lsbd create)")
    parser.add_argument("--auto-compact", action="store_true",
                        help="compact in the background while open (rate-limited)")
    parser.add_argument("--cache-limit", metavar="SIZE", type=size_arg, default=None,
                        help="keep at most this much of the segments already in the store in "
                             "the cache dir (default 1G; less when the disk has less room)")
    parser.add_argument("--cache-full-wait", metavar="SECONDS", type=parse_seconds, default=None,
                        help="when the cache dir's disk is full and nothing can be evicted "
                             "(the store is down or slow), a write waits this long for "
                             "uploads to make room, then fails with ENOSPC (default 30)")


def writer_options(args) -> dict:
    """Volume.open options from add_writer_args' flags."""
    options: dict[str, object] = {"auto_compact": True} if args.auto_compact else {}
    if args.cache_limit is not None:
        options["cache_limit"] = args.cache_limit
    if args.cache_full_wait is not None:
        options["cache_full_wait"] = args.cache_full_wait
    return options


def parse_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise UserError(f"bad value {text!r}: a number of seconds, 0 or more")
    return value


def resolve_args(store, config, args) -> int | None:
    from lsbd.history.points import resolve

    return resolve(store, config, snapshot=getattr(args, "snapshot", None),
                   seq=getattr(args, "seq", None), at=getattr(args, "at", None))


def live_state(ctx, volume: str, reader: str) -> int | None:
    """The seq of the volume's state now: a writer running here (a mount or
    `lsbd serve`) first puts what it holds into the store, as for a clone.
    None without one: the newest state in the store, and a note when the
    last writer died with writes in its journal that `reader` cannot see."""
    from lsbd.cli import ui
    from lsbd.meta.lease import read_holder
    from lsbd.service.writer import ask_writer

    seq = ask_writer(ctx.store, volume, {"op": "flush"}, cache_root=ctx.cache_dir)
    if seq is None:
        holder = read_holder(ctx.plain_store, volume)
        if holder is not None and holder.is_dead_local_process():
            ui.note(f"the last writer of {volume} ({holder.describe()}) stopped without "
                    f"closing: writes it did not upload are in its journal, not in {reader} "
                    f"(`lsbd serve {volume}` or `lsbd mount` on this machine replays them)")
    return seq
