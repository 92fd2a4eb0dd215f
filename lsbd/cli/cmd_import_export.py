"""lsbd import VOLUME FILE / lsbd export VOLUME FILE: whole-volume copies."""

import os

from lsbd.cli import ui
from lsbd.cli.args import add_break_lease, add_volume, command, path_arg
from lsbd.cli.points import add_point_args, live_state, point_arg, resolve_args
from lsbd.errors import UserError


def register(sub) -> None:
    p = command(sub, "import", help="copy a raw disk image or a block device into a volume",
                description="Copy a raw disk image (a file) or a block device into VOLUME from "
                            "offset 0, replacing what the volume held there; holes and blocks "
                            "of zeros read as zeros and take no space. qcow2, VMDK, VHD, VHDX and "
                            "VDI images are refused: convert them with `qemu-img convert -O raw` "
                            "first.",
                examples=["vm2 disk.raw", "vm2 /dev/sdb", "vm2 odd.bin --raw"])
    add_volume(p, "the volume to copy into (at least as large as FILE)")
    p.add_argument("file", metavar="FILE", type=path_arg,
                   help="a raw image file or a block device")
    p.add_argument("--raw", action="store_true",
                   help="import the bytes as they are, even if they look like a qcow2, VMDK, "
                        "VHD, VHDX or VDI image")
    add_break_lease(p)
    p.set_defaults(func=run_import)

    p = command(sub, "export", help="copy a volume (or a past state) out to a file or device",
                description="Copy a volume, or a past state of it, out to FILE: a regular file "
                            "is created or replaced and comes out sparse (holes stay holes); a "
                            "block device, or a file that cannot be replaced (a mounted lsbd "
                            "volume's image), gets every block in place (holes as zeros) and is "
                            "never truncated. With --from, FILE already holds an older state and only "
                            "the changed blocks are written. A volume mounted or served here is "
                            "copied as it is now: its writer first puts what it holds in the "
                            "store. A volume's own mounted image is refused (it would read and "
                            "write the same volume at once).",
                examples=["vm2 copy.raw", "vm1 old.raw --at -2h", "vm1 /dev/sdc --snapshot s1",
                          "vm1 backup.raw --from s1 --snapshot s2"])
    add_volume(p)
    p.add_argument("file", metavar="FILE", type=path_arg,
                   help="the file or block device to write")
    add_point_args(p, what="export the state")
    p.add_argument("--from", dest="from_point", metavar="POINT", type=point_arg,
                   help="incremental: FILE holds the state at POINT (a snapshot name, seq:N "
                        "or @TIME); write only the blocks changed since then")
    p.set_defaults(func=run_export)


def run_import(args, ctx) -> int:
    from lsbd.meta.config import load_config
    from lsbd.service.images import import_image

    load_config(ctx.store, args.volume)
    copied = False
    try:
        with ctx.open_volume(args.volume, break_lease=args.break_lease) as vol, \
                ui.byte_steps(f"importing into {vol.name}") as update:
            try:
                size = import_image(vol, args.file, raw=args.raw, progress=update)
            except KeyboardInterrupt:
                # What was copied stays (the volume closes as ever): say so.
                raise KeyboardInterrupt(f"{args.volume} holds the part of {args.file} copied "
                                        "so far; import again to copy all of it") from None
            copied = True
            ui.note("uploading ...")
    except KeyboardInterrupt as e:
        if not copied:
            raise
        # Interrupted while the close uploads: the copy is whole and synced
        # in the journal; only its upload waits.
        raise KeyboardInterrupt(f"all of {args.file} is in {args.volume}; what is not in the "
                                "store yet waits in the cache dir, and the next open of "
                                f"{args.volume} uploads it") from e
    ui.done({"volume": args.volume, "file": args.file, "bytes": size},
            f"imported {ui.human_size(size)} into {ui.bold(args.volume)}")
    return 0


def run_export(args, ctx) -> int:
    from lsbd.meta.config import load_config
    from lsbd.service.images import export_image, written_in_place

    config = load_config(ctx.store, args.volume)
    _refuse_its_own_image(ctx, args.volume, args.file)
    target = resolve_args(ctx.store, config, args)
    if target is None:
        target = live_state(ctx, args.volume, "this export")
    if args.from_point is not None:
        return _export_changes(args, ctx, config, target)
    in_place = written_in_place(args.file)
    if in_place and os.path.isfile(args.file):
        ui.note(f"{args.file} cannot be replaced (a mounted image, or its folder takes no new "
                "file): it is written in place, and holds only part of the volume if the "
                "export fails or is interrupted")
    with ctx.open_volume(args.volume, read_only=True, at_seq=target) as vol, \
            ui.byte_progress(f"exporting {vol.name}", vol.size) as advance:
        try:
            size = export_image(vol, args.file, progress=advance)
        except KeyboardInterrupt:
            if in_place:
                raise KeyboardInterrupt(f"{args.file} holds only part of {args.volume}; "
                                        "export again") from None
            raise KeyboardInterrupt(f"{args.file} is as it was; export again") from None

    ui.done({"volume": args.volume, "file": args.file, "bytes": size, "seq": target},
            f"exported {ui.bold(args.volume)} ({ui.human_size(size)}) to {args.file}")
    return 0


def _refuse_its_own_image(ctx, volume: str, path: str) -> None:
    """An export of a volume onto its own mounted image would read it and
    write it at once: the same bytes again (a churn of the whole volume
    through its writer), or an older state over the live one, not atomic,
    under whatever has the image open.  The image is the volume's when the
    mount serving it is the process holding the volume's lease."""
    from lsbd.meta.lease import host_name, read_holder
    from lsbd_fuse.mounts import serving_image

    found = serving_image(path)
    if found is None or found[1] != f"{volume}.img":
        return
    server, _name = found
    holder = read_holder(ctx.plain_store, volume)
    if holder is None or holder.host != host_name() or holder.pid != server.pid:
        return      # a volume of the same name in another store
    raise UserError(f"{path} is the image of {volume} itself (mounted on {server.mountpoint}): "
                    f"an export would read {volume} and write it at once; export to another "
                    f"file, or make a past state a volume of its own with `lsbd restore "
                    f"{volume} --at TIME --to NEW`")


def _export_changes(args, ctx, config, target: int | None) -> int:
    """Bring FILE, an image of the state at --from, up to the target state by
    writing only the block ranges that changed in between."""
    from lsbd.history.points import resolve_word
    from lsbd.history.report import newest_seq
    from lsbd.history.restore import changed_between
    from lsbd.service.images import export_changes

    store = ctx.store
    old = resolve_word(store, config, args.from_point)
    new = target if target is not None else newest_seq(store, config)
    if old > new:
        raise UserError(f"--from ({args.from_point}) is newer than the state to export")
    with changed_between(store, args.volume, old, new, cache_root=ctx.cache_dir) as (ranges, _bs,
                                                                                    _size), \
            ctx.open_volume(args.volume, read_only=True, at_seq=new) as vol, \
            ui.byte_steps(f"exporting changes of {vol.name}") as update:
        try:
            count, total = export_changes(vol, args.file, ranges, progress=update)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"{args.file} holds some of the changes only; run the same "
                                    "export --from again") from None
    ui.done({"volume": args.volume, "file": args.file, "from_seq": old, "to_seq": new,
             "ranges": count, "bytes": total},
            f"wrote {count} changed ranges ({ui.human_size(total)}) of "
            f"{ui.bold(args.volume)} into {args.file}")
    return 0
