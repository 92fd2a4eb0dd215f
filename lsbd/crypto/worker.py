"""Sealing a segment in a process of its own.

Compressing and encrypting a segment inside the serving process takes the
GIL from the threads that answer requests, a little at a time but all the
time: measured with random 4 KiB NBD writes on 2 cores, the upload thread
spent most of its time waiting for the GIL and writes ran at 0.3-0.6x
of a plain volume.  Here one child process (`python -m lsbd.crypto.worker`,
started on first use) reads the segment file, seals it into the scratch
file it is given, and syncs it; the serving process only waits.  It is a
plain subprocess, not multiprocessing: forking a process full of threads
is unsafe, and multiprocessing's spawn runs the parent's main module again
in the child, which a program using lsbd need not expect.

Protocol, over the child's stdin and stdout: a u32 length and a pickled
SealJob in; a u32 length and a pickled ("ok", (object version, stored
length)), ("oserror", (errno, message)) or ("error", message) out.  The
child exits at end of input (its parent gone).

The child runs at nice +5 from its parent: while a client writes, the
threads answering it come first, and sealing catches up in the moments
they leave (a writer faster than sealing for long fills the cache dir
until writes wait for room, docs/operations.md).  Sealing once took 42 ms of CPU per 32 MiB segment
and at +5 uploads fell so far behind on a busy machine that compactions
under fio, which wait for them, ran 2 times instead of 6-7; at 27 ms that
test ran 11-13 of them at +5 (and 12 at +0, 4 at +10).

The child gets the object's own key (derived from the data key for this
object alone, frames.object_cipher), never the data key, over the pipe
between the two processes; for sealing by link the object's MAC key and
the local file's key, as well derived for that file alone.

Sealing by link (lsbd.crypto.linked, objects of version 2): a segment of an
encrypted volume whose first BATCH frames do not compress is not sealed
into the scratch file: its local file gets a tag per frame appended, and
becomes the object.  That reads the file once and deciphers only its first
MiB (to try compressing it): 6-7 ms of CPU per 32 MiB segment of random
writes against 25-27 for sealing it into frames of its own.  The file is
then made read-only (docs/security.md: on a file:// store the object and
the cached file are one inode).  If the child cannot be started or dies, the
caller seals in its own thread (SealingStore.put_file) and a new child is
started next time.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import threading

import attrs

from lsbd import childproc
from lsbd.crypto import linked, objects
from lsbd.crypto.aead import Cipher, Stream
from lsbd.crypto.compress import Compressor
from lsbd.crypto.frames import Framer
from lsbd.directio import DirectOutput, open_direct
from lsbd.linux import unfilled_bytearray



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
    # The source is an encrypted local file (lsbd.crypto.localfile): its
    # bytes start at source_base, under this file key (None: in the clear).
    source_key: bytes | None = attrs.field(default=None, repr=False)
    source_base: int = 0
    # Sealing by link (lsbd.crypto.linked): the object's MAC key (None: seal
    # into dest, always), and the local file's data key id and file id.
    link_mac_key: bytes | None = attrs.field(default=None, repr=False)
    link_key_id: int = 0
    link_file_id: bytes = b""


def run(job: SealJob) -> tuple[int, int]:
    """Seal job.source, returning (object version, stored length): into
    job.dest, synced (version 1), or by link, its index and tail appended
    to job.source (version 2, lsbd.crypto.linked; the store takes
    job.source itself)."""
    if job.link_mac_key is not None and not _compresses(job):
        return objects.LINKED_VERSION, _link(job)
    return objects.VERSION, _seal(job)


def _compresses(job: SealJob) -> bool:
    """Whether the sealing would store any of the segment's first BATCH
    frames compressed (Compressor.any_compressed: compress_many's sample,
    not the whole batch, which the sealing then compresses itself)."""
    if not job.level:
        return False
    src = os.open(job.source, os.O_RDONLY)
    try:
        first = source_reader(src, job.source_key, job.source_base)(
            0, min(job.length, objects.BATCH * job.frame_size))
    finally:
        os.close(src)
    view = memoryview(first)
    chunks = [view[k:k + job.frame_size] for k in range(0, len(view), job.frame_size)]
    return Compressor(job.level, threads=1).any_compressed(chunks)


def _link(job: SealJob) -> int:
    """Append the index and tail of job.source's body, sync it, and make it
    read-only; returns the object's size."""
    assert job.link_mac_key is not None
    # Writable again if an earlier sealing made it read-only and was not
    # stored (the store was down): tagging again writes the same bytes.
    os.chmod(job.source, 0o600)
    fd = os.open(job.source, os.O_RDWR)
    try:
        tail = linked.tail_of(key_id=job.link_key_id, file_id=job.link_file_id,
                              frame_size=job.frame_size, body_length=job.length)
        buf = unfilled_bytearray(objects.BATCH * job.frame_size)

        def read(start: int, size: int) -> memoryview:
            n = os.preadv(fd, [memoryview(buf)[:size]], job.source_base + start)
            return memoryview(buf)[:n]

        index = linked.make_index(read, Cipher(job.link_mac_key), tail)
        size = linked.append(fd, tail, index)
        os.fchmod(fd, 0o400)
        return size
    finally:
        os.close(fd)


