"""lsbd compact VOLUME"""

from lsbd.cli import ui
from lsbd.cli.args import add_break_lease, add_volume, command
from lsbd.cli.cmd_history import format_duration
from lsbd.errors import UserError


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"bad threshold {text!r}: a fraction between 0 and 1, e.g. 0.6") from None
    if not 0.0 < value <= 1.0:
        raise UserError(f"bad threshold {text!r}: a fraction between 0 and 1, e.g. 0.6")
    return value


def register(sub) -> None:
    p = command(sub, "compact", help="reclaim space: rewrite sparse segments, delete dead ones",
                description="Reclaim space: rewrite the live data of sparse segments, then "
                            "delete the segments and checkpoints no kept point needs (the "
                            "retention window, snapshots and clones keep theirs). Works while "
                            "the volume is mounted or served (its writer compacts).",
                examples=["vm1", "vm1 --dry-run", "vm1 --defrag --threshold 0.8 --json",
                          "secret --rekey"])
    add_volume(p)
    p.add_argument("--threshold", type=_fraction, default=0.6,
                   help="rewrite segments whose live fraction is below this (default 0.6)")
    p.add_argument("--defrag", action="store_true",
                   help="also rewrite ranges scattered in many small pieces (random writes) "
                        "in block order, so that reading them in order is fast again")
    p.add_argument("--rekey", action="store_true",
                   help="also rewrite every segment sealed with a data key other than the "
                        "current one (after `lsbd key rotate`), except those snapshots, clones "
                        "or the retention window still need as they are; refused while the "
                        "volume is mounted or served (its writer keeps the key it opened with)")
    p.add_argument("--dry-run", action="store_true", help="show what would happen")
    add_break_lease(p)
    p.set_defaults(func=run)


def run(args, ctx) -> int:
    from lsbd.crypto.keystore import stale_segments
    from lsbd.meta.config import load_config
    from lsbd.service.writer import ask_writer, run_on_writer

    config = load_config(ctx.store, args.volume)
    request = {"op": "compact", "threshold": args.threshold, "dry_run": args.dry_run,
               "defrag": args.defrag}
    if args.rekey:
        if not config.encryption:
            raise UserError(f"volume {args.volume} is not encrypted: --rekey has nothing to do")
        if ask_writer(ctx.store, args.volume, {"op": "stats"}, cache_root=ctx.cache_dir,
                      timeout=10) is not None:
            raise UserError(f"{args.volume} is mounted or served, and its writer seals with the "
                            "data key it was opened with: stop it, then compact --rekey")
        request["force"] = sorted(stale_segments(ctx.plain_store, args.volume,
                                                 ctx.keyring(args.volume).current))
    ctx.check_given_key(args.volume)
    with ui.count_progress("compacting") as update:
        report = run_on_writer(ctx.store, args.volume, request, cache_root=ctx.cache_dir,
                               break_lease=args.break_lease, progress=update, timeout=3600,
                               prepare=ctx.unlock).value
    report["why"] = why(report)
    if args.rekey and not args.dry_run:
        left = len(stale_segments(ctx.plain_store, args.volume,
                                  ctx.keyring(args.volume).current))
        report["stale_key_segments"] = left
        if left:
            report["why"].append(
                f"{left} {_segments(left)} {_are(left)} still sealed with an older data key: "
                "snapshots, clones or the retention window need them as they are, so `lsbd key "
                "retire` refuses that key until they are released and compacted")
    if args.json:
        ui.print_json(report)
        return 0
    h = ui.human_size
    title = "compaction plan (dry run)" if args.dry_run else f"compaction of {args.volume}"
    # "segments it would delete" in a plan, "segments deleted" after a run.
    deleted, reclaimed = (("it would delete", "it would reclaim") if args.dry_run
                          else ("deleted", "reclaimed"))
    rows = [["segments rewritten (read)", report["segments_read"]],
            ["segments kept whole for snapshots/clones", report["skipped_pinned"]],
            ["bytes rewritten", h(report["bytes_rewritten"])]]
    if args.defrag:
        rows += [["1 MiB ranges defragmented", report["windows_defragmented"]],
                 ["of which bytes rewritten in order", h(report["bytes_defragmented"])]]
    if not args.dry_run:
        rows += [["segments written", report["segments_written"]]]
    rows += [[f"segments {deleted}", report["segments_deleted"]],
             [f"checkpoints {deleted}", report["checkpoints_deleted"]],
             [f"bytes {reclaimed}", h(report["bytes_reclaimed"])],
             ["stored before / after", f"{h(report['stored_bytes_before'])} / "
                                       f"{h(report['stored_bytes_after'])}"]]
    if not args.dry_run:
        rows += [["write amplification (written / reclaimed)",
                  f"{report['write_amplification']:.2f}"],
                 ["time", f"{report['seconds']:.1f}s"]]
    ui.table(title, ["", ""], rows)
    for text in report["why"]:
        ui.line(text)
    return 0


def _segments(n: int) -> str:
    """The noun and its verb agree with n (`1 segment ... is`)."""
    return "segment" if n == 1 else "segments"


def _are(n: int) -> str:
    return "is" if n == 1 else "are"


def _they(n: int) -> str:
    return "it" if n == 1 else "they"


def _them(n: int) -> str:
    return "it" if n == 1 else "them"


def why(report: dict) -> list[str]:
    """Why dead data stays in the store after this compaction (or would)."""
    h = ui.human_size
    out = []
    n, size = report["held_by_window_segments"], report["held_by_window_bytes"]
    if n:
        out.append(f"{n} {_segments(n)} with {h(size)} of old data {_are(n)} inside the "
                   f"retention window (retain {format_duration(report['retain_seconds'])}): "
                   f"{_they(n)} become{'s' * (n == 1)} reclaimable once older than that "
                   "(`lsbd retain` shortens it)")
    n, size = report["held_by_points_segments"], report["held_by_points_bytes"]
    if n:
        out.append(f"{n} {_segments(n)} with {h(size)} of old data {_are(n)} kept for "
                   "snapshots, clones or the start of the retention window (`lsbd snapshot "
                   "delete` releases a snapshot's)")
    n, size = report["held_by_threshold_segments"], report["held_by_threshold_bytes"]
    if n:
        out.append(f"{n} {_segments(n)} with {h(size)} of old data {_are(n)} more than "
                   f"{report['threshold']:.0%} live, so not rewritten (a higher --threshold "
                   f"rewrites {_them(n)})")
    if not report["bytes_reclaimed"] and not out:
        out.append("nothing to reclaim: the store holds only live data")
    return out
