"""lsbd log / retain / restore / clone / diff: working with a volume's history."""

from __future__ import annotations

from lsbd import names
from lsbd.cli import ui
from lsbd.cli.points import add_point_args, resolve_args, resolve_word
from lsbd.engine import control
from lsbd.segments.checkpoints import list_checkpoints
from lsbd.meta.config import load_config, save_config
from lsbd.meta.lease import Lease
from lsbd.history.restore import changed_between, create_clone, restore_volume
from lsbd.plans.restore import format_time, plan_restore, recoverable
from lsbd.meta.snapshots import list_snapshots
from lsbd.segments.remote import segment_times
from lsbd.segments.remote import store_segment_seqs
from lsbd.errors import UserError, VolumeExists


def register(sub) -> None:
    p = sub.add_parser("log", help="list the recoverable history of a volume")
    p.add_argument("volume")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_log)

    p = sub.add_parser("retain", help="set how long every point in time stays recoverable")
    p.add_argument("volume")
    p.add_argument("duration", help="e.g. 24h, 7d, 90m; 0 keeps no history beyond snapshots")
    p.set_defaults(func=run_retain)

    p = sub.add_parser("restore", help="create a new volume from a past state")
    p.add_argument("volume")
    add_point_args(p, required=True)
    p.add_argument("--to", required=True, metavar="NEWVOLUME", help="the volume to create")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.set_defaults(func=run_restore)

    p = sub.add_parser("clone", help="a new writable volume sharing a past state (no copy)")
    p.add_argument("volume")
    p.add_argument("new_volume", metavar="NEWVOLUME")
    add_point_args(p, required=False, what="start from the state")
    p.set_defaults(func=run_clone)

    p = sub.add_parser("diff", help="list the block ranges changed between two points")
    p.add_argument("volume")
    p.add_argument("--from", dest="from_point", required=True, metavar="POINT",
                   help="a snapshot name, #SEQ or @TIME")
    p.add_argument("--to", dest="to_point", default="live", metavar="POINT",
                   help="a snapshot name, #SEQ, @TIME or live (default)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_diff)


def parse_duration(text: str) -> float:
    t = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    try:
        if t and t[-1] in units:
            return float(t[:-1]) * units[t[-1]]
        return float(t)
    except ValueError:
        raise UserError(f"bad duration {text!r}: use e.g. 30m, 24h, 7d or 0") from None


def format_duration(seconds: float) -> str:
    if seconds <= 0:
        return "0 (snapshots only)"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def run_retain(args, ctx) -> int:
    config = load_config(ctx.store, args.volume)
    seconds = parse_duration(args.duration)
    if seconds < 0:
        raise UserError("the retention window cannot be negative")
    # The writer of a volume in use prunes by this window: it makes the
    # change; otherwise the lease keeps a writer from opening meanwhile.
    reply = control.call(ctx.control_path(config.name), {"op": "retain", "seconds": seconds})
    if reply is None:
        with Lease.held(ctx.store, config.name, doing="lsbd retain"):
            config = load_config(ctx.store, args.volume)
            config.retain_seconds = seconds
            save_config(ctx.store, config)
    ui.err.print(f"volume [bold]{args.volume}[/] keeps every point of the last "
                 f"{format_duration(seconds)}")
    return 0


def run_log(args, ctx) -> int:
    store = ctx.store
    config = load_config(store, args.volume)
    times = segment_times(store, config)
    sizes = store_segment_seqs(store, config.name)
    checkpoints = set(list_checkpoints(store, config.name))
    snaps = {}
    for s in list_snapshots(store, config):
        snaps.setdefault(s.seq, []).append(s.name)
    rows = []
    run: list[int] = []

    def close_run():
        if run:
            rows.append({"first": run[0], "last": run[-1], "segments": len(run),
                         "bytes": sum(sizes.get(s, 0) for s in run),
                         "from": times[run[0]] / 1e9, "to": times[run[-1]] / 1e9,
                         "checkpoints": sorted(checkpoints & set(run)),
                         "snapshots": sorted(n for s in run for n in snaps.get(s, []))})
            run.clear()

    isolated, window, _top = recoverable(checkpoints, sizes, base=config.base_seq)
    snap_times = {s.seq: s.created * 1e9 for s in list_snapshots(store, config)}
    for seq in isolated:
        # Kept only as a checkpoint (a snapshot or clone base outside the window).
        t = times.get(seq) or snap_times.get(seq) or 0
        rows.append({"first": seq, "last": seq, "segments": 0, "bytes": 0, "from": t / 1e9,
                     "to": t / 1e9, "checkpoints": [seq], "snapshots": snaps.get(seq, [])})
    for seq in sorted(s for s in times if s >= window):
        # A new line after a checkpoint, a snapshot, or a pause of 10 minutes.
        if run and (times[seq] - times[run[-1]] > 600e9 or run[-1] in checkpoints
                    or run[-1] in snaps):
            close_run()
        run.append(seq)
    close_run()
    if args.json:
        ui.print_json({"volume": config.name, "created": config.created,
                       "retain_seconds": config.retain_seconds, "ranges": rows})
        return 0
    if not rows:
        ui.err.print(f"volume {config.name} has no history yet (nothing written)")
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
    store = ctx.store
    config = load_config(store, args.volume)
    target = resolve_args(store, config, args)
    plan = plan_restore(list_checkpoints(store, config.name), store_segment_seqs(store, config.name),
                        target, base=config.base_seq)
    if store.exists(names.config_key(args.to)):
        raise VolumeExists(f"volume {args.to!r} already exists: restore never overwrites; "
                           "choose another name")
    if args.dry_run:
        for line in plan.describe():
            ui.out.print(line)
        ui.out.print(f"metadata to read: about {ui.human_size(plan.index_bytes)}")
        ui.out.print(f"would create volume {args.to}")
        return 0
    with ui.count_progress(f"restoring {args.volume}@{target} to {args.to}") as update:
        copied = restore_volume(store, config, target, args.to, cache_root=ctx.cache_dir,
                                progress=update)
    ui.err.print(f"restored [bold]{args.volume}[/] at seq {target} to new volume "
                 f"[bold]{args.to}[/] ({ui.human_size(copied)} of data)")
    return 0


def run_clone(args, ctx) -> int:
    store = ctx.store
    config = load_config(store, args.volume)
    target = resolve_args(store, config, args)
    if target is None:
        # The live state: a running writer flushes to the store first.
        sock = ctx.control_path(config.name)
        reply = control.call(sock, {"op": "flush"})
        target = reply["seq"] if reply else max(store_segment_seqs(store, config.name)
                                                 or [config.base_seq])
    # The size at that point (a read-only open rebuilds the map; metadata only).
    with ctx.open_volume(args.volume, at_seq=target) as src:
        size = src.size
    create_clone(store, config, args.new_volume, target, size=size, cache_root=ctx.cache_dir)
    ui.err.print(f"cloned [bold]{args.volume}[/] at seq {target} as [bold]{args.new_volume}[/] "
                 "(no data copied)")
    return 0


def run_diff(args, ctx) -> int:
    store = ctx.store
    config = load_config(store, args.volume)
    old = resolve_word(store, config, args.from_point)
    new = resolve_word(store, config, args.to_point)
    if old > new:
        raise UserError(f"--from ({args.from_point}, seq {old}) is newer than --to "
                        f"({args.to_point}, seq {new})")
    ranges, bs, _size = changed_between(store, args.volume, old, new, cache_root=ctx.cache_dir)
    total = sum((hi - lo) * bs for lo, hi in ranges)
    if args.json:
        ui.print_json({"volume": args.volume, "from_seq": old, "to_seq": new, "block_size": bs,
                       "changed_bytes": total,
                       "ranges": [{"offset": lo * bs, "length": (hi - lo) * bs}
                                  for lo, hi in ranges]})
        return 0
    for lo, hi in ranges:
        ui.out.print(f"{lo * bs}\t{(hi - lo) * bs}")
    ui.err.print(f"{len(ranges)} ranges, {ui.human_size(total)} changed between seq {old} "
                 f"and seq {new}")
    return 0