def _seal(job: SealJob) -> int:
    """Seal job.source into job.dest and sync it; returns the sealed length."""
    # One compressing thread: sealing must leave the other core of a small
    # machine to the threads serving requests.
    framer = Framer(Cipher(job.object_key) if job.object_key is not None else None,
                    Compressor(job.level, threads=1) if job.level else None)
    src = os.open(job.source, os.O_RDONLY)
    try:
        dst, direct = open_direct(job.dest, os.O_WRONLY)
        out = DirectOutput(dst) if direct else None
        try:
            def write(parts: list) -> None:
                for i in range(0, len(parts), 1024):     # writev takes up to IOV_MAX
                    write_all(dst, parts[i:i + 1024])

            # Encrypted frames are enciphered straight into the aligned buffer
            # when a whole one always fits there.
            reserve = out.reserve if out is not None and \
                job.frame_size + 64 <= out.MAX_RESERVE else None
            n = objects.seal_into(source_reader(src, job.source_key, job.source_base), job.length,
                                  write if out is None else out.write, name=job.name,
                                  volume_id=job.volume_id, framer=framer, key_id=job.key_id,
                                  object_id=job.object_id, frame_size=job.frame_size,
                                  reserve=reserve)
            if out is not None:
                out.finish()
            os.fdatasync(dst)
            return n
        finally:
            os.close(dst)
    finally:
        os.close(src)



def source_reader(fd: int, key: bytes | None, base: int):
    """read(offset, n) of a segment file's plain bytes, decrypting an
    encrypted local file (key) as it reads."""
    if key is None:
        return lambda start, size: os.pread(fd, size, base + start)
    stream = Stream(key)

    def read(start: int, size: int) -> memoryview:
        # Deciphered where it was read: no second buffer for each batch.
        buf = unfilled_bytearray(size + 15)     # update_into's 15 spare bytes
        n = os.preadv(fd, [memoryview(buf)[:size]], base + start)
        stream.xor_in_place(start, buf, n)
        return memoryview(buf)[:n]
    return read


def write_all(fd: int, parts: list) -> None:
    want = sum(len(p) for p in parts)
    done = os.writev(fd, parts)
    if done != want:       # a short write: finish it piece by piece
        rest = b"".join(bytes(p) for p in parts)[done:]
        while rest:
            rest = rest[os.write(fd, rest):]


class _Child:
    def __init__(self) -> None:
        self.proc = childproc.start("lsbd.crypto.worker")

    def run(self, job: SealJob) -> tuple[int, int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        childproc.send(self.proc.stdin, job)
        return childproc.reply_value(childproc.receive(self.proc.stdout), "sealing process")

    def stop(self) -> None:
        childproc.stop(self.proc, 5)


#: How much lower the sealing process's CPU priority is than its parent's
#: (see above).
NICE = 5

_child: _Child | None = None
#: One job at a time: a second child would only take the CPU from the
#: threads serving requests on a machine of few cores.
_slot = threading.Lock()


def seal(job: SealJob) -> tuple[int, int]:
    """Run the job in the sealing process; WorkerUnavailable if it cannot
    (the scratch file may then hold part of the object: start it again).
    An OSError of the job itself (a disk full) is raised as it is."""
    global _child
    with _slot:
        try:
            if _child is None:
                _child = _Child()
            return _child.run(job)
        except (EOFError, BrokenPipeError, pickle.PickleError, ValueError) as e:
            # The child died or cannot start: the next call starts another.
            if _child is not None:
                _child.stop()
                _child = None
            raise WorkerUnavailable(str(e) or type(e).__name__) from None
        except OSError as e:
            if _child is None:      # could not start it
                raise WorkerUnavailable(str(e)) from None
            raise


def main() -> int:
    """The child's loop: seal jobs until the parent closes our stdin."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # a ^C is for the parent to handle
    os.nice(NICE)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            job = childproc.receive(stdin)
        except EOFError:
            return 0
        try:
            reply: tuple[str, object] = ("ok", run(job))
        except OSError as e:     # its errno matters to the parent (a full disk)
            reply = ("oserror", (e.errno, f"{type(e).__name__}: {e}"))
        except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
            reply = ("error", f"{type(e).__name__}: {e}")
        childproc.send(stdout, reply)


if __name__ == "__main__":
    sys.exit(main())
