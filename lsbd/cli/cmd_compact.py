"""lsbd compact VOLUME"""


from lsbd.cli import ui
from lsbd.engine import control
from lsbd.meta.config import load_config
from lsbd.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("compact", help="reclaim space: rewrite sparse segments, delete dead ones")
    p.add_argument("volume")
    p.add_argument("--threshold", type=float, default=0.6,
                   help="rewrite segments whose live fraction is below this (default 0.6)")
    p.add_argument("--defrag", action="store_true",
                   help="also rewrite ranges scattered in many small pieces (random writes) "
                        "in block order, so that reading them in order is fast again")
    p.add_argument("--rekey", action="store_true",
                   help="also rewrite every segment sealed with a data key other than the "
                        "current one (after `lsbd key rotate`), except those snapshots, clones "
                        "or the retention window still need as they are")
    p.add_argument("--dry-run", action="store_true", help="show what would happen")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument("--break-lease", action="store_true", help="take over a lease held elsewhere")
    p.set_defaults(func=run)


def run(args, ctx) -> int:
    if not 0.0 < args.threshold <= 1.0:
        raise UserError("--threshold is a fraction between 0 and 1")
    store = ctx.store
    config = load_config(store, args.volume)
    sock = ctx.control_path(config.name)
    if args.rekey:
        if not config.encryption:
            raise UserError(f"volume {args.volume} is not encrypted: --rekey has nothing to do")
        reply = None
        if control.call(sock, {"op": "stats"}, timeout=10) is not None:
            raise UserError(f"{args.volume} is mounted or served, and its writer seals with the "
                            "data key it was opened with: stop it, then compact --rekey")
    else:
        reply = control.call(sock, {"op": "compact", "threshold": args.threshold,
                                    "dry_run": args.dry_run, "defrag": args.defrag},
                             timeout=3600)
    if reply is not None:  # the volume is mounted or served: its writer compacts
        report = reply["report"]
    else:
        force: frozenset[int] = frozenset()
        if args.rekey:
            from lsbd.crypto.keystore import stale_segments

            force = stale_segments(ctx.plain_store, args.volume,
                                   ctx.keyring(args.volume).current)
        with ctx.open_volume(args.volume, break_lease=args.break_lease) as vol:
            with ui.count_progress("compacting") as update:
                report = vol.compact(threshold=args.threshold, dry_run=args.dry_run,
                                     progress=update, defrag=args.defrag,
                                     force=force).as_dict()
    if args.json:
        ui.print_json(report)
        return 0
    h = ui.human_size
    title = "compaction plan (dry run)" if args.dry_run else f"compaction of {args.volume}"
    rows = [["segments rewritten (read)", report["segments_read"]],
            ["segments kept whole for snapshots/clones", report["skipped_pinned"]],
            ["bytes rewritten", h(report["bytes_rewritten"])]]
    if args.defrag:
        rows += [["1 MiB ranges defragmented", report["windows_defragmented"]],
                 ["of which bytes rewritten in order", h(report["bytes_defragmented"])]]
    if not args.dry_run:
        rows += [["segments written", report["segments_written"]],
                 ["segments deleted", report["segments_deleted"]],
                 ["checkpoints deleted", report["checkpoints_deleted"]],
                 ["bytes reclaimed", h(report["bytes_reclaimed"])],
                 ["stored before / after", f"{h(report['stored_bytes_before'])} / "
                                           f"{h(report['stored_bytes_after'])}"],
                 ["write amplification (written / reclaimed)",
                  f"{report['write_amplification']:.2f}"],
                 ["time", f"{report['seconds']:.1f}s"]]
    else:
        rows += [["bytes it would reclaim (at least)", h(report["bytes_reclaimed"])]]
    ui.table(title, ["", ""], rows)
    return 0
