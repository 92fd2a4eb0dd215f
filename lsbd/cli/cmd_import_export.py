"""lsbd import VOLUME FILE / lsbd export VOLUME FILE: whole-volume copies."""

import os

from lsbd.cli import ui
from lsbd.cli.points import add_point_args, resolve_args, resolve_word
from lsbd.meta.config import load_config
from lsbd.history.restore import changed_between
from lsbd.segments.remote import store_segment_seqs
from lsbd.errors import UserError

CHUNK = 4 * 1024 * 1024


def register(sub) -> None:
    p = sub.add_parser("import", help="copy a file or disk image into a volume")
    p.add_argument("volume")
    p.add_argument("file")
    p.add_argument("--break-lease", action="store_true", help="take over a lease held elsewhere")
    p.set_defaults(func=run_import)
    p = sub.add_parser("export", help="copy a volume (or a past state) out to a (sparse) file")
    p.add_argument("volume")
    p.add_argument("file")
    add_point_args(p, what="export the state")
    p.add_argument("--from", dest="from_point", metavar="POINT",
                   help="incremental: FILE holds the state at POINT (a snapshot name, #SEQ or "
                        "@TIME); write only the blocks changed since then")
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
    config = load_config(ctx.store, args.volume)
    target = resolve_args(ctx.store, config, args)
    if args.from_point is not None:
        return _export_changes(args, ctx, config, target)
    with ctx.open_volume(args.volume, read_only=True, at_seq=target) as vol:
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


def _export_changes(args, ctx, config, target: int | None) -> int:
    """Bring FILE, an image of the state at --from, up to the target state by
    writing only the block ranges that changed in between."""
    store = ctx.store
    old = resolve_word(store, config, args.from_point)
    new = target if target is not None else max(store_segment_seqs(store, config.name)
                                                 or [config.base_seq])
    if old > new:
        raise UserError(f"--from ({args.from_point}) is newer than the state to export")
    try:
        dst = open(args.file, "r+b")
    except OSError as e:
        raise UserError(f"cannot update {args.file} ({e.strerror}): --from needs an image of "
                        f"the state at {args.from_point} to bring up to date") from None
    ranges, bs, size = changed_between(store, args.volume, old, new, cache_root=ctx.cache_dir)
    total = sum((hi - lo) * bs for lo, hi in ranges)
    with dst, ctx.open_volume(args.volume, read_only=True, at_seq=new) as vol, \
            ui.byte_progress(f"exporting changes of {vol.name}", total) as advance:
        for lo, hi in ranges:
            offset = lo * bs
            while offset < hi * bs:
                length = min(CHUNK, hi * bs - offset)
                dst.seek(offset)
                dst.write(vol.read(offset, length))
                offset += length
                advance(length)
        if os.fstat(dst.fileno()).st_size < size:
            dst.truncate(size)
    ui.err.print(f"wrote {len(ranges)} changed ranges ({ui.human_size(total)}) of "
                 f"[bold]{args.volume}[/] into {args.file}")
    return 0
