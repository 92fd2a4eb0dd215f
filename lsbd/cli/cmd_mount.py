"""`lsbd mount VOLUME MOUNTPOINT` and `lsbd umount MOUNTPOINT`: the FUSE front end.

The mount shows the volume as MOUNTPOINT/VOLUME.img.  The volume is opened in
the process that serves it (after the fork), never before: the engine starts
threads.  See docs/fuse.md.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from lsbd.cli import ui
from lsbd.cli.context import tune_serving_process
from lsbd.cli.points import add_point_args, add_writer_args, writer_options


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "mount", help="show a volume as an image file in a FUSE mount",
        description="Mount VOLUME on MOUNTPOINT as MOUNTPOINT/VOLUME.img. Returns once the "
                    "mount is ready; a background process serves it until `lsbd umount`.")
    p.add_argument("volume", metavar="VOLUME")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-f", "--foreground", action="store_true",
                   help="serve in this process (Ctrl-C or umount stops it)")
    p.add_argument("--read-only", action="store_true", help="refuse every write")
    add_writer_args(p)
    add_point_args(p, what="mount, read-only, the state")
    p.add_argument("--with-snapshots", action="store_true",
                   help="show the snapshots (snapshots/NAME.img) also on a read-only mount")
    p.add_argument("--no-snapshots", action="store_true",
                   help="do not show the snapshots (a read-write mount shows each one, "
                        "read-only, as snapshots/NAME.img)")
    p.add_argument("--page-cache", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--fuse-debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=run_mount)

    u = subparsers.add_parser(
        "umount", help="unmount an lsbd mount and wait until the volume is closed",
        description="Unmount MOUNTPOINT, then wait until the serving process has flushed, "
                    "uploaded and closed the volume (the data is safe when this returns).")
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    u.add_argument("-l", "--lazy", action="store_true",
                   help="detach now even if busy (fusermount3 -u -z); still waits for "
                        "the process")
    u.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="give up waiting after this long (default: wait)")
    u.set_defaults(func=run_umount)


def run_mount(args: argparse.Namespace, ctx) -> int:
    from lsbd_fuse.daemon import run

    name = args.volume
    read_only = args.read_only or any(
        getattr(args, k, None) is not None for k in ("snapshot", "seq", "at"))

    ctx.ask_secret_if_encrypted(name)   # before the fork: the child has no terminal

    def open_images():
        # Runs in the serving process, after the fork: the engine starts threads.
        tune_serving_process()
        return _open_images(args, ctx, name)

    return run(open_images, args.mountpoint, name=name, foreground=args.foreground,
               read_only=read_only, direct_io=not args.page_cache, finalizer=ctx.close,
               debug=args.fuse_debug)


def _open_images(args: argparse.Namespace, ctx, name: str) -> dict:
    """VOLUME.img (the live volume, or its state at the point named) and,
    with --with-snapshots, snapshots/NAME.img for each snapshot."""
    from lsbd_fuse.tree import Image

    from lsbd.cli.points import resolve_args
    from lsbd.meta.config import load_config
    from lsbd.meta.snapshots import list_snapshots

    config = load_config(ctx.store, name)
    seq = resolve_args(ctx.store, config, args)
    images: dict = {}
    try:
        if seq is not None:
            images[f"{name}.img"] = Image(device=ctx.open_volume(name, at_seq=seq),
                                          read_only=True)
        else:
            options = writer_options(args)
            volume = ctx.open_volume(name, read_only=args.read_only,
                                     break_lease=args.break_lease,
                                     flush_mode=args.flush_mode, **options)
            images[f"{name}.img"] = Image(device=volume, read_only=args.read_only)
        # A read-write mount of the live volume shows its snapshots by default.
        show = args.with_snapshots or (seq is None and not args.read_only)
        if show and not args.no_snapshots:
            for snap in list_snapshots(ctx.store, config):
                images[f"snapshots/{snap.name}.img"] = Image(
                    device=ctx.open_volume(name, at_seq=snap.seq), read_only=True)
    except BaseException:
        for image in images.values():
            # The first error is the one to report.
            with contextlib.suppress(Exception):
                image.device.close()
        raise
    return images


def run_umount(args: argparse.Namespace, ctx) -> int:
    from lsbd_fuse.mounts import unmount

    err = ui.err

    def slow(server) -> None:
        what = server.name or "the volume"
        err.print(f"waiting for lsbd (pid {server.pid}) to flush and close {what}...")

    server = unmount(args.mountpoint, lazy=args.lazy, timeout=args.timeout, on_slow=slow)
    if server is None:
        print(f"lsbd: unmounted {args.mountpoint}, but its serving process is unknown or "
              "gone: cannot wait for it", file=sys.stderr)
    return 0
