"""lsbd list"""

import time

from lsbd.cli import ui
from lsbd.meta.config import list_volumes, load_config


def register(sub) -> None:
    p = sub.add_parser("list", help="list the volumes in the store")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args, ctx) -> int:
    configs = [load_config(ctx.store, name) for name in list_volumes(ctx.store)]
    if args.json:
        ui.print_json([{"name": c.name, "size": c.size, "block_size": c.block_size,
                        "created": c.created, "volume_id": c.volume_id} for c in configs])
        return 0
    if not configs:
        ui.err.print(f"no volumes in {ctx.store.url}")
        return 0
    ui.table(None, ["volume", "size", "block size", "created"],
             [[c.name, ui.human_size(c.size), c.block_size,
               time.strftime("%Y-%m-%d %H:%M", time.localtime(c.created))] for c in configs])
    return 0
