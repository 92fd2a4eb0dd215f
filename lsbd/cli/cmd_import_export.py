"""lsbd import VOLUME FILE / lsbd export VOLUME FILE: whole-volume copies."""

import os

from lsbd.cli import ui
from lsbd.errors import UserError

CHUNK = 4 * 1024 * 1024


def register(sub) -> None:
    p = sub.add_parser("import", help="copy a file or disk image into a volume")
    p.add_argument("volume")
    p.add_argument("file")
    p.add_argument("--break-lease", action="store_true", help="take over a lease held elsewhere")
    p.set_defaults(func=run_import)
    p = sub.add_parser("export", help="copy a volume out to a (sparse) file")
    p.add_argument("volume")
    p.add_argument("file")
    p.set_defaults(func=run_export)


def run_import(args, ctx) -> int:
    try:
        src = open(args.file, "rb")
    except OSError as e:
        raise UserError(f"cannot read {args.file}: {e.strerror}") from None
    with src, ctx.open_volume(args.volume, break_lease=args.break_lease) as vol:
        size = os.fstat(src.fileno()).st_size
        if size > vol.size:
            raise UserError(f"{args.file} ({size} bytes) is larger than volume {vol.name} "
                            f"({vol.size} bytes)")
        with ui.byte_progress(f"importing into {vol.name}", size) as advance:
            offset = 0
            while offset < size:
                chunk = src.read(CHUNK)
                if not chunk:
                    break
                vol.write(offset, chunk)
                offset += len(chunk)
                advance(len(chunk))
        vol.flush()
        ui.err.print("uploading ...")
    ui.err.print(f"imported {ui.human_size(size)} into [bold]{args.volume}[/]")
    return 0


def run_export(args, ctx) -> int:
    with ctx.open_volume(args.volume, read_only=True) as vol:
        try:
            dst = open(args.file, "wb")
        except OSError as e:
            raise UserError(f"cannot write {args.file}: {e.strerror}") from None
        with dst, ui.byte_progress(f"exporting {vol.name}", vol.size) as advance:
            offset = 0
            while offset < vol.size:
                length = min(CHUNK, vol.size - offset)
                for run in vol.allocation(offset, length):
                    if run.allocated:  # holes stay holes: the file is sparse
                        dst.seek(run.offset)
                        dst.write(vol.read(run.offset, run.length))
                offset += length
                advance(length)
            dst.truncate(vol.size)
    ui.err.print(f"exported [bold]{args.volume}[/] to {args.file}")
    return 0
