"""The open segment: a journal file in the cache dir that grows as
transactions commit, plus the in-memory index of the blocks it holds.

Sealing appends the footer and trailer, after which the file is exactly the
segment object to upload.  Sealing does not fsync: the volume's sealer thread
does that (finish()) so that writers never wait for the disk; a flush syncs
every journal file not yet finished, in order.

On an encrypted volume (keys given) the file is encrypted as it is
appended (lsbd.crypto.localfile): a clear header, then every byte at its
segment offset under the file's own key.  Bytes once written at an offset
are never written again under that key: a roll-back past bytes already
written copies the file up to the mark into a new file, with a new key."""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time
from typing import Callable

from lsbd.crypto import localfile
from lsbd.crypto.localfile import FileCipher, LocalKeys
from lsbd.format.segment import (
    DATA,
    FLAG_COMMIT,
    RESIZE,
    Record,
    Trailer,
    encode_footer,
    encode_header,
    encode_record,
    encode_trailer,
    masked_crc,
)
from lsbd import fileio
from lsbd.linux import reserve, start_writeback
from lsbd.plans.reads import HOLE, ranges_meeting

log = logging.getLogger(__name__)
_CRC = struct.Struct("<I")
WRITEBACK_EVERY = 1 << 20  # start writing the journal to disk every this many bytes
_PAGE_MASK = 4095
BIG_RANGE = 16  # records longer than this (blocks) are indexed as ranges


def _clip(r: tuple, start: int, end: int, bs: int) -> tuple:
    """The part [start, end) of range r."""
    r0, _r1, offset, crcs = r
    k = start - r0
    if offset == HOLE:
        return (start, end, HOLE, b"")
    return (start, end, offset + k * bs, crcs[4 * k:4 * (end - r0)])




