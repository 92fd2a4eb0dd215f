"""Copying a whole volume in from, and out to, a raw image: a regular file
(sparse: holes stay holes) or a block device (its size comes from the
device; holes are written as zeros, and the device is never truncated).

Known image formats are recognised on import, so that a qcow2 or VMDK file
is not taken for a raw disk."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import Callable, Iterable, Iterator

from lsbd import linux
from lsbd.engine.walk import allocation_chunks
from lsbd.errors import LsbdError, UserError

CHUNK = 4 * 1024 * 1024
_ZEROS = bytes(CHUNK)

Progress = Callable[[int], None]


def _fail(path: str, doing: str, e: OSError, offset: int | None = None) -> UserError:
    where = f" at byte {offset}" if offset is not None else ""
    return UserError(f"{doing} {path}{where} failed: {e.strerror or e}")


# --- what a file is ------------------------------------------------------------

def is_block_device(fd: int) -> bool:
    return stat.S_ISBLK(os.fstat(fd).st_mode)


def size_of(fd: int) -> int:
    """The size of a regular file, or of a block device (seeking to its end:
    st_size is 0 for a device)."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    raise UserError("not a regular file or a block device")


def image_format(fd: int, size: int) -> str | None:
    """The name of a known non-raw disk image format the file holds, or None."""
    head = os.pread(fd, 512, 0)
    if head[:4] == b"QFI\xfb":
        return "qcow2" if head[4:8] in (b"\0\0\0\2", b"\0\0\0\3") else "qcow"
    if head[:4] == b"KDMV" or head[:4] == b"COWD" or head.startswith(b"# Disk DescriptorFile"):
        return "vmdk"
    if head[:8] == b"vhdxfile":
        return "vhdx"
    if head[:8] == b"conectix":
        return "vpc"    # a dynamic VHD (a copy of its footer comes first)
    if head.startswith(b"<<< ") and head[0x40:0x44] == b"\x7f\x10\xda\xbe":
        return "vdi"
    if size >= 512 and size % 512 == 0 and os.pread(fd, 8, size - 512) == b"conectix":
        return "vpc"    # a fixed VHD: raw data and a 512-byte footer
    return None


# --- in ----------------------------------------------------------------------------

def _data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The ranges [start, end) of a file that may hold data: a sparse file's
    holes are skipped (SEEK_DATA / SEEK_HOLE), a device is read whole."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return                  # only a hole is left
            yield offset, size          # no SEEK_DATA here: read it all
            return
        if start >= size:
            return
        yield start, end
        offset = end


