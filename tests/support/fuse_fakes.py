"""Mount an in-memory FakeVolume (tests/support/fakes.py) through the real FUSE front
end, to test and measure the front end without the engine.

    python tests/support/fuse_fakes.py MOUNTPOINT [--size 1G] [--name vol] [--foreground]
        [--read-only] [--page-cache] [--delay SECONDS] [--delay-from OFFSET]
        [--blocking] [--close-delay SECONDS] [--snapshot NAME ...]

It goes through lsbd_fuse.daemon.run exactly as `lsbd mount` does (background
process, readiness pipe, pid file, `lsbd umount`).  Data lives in memory and
dies with the process.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fakes import FakeVolume

from lsbd.sizes import parse_size
from lsbd.errors import LsbdError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fuse_fakes")
    p.add_argument("mountpoint")
    p.add_argument("--size", default="1G")
    p.add_argument("--name", default="vol")
    p.add_argument("--foreground", action="store_true")
    p.add_argument("--read-only", action="store_true")
    p.add_argument("--page-cache", action="store_true")
    p.add_argument("--delay", type=float, default=0.0,
                   help="seconds every read/write sleeps (a slow store)")
    p.add_argument("--delay-from", type=parse_size, default=0,
                   help="only requests at or after this offset are slow")
    p.add_argument("--blocking", action="store_true",
                   help="the volume does not take nowait: every call goes to a worker thread")
    p.add_argument("--close-delay", type=float, default=0.0,
                   help="seconds closing the volume takes (a store that does not answer)")
    p.add_argument("--snapshot", action="append", default=[],
                   help="also show snapshots/NAME.img, read-only")
    p.add_argument("-v", "--verbose", action="count", default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="fuse_fakes: %(levelname)s: %(message)s")

    from lsbd_fuse.daemon import run
    from lsbd_fuse.tree import Image

    def open_images():
        vol = FakeVolume(args.name, parse_size(args.size), read_only=args.read_only)
        if args.blocking:
            vol.supports_nowait = False
        if args.delay:
            vol.delay_for = lambda op, offset: args.delay if offset >= args.delay_from else 0
        if args.close_delay:
            close = vol.close
            vol.close = lambda: (time.sleep(args.close_delay), close())
        images = {f"{args.name}.img": Image(device=vol, read_only=args.read_only)}
        for snap in args.snapshot:
            images[f"snapshots/{snap}.img"] = Image(
                device=FakeVolume(snap, parse_size(args.size), read_only=True), read_only=True)
        return images

    try:
        return run(open_images, args.mountpoint, name=args.name, foreground=args.foreground,
                   read_only=args.read_only, direct_io=not args.page_cache)
    except LsbdError as e:
        print(f"fuse_fakes: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
