"""What the benchmarks share: running commands and fio, starting and
stopping servers, nbdkit as the reference NBD server, the page cache, sizes.

Each benchmark puts this folder on sys.path and imports from here."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time


def sh(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, **kw)


def fio(target: str, rw: str, bs: str, *, size: int | str, runtime: int | None = None,
        io_size: int | None = None, offset: int = 0, compress_pct: int = 0,
        cpus: str | None = None) -> dict:
    """One fio job at iodepth 16: through fio's nbd engine for an nbd URI,
    else with O_DIRECT on a file.  Time based when `runtime` is given.
    compress_pct: write buffers that compress by about that much (fio's
    buffer_compress_percentage, refilled for every write).  cpus: the
    cores fio may run on (its cpus_allowed, e.g. "0").
    Returns MiB/s, IOPS, the seconds it ran and the CPU seconds fio spent."""
    where = (["--ioengine=nbd", f"--uri={target}"] if target.startswith("nbd") else
             [f"--filename={target}", "--ioengine=libaio", "--direct=1"])
    extra = [f"--io_size={io_size}"] if io_size else []
    if runtime:
        extra += [f"--runtime={runtime}", "--time_based"]
    if compress_pct:
        extra += [f"--buffer_compress_percentage={compress_pct}", "--refill_buffers"]
    if cpus is not None:
        extra += [f"--cpus_allowed={cpus}"]
    # In bytes: fio's own reading of a unit differs from lsbd's (by default it
    # takes 1GiB as 10^9 bytes and 1GB as 2^30), and the lsbd volume and fio's
    # region must be the size the flag said.
    nbytes = parse_size(size) if isinstance(size, str) else size
    r = sh("fio", "--name=bench", *where, "--iodepth=16", f"--rw={rw}", f"--bs={bs}",
           f"--size={nbytes}", f"--offset={offset}", *extra, "--randrepeat=0", "--norandommap",
           "--output-format=json")
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    if job["error"]:
        raise RuntimeError(f"fio {rw} {bs} failed with error {job['error']}")
    side = job["write" if "write" in rw else "read"]
    seconds = side["runtime"] / 1000
    return {"mib_s": side["bw"] / 1024, "iops": side["iops"], "seconds": seconds,
            "cpu_s": (job["usr_cpu"] + job["sys_cpu"]) / 100 * seconds}


def wait_for(path: str, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    """Until `path` exists (a socket, a mounted file); fails at once if
    `proc` exits first."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"waiting for {path}: its process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.05)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, two minutes to finish (a server flushes on the way out),
    then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def nbd_server(argv: list[str], sock: str, export: str = "", *, log: str | None = None, **kw):
    """An NBD server started from `argv` that listens on the Unix socket
    `sock`; yields the URI of `export` once the socket is there, and stops
    the server at the end.  Its stderr goes to the file `log` if given, else
    where `stderr` says (nowhere by default)."""
    with contextlib.ExitStack() as stack:
        err = stack.enter_context(open(log, "w")) if log else kw.pop("stderr", subprocess.DEVNULL)
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, **kw)
        try:
            wait_for(sock, proc)
            yield f"nbd+unix:///{export}?socket={sock}"
        finally:
            stop(proc)


@contextlib.contextmanager
def nbdkit(workdir: str, size: int):
    """nbdkit's file plugin on a sparse file in `workdir`: the C reference
    server over the same disk.  Yields its URI."""
    image = os.path.join(workdir, "nbdkit.img")
    with open(image, "wb") as f:
        f.truncate(size)
    sock = os.path.join(workdir, "nbdkit.sock")
    try:
        with nbd_server(["nbdkit", "-f", "-U", sock, "file", image], sock) as uri:
            yield uri
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(image)


def drop_page_cache() -> bool:
    """Start a subject from the same memory state: a log-structured store
    writes into new page-cache pages, and on a machine whose memory is full
    of cache every such page costs a reclaim first (measured here: 1 MiB
    writes at 1300 MiB/s with free memory, 330-650 with a full cache), while
    an in-place server like nbdkit's file plugin rewrites pages it has.
    Needs root; returns False if it could not."""
    subprocess.run(["sync"], check=False)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def work_dir(prefix: str, parent: str | None) -> str:
    """A new temporary directory under `parent` (made first if it is not
    there: a --workdir named on the command line need not exist yet)."""
    if parent is not None:
        os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=prefix, dir=parent)


def code_path(code: str) -> str:
    """PYTHONPATH for running the copy of lsbd at `code`, its NBD and FUSE
    front ends (nbd/, fuse/) included: with only `code` on the path, the
    installed front ends (an editable install's: the checkout's) were
    imported instead, and a change to them was not the one measured."""
    return os.pathsep.join(os.path.join(code, d) for d in (".", "nbd", "fuse"))


def parse_size(text: str) -> int:
    """'1G', '512MiB', '1.5T', '4096' -> bytes: lsbd's own reading of a size
    (binary units; '1GB' refused), so a bench flag means what `--size` does."""
    from lsbd.sizes import parse_size as lsbd_parse_size

    return lsbd_parse_size(text)
