"""lsbd delete VOLUME"""

import shutil

from lsbd import names
from lsbd.cli import ui
from lsbd.meta.config import load_config
from lsbd.meta.lease import Lease
from lsbd.names import cache_dir_for
from lsbd.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("delete", help="delete a volume and all its objects")
    p.add_argument("volume")
    p.add_argument("--break-lease", action="store_true",
                   help="delete even if a writer on another machine (that is gone) holds it")
    p.set_defaults(func=run)


def run(args, ctx) -> int:
    store = ctx.store
    config = load_config(store, args.volume)
    clones = [i.key.rsplit("/", 1)[-1] for i in store.list(names.clone_prefix(config.name))]
    clones = [c for c in clones if store.exists(names.config_key(c))]
    if clones:
        raise UserError(f"volume {config.name!r} has clones that share its data "
                        f"({', '.join(clones)}): delete them first")
    # Taking the lease refuses to delete a volume in use (on this machine
    # even with --break-lease).
    Lease.acquire(store, config.name, break_lease=args.break_lease)
    keys = [info.key for info in store.list(names.volume_prefix(config.name))]
    # The config goes last: a half-deleted volume is still listed and deletable.
    keys.sort(key=lambda k: (k == names.config_key(config.name), k))
    with ui.count_progress(f"deleting {config.name}") as update:
        for i, key in enumerate(keys):
            store.delete(key)
            update(i + 1, len(keys))
    shutil.rmtree(cache_dir_for(ctx.cache_dir, store, config.name), ignore_errors=True)
    if config.parent:
        store.delete(names.clone_ref_key(config.parent["volume"], config.name))
    ui.err.print(f"deleted volume [bold]{config.name}[/] ({len(keys)} objects)")
    return 0
