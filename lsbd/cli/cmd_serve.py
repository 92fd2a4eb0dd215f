"""`lsbd serve VOLUME [VOLUME...]`: the NBD front end.

Each volume is an export named after it; the default export (an empty name)
is the first volume.  One line on stderr says where it is served once the
server accepts connections.  SIGINT or SIGTERM stops accepting, finishes the
requests in flight, flushes and closes every volume, and exits 0.
See docs/nbd.md.
"""

from __future__ import annotations

import argparse
import signal
import sys
from urllib.parse import quote

from lsbd.cli.context import tune_serving_process
from lsbd.cli.points import add_point_args, add_writer_args, resolve_args
from lsbd.engine.config import load_config
from lsbd.engine.history import list_snapshots
from lsbd.errors import UserError

DEFAULT_HOST = "127.0.0.1"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve volumes over NBD",
        description="Serve each VOLUME as an NBD export of the same name (the first one is "
                    "also the default export) until interrupted. Default: TCP "
                    f"{DEFAULT_HOST}:10809.")
    p.add_argument("volumes", nargs="+", metavar="VOLUME")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH", help="listen on a Unix socket instead of TCP")
    where.add_argument("--host", default=None,
                       help=f"TCP address to listen on (default {DEFAULT_HOST}; "
                            "0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=None,
                   help="TCP port (default 10809; 0 picks a free one)")
    p.add_argument("--read-only", action="store_true", help="export read-only")
    add_writer_args(p)
    add_point_args(p, what="export, read-only, the state")
    p.add_argument("--with-snapshots", action="store_true",
                   help="also export every snapshot read-only, as VOLUME@SNAPSHOT")
    p.add_argument("--workers", type=int, default=32, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def nbd_uri(export: str, *, socket_path: str | None = None, host: str = DEFAULT_HOST,
            port: int = 10809) -> str:
    """The NBD URI of `export` (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/uri.md)."""
    name = quote(export, safe="")
    if socket_path is not None:
        return f"nbd+unix:///{name}?socket={quote(socket_path, safe='/')}"
    if ":" in host:
        host = f"[{host}]"
    return f"nbd://{host}:{port}/{name}"


def open_exports(args: argparse.Namespace, ctx) -> dict:
    """Export name -> open volume: each volume (or its state at the point
    named), and with --with-snapshots each snapshot as VOLUME@NAME."""
    if len(set(args.volumes)) != len(args.volumes):
        raise UserError("a volume is named twice")
    exports: dict = {}
    try:
        for name in args.volumes:
            config = load_config(ctx.store, name)
            seq = resolve_args(ctx.store, config, args)
            if seq is not None:
                exports[name] = ctx.open_volume(name, at_seq=seq)
            else:
                exports[name] = ctx.open_volume(name, read_only=args.read_only,
                                                break_lease=args.break_lease,
                                                flush_mode=args.flush_mode,
                                                auto_compact=args.auto_compact)
            if args.with_snapshots:
                for snap in list_snapshots(ctx.store, config):
                    exports[f"{name}@{snap.name}"] = ctx.open_volume(name, at_seq=snap.seq)
    except BaseException:
        close_exports(exports)
        raise
    return exports


def close_exports(exports: dict) -> int:
    """Flush and close every volume; returns how many failed."""
    failed = 0
    for name, volume in exports.items():
        try:
            if not volume.read_only:
                volume.flush()
            volume.close()
        except Exception as e:  # noqa: BLE001 - report it and close the others
            print(f"lsbd: closing {name} failed: {e}", file=sys.stderr)
            failed += 1
    return failed


def run(args: argparse.Namespace, ctx) -> int:
    from lsbd_nbd import DEFAULT_PORT, NBDServer

    if args.socket is not None and args.port is not None:
        raise UserError("--port goes with TCP, not with --socket")
    tune_serving_process()
    exports = open_exports(args, ctx)
    server = None
    try:
        server = NBDServer(exports, default_export=args.volumes[0], workers=args.workers)
        if args.socket is not None:
            path = server.listen_unix(args.socket)
            uris = [nbd_uri(name, socket_path=path) for name in exports]
        else:
            host, port = server.listen_tcp(args.host or DEFAULT_HOST,
                                           DEFAULT_PORT if args.port is None else args.port)
            uris = [nbd_uri(name, host=host, port=port) for name in exports]

        def stop(signum, frame) -> None:
            server.stop()

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        where = ", ".join(f"{name} on {uri}" for name, uri in zip(exports, uris))
        print(f"lsbd: serving {where}", file=sys.stderr, flush=True)
        server.serve_forever()
        print("lsbd: stopping: finishing requests in flight", file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.close()
        failed = close_exports(exports)
    if failed:
        return 1
    print("lsbd: volumes flushed and closed", file=sys.stderr, flush=True)
    return 0
