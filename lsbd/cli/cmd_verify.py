"""lsbd verify VOLUME"""

from lsbd.cli import ui
from lsbd.cli.args import add_volume, command
from lsbd.errors import CorruptionError, UserError


def register(sub) -> None:
    p = command(sub, "verify", help="read every live segment from the store and check every CRC",
                description="Read every live segment from the store and check every CRC. "
                            "Exit status 1 when a problem is found (each one on stderr).",
                examples=["vm1", "vm1 --json", "secret --structure-only"])
    add_volume(p)
    p.add_argument("--structure-only", action="store_true",
                   help="without the passphrase of an encrypted volume: check that every "
                        "stored object is whole and well formed (not its content)")
    p.set_defaults(func=run)


def run(args, ctx) -> int:
    if args.structure_only:
        return run_structure(args, ctx)
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
            ui.problem(p)
        ui.err.print(f"volume {args.volume}: {len(problems)} problem(s) found")
    else:
        ui.err.print(f"volume {ui.bold(args.volume)}: every checksum is good")
    return 1 if problems else 0


def run_structure(args, ctx) -> int:
    from lsbd.crypto.keystore import check_structure
    from lsbd.meta.config import load_config

    config = load_config(ctx.plain_store, args.volume)
    if not config.sealed:
        raise UserError(f"volume {args.volume} is neither compressed nor encrypted: "
                        "verify it without --structure-only")
    checked, problems = check_structure(ctx.plain_store, config.name)
    if args.json:
        ui.print_json({"volume": args.volume, "ok": not problems, "objects": checked,
                       "problems": problems})
    else:
        for p in problems:
            ui.problem(p)
        ui.err.print(f"volume {args.volume}: {checked} objects, "
                     + (f"{len(problems)} problem(s) found" if problems
                        else "every one whole and well formed (content not checked)"))
    return 1 if problems else 0