def import_image(volume, path: str, *, raw: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> int:
    """Copy the raw image at `path` (a file or a block device) into `volume`
    from offset 0; blocks of zeros stay holes.  Returns its size."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    try:
        try:
            size = size_of(fd)
        except UserError:
            raise UserError(f"cannot import {path}: not a regular file or a block device") from None
        if not raw:
            kind = image_format(fd, size)
            if kind is not None:
                raise UserError(f"{path} is a {kind} image, not a raw disk: convert it first "
                                f"(qemu-img convert -f {kind} -O raw {path} disk.raw), or give "
                                "--raw to import its bytes as they are")
        if size > volume.size:
            raise UserError(f"{path} ({size} bytes) is larger than volume {volume.name} "
                            f"({volume.size} bytes)")
        copied = 0          # the volume matches the file up to here
        for start, end in _data_ranges(fd, size):
            _zero_allocated(volume, copied, start)
            copied = end
            offset = start
            while offset < end:
                try:
                    chunk = os.pread(fd, min(CHUNK, end - offset), offset)
                except OSError as e:
                    raise _fail(path, "reading", e, offset) from None
                if not chunk:
                    raise UserError(f"{path} ended at byte {offset}, before its size ({size})")
                volume.write(offset, chunk)
                offset += len(chunk)
                if progress:
                    progress(offset, size)
        _zero_allocated(volume, copied, size)
        volume.flush()
        return size
    finally:
        os.close(fd)


def _zero_allocated(volume, start: int, end: int) -> None:
    """A hole of the file reads as zeros in the volume too: zero what the
    volume holds there (an import into a new volume writes nothing)."""
    if end > start:
        for run in volume.allocation(start, end - start):
            if run.allocated:
                volume.write_zeroes(run.offset, run.length)


# --- out -----------------------------------------------------------------------------

def written_in_place(path: str) -> bool:
    """Whether an export to path writes it where it is: a block device, a
    stream, or a file that cannot be replaced (the user's explicit target):
    a file mounted on (rename cannot go over a mount point) or one whose
    folder takes no new file, such as a mounted lsbd volume's image (FUSE).
    Any other file is written beside it and renamed once whole."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    except OSError:
        return False        # opening it fails and says why
    if not stat.S_ISREG(st.st_mode):
        return True
    folder, name = os.path.split(os.path.realpath(path))
    probe = os.path.join(folder, f".{name}.probe-{os.getpid()}")
    try:
        if os.stat(folder).st_dev != st.st_dev:
            return True
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except OSError:
        return True
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return False


class _Target:
    """Where an export writes: a sparse regular file, a block device or a
    file written in place (fixed: every block written, holes as zeros), or a
    stream (a character device or a pipe: every byte in order)."""

    def __init__(self, path: str, *, update: bool):
        self.path = path
        flags = os.O_WRONLY | os.O_CLOEXEC
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise _fail(path, "opening", e) from None
        if update and st is None:
            raise UserError(f"cannot update {path} (no such file): --from needs an image of "
                            "the older state to bring up to date")
        self.regular = st is None or stat.S_ISREG(st.st_mode)
        in_place = st is not None and not update and written_in_place(path)
        #: Old bytes to overwrite: holes are written as zeros.
        self.fixed = st is not None and (stat.S_ISBLK(st.st_mode) or (self.regular and in_place))
        #: A whole file is written under a temporary name beside it and
        #: renamed over it once complete: an export that fails or is
        #: interrupted leaves the file that was there (an older good export)
        #: and no half of a new one that looks whole.
        self.partial: str | None = None
        self.final = os.path.realpath(path)     # through a symlink: its target is replaced
        opened = path
        if self.regular and not update and not in_place:
            folder, name = os.path.split(self.final)
            opened = os.path.join(folder, f".{name}.partial-{os.getpid()}")
            flags |= os.O_CREAT | os.O_TRUNC
        try:
            self.fd = os.open(opened, flags, 0o644)
        except OSError as e:
            raise _fail(path, "opening", e) from None
        if opened != path:
            self.partial = opened
            if st is not None:
                try:
                    os.fchmod(self.fd, stat.S_IMODE(st.st_mode))     # a replaced file's mode
                except OSError as e:
                    self.close()
                    raise _fail(path, "opening", e) from None

    def check_room(self, size: int) -> None:
        if not self.fixed:
            return
        room = os.lseek(self.fd, 0, os.SEEK_END)
        if room < size and self.regular:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, size)     # a file (a FUSE image) may grow
                room = size
        if room < size:
            raise UserError(f"{self.path} holds {room} bytes: too small for {size} bytes")

    def write(self, offset: int, data: bytes) -> None:
        try:
            done = 0
            while done < len(data):
                if self.regular or self.fixed:
                    n = os.pwrite(self.fd, data[done:], offset + done)
                else:
                    n = os.write(self.fd, data[done:])
                if n == 0:
                    raise OSError(28, os.strerror(28))
                done += n
        except OSError as e:
            raise _fail(self.path, "writing", e, offset + done) from None

    def hole(self, offset: int, length: int) -> None:
        """Bytes that read as zeros: left as a hole in a new file, written on
        a device, a file written in place (over its old bytes) or a stream."""
        if self.regular and not self.fixed:
            return
        while length > 0:
            n = min(length, CHUNK)
            self.write(offset, _ZEROS[:n])
            offset += n
            length -= n

    def finish(self, size: int) -> None:
        try:
            if self.regular and os.fstat(self.fd).st_size < size:
                os.ftruncate(self.fd, size)
            if self.regular or self.fixed:
                os.fsync(self.fd)
            if self.partial is not None:
                os.rename(self.partial, self.final)
                self.partial = None
                linux.sync_directory(os.path.dirname(self.final))
        except OSError as e:
            raise _fail(self.path, "finishing", e) from None

    def close(self) -> None:
        os.close(self.fd)
        if self.partial is not None:        # failed or interrupted: no half file
            with contextlib.suppress(OSError):
                os.unlink(self.partial)


def export_image(volume, path: str, *, progress: Progress | None = None) -> int:
    """Write the whole of `volume` (a Volume or a past state) to `path`; a
    regular file is created or replaced and comes out sparse.  Returns the
    size written."""
    target = _Target(path, update=False)
    try:
        target.check_room(volume.size)
        try:
            for _offset, length, runs in allocation_chunks(volume, CHUNK):
                for run in runs:
                    if run.allocated:
                        target.write(run.offset, volume.read(run.offset, run.length))
                    else:
                        target.hole(run.offset, run.length)
                if progress:
                    progress(length)
            target.finish(volume.size)
        except LsbdError as e:
            if target.fixed and target.regular:     # a file that could not be replaced
                raise UserError(f"{e}; {path} was written in place and now holds only part "
                                "of the volume: export again") from e
            raise
        return volume.size
    finally:
        target.close()


def export_changes(volume, path: str, ranges: Iterable[tuple[int, int]], *,
                   progress: Callable[[int, int], None] | None = None) -> tuple[int, int]:
    """Bring the image at `path` (a file or a device holding an older state)
    up to `volume`'s state by writing only the block ranges given (streamed,
    in order).  Returns (ranges, bytes) written."""
    bs = volume.block_size
    target = _Target(path, update=True)
    count = total = 0
    try:
        target.check_room(volume.size)
        for lo, hi in ranges:
            count += 1
            offset = lo * bs
            while offset < hi * bs:
                length = min(CHUNK, hi * bs - offset)
                target.write(offset, volume.read(offset, length))
                offset += length
                total += length
            if progress:
                progress(hi * bs, volume.size)
        target.finish(volume.size)
        return count, total
    finally:
        target.close()
