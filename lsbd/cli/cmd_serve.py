"""`lsbd serve VOLUME [VOLUME...]`: the NBD front end.

Each volume is an export named after it; the default export (an empty name)
is the first volume.  One line on stderr says where it is served once the
server accepts connections.  SIGINT or SIGTERM stops accepting, finishes the
requests in flight, flushes and closes every volume, and exits 0.  While the
store is unreachable, closing waits for uploads only until they have failed
for 10 s in a row or the store has answered nothing for 20 s (a second
signal: not at all); what is not uploaded stays
in the cache dir for the next open, and the last line says so.
See docs/nbd.md.
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import socket
import sys
from urllib.parse import quote

from lsbd.cli import ui
from lsbd.cli.args import LeaveAtOnce, command, path_arg, volume_arg
from lsbd.cli.context import tune_serving_process
from lsbd.cli.points import add_point_args, add_writer_args, writer_options
from lsbd.errors import UserError

DEFAULT_HOST = "127.0.0.1"


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise UserError(f"bad port {text!r}: a number from 0 to 65535") from None
    if not 0 <= port <= 65535:
        raise UserError(f"bad port {text!r}: a number from 0 to 65535")
    return port


def _workers(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 1024:
        raise UserError(f"bad number of workers {text!r}: from 1 to 1024")
    return n


def register(subparsers: argparse._SubParsersAction) -> None:
    p = command(
        subparsers, "serve", help="serve volumes over NBD",
        description="Serve each VOLUME as an NBD export of the same name (the first one is "
                    "also the default export) until interrupted (Ctrl-C or SIGTERM). Default: "
                    f"TCP {DEFAULT_HOST}:10809. It runs in the foreground: use another "
                    "terminal, or `&`, for the clients. With --json, one JSON document "
                    "naming the exports and their URIs is printed on stdout once they are "
                    "served.",
        examples=["vm1", "vm1 --socket /tmp/vm1.sock", "vm1 vm2 --port 10810 --read-only",
                  "vm1 --snapshot before-upgrade", "vm1 --with-snapshots"])
    p.add_argument("volumes", nargs="+", metavar="VOLUME", type=volume_arg,
                   help="the volumes to export")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH", type=path_arg,
                       help="listen on a Unix socket instead of TCP")
    where.add_argument("--host", default=None,
                       help=f"TCP address to listen on (default {DEFAULT_HOST}; "
                            "0.0.0.0 for every interface)")
    p.add_argument("--port", type=_port, default=None,
                   help="TCP port (default 10809; 0 picks a free one)")
    p.add_argument("--read-only", action="store_true", help="export read-only")
    add_writer_args(p)
    add_point_args(p, what="export, read-only, the state")
    p.add_argument("--with-snapshots", action="store_true",
                   help="also export every snapshot read-only, as VOLUME@SNAPSHOT")
    tls = p.add_argument_group("TLS (NBD_OPT_STARTTLS; URIs nbds:// and nbds+unix://)")
    tls.add_argument("--tls", choices=("off", "on", "require"), default=None,
                     help="off: no TLS; on: offered; require: nothing but STARTTLS "
                          "before it (default: require with credentials, else off)")
    tls.add_argument("--tls-certificates", metavar="DIR",
                     help="X.509 credentials: DIR/server-cert.pem, DIR/server-key.pem "
                          "(and DIR/ca-cert.pem)")
    tls.add_argument("--tls-psk", metavar="FILE",
                     help="pre-shared keys, one username:hexkey a line (as psktool writes)")
    tls.add_argument("--tls-verify-peer", action="store_true",
                     help="clients must show a certificate signed by DIR/ca-cert.pem")
    p.add_argument("--allow-unencrypted", action="store_true",
                   help="serve a non-loopback address without TLS (anyone who reaches "
                        "it reads and writes the volume)")
    p.add_argument("--workers", type=_workers, default=32, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def nbd_uri(export: str, *, socket_path: str | None = None, host: str = DEFAULT_HOST,
            port: int = 10809, tls: bool = False) -> str:
    """The NBD URI of `export` (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/uri.md)."""
    name = quote(export, safe="")
    scheme = "nbds" if tls else "nbd"
    if socket_path is not None:
        return f"{scheme}+unix:///{name}?socket={quote(socket_path, safe='/')}"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}/{name}"


def open_exports(args: argparse.Namespace, ctx) -> dict:
    """Export name -> open volume: each volume (or its state at the point
    named), and with --with-snapshots each snapshot as VOLUME@NAME."""
    from lsbd.service.serving import Point, open_devices

    devices = open_devices(ctx.store, args.volumes, cache_root=ctx.cache_dir,
                           point=Point(snapshot=args.snapshot, seq=args.seq, at=args.at),
                           read_only=args.read_only, break_lease=args.break_lease,
                           flush_mode=args.flush_mode, options=writer_options(args),
                           snapshots=args.with_snapshots, prepare=ctx.unlock,
                           configs={v: ctx.volume_config(v) for v in args.volumes})
    return {d.volume if d.snapshot is None else f"{d.volume}@{d.snapshot}": d.device
            for d in devices}


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


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback address."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def server_tls(args: argparse.Namespace):
    """The TLS settings the options ask for (a user error if unusable)."""
    from lsbd_nbd.tls import ServerTLS, TLSConfigError

    credentials = args.tls_certificates or args.tls_psk
    mode = args.tls or ("require" if credentials else "off")
    if args.tls_certificates and args.tls_psk:
        raise UserError("give --tls-certificates or --tls-psk, not both")
    try:
        return ServerTLS(mode, certificates=args.tls_certificates, psk_file=args.tls_psk,
                         verify_peer=args.tls_verify_peer)
    except TLSConfigError as e:
        raise UserError(str(e)) from None


def run(args: argparse.Namespace, ctx) -> int:
    from lsbd_nbd import DEFAULT_PORT, NBDServer

    if args.socket is not None and args.port is not None:
        raise UserError("--port goes with TCP, not with --socket")
    tls = server_tls(args)
    host = args.host or DEFAULT_HOST
    if args.socket is None and not tls.required and not is_loopback(host):
        if not args.allow_unencrypted:
            raise UserError(f"{host} is not a loopback address: serve it with --tls=require "
                            "and credentials, or say --allow-unencrypted")
        print(f"lsbd: warning: serving {host} without TLS required: anyone who reaches it "
              "can read and write the volumes", file=sys.stderr, flush=True)
    tune_serving_process()
    exports = open_exports(args, ctx)
    server = None
    try:
        server = NBDServer(exports, default_export=args.volumes[0], workers=args.workers,
                           tls=tls)
        if args.socket is not None:
            try:
                path = server.listen_unix(args.socket)
            except OSError as e:
                raise UserError(f"cannot listen on {args.socket}: {e.strerror or e}") from None
            uris = [nbd_uri(name, socket_path=path, tls=tls.required) for name in exports]
        else:
            port = DEFAULT_PORT if args.port is None else args.port
            try:
                host, port = server.listen_tcp(host, port)
            except OSError as e:
                raise UserError(f"cannot listen on {host} port {port}: "
                                f"{e.strerror or e}") from None
            uris = [nbd_uri(name, host=host, port=port, tls=tls.required) for name in exports]

        stops = []

        def stop(signum, frame) -> None:
            stops.append(signum)
            if len(stops) == 1:
                server.stop()
                return
            # A second signal while closing: stop waiting for the store.
            print("lsbd: stopping now: segments not yet uploaded stay in the cache dir",
                  file=sys.stderr, flush=True)
            for volume in exports.values():
                volume.give_up_uploads()

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        where = ", ".join(f"{name} on {uri}" for name, uri in zip(exports, uris))
        print(f"lsbd: serving {where}", file=sys.stderr, flush=True)
        if args.json:
            ui.print_json({"exports": [{"name": name, "uri": uri}
                                       for name, uri in zip(exports, uris)],
                           "default_export": args.volumes[0]})
            sys.stdout.flush()
        server.serve_forever()
        print("lsbd: stopping: finishing requests in flight", file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.close()
        failed = close_exports(exports)
    # With the store down or stalled, upload attempts may still hang in
    # their threads (up to the read timeout, per retry) after the volumes
    # closed: nothing is left to do, so the process ends past them.
    if failed:
        return LeaveAtOnce(1)
    waiting = [f"{name}: {v.left_waiting}" for name, v in exports.items()
               if getattr(v, "left_waiting", None)]
    if waiting:
        print(f"lsbd: volumes flushed and closed; the next open uploads what waits in the "
              f"cache dir ({'; '.join(waiting)})", file=sys.stderr, flush=True)
        return LeaveAtOnce(0)
    print("lsbd: volumes flushed and closed", file=sys.stderr, flush=True)
    return 0
