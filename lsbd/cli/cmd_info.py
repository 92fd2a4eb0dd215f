"""lsbd info VOLUME"""

import time

from lsbd import names
from lsbd.cli import ui
from lsbd.cli.cmd_history import format_duration
from lsbd.crypto import keystore
from lsbd.engine import control
from lsbd.segments.checkpoints import list_checkpoints
from lsbd.meta.config import load_config
from lsbd.meta.snapshots import list_snapshots
from lsbd.meta.lease import read_holder
from lsbd.segments.remote import fetch_segment_index, store_segment_seqs
from lsbd.errors import StoreError


def register(sub) -> None:
    p = sub.add_parser("info", help="show a volume's settings and state")
    p.add_argument("volume")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args, ctx) -> int:
    # A running writer answers first, without the store; the store adds the
    # rest (snapshots, checkpoints, stored segments) when it is reachable.
    reply = control.call(ctx.control_path(args.volume), {"op": "info"}, timeout=30)
    live = reply["report"] if reply is not None else None
    try:
        info = _from_store(ctx.store, args.volume)
    except StoreError as e:
        if live is None:
            raise
        info = {**live, "segments": None, "stored_bytes": None, "checkpoints": None,
                "snapshots": None, "store_error": str(e)}
    if live is not None:
        info["size"] = live["size"]
        info["newest_seq"] = live["newest_seq"]
        info["durable_seq"] = live["durable_seq"]
        info["writer"] = live["writer"]
    if args.json:
        ui.print_json(info)
        return 0
    size, parent, unknown = info["size"], info["parent"], "? (the store is unreachable)"
    rows = [
        ["volume", info["name"]], ["size", f"{ui.human_size(size)} ({size} bytes)"],
        ["block size", info["block_size"]], ["flush mode", info["flush_mode"]],
        ["retain", format_duration(info["retain_seconds"])],
        ["clone of", f"{parent['volume']} at seq {parent['seq']}" if parent else "-"],
        ["snapshots", unknown if info["snapshots"] is None
         else ", ".join(s["name"] for s in info["snapshots"]) or "none"],
        ["created", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["created"]))],
        ["segments", unknown if info["segments"] is None
         else f"{info['segments']} ({ui.human_size(info['stored_bytes'])} stored)"],
        ["newest seq", f"{info['newest_seq']:016x}"],
        ["checkpoints", unknown if info["checkpoints"] is None
         else ", ".join(f"{c:016x}" for c in info["checkpoints"]) or "none"],
        ["writer", info["writer"] or "none"],
        ["compression", info.get("compression", "?")],
        ["encryption", info.get("encryption") or "none"],
        ["data keys in use", ", ".join(f"key {k}: {n} objects" for k, n in
                                       (info.get("data_keys_in_use") or {}).items()) or "-"],
        ["store", names.volume_prefix(info["name"]) + " in " + info["store"]],
    ]
    if "durable_seq" in info:
        rows.insert(10, ["in the store up to", f"{info['durable_seq']:016x}"])
    if info.get("store_error"):
        rows.append(["store error", info["store_error"]])
    ui.table(None, ["", ""], rows)
    return 0


def _from_store(store, volume: str) -> dict:
    config = load_config(store, volume)
    segments = store_segment_seqs(store, config.name)
    checkpoints = list_checkpoints(store, config.name)
    holder = read_holder(store, config.name)
    snaps = list_snapshots(store, config)
    size = config.size
    if segments:
        top = max(segments)
        trailer, _ = fetch_segment_index(store, config.name, top)
        size = trailer.volume_size
    return {
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
        "compression": config.compression,
        "encryption": config.encryption,
        # Which data key seals how many stored objects (read from each
        # object's tail: no passphrase needed); `lsbd key list` shows more.
        "data_keys_in_use": ({str(k): n for k, n in sorted(
            keystore.keys_in_use(getattr(store, "inner", store), config.name).items())}
            if config.encryption else {}),
    }
