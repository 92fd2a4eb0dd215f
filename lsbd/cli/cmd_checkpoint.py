"""lsbd checkpoint VOLUME"""

from lsbd.cli import ui


def register(sub) -> None:
    p = sub.add_parser("checkpoint", help="write a checkpoint of the block map now")
    p.add_argument("volume")
    p.add_argument("--break-lease", action="store_true", help="take over a lease held elsewhere")
    p.set_defaults(func=run)


def run(args, ctx) -> int:
    with ctx.open_volume(args.volume, break_lease=args.break_lease) as vol:
        seq = vol.checkpoint()
    ui.err.print(f"checkpoint of [bold]{args.volume}[/] at seq {seq:016x}" if seq
                 else f"volume {args.volume} is empty: nothing to checkpoint")
    return 0
