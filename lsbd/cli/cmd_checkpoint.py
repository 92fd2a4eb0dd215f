"""lsbd checkpoint VOLUME"""

from lsbd.cli import ui
from lsbd.engine import control
from lsbd.meta.config import load_config


def register(sub) -> None:
    p = sub.add_parser("checkpoint", help="write a checkpoint of the block map now")
    p.add_argument("volume")
    p.add_argument("--break-lease", action="store_true",
                   help="take over the lease of a writer on a machine that is gone")
    p.set_defaults(func=run)


def run(args, ctx) -> int:
    config = load_config(ctx.store, args.volume)
    # A volume in use: its writer checkpoints (the lease keeps any other
    # process from opening it, --break-lease included).
    reply = control.call(ctx.control_path(config.name), {"op": "checkpoint"})
    if reply is not None:
        seq = reply["seq"]
    else:
        with ctx.open_volume(args.volume, break_lease=args.break_lease) as vol:
            seq = vol.checkpoint()
    ui.err.print(f"checkpoint of [bold]{args.volume}[/] at seq {seq:016x}" if seq
                 else f"volume {args.volume} is empty: nothing to checkpoint")
    return 0
