"""lsbd log / retain / restore / clone / diff: working with a volume's history."""

from __future__ import annotations

import math

from lsbd.cli import ui
from lsbd.cli.args import add_volume, command, volume_arg
from lsbd.cli.points import add_point_args, live_state, point_arg, resolve_args
from lsbd.errors import UserError


def register(sub) -> None:
    p = command(sub, "log", help="list the recoverable history of a volume",
                examples=["vm1", "vm1 --json"])
    add_volume(p)
    p.set_defaults(func=run_log)

    p = command(sub, "retain", help="set how long every point in time stays recoverable",
                examples=["vm1 7d", "vm1 0"])
    add_volume(p)
    p.add_argument("duration", metavar="DURATION", type=parse_duration,
                   help="e.g. 24h, 7d, 90m; 0 keeps no history beyond snapshots")
    p.set_defaults(func=run_retain)

    p = command(sub, "restore", help="create a new volume from a past state",
                description="Create NEWVOLUME holding a past state of VOLUME, as an independent "
                            "copy. Never overwrites: an existing NEWVOLUME is refused.",
                examples=["vm1 --snapshot before-upgrade --to vm1-old",
                          "vm1 --at -2h --to vm1-2h-ago --dry-run", "vm1 --seq 20 --to vm1-20"])
    add_volume(p, "the volume whose history holds the state")
    add_point_args(p, required=True)
    p.add_argument("--to", required=True, metavar="NEWVOLUME", type=volume_arg,
                   help="the volume to create")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.set_defaults(func=run_restore)

    p = command(sub, "clone", help="a new writable volume sharing a past state (no copy)",
                examples=["vm1 vm1-test --snapshot before-upgrade", "vm1 vm1-now"])
    add_volume(p, "the volume to clone")
    p.add_argument("new_volume", metavar="NEWVOLUME", type=volume_arg,
                   help="the name of the clone")
    add_point_args(p, required=False, what="start from the state")
    p.set_defaults(func=run_clone)

    p = command(sub, "diff", help="list the block ranges changed between two points",
                description="List the byte ranges (offset and length) whose content may "
                            "differ between two points of a volume's history.",
                examples=["vm1 --from before-upgrade", "vm1 --from seq:20 --to @-1h --json"])
    add_volume(p)
    p.add_argument("--from", dest="from_point", required=True, metavar="POINT", type=point_arg,
                   help="a snapshot name, seq:N (or #N, quoted: # starts a shell comment) or @TIME")
    p.add_argument("--to", dest="to_point", default="live", metavar="POINT", type=point_arg,
                   help="a snapshot name, seq:N (or #N, quoted), @TIME or live (default)")
    p.set_defaults(func=run_diff)


def parse_duration(text: str) -> float:
    t = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    try:
        if t and t[-1] in units:
            seconds = float(t[:-1]) * units[t[-1]]
        else:
            seconds = float(t)
    except ValueError:
        raise UserError(f"bad duration {text!r}: use e.g. 30m, 24h, 7d or 0") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise UserError(f"bad duration {text!r}: a finite time, 0 or more (e.g. 24h)")
    return seconds


def format_duration(seconds: float) -> str:
    if seconds <= 0:
        return "0 (snapshots only)"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def run_retain(args, ctx) -> int:
    from lsbd.meta.config import load_config, save_config
    from lsbd.service.writer import run_on_writer_or_lease

    load_config(ctx.store, args.volume)
    seconds = args.duration

    def save() -> None:
        config = load_config(ctx.store, args.volume)
        config.retain_seconds = seconds
        save_config(ctx.store, config)

    # The writer of a volume in use prunes by this window: it makes the change.
    run_on_writer_or_lease(ctx.store, args.volume, {"op": "retain", "seconds": seconds}, save,
                           cache_root=ctx.cache_dir, doing="lsbd retain")
    kept = (f"every point of the last {format_duration(seconds)}" if seconds
            else "no past points but its snapshots")
    ui.done({"volume": args.volume, "retain_seconds": seconds},
            f"volume {ui.bold(args.volume)} keeps {kept}")
    return 0


