"""lsbd verify VOLUME"""

from lsbd.cli import ui
from lsbd.errors import CorruptionError


def register(sub) -> None:
    p = sub.add_parser("verify", help="read every live segment from the store and check every CRC")
    p.add_argument("volume")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args, ctx) -> int:
    try:
        with ui.count_progress("opening") as update:
            vol = ctx.open_volume(args.volume, read_only=True, progress=update)
    except CorruptionError as e:
        problems = [str(e)]
    else:
        with vol:
            with ui.count_progress("verifying segments") as update:
                problems = vol.verify(progress=update)
    if args.json:
        ui.print_json({"volume": args.volume, "ok": not problems, "problems": problems})
    elif problems:
        for p in problems:
            ui.err.print(f"[red]bad[/]: {p}")
        ui.err.print(f"volume {args.volume}: {len(problems)} problem(s) found")
    else:
        ui.err.print(f"volume [bold]{args.volume}[/]: every checksum is good")
    return 1 if problems else 0
