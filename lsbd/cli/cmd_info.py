"""lsbd info VOLUME"""

import time

from lsbd import names
from lsbd.cli import ui
from lsbd.cli.cmd_history import format_duration
from lsbd.segments.checkpoints import list_checkpoints
from lsbd.meta.config import load_config
from lsbd.meta.snapshots import list_snapshots
from lsbd.meta.lease import read_holder
from lsbd.segments.remote import fetch_segment_index, store_segment_seqs


def register(sub) -> None:
    p = sub.add_parser("info", help="show a volume's settings and state")
    p.add_argument("volume")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args, ctx) -> int:
    store = ctx.store
    config = load_config(store, args.volume)
    segments = store_segment_seqs(store, config.name)
    checkpoints = list_checkpoints(store, config.name)
    holder = read_holder(store, config.name)
    snaps = list_snapshots(store, config)
    size = config.size
    if segments:
        trailer, _ = fetch_segment_index(store, config.name, max(segments))
        size = trailer.volume_size
    info = {
        "name": config.name, "volume_id": config.volume_id, "size": size,
        "block_size": config.block_size, "created": config.created,
        "flush_mode": config.flush_mode, "segment_size": config.segment_size,
        "retain_seconds": config.retain_seconds,
        "segments": len(segments), "stored_bytes": sum(segments.values()),
        "newest_seq": max(segments) if segments else 0,
        "checkpoints": checkpoints,
        "parent": config.parent,
        "snapshots": [{"name": s.name, "seq": s.seq} for s in snaps],
        "writer": None if holder is None else holder.describe(),
        "store": store.url,
    }
    if args.json:
        ui.print_json(info)
        return 0
    rows = [
        ["volume", config.name], ["size", f"{ui.human_size(size)} ({size} bytes)"],
        ["block size", config.block_size], ["flush mode", config.flush_mode],
        ["retain", format_duration(config.retain_seconds)],
        ["clone of", f"{config.parent['volume']} at seq {config.parent['seq']}"
         if config.parent else "-"],
        ["snapshots", ", ".join(s.name for s in snaps) or "none"],
        ["created", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(config.created))],
        ["segments", f"{len(segments)} ({ui.human_size(info['stored_bytes'])} stored)"],
        ["newest seq", f"{info['newest_seq']:016x}"],
        ["checkpoints", ", ".join(f"{c:016x}" for c in checkpoints) or "none"],
        ["writer", info["writer"] or "none"],
        ["store", names.volume_prefix(config.name) + " in " + store.url],
    ]
    ui.table(None, ["", ""], rows)
    return 0
