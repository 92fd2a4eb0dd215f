"""lsbd info VOLUME"""

import time

from lsbd import names
from lsbd.cli import ui
from lsbd.cli.args import add_volume, command
from lsbd.cli.cmd_history import format_duration
from lsbd.errors import StoreError

UNKNOWN = "? (the store is unreachable)"


def register(sub) -> None:
    p = command(sub, "info", help="show a volume's settings and state",
                description="Show a volume's settings and state: from the store, and from its "
                            "writer when it is mounted or served on this machine (which also "
                            "answers while the store is unreachable).",
                examples=["vm1", "vm1 --json"])
    add_volume(p)
    p.set_defaults(func=run)


def run(args, ctx) -> int:
    from lsbd.service.volumes import describe_volume

    # An encrypted volume's size and newest seq are in its sealed log: its
    # key is needed, and checked first, whether the volume holds data yet or not.
    config = store_error = None   # the config is read once: unlocking reads it
    try:
        ctx.unlock(args.volume)
        config = ctx.volume_config(args.volume)
    except StoreError as e:
        store_error = e     # not tried again: the writer, if any, answers without the store
    info = describe_volume(ctx.store, args.volume, cache_root=ctx.cache_dir, config=config,
                           store_error=store_error)
    if args.json:
        ui.print_json(info)
        return 0
    size, parent = info["size"], info["parent"]
    snapshots, checkpoints = info["snapshots"], info["checkpoints"]
    rows = [
        ["volume", info["name"]], ["size", f"{ui.human_size(size)} ({size} bytes)"],
        ["block size", info["block_size"]], ["flush mode", info["flush_mode"]],
        ["retain", format_duration(info["retain_seconds"])],
        ["clone of", f"{parent['volume']} at seq {parent['seq']}" if parent else "-"],
        ["snapshots", UNKNOWN if snapshots is None
         else ", ".join(f"{s['name']} (seq {s['seq']})" for s in snapshots) or "none"],
        ["created", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["created"]))],
        ["segments", UNKNOWN if info["segments"] is None
         else f"{info['segments']} ({ui.human_size(info['stored_bytes'])} stored)"],
        ["newest seq", info["newest_seq"]],
        ["checkpoints", UNKNOWN if checkpoints is None
         else ", ".join(str(c) for c in checkpoints) or "none"],
        ["writer", (f"{info['writer']}, exited without closing (`lsbd serve` or `lsbd mount` "
                    "here replays its journal)") if info.get("writer_exited")
         else info["writer"] or "none"],
        ["compression", info.get("compression", "?")],
        ["encryption", info.get("encryption") or "none"],
        ["data keys in use", ", ".join(f"key {k}: {n} objects" for k, n in
                                       (info.get("data_keys_in_use") or {}).items()) or "-"],
        ["store", names.volume_prefix(info["name"]) + " in " + info["store"]],
    ]
    if "durable_seq" in info:
        rows.insert(10, ["in the store up to", info["durable_seq"]])
    if info.get("store_error"):
        rows.append(["store error", info["store_error"]])
    ui.table(None, ["", ""], rows)
    return 0
