"""`lsbd mount VOLUME MOUNTPOINT` and `lsbd umount MOUNTPOINT`: the FUSE front end.

The mount shows the volume as MOUNTPOINT/VOLUME.img.  The volume is opened in
the process that serves it (after the fork), never before: the engine starts
threads.  See docs/fuse.md.
"""

from __future__ import annotations

import argparse
import os
import sys

from lsbd.cli import ui
from lsbd.cli.args import LeaveAtOnce, add_volume, command, path_arg, size_arg
from lsbd.cli.context import tune_serving_process
from lsbd.cli.points import add_point_args, add_writer_args, parse_seconds, writer_options
from lsbd.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = command(
        subparsers, "mount", help="show a volume as an image file in a FUSE mount",
        description="Mount VOLUME on MOUNTPOINT (an existing directory) as "
                    "MOUNTPOINT/VOLUME.img. Returns once the mount is ready; a background "
                    "process serves it until `lsbd umount`.",
        examples=["vm1 /mnt/lsbd", "vm1 /mnt/lsbd --read-only",
                  "vm1 /mnt/old --at -2h", "vm1 /mnt/lsbd --no-snapshots"])
    add_volume(p, "the volume to show")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", type=path_arg,
                   help="an existing directory (what it holds is hidden while mounted: a "
                        "warning says so)")
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
    p.add_argument("--direct-io", action="store_true",
                   help="open the image with direct I/O: no page cache of the image, every "
                        "read and write reaches lsbd as issued (default: the page cache, "
                        "writes written through)")
    p.add_argument("--readahead", metavar="SIZE", type=readahead_arg, default=None,
                   help="the kernel's read-ahead on the image (default 4M; it needs root, "
                        "else the kernel's 128K stays)")
    p.add_argument("--page-cache", action="store_true", help=argparse.SUPPRESS)  # the default
    p.add_argument("--fuse-debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=run_mount)

    u = command(
        subparsers, "umount", help="unmount an lsbd mount and wait until the volume is closed",
        description="Unmount MOUNTPOINT, then wait until the serving process has flushed, "
                    "uploaded and closed the volume (the data is safe when this returns).",
        examples=["/mnt/lsbd", "/mnt/lsbd --lazy --timeout 60"])
    u.add_argument("mountpoint", metavar="MOUNTPOINT", type=path_arg,
                   help="where the volume is mounted")
    u.add_argument("-l", "--lazy", action="store_true",
                   help="detach now even if busy (fusermount3 -u -z); still waits for "
                        "the process")
    u.add_argument("--timeout", type=parse_seconds, default=None, metavar="SECONDS",
                   help="past this long, tell the serving process to stop waiting for the "
                        "store (what is not uploaded stays in the cache dir for the next "
                        "mount) and return within 5 s more (default: wait)")
    u.set_defaults(func=run_umount)


def run_mount(args: argparse.Namespace, ctx) -> int:
    from lsbd_fuse.daemon import run

    name = args.volume
    readahead = args.readahead
    if readahead is None:
        from lsbd_fuse.options import READAHEAD

        readahead = READAHEAD
    read_only = args.read_only or any(
        getattr(args, k, None) is not None for k in ("snapshot", "seq", "at"))

    ctx.before_fork(name, writer=not read_only, beside=_import_serving)

    def open_images():
        # Runs in the serving process, after the fork: the engine starts threads.
        tune_serving_process()
        return _open_images(args, ctx, name)

    code = run(open_images, args.mountpoint, name=name, foreground=args.foreground,
               read_only=read_only, direct_io=args.direct_io, finalizer=ctx.close,
               debug=args.fuse_debug, readahead=readahead,
               while_waiting=ui.prepare)   # its last line is printed with rich
    if not args.foreground:
        ui.done({"volume": name, "mountpoint": args.mountpoint,
                 "image": os.path.join(args.mountpoint, f"{name}.img"), "read_only": read_only},
                f"mounted {ui.bold(name)} on {args.mountpoint} as "
                f"{os.path.join(args.mountpoint, name + '.img')}")
        return LeaveAtOnce(code)    # the serving process is on its own
    return code


#: The largest --readahead taken.
READAHEAD_MAX = 256 << 20


def readahead_arg(text: str) -> int:
    """--readahead in bytes, whole pages."""
    value = size_arg(text)
    if value > READAHEAD_MAX:
        raise UserError(f"bad readahead {text!r}: at most {READAHEAD_MAX >> 20}M")
    if 0 < value < 4096:    # whole pages: it would round down to none
        raise UserError(f"bad readahead {text!r}: at least 4K (0 for none)")
    return value // 4096 * 4096


def _import_serving() -> None:
    """The serving process's modules (the engine: about 0.1 s of imports;
    the sealing store's, 10-20 ms of the serving process's start before its
    lease request), imported before the fork while the store answers the
    config's request, rather than after it, before the serving process's
    first request."""
    import lsbd.crypto.store
    import lsbd.service.serving  # noqa: F401


def _open_images(args: argparse.Namespace, ctx, name: str) -> dict:
    """VOLUME.img (the live volume, or its state at the point named) and,
    with --with-snapshots, snapshots/NAME.img for each snapshot."""
    from lsbd.service.serving import Point, open_devices
    from lsbd_fuse.tree import Image

    point = Point(snapshot=args.snapshot, seq=args.seq, at=args.at)
    live = point == Point()
    # A read-write mount of the live volume shows its snapshots by default.
    show = (args.with_snapshots or (live and not args.read_only)) and not args.no_snapshots
    devices = open_devices(ctx.store, [name], cache_root=ctx.cache_dir, point=point,
                           read_only=args.read_only, break_lease=args.break_lease,
                           flush_mode=args.flush_mode, options=writer_options(args),
                           snapshots=show, prepare=ctx.unlock,
                           configs={name: ctx.volume_config(name)})
    return {f"{name}.img" if d.snapshot is None else f"snapshots/{d.snapshot}.img":
            Image(device=d.device, read_only=d.read_only) for d in devices}


def run_umount(args: argparse.Namespace, ctx) -> int:
    from lsbd_fuse.mounts import unmount

    def slow(server) -> None:
        what = server.name or "the volume"
        ui.note(f"waiting for lsbd (pid {server.pid}) to flush and close {what}...")

    server = unmount(args.mountpoint, lazy=args.lazy, timeout=args.timeout, on_slow=slow)
    if server is None:
        print(f"lsbd: unmounted {args.mountpoint}, but its serving process is unknown or "
              "gone: cannot wait for it", file=sys.stderr)
    if args.json:
        ui.print_json({"mountpoint": args.mountpoint, "unmounted": True,
                       "waited_for_pid": None if server is None else server.pid})
    return 0
