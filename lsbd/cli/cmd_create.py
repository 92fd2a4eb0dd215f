"""lsbd create VOLUME --size SIZE"""

from lsbd.cli import ui
from lsbd.cli.cmd_history import parse_duration
from lsbd.meta.config import DEFAULT_BLOCK_SIZE, create_volume, parse_size


def register(sub) -> None:
    p = sub.add_parser("create", help="create a volume")
    p.add_argument("volume")
    p.add_argument("--size", required=True, help="size, e.g. 10G (binary units)")
    p.add_argument("--block-size", default=str(DEFAULT_BLOCK_SIZE), help="block size (default 4K)")
    p.add_argument("--flush-mode", choices=["journal", "store"], default="journal",
                   help="journal: FLUSH returns once the local journal is synced (default); "
                        "store: once the data is in the store")
    p.add_argument("--segment-size", default="32M", help="target segment object size (default 32M)")
    p.add_argument("--retain", default="24h",
                   help="keep every point in time of this window recoverable (default 24h; "
                        "0: snapshots only)")
    p.set_defaults(func=run)


def run(args, ctx) -> int:
    config = create_volume(ctx.store, args.volume, parse_size(args.size),
                           block_size=parse_size(args.block_size), flush_mode=args.flush_mode,
                           segment_size=parse_size(args.segment_size),
                           retain_seconds=parse_duration(args.retain))
    ui.err.print(f"created volume [bold]{config.name}[/] ({ui.human_size(config.size)}, "
                 f"{config.block_size}-byte blocks) in {ctx.store.url}")
    return 0
