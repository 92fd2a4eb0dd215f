"""lsbd snapshot create|list|delete"""


from lsbd.cli import ui
from lsbd.engine import control
from lsbd.meta.config import load_config
from lsbd.meta.snapshots import check_snapshot_name, delete_snapshot, list_snapshots
from lsbd.plans.restore import format_time
from lsbd.meta.lease import Lease, read_holder
from lsbd.errors import LeaseHeld


def register(sub) -> None:
    p = sub.add_parser("snapshot", help="create, list and delete snapshots")
    ssub = p.add_subparsers(dest="snapshot_command", metavar="ACTION")
    ssub.required = True
    c = ssub.add_parser("create", help="bind a name to the volume's current state")
    c.add_argument("volume")
    c.add_argument("name")
    c.set_defaults(func=run_create)
    ls = ssub.add_parser("list", help="list a volume's snapshots")
    ls.add_argument("volume")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=run_list)
    d = ssub.add_parser("delete", help="delete a snapshot (its data is reclaimed by compaction)")
    d.add_argument("volume")
    d.add_argument("name")
    d.set_defaults(func=run_delete)


def run_create(args, ctx) -> int:
    check_snapshot_name(args.name)
    store = ctx.store
    config = load_config(store, args.volume)
    # A volume in use: ask its writer, which flushes to the store first.
    sock = ctx.control_path(config.name)
    reply = control.call(sock, {"op": "snapshot", "name": args.name})
    if reply is not None:
        seq = reply["seq"]
    else:
        try:
            with ctx.open_volume(args.volume) as vol:
                seq = vol.snapshot(args.name).seq
        except LeaseHeld:
            holder = read_holder(store, config.name)
            raise LeaseHeld(f"volume {config.name!r} is in use by "
                            f"{holder.describe() if holder else 'another writer'}, which "
                            "cannot be asked to flush from here: run `lsbd snapshot create` "
                            "on that machine") from None
    ui.err.print(f"snapshot [bold]{args.name}[/] of {args.volume} at seq {seq:016x}")
    return 0


def run_list(args, ctx) -> int:
    store = ctx.store
    config = load_config(store, args.volume)
    snaps = list_snapshots(store, config)
    if args.json:
        ui.print_json([{"name": s.name, "seq": s.seq, "created": s.created} for s in snaps])
        return 0
    if not snaps:
        ui.err.print(f"volume {args.volume} has no snapshots")
        return 0
    ui.table(None, ["snapshot", "seq", "created"],
             [[s.name, f"{s.seq:016x}", format_time(s.created)] for s in snaps])
    return 0


def run_delete(args, ctx) -> int:
    config = load_config(ctx.store, args.volume)
    # Through the writer of a volume in use (it may be compacting by the
    # snapshots it knows), else holding the lease.
    reply = control.call(ctx.control_path(config.name),
                         {"op": "delete_snapshot", "name": args.name})
    if reply is None:
        with Lease.held(ctx.store, config.name, doing="lsbd snapshot delete"):
            delete_snapshot(ctx.store, config, args.name)
    ui.err.print(f"deleted snapshot [bold]{args.name}[/] of {args.volume}")
    return 0
