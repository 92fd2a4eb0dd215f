"""lsbd checkpoint VOLUME"""

from lsbd.cli import ui
from lsbd.cli.args import add_break_lease, add_volume, command


def register(sub) -> None:
    p = command(sub, "checkpoint", help="write a checkpoint of the block map now",
                description="Write a checkpoint of the block map now (also while the volume is "
                            "mounted or served: its writer does it). Opening the volume from "
                            "the store alone then starts from this checkpoint.",
                examples=["vm1", "vm1 --json"])
    add_volume(p)
    add_break_lease(p)
    p.set_defaults(func=run)


def run(args, ctx) -> int:
    from lsbd.service.writer import run_on_writer

    ctx.check_given_key(args.volume)
    outcome = run_on_writer(ctx.store, args.volume, {"op": "checkpoint"},
                            cache_root=ctx.cache_dir, break_lease=args.break_lease,
                            prepare=ctx.unlock)
    seq = outcome.value
    ui.done({"volume": args.volume, "seq": seq or None, "by_writer": outcome.by_writer},
            f"checkpoint of {ui.bold(args.volume)} at seq {seq}" if seq
            else f"volume {args.volume} is empty: nothing to checkpoint")
    return 0
