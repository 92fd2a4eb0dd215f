"""A small control socket that a writing process serves next to its cache
dir, so that other `lsbd` commands can ask the writer of a volume to do what
only the writer can: flush to the store, checkpoint, take a snapshot; and
answer `stats` and `info` without the store (which may be down).

Protocol: one JSON object per line each way.
  {"op": "snapshot", "name": "s1"}  ->  {"ok": true, "seq": 12}
  {"op": "checkpoint"}              ->  {"ok": true, "seq": 12}
  {"op": "flush"}                   ->  {"ok": true, "seq": 12}
  {"op": "resize", "size": 1073741824} ->  {"ok": true, "seq": 12}
  {"op": "stats"}                   ->  {"ok": true, "report": {...}}
  {"op": "info"}                    ->  {"ok": true, "report": {...}}
  {"op": "compact", "threshold": 0.6, "dry_run": false, "defrag": false}  ->  {"ok": true, "report": {...}}
  {"op": "retain", "seconds": 86400} ->  {"ok": true, "seq": 12}
  {"op": "delete_snapshot", "name": "s1"} ->  {"ok": true, "seq": 12}
  anything failing                  ->  {"ok": false, "error": "one line"}
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import stat
import tempfile
import threading
from typing import Any

from lsbd.errors import LsbdError, StoreError

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
_MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to 108 bytes


def socket_path(cache_folder: str) -> str:
    """Where the writer whose cache dir is `cache_folder` listens: inside it,
    or (when that path is too long for a Unix socket) at a name derived from it
    in the temporary directory."""
    path = os.path.join(cache_folder, SOCKET_NAME)
    if len(path.encode()) < _MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(os.path.abspath(cache_folder).encode()).hexdigest()[:20]
    return os.path.join(tempfile.gettempdir(), f"lsbd-{digest}.sock")


class ControlServer:
    def __init__(self, volume, path: str):
        self.volume = volume
        self.path = path
        if os.path.exists(path):
            os.unlink(path)  # left by a crashed writer: we hold the lease now
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        os.chmod(path, 0o600)
        self._sock.listen(8)
        self._thread = threading.Thread(target=self._serve, name="lsbd-control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            for line in f:
                try:
                    request = json.loads(line)
                    result = self._do(request)
                    reply = {"ok": True, "report": result} if isinstance(result, dict) \
                        else {"ok": True, "seq": result}
                except (LsbdError, OSError, ValueError, KeyError) as e:
                    reply = {"ok": False, "error": str(e)}
                f.write(json.dumps(reply).encode() + b"\n")
                f.flush()

    def _do(self, request: dict) -> Any:
        return perform(self.volume, request)

    def close(self) -> None:
        try:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            except OSError:
                pass
            self._sock.close()
            self._thread.join(timeout=5)
        finally:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def perform(volume, request: dict, *, progress=None) -> Any:
    """The answer is JSON: a seq for most operations, a report (dict) for stats and compact."""
    """Do one control operation on an open volume: what the writer does for a
    request on its socket, and what a command does itself when no writer
    runs.  Returns a seq, or a report (a dict)."""
    op = request["op"]
    if op == "snapshot":
        return volume.snapshot(request["name"]).seq
    if op == "checkpoint":
        return volume.checkpoint()
    if op == "flush":
        return volume.flush_to_store()
    if op == "resize":
        volume.resize(int(request["size"]))
        for tell in getattr(volume, "resize_listeners", ()):
            tell()      # a mount shows the new size before the answer (`losetup -c` next)
        return volume.applied_seq
    if op == "stats":
        return volume.usage()
    if op == "info":
        return volume.describe()
    if op == "retain":
        from lsbd.meta.config import save_config

        # The writer prunes by this window: it changes it itself.
        volume.check_lease()
        volume.config.retain_seconds = float(request["seconds"])
        save_config(volume.store, volume.config)
        return volume.applied_seq
    if op == "delete_snapshot":
        from lsbd.meta.snapshots import delete_snapshot

        volume.check_lease()
        delete_snapshot(volume.store, volume.config, request["name"])
        return volume.applied_seq
    extra = getattr(volume, "control_ops", {}).get(op)
    if extra is not None:     # added from above the engine (compaction)
        return extra(request, progress=progress)
    raise ValueError(f"unknown control operation {op!r}")


def call(path: str, request: dict, *, timeout: float = 300.0) -> dict | None:
    """Ask the writer behind `path`; None if no writer is listening there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    # A socket another account made (in the temporary directory, where a
    # long cache dir's socket goes) would answer for our volume.
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
        raise LsbdError(f"{path} is not a control socket of this user: remove it if no lsbd "
                        "of yours serves the volume")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except OSError:
        s.close()
        return None
    with s, s.makefile("rwb") as f:
        f.write(json.dumps(request).encode() + b"\n")
        f.flush()
        line = f.readline()
    if not line:
        raise StoreError("the volume's writer closed the control connection without answering")
    reply = json.loads(line)
    if not reply.get("ok"):
        raise LsbdError(reply.get("error", "the writer refused"))
    return reply
