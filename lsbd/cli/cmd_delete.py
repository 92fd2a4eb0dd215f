"""lsbd delete VOLUME"""

from lsbd.cli import ui
from lsbd.cli.args import add_volume, command


def register(sub) -> None:
    p = command(sub, "delete", help="delete a volume and all its objects",
                examples=["vm2", "vm2 --break-lease"])
    add_volume(p, "the volume to delete (refused while it has clones)")
    p.add_argument("--break-lease", action="store_true",
                   help="delete even if a writer on another machine (that is gone) holds it")
    p.set_defaults(func=run)


def run(args, ctx) -> int:
    from lsbd.service.volumes import delete_volume

    with ui.count_progress(f"deleting {args.volume}") as update:
        count = delete_volume(ctx.store, args.volume, cache_root=ctx.cache_dir,
                              break_lease=args.break_lease, progress=update)
    ui.done({"volume": args.volume, "objects_deleted": count},
            f"deleted volume {ui.bold(args.volume)} ({count} objects)")
    return 0
