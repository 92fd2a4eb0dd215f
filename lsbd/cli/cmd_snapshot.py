"""lsbd snapshot create|list|delete"""

from lsbd.cli import ui
from lsbd.cli.args import add_volume, command, snapshot_name_arg


def register(sub) -> None:
    p = sub.add_parser("snapshot", help="create, list and delete snapshots",
                       description="Create, list and delete snapshots: names bound to a state "
                                   "of a volume (no data is copied).")
    ssub = p.add_subparsers(dest="snapshot_command", metavar="ACTION")
    ssub.required = True
    c = command(ssub, "create", help="bind a name to the volume's current state",
                description="Bind NAME to the volume's current state. Works while the volume "
                            "is mounted or served (its writer flushes to the store first).",
                examples=["vm1 before-upgrade"])
    add_volume(c)
    c.add_argument("name", metavar="NAME", type=snapshot_name_arg,
                   help="the snapshot's name (letters, digits, '.', '_', '-')")
    c.set_defaults(func=run_create)
    ls = command(ssub, "list", help="list a volume's snapshots", examples=["vm1", "vm1 --json"])
    add_volume(ls)
    ls.set_defaults(func=run_list)
    d = command(ssub, "delete", help="delete a snapshot (its data is reclaimed by compaction)",
                examples=["vm1 before-upgrade"])
    add_volume(d)
    d.add_argument("name", metavar="NAME", type=snapshot_name_arg, help="the snapshot to delete")
    d.set_defaults(func=run_delete)


def run_create(args, ctx) -> int:
    from lsbd.meta.config import load_config
    from lsbd.service.writer import run_on_writer

    load_config(ctx.store, args.volume)
    ctx.check_given_key(args.volume)
    outcome = run_on_writer(ctx.store, args.volume, {"op": "snapshot", "name": args.name},
                            cache_root=ctx.cache_dir,
                            prepare=ctx.unlock)
    ui.done({"volume": args.volume, "snapshot": args.name, "seq": outcome.value},
            f"snapshot {ui.bold(args.name)} of {args.volume} at seq {outcome.value}")
    return 0


def run_list(args, ctx) -> int:
    from lsbd.meta.config import load_config
    from lsbd.meta.snapshots import list_snapshots
    from lsbd.plans.restore import format_time

    config = load_config(ctx.store, args.volume)
    snaps = list_snapshots(ctx.store, config)
    if args.json:
        ui.print_json([{"name": s.name, "seq": s.seq, "created": s.created} for s in snaps])
        return 0
    if not snaps:
        ui.note(f"volume {args.volume} has no snapshots")
        return 0
    ui.table(None, ["snapshot", "seq", "created"],
             [[s.name, s.seq, format_time(s.created)] for s in snaps])
    return 0


def run_delete(args, ctx) -> int:
    from lsbd.meta.config import load_config
    from lsbd.meta.snapshots import delete_snapshot
    from lsbd.service.writer import run_on_writer_or_lease

    config = load_config(ctx.store, args.volume)
    # Through the writer of a volume in use (it may be compacting by the
    # snapshots it knows), else holding the lease.
    run_on_writer_or_lease(ctx.store, config.name, {"op": "delete_snapshot", "name": args.name},
                           lambda: delete_snapshot(ctx.store, config, args.name),
                           cache_root=ctx.cache_dir, doing="lsbd snapshot delete")
    ui.done({"volume": args.volume, "snapshot": args.name, "deleted": True},
            f"deleted snapshot {ui.bold(args.name)} of {args.volume}")
    return 0
