"""lsbd resize VOLUME SIZE / lsbd stats VOLUME"""


from lsbd.cli import ui
from lsbd.engine import control
from lsbd.meta.config import load_config, parse_size


def register(sub) -> None:
    p = sub.add_parser("resize", help="grow a volume (also while it is mounted or served)")
    p.add_argument("volume")
    p.add_argument("size", help="the new size, e.g. 20G (shrinking is refused)")
    p.set_defaults(func=run_resize)
    p = sub.add_parser("stats", help="space and I/O counters of a volume")
    p.add_argument("volume")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_stats)


def run_resize(args, ctx) -> int:
    config = load_config(ctx.store, args.volume)
    size = parse_size(args.size)
    if control.call(ctx.control_path(config.name), {"op": "resize", "size": size}) is None:
        with ctx.open_volume(args.volume) as vol:
            vol.resize(size)
    ui.err.print(f"volume [bold]{args.volume}[/] is now {ui.human_size(size)}")
    return 0


def run_stats(args, ctx) -> int:
    # The running writer first: it answers without the store.
    reply = control.call(ctx.control_path(args.volume), {"op": "stats"}, timeout=30)
    if reply is not None:
        data = reply["report"]
        data["source"] = "the running writer"
    else:
        load_config(ctx.store, args.volume)
        with ctx.open_volume(args.volume, read_only=True) as vol:
            data = vol.usage()
        data["source"] = "the store (no writer running)"
    if args.json:
        ui.print_json(data)
        return 0
    h = ui.human_size
    rows = [["size", h(data["size"])], ["segments", f"{data['segments']} ({h(data['segment_bytes'])})"],
            ["live data", h(data["live_bytes"])],
            ["space amplification", f"{data['segment_bytes'] / data['live_bytes']:.2f}"
             if data["live_bytes"] else "-"],
            ["map extents", data["extents"]], ["newest seq", data["applied_seq"]],
            ["in the store up to", data["durable_seq"]],
            ["waiting for upload", f"{data['uploads_pending']} segments "
                                   f"({h(data.get('pending_bytes', 0))})"],
            ["reads / writes", f"{data['reads']} / {data['writes']}"],
            ["bytes read / written", f"{h(data['bytes_read'])} / {h(data['bytes_written'])}"],
            ["source", data["source"]]]
    if "cache_bytes" in data:
        rows.append(["cache (in the store too)",
                     f"{data['cache_segments']} segments, {h(data['cache_bytes'])} of "
                     f"{h(data['cache_limit'])}; {h(data['cache_disk_free'])} free on its disk"])
    if data.get("upload_error"):
        rows.append(["uploads failing", f"for {data['uploads_failing_for']:.0f}s: "
                                        f"{data['upload_error']}"])
    ui.table(f"{args.volume}", ["", ""], rows)
    return 0
