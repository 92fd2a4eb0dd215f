"""lsbd resize VOLUME SIZE / lsbd stats VOLUME"""

from lsbd.cli import ui
from lsbd.cli.args import add_break_lease, add_volume, command, size_arg


def register(sub) -> None:
    p = command(sub, "resize", help="grow a volume (also while it is mounted or served)",
                examples=["vm1 40G"])
    add_volume(p)
    p.add_argument("size", metavar="SIZE", type=size_arg,
                   help="the new size, e.g. 20G (shrinking is refused)")
    add_break_lease(p)
    p.set_defaults(func=run_resize)
    p = command(sub, "stats", help="space and I/O counters of a volume",
                description="Space and I/O counters of a volume: from its running writer when "
                            "it is mounted or served, else from the store.",
                examples=["vm1", "vm1 --json"])
    add_volume(p)
    p.set_defaults(func=run_stats)


def run_resize(args, ctx) -> int:
    from lsbd.service.writer import run_on_writer

    size = args.size
    ctx.check_given_key(args.volume)
    outcome = run_on_writer(ctx.store, args.volume, {"op": "resize", "size": size},
                            cache_root=ctx.cache_dir, break_lease=args.break_lease,
                            prepare=ctx.unlock)
    ui.done({"volume": args.volume, "size": size, "seq": outcome.value,
             "by_writer": outcome.by_writer},
            f"volume {ui.bold(args.volume)} is now {ui.human_size(size)}")
    return 0


def run_stats(args, ctx) -> int:
    # The running writer first: it answers without the store.
    from lsbd.service.writer import run_on_writer

    ctx.check_given_key(args.volume)
    outcome = run_on_writer(ctx.store, args.volume, {"op": "stats"}, cache_root=ctx.cache_dir,
                            read_only=True, timeout=30,
                            prepare=ctx.unlock)
    data = dict(outcome.value)
    data["source"] = "the running writer" if outcome.by_writer else "the store (no writer running)"
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
    if "cache_evicted_segments" in data:
        rows.append(["evicted from the cache", f"{data['cache_evicted_segments']} segments "
                                               f"({h(data['cache_evicted_bytes'])})"])
        rows.append(["blocks read from the cache / the store",
                     f"{h(data['local_read_bytes'])} / {h(data['store_read_bytes'])}"])
    if data.get("upload_error"):
        rows.append(["uploads failing", f"for {data['uploads_failing_for']:.0f}s: "
                                        f"{data['upload_error']}"])
    ui.table(f"{args.volume}", ["", ""], rows)
    return 0