def run_log(args, ctx) -> int:
    from lsbd.history.report import log_rows
    from lsbd.meta.config import load_config
    from lsbd.plans.restore import format_time

    config = load_config(ctx.store, args.volume)
    ctx.unlock(config.name)   # the times are in the sealed segments: checked, empty or not
    rows = log_rows(ctx.store, config)
    if args.json:
        ui.print_json({"volume": config.name, "created": config.created,
                       "retain_seconds": config.retain_seconds, "ranges": rows})
        return 0
    if not rows:
        ui.note(f"volume {config.name} has no history yet (nothing written)")
        return 0
    ui.table(f"{config.name}: recoverable points (retain {format_duration(config.retain_seconds)})",
             ["seqs", "sealed", "segments", "stored", "marks"],
             [[f"{r['first']}..{r['last']}" if r["first"] != r["last"] else str(r["first"]),
               format_time(r["from"]) + ("" if r["first"] == r["last"]
                                         else " .. " + format_time(r["to"])[11:]),
               r["segments"], ui.human_size(r["bytes"]),
               " ".join([f"checkpoint {c}" for c in r["checkpoints"]]
                        + [f"snapshot {n}" for n in r["snapshots"]])]
              for r in rows])
    return 0


def run_restore(args, ctx) -> int:
    from lsbd.history.points import plan_restore_to
    from lsbd.meta.config import load_config
    from lsbd.service.volumes import restore_whole

    store = ctx.store
    config = load_config(store, args.volume)
    ctx.unlock(config.name)   # before anything is resolved or made, empty volume or not
    target = resolve_args(store, config, args)
    assert target is not None  # restore's parser requires a point
    plan = plan_restore_to(store, config, target, args.to)
    if args.dry_run:
        if args.json:
            ui.print_json({"volume": args.volume, "to": args.to, "dry_run": True,
                           "target_seq": plan.target, "checkpoint": plan.checkpoint,
                           "segments": plan.segments, "index_bytes": plan.index_bytes})
            return 0
        for text in plan.describe():
            ui.line(text)
        ui.line(f"metadata to read: about {ui.human_size(plan.index_bytes)}")
        ui.line(f"would create volume {args.to}")
        return 0
    with ui.byte_steps(f"restoring {args.volume} at seq {target} to {args.to}") as update:
        try:
            copied = restore_whole(store, config, target, args.to, cache_root=ctx.cache_dir,
                                   progress=update)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"the unfinished {args.to} is deleted; restore "
                                    "again") from None
    ui.done({"volume": args.volume, "seq": target, "to": args.to, "bytes_copied": copied},
            f"restored {ui.bold(args.volume)} at seq {target} to new volume "
            f"{ui.bold(args.to)} ({ui.human_size(copied)} of data)")
    return 0


def run_clone(args, ctx) -> int:
    from lsbd.history.report import newest_seq
    from lsbd.history.restore import create_clone
    from lsbd.meta.config import load_config
    from lsbd.service.writer import ask_writer

    store = ctx.store
    config = load_config(store, args.volume)
    target = resolve_args(store, config, args)
    if target is None:
        # The live state: a running writer flushes to the store first.
        target = ask_writer(store, config.name, {"op": "flush"}, cache_root=ctx.cache_dir)
        if target is None:
            target = newest_seq(store, config)
    # The size at that point (a read-only open rebuilds the map; metadata only).
    with ctx.open_volume(args.volume, at_seq=target) as src:
        size = src.size
    create_clone(store, config, args.new_volume, target, size=size, cache_root=ctx.cache_dir)
    ui.done({"volume": args.volume, "seq": target, "clone": args.new_volume, "size": size},
            f"cloned {ui.bold(args.volume)} at seq {target} as {ui.bold(args.new_volume)} "
            "(no data copied)")
    return 0


def run_diff(args, ctx) -> int:
    from lsbd.history.points import resolve_word
    from lsbd.history.restore import changed_between
    from lsbd.meta.config import load_config

    store = ctx.store
    config = load_config(store, args.volume)
    old = resolve_word(store, config, args.from_point)
    new = None
    if args.to_point == "live":
        new = live_state(ctx, args.volume, "this diff")
    if new is None:
        new = resolve_word(store, config, args.to_point)
    if old > new:
        raise UserError(f"--from ({args.from_point}, seq {old}) is newer than --to "
                        f"({args.to_point}, seq {new})")
    count = total = 0
    with changed_between(store, args.volume, old, new, cache_root=ctx.cache_dir) as (ranges, bs,
                                                                                    _size):
        # Streamed as the two maps are walked: memory does not grow with them.
        if args.json:
            writer = ui.JsonArrayWriter({"volume": args.volume, "from_seq": old, "to_seq": new,
                                         "block_size": bs}, "ranges")
        for lo, hi in ranges:
            count += 1
            total += (hi - lo) * bs
            if args.json:
                writer.item({"offset": lo * bs, "length": (hi - lo) * bs})
            else:
                ui.line(f"{lo * bs}\t{(hi - lo) * bs}")
    if args.json:
        writer.close({"changed_bytes": total})
        return 0
    ui.note(f"{count} ranges, {ui.human_size(total)} changed between seq {old} and seq {new}")
    return 0
