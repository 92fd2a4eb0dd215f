"""Naming a point in a volume's history on the command line:
--snapshot NAME, --seq N or --at TIME, and the one-word form used by diff
and export --from: NAME (a snapshot), #N or seq:N, @TIME."""

from __future__ import annotations

import time

from lsbd.segments.checkpoints import list_checkpoints
from lsbd.meta.config import FLUSH_MODES, VolumeConfig
from lsbd.plans.restore import BadPoint, parse_time, plan_restore, seq_at
from lsbd.meta.snapshots import read_snapshot
from lsbd.segments.remote import segment_times
from lsbd.segments.remote import store_segment_seqs
from lsbd.errors import UserError


def add_point_args(parser, *, required: bool = False, what: str = "the state") -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--snapshot", metavar="NAME", help=f"{what} of a snapshot")
    group.add_argument("--seq", metavar="N", type=_seq_arg, help=f"{what} after segment N")
    group.add_argument("--at", metavar="TIME",
                       help=f"{what} at a time: ISO 8601 or relative (-15m, -2h, -1d)")


def add_writer_args(parser) -> None:
    """The options of a command that opens a volume for writing and keeps it
    open (mount, serve)."""
    parser.add_argument("--break-lease", action="store_true",
                        help="take over a volume whose writer is gone without releasing it")
    parser.add_argument("--flush-mode", choices=FLUSH_MODES, default=None,
                        help="journal: a flush returns once the local journal is durable "
                             "(the volume's default); store: once the data is in the store")
    parser.add_argument("--auto-compact", action="store_true",
                        help="compact in the background while open (rate-limited)")
    parser.add_argument("--cache-limit", metavar="SIZE", default=None,
                        help="keep at most this much of the segments already in the store in "
                             "the cache dir (default 1G; less when the disk has less room)")


def writer_options(args) -> dict:
    """Volume.open options from add_writer_args' flags."""
    from lsbd.meta.config import parse_size

    options = {"auto_compact": True} if args.auto_compact else {}
    if args.cache_limit is not None:
        options["cache_limit"] = parse_size(args.cache_limit)
    return options


def _seq_arg(text: str) -> int:
    try:
        return int(text, 16) if text.startswith("0x") else int(text)
    except ValueError:
        raise UserError(f"bad seq {text!r}") from None


def resolve(store, config: VolumeConfig, *, snapshot: str | None = None, seq: int | None = None,
            at: str | None = None) -> int | None:
    """The seq a point names, or None if none was named (the live state)."""
    top = max(store_segment_seqs(store, config.name) or [config.base_seq])
    if snapshot is not None:
        return read_snapshot(store, config, snapshot).seq
    if seq is not None:
        if seq < 0 or seq > top:
            raise BadPoint(f"volume {config.name} has no seq {seq} (its newest is {top})")
        return _recoverable(store, config, seq)
    if at is not None:
        when = parse_time(at)
        times = segment_times(store, config)
        found = seq_at(times, when, created=config.created, now=time.time(),
                       floor=config.base_seq)
        if found == config.base_seq and times and config.base_seq + 1 not in times:
            # The segments sealed before `when` are gone: which state it was is unknown.
            raise BadPoint(f"{at}: that state can no longer be rebuilt: its history was "
                           "reclaimed (outside the retention window, and no snapshot keeps it)")
        return _recoverable(store, config, found)
    return None


def _recoverable(store, config: VolumeConfig, seq: int) -> int:
    """`seq`, if its state can still be rebuilt (compaction may have removed it)."""
    if seq <= config.base_seq:
        return seq
    plan_restore(list_checkpoints(store, config.name), store_segment_seqs(store, config.name),
                 seq, base=config.base_seq)
    return seq


def resolve_args(store, config: VolumeConfig, args) -> int | None:
    return resolve(store, config, snapshot=getattr(args, "snapshot", None),
                   seq=getattr(args, "seq", None), at=getattr(args, "at", None))


def resolve_word(store, config: VolumeConfig, word: str) -> int:
    """NAME (snapshot), #N / seq:N, @TIME, or 'live'."""
    if word == "live":
        return max(store_segment_seqs(store, config.name) or [config.base_seq])
    if word.startswith("#"):
        return resolve(store, config, seq=_seq_arg(word[1:]))
    if word.startswith("seq:"):
        return resolve(store, config, seq=_seq_arg(word[4:]))
    if word.startswith("@"):
        return resolve(store, config, at=word[1:])
    return resolve(store, config, snapshot=word)
