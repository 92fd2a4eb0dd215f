"""lsbd's own helper processes: started as `python -m MODULE ARGS`, sent
pickled messages on their stdin and answering on their stdout, each a u32
length, then the pickle.  The sealing process (lsbd.crypto.worker) and the
map's process (lsbd.map.offload) talk this way."""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys

_LENGTH = struct.Struct("<I")


def start(module: str, *args: str) -> subprocess.Popen:
    """`python -m module args` with pipes on stdin and stdout.  lsbd's own
    folder goes first on its path: the child imports lsbd as the parent
    did, wherever lsbd is installed or checked out."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.Popen([sys.executable, "-m", module, *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": path})


def stop(proc: subprocess.Popen, timeout: float) -> None:
    """Close its pipes (its end of input: it finishes what it was doing and
    exits) and wait for it that long, then kill it."""
    for f in (proc.stdin, proc.stdout):
        try:
            if f is not None:
                f.close()
        except OSError:
            pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def send(f, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(_LENGTH.pack(len(data)) + data)
    f.flush()


def receive(f):
    """The next message; EOFError when the other side has gone."""
    head = f.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        raise EOFError
    (n,) = _LENGTH.unpack(head)
    data = f.read(n)
    if len(data) < n:
        raise EOFError
    return pickle.loads(data)


def reply_value(reply: tuple, who: str):
    """The value of an ("ok", value) reply.  ("oserror", (errno, message))
    and ("error", message) are raised as OSError, naming `who`: an errno
    such as ENOSPC matters to the caller."""
    status, value = reply
    if status == "oserror":
        errno_, message = value
        raise OSError(errno_, f"{who}: {message}")
    if status != "ok":
        raise OSError(f"{who}: {value}")
    return value