class OpenSegment:
    def __init__(self, path: str, *, volume_id: bytes, seq: int, block_size: int,
                 expected_size: int = 0, keys: LocalKeys | None = None):
        self.path = path
        self.seq = seq
        self.block_size = block_size
        self.volume_id = volume_id
        self.created_ns = time.time_ns()
        self.opened_at = time.monotonic()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        if expected_size:
            # Appending into blocks reserved up front costs the file system
            # (ext4) about a third less than allocating as the file grows
            # (measured: 290 -> 200 us of CPU per MiB written and synced).
            # seal() gives back what the segment did not use.  A full disk
            # shows here (ENOSPC), before anything is written.
            try:
                reserve(self.fd, expected_size)
            except OSError:
                os.close(self.fd)
                os.unlink(path)
                raise
        self._preallocated = expected_size
        self.keys = keys
        self.cipher: FileCipher | None = keys.new_file() if keys is not None else None
        # The cipher's context at the end of what was last encrypted: the
        # next append goes on from there without setting up a new one.
        self._ctx = None
        self._ctx_pos = -1
        self.base = localfile.HEADER_SIZE if keys is not None else 0  # file offset of segment offset 0
        self._rekey_pending = False   # bytes were written past the end: new key before writing
        # Called with the seq once a new file has taken the path (_rekey):
        # descriptors of the old one must no longer be used to read.
        self.on_replaced: Callable[[int], None] | None = None
        header = encode_header(volume_id, seq, block_size, self.created_ns)
        if self.cipher is not None:
            os.pwrite(self.fd, self.cipher.header + self._encrypt(0, [header]), 0)
        else:
            os.pwrite(self.fd, header, 0)
        self.end = len(header)
        self.records: list[Record] = []
        # lba -> (file offset, masked crc), or (HOLE, 0) for a zeroed/trimmed block
        self.blocks: dict[int, tuple[int, int]] = {}
        # The blocks of large records, as ranges (start, end, file offset of
        # the first block or HOLE, packed masked CRCs): sorted, not
        # overlapping, and older than any entry in `blocks` they contain.
        self.ranges: list[tuple[int, int, int, bytes]] = []
        self.dirty = False       # written since the last fsync
        self._dir_synced = False  # the file's directory entry is durable
        self._sync_lock = threading.Lock()  # sync() vs finish() closing the fd
        # A sync that failed: every later one fails too (see sync()).
        self._sync_error: OSError | None = None
        self.trailer: Trailer | None = None  # set by seal()
        self.sealed_at = 0.0     # time.monotonic() at seal()
        self.trailer_crc = 0     # the sealed trailer's fingerprint (the next one's prev_crc)
        self._writeback_from = 0  # bytes before this were handed to start_writeback
        #: Only moves of bytes the volume already holds were appended (a
        #: relocation): the sealer may hold it back (Sealer.holding).
        self.moves_only = True

    @property
    def empty(self) -> bool:
        return not self.records

    @property
    def has_overlay(self) -> bool:
        return bool(self.blocks or self.ranges)

    # --- appending, with undo for a transaction that fails half way -----------

    def mark(self) -> tuple[int, int, list]:
        return (self.end, len(self.records), [])

    def append(self, kind: int, lba: int, nblocks: int, *, data=None, crcs: bytes = b"",
               undo: list | None = None, commit: bool = False) -> None:
        if self._rekey_pending:
            self._rekey(self.end)
        head = encode_record(kind, FLAG_COMMIT if commit else 0, lba, nblocks, crcs)
        pos = self.end
        if self.cipher is not None:
            buf = self._encrypt(pos, [head] if data is None else [head, data])
            written = os.pwrite(self.fd, buf, self.base + pos)
            expected = len(buf)
        elif data is not None:
            written = os.pwritev(self.fd, [head, data], pos)
            expected = len(head) + len(data)
        else:
            written = os.pwrite(self.fd, head, pos)
            expected = len(head)
        if written != expected:
            raise OSError(28, "short write to the journal (disk full?)")
        self._appended(pos + expected)
        self._index(kind, FLAG_COMMIT if commit else 0, lba, nblocks,
                    pos + len(head) if kind == DATA else 0, crcs, undo)

    def append_many(self, records: list[tuple], undo: list | None = None) -> None:
        """Append several records with one system call: (kind, lba, nblocks,
        data, crcs, commit) each, in order.  All or nothing, as append."""
        if self._rekey_pending:
            self._rekey(self.end)
        iov = []
        placed = []
        pos = self.end
        for kind, lba, nblocks, data, crcs, commit in records:
            flags = FLAG_COMMIT if commit else 0
            head = encode_record(kind, flags, lba, nblocks, crcs)
            iov.append(head)
            pos += len(head)
            placed.append((kind, flags, lba, nblocks, pos if kind == DATA else 0, crcs))
            if data is not None:
                iov.append(data)
                pos += len(data)
        expected = pos - self.end
        written = 0
        while iov and written < expected:
            # pwritev takes at most IOV_MAX buffers: a long batch goes in pieces.
            chunk = iov[:1024]
            if self.cipher is not None:
                n = os.pwrite(self.fd, self._encrypt(self.end + written, chunk),
                              self.base + self.end + written)
            else:
                n = os.pwritev(self.fd, chunk, self.end + written)
            if n != sum(map(len, chunk)):
                raise OSError(28, "short write to the journal (disk full?)")
            written += n
            del iov[:1024]
        self._appended(pos)
        for kind, flags, lba, nblocks, data_offset, crcs in placed:
            self._index(kind, flags, lba, nblocks, data_offset, crcs, undo)

    def _appended(self, end: int) -> None:
        self.end = end
        self.dirty = True
        if end - self._writeback_from >= WRITEBACK_EVERY:
            # Start the disk on what is written so far (without waiting), so
            # that the fsync at the seal finds little left to do.  Whole pages
            # only: the next append writes into the partial last one.
            upto = end & ~_PAGE_MASK
            start_writeback(self.fd, self._writeback_from, upto - self._writeback_from)
            self._writeback_from = upto

    def _index(self, kind: int, flags: int, lba: int, nblocks: int, data_offset: int,
               crcs: bytes, undo: list | None) -> None:
        """Record an appended record in the in-memory index."""
        self.records.append(Record(kind, flags, lba, nblocks, data_offset, crcs))
        if kind == RESIZE:
            return
        bs = self.block_size
        blocks = self.blocks
        if nblocks > BIG_RANGE:
            # A large record (a sequential write, a whole-disk discard) is
            # kept as one range, not a dict entry per block; it hides the
            # older entries it covers.
            end = lba + nblocks
            if blocks:
                covered = [b for b in blocks if lba <= b < end] if len(blocks) < nblocks \
                    else [b for b in range(lba, end) if b in blocks]
                for b in covered:
                    if undo is not None:
                        undo.append((b, blocks[b]))
                    del blocks[b]
            self._add_range(lba, end, data_offset if kind == DATA else HOLE, crcs, undo)
            return
        if nblocks == 1:   # random I/O
            if undo is not None:
                undo.append((lba, blocks.get(lba)))
            if kind == DATA:
                blocks[lba] = (data_offset, _CRC.unpack(crcs)[0])
            else:
                blocks[lba] = (HOLE, 0)
            return
        # Bulk operations rather than a loop per block.
        lbas = range(lba, lba + nblocks)
        if undo is not None:
            undo.extend(zip(lbas, map(blocks.get, lbas)))
        if kind == DATA:
            blocks.update(zip(lbas, zip(range(data_offset, data_offset + nblocks * bs, bs),
                                        struct.unpack(f"<{nblocks}I", crcs))))
        else:
            blocks.update(dict.fromkeys(lbas, (HOLE, 0)))

    def _add_range(self, start: int, end: int, offset: int, crcs: bytes,
                   undo: list | None) -> None:
        """Put [start, end) into `ranges` as its newest content: the older
        ranges it overlaps are cut back to what lies outside it."""
        ranges = self.ranges
        i, j = ranges_meeting(ranges, start, end)
        new = [(start, end, offset, crcs)]
        if j > i:
            first, last = ranges[i], ranges[j - 1]
            if first[0] < start:
                new.insert(0, _clip(first, first[0], start, self.block_size))
            if last[1] > end:
                new.append(_clip(last, end, last[1], self.block_size))
        if undo is not None:
            undo.append((None, (i, ranges[i:j], len(new))))
        ranges[i:j] = new

    def rollback(self, mark: tuple[int, int, list], *, failed: bool = False) -> bool:
        """Undo the appends since `mark`.  failed: after a failed write, whose
        bytes may lie past the end (cut off; otherwise the file is cut only
        if something was appended, keeping the blocks reserved past it).
        True if the file was replaced by a new one (an encrypted journal):
        descriptors of the old one no longer see what is appended."""
        end, nrecords, undo = mark
        for b, old in reversed(undo):
            if b is None:               # a change to `ranges`
                i, removed, added = old
                self.ranges[i:i + added] = removed
            elif old is None:
                self.blocks.pop(b, None)
            else:
                self.blocks[b] = old
        del self.records[nrecords:]
        replaced = False
        if self.cipher is not None:
            # Bytes written past the mark must never be written over under
            # the same key (see the module's doc): a new file, a new key.
            if self._rekey_pending or os.fstat(self.fd).st_size > self.base + end:
                replaced = True
                try:
                    self._rekey(end)
                except OSError as e:
                    # No room for the copy (the usual reason a write
                    # failed): cut the file, which needs none, and copy
                    # before the next write instead.
                    os.ftruncate(self.fd, self.base + end)
                    self._preallocated = 0
                    self._rekey_pending = True
                    log.warning("%s: new key deferred to the next write (%s)", self.path, e)
        elif failed or self.end != end:
            os.ftruncate(self.fd, end)
            self._preallocated = 0
        self.end = end
        return replaced

    def _encrypt(self, pos: int, parts: list) -> bytes:
        """The parts, lying from segment offset `pos` on, encrypted."""
        assert self.cipher is not None
        ctx = self._ctx
        if ctx is None or pos != self._ctx_pos:
            ctx = self.cipher.at(pos)
        # Joined first, then ciphered in one call: a batch of 16 writes is 32
        # parts, and a call per part cost 0.9 us a write against 0.65.
        out = ctx.update(parts[0] if len(parts) == 1 else b"".join(parts))
        self._ctx, self._ctx_pos = ctx, pos + len(out)
        return out

    def _rekey(self, end: int) -> None:
        """Replace the file by a copy of its first `end` bytes under a new key."""
        assert self.keys is not None and self.cipher is not None
        with self._sync_lock:
            old = localfile.LocalReader(self.fd, self.cipher)
            fd, cipher = localfile.rewrite(self.path, old, end, self.keys)
            os.close(self.fd)
            self.fd, self.cipher = fd, cipher
            self._ctx = None
            self._preallocated = 0
            self.dirty = False          # rewrite() synced it, and its directory
            self._dir_synced = True
            self._writeback_from = 0
            self._rekey_pending = False
        if self.on_replaced is not None:
            self.on_replaced(self.seq)

    def sync(self) -> None:
        """Make everything appended so far durable (safe from any thread; a
        no-op once finish() has synced and closed the file).  A file closed
        without that (close_fd: the volume stopped under a flush) raises:
        a flush must never return for writes that are not durable.  Nor
        may one after a sync that failed: the kernel marks the pages of a
        failed writeback clean, so a second fdatasync succeeds though their
        bytes never reached the disk."""
        with self._sync_lock:
            if self._sync_error is not None:
                raise OSError(errno.EIO, f"journal {self.path}: a sync of it failed "
                              f"({self._sync_error}): its writes may not be durable")
            if self.fd < 0:
                if self.dirty or (self.records and not self._dir_synced):
                    raise OSError(errno.EIO, f"journal {self.path} was closed before it was "
                                  "synced (the volume stopped): its last writes are not durable")
                return
            if self.dirty:
                self.dirty = False   # before the sync: an append meanwhile stays dirty
                try:
                    fileio.fdatasync(self.fd)
                except BaseException as e:
                    self.dirty = True
                    if isinstance(e, OSError):
                        self._sync_error = e
                    raise
            if not self._dir_synced:
                # A new file's name is durable only once its directory is synced.
                try:
                    fileio.fsync_dir(os.path.dirname(self.path))
                except OSError as e:
                    self._sync_error = e
                    raise
                self._dir_synced = True

    def seal(self, volume_size: int, prev_crc: int) -> Trailer:
        """Append the index and trailer: the file is now the segment object.
        Not synced yet, and still holding its reserved blocks: see finish()."""
        if self._rekey_pending:
            self._rekey(self.end)
        footer = encode_footer(self.records)
        trailer = Trailer(volume_id=self.volume_id, seq=self.seq, footer_offset=self.end,
                          footer_length=len(footer), record_count=len(self.records),
                          sealed_ns=time.time_ns(), volume_size=volume_size,
                          footer_crc=masked_crc(footer), prev_crc=prev_crc)
        raw = encode_trailer(trailer)
        tail = footer + raw
        if self.cipher is not None:
            n = os.pwrite(self.fd, self._encrypt(self.end, [tail]), self.base + self.end)
        else:
            n = os.pwrite(self.fd, tail, self.end)
        if n != len(tail):
            # Part of the tail lies past the end now: under this key the
            # next append must not write there again (see the module's doc).
            self._rekey_pending = self.cipher is not None
            raise OSError(28, "short write to the journal (disk full?)")
        self.end += len(tail)
        self.dirty = True
        self.trailer = trailer
        self.trailer_crc = masked_crc(raw)
        self.sealed_at = time.monotonic()
        return trailer

    def finish(self) -> None:
        """Sync the sealed file, give back the blocks reserved past its end,
        and close it."""
        self.sync()
        with self._sync_lock:
            if self.fd < 0:
                return
            if self._preallocated > self.base + self.end:
                # After the sync, not at the seal: truncating waits for the
                # file's writeback in flight (6-10 ms for 32 MiB, measured),
                # and the seal runs on a writer's thread under the volume lock.
                # The size does not change; a failure only keeps the blocks.
                try:
                    os.ftruncate(self.fd, self.base + self.end)
                except OSError:
                    pass
                self._preallocated = 0
            os.close(self.fd)
            self.fd = -1

    def close_fd(self) -> None:
        """Close without syncing (a crash-like stop)."""
        with self._sync_lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    def discard(self) -> None:
        """Close and remove a journal that holds no record (nothing in it
        was acknowledged, so nothing needs to be durable)."""
        with self._sync_lock:
            self.dirty = False
        self.close_fd()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
