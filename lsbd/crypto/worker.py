"""Sealing a segment in a process of its own.

Compressing and encrypting a segment inside the serving process takes the
GIL from the threads that answer requests, a little at a time but all the
time: measured with random 4 KiB NBD writes on 2 cores, the upload thread
spent most of its time waiting for the GIL and writes ran at 0.3-0.6x
of a plain volume.  Here one child process (started on first use, with
`spawn`, since forking a process full of threads is unsafe) reads the
segment file, seals it into the scratch file it is given, and syncs it; the
serving process only waits.  The child keeps the default CPU priority:
at nice +5 or +10, on a busy machine, uploads fell so far behind that
compactions under fio, which wait for them, ran 2 times instead of 6-7.

The child gets the object's own key (derived from the data key for this
object alone, frames.object_cipher), never the data key, over the pipe
between the two processes.  If the child cannot be started or dies, the
caller seals in its own thread (SealingStore.put_file) and a new child is
started next time.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import attrs

from lsbd.crypto import objects
from lsbd.crypto.aead import Cipher
from lsbd.crypto.compress import Compressor
from lsbd.crypto.frames import Framer



class WorkerUnavailable(Exception):
    """The sealing process could not be started or died: seal here instead."""


@attrs.frozen(kw_only=True)
class SealJob:
    """What the child needs to seal one object (every field picklable)."""

    source: str              # the plain file (a sealed segment in the cache dir)
    length: int              # its plain bytes to seal
    dest: str                # the scratch file to write the sealed object to
    name: str                # the object's key in the store
    volume_id: bytes
    object_key: bytes | None = attrs.field(repr=False)   # None: not encrypted
    key_id: int
    object_id: bytes
    frame_size: int
    level: int               # zstd level; 0: frames stored raw


def run(job: SealJob) -> int:
    """Seal job.source into job.dest and sync it; returns the sealed length."""
    framer = Framer(Cipher(job.object_key) if job.object_key is not None else None,
                    Compressor(job.level) if job.level else None)
    src = os.open(job.source, os.O_RDONLY)
    try:
        dst = os.open(job.dest, os.O_WRONLY)
        try:
            def write(parts: list) -> None:
                for i in range(0, len(parts), 1024):     # writev takes up to IOV_MAX
                    write_all(dst, parts[i:i + 1024])

            n = objects.seal_into(lambda start, size: os.pread(src, size, start), job.length,
                                  write, name=job.name, volume_id=job.volume_id,
                                  framer=framer, key_id=job.key_id, object_id=job.object_id,
                                  frame_size=job.frame_size)
            os.fdatasync(dst)
            return n
        finally:
            os.close(dst)
    finally:
        os.close(src)


def write_all(fd: int, parts: list) -> None:
    want = sum(len(p) for p in parts)
    done = os.writev(fd, parts)
    if done != want:       # a short write: finish it piece by piece
        rest = b"".join(bytes(p) for p in parts)[done:]
        while rest:
            rest = rest[os.write(fd, rest):]


_pool: ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()
#: One job at a time: a second child would only take the CPU from the
#: threads serving requests on a machine of few cores.
_slot = threading.Lock()


def seal(job: SealJob) -> int:
    """Run the job in the sealing process; WorkerUnavailable if it cannot."""
    global _pool
    with _slot:
        with _pool_lock:
            if _pool is None:
                try:
                    _pool = ProcessPoolExecutor(max_workers=1,
                                                mp_context=multiprocessing.get_context("spawn"))
                except (OSError, ValueError) as e:
                    raise WorkerUnavailable(str(e)) from None
            pool = _pool
        try:
            return pool.submit(run, job).result()
        except (BrokenProcessPool, RuntimeError) as e:
            # The child died (or the interpreter is shutting down): the next
            # call starts another one.
            with _pool_lock:
                if _pool is pool:
                    _pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            raise WorkerUnavailable(str(e) or type(e).__name__) from None
