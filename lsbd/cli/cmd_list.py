"""lsbd list"""

import time

from lsbd.cli import ui
from lsbd.cli.args import command
from lsbd.errors import StoreNotFound
from lsbd.service.volumes import list_volumes_now


def register(sub) -> None:
    p = command(sub, "list", help="list the volumes in the store",
                examples=["", "--json", "--store s3://bucket/prefix"])
    p.set_defaults(func=run)


def run(args, ctx) -> int:
    try:
        rows = list_volumes_now(ctx.store, cache_root=ctx.cache_dir)
    except StoreNotFound as e:
        # Nothing to list, and nothing is created: say so, in case the path is mistyped.
        ui.note(f"{e}")
        rows = []
    if args.json:
        ui.print_json(rows)
        return 0
    if not rows:
        if ctx.has_store:
            ui.note(f"no volumes in {ctx.store.url}")
        return 0
    ui.table(None, ["volume", "size", "block size", "created"],
             [[r["name"], ("at least " if r["size_at_least"] else "") + ui.human_size(r["size"]),
               r["block_size"],
               time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"]))] for r in rows])
    return 0
