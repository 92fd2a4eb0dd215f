"""lsbd list"""

import time

from lsbd.cli import ui
from lsbd.cli.args import command


def register(sub) -> None:
    p = command(sub, "list", help="list the volumes in the store",
                examples=["", "--json", "--store s3://bucket/prefix"])
    p.set_defaults(func=run)


def run(args, ctx) -> int:
    # A store that does not exist is an error (StoreNotFound, one line, exit
    # 1), not an empty list: the path may be mistyped, and nothing is created.
    from lsbd.service.volumes import list_volumes_now

    rows = list_volumes_now(ctx.store, cache_root=ctx.cache_dir)
    if args.json:
        ui.print_json(rows)
        return 0
    if not rows:
        ui.note(f"no volumes in {ctx.store.url}")
        return 0
    ui.table(None, ["volume", "size", "block size", "created"],
             [[r["name"], ("at least " if r["size_at_least"] else "") + ui.human_size(r["size"]),
               r["block_size"],
               time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"]))] for r in rows])
    return 0
