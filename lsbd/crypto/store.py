"""A store wrapper that compresses and encrypts the segments and
checkpoints of the volumes that ask for it, and hands back their plain
bytes, ranges included: the engine sees the same objects as ever.

Which volume a key belongs to, and how that volume is sealed, comes from
`resolve(volume)` (VolumeSealing, or None for a plain volume); it is asked
once per volume, the first time one of its objects is touched, so a clone
reads its parent's objects with the parent's keys.  Every other key
(config, lease, keys, snapshots) passes through untouched.

A ranged read fetches the object's index once (kept, up to LAYOUT_BYTES
of them) and then only the frames that hold the range.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import tempfile
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import attrs

from lsbd import names
from lsbd.crypto import keystore, linked, localfile, objects, worker
from lsbd.crypto.aead import CIPHER_NAME, Cipher
from lsbd.crypto.compress import FRAME_SIZE, Compressor
from lsbd.crypto.frames import FrameError, Framer, new_object_id, object_cipher, object_key
from lsbd.crypto.keyring import Keyring, Secret
from lsbd.errors import CorruptionError, ObjectNotFound, UserError
from lsbd.store.base import ObjectInfo, Store

#: Bytes read from an object's end to find its tail and index (one GET for
#: segments up to about 200 MiB at 16 KiB frames).
TAIL_READ = 64 * 1024
#: Object layouts kept, by size: about 9 KiB for a 32 MiB segment of 16 KiB
#: frames, so some 3,600 segments: every segment of 64 GiB of random writes
#: (2,112), whose server keeps each one's layout from when it stored it and
#: then reads a few blocks of each, in every MiB of a region (16 MiB held
#: some 1,780 of them).  4,096 layouts of 16 KiB each were most of what a
#: serving process's memory grew by in such a read.
LAYOUT_BYTES = 32 << 20
log = logging.getLogger(__name__)
_SEALING_SLOT = threading.Lock()     # sealing here: one object at a time, as worker.seal


def _end_read(n: int) -> int:
    """Stored bytes read from an object's end for its last `n` plain bytes:
    the tail and index, and (most often) the frames that hold them."""
    return TAIL_READ + n + n // 4


@attrs.frozen(kw_only=True)
class VolumeSealing:
    """How one volume's objects are sealed."""

    volume_id: bytes
    keyring: Keyring | None = None          # None: compressed only
    compressor: Compressor | None = None    # None: frames stored raw
    frame_size: int = FRAME_SIZE

    def framer_for(self, tail: objects.Tail, name: str) -> Framer:
        if tail.encrypted != (self.keyring is not None):
            raise FrameError(f"{name}: object is "
                             f"{'encrypted' if tail.encrypted else 'not encrypted'}, "
                             "unlike its volume", key=name)
        if self.keyring is None:
            return Framer(None)
        key = self.keyring.data_key(tail.key_id)
        return Framer(object_cipher(key, volume_id=self.volume_id, name=name,
                                    object_id=tail.object_id))

    def linked_layout(self, name: str, tail: objects.Tail, index: bytes,
                      raw: bytes) -> objects.Layout:
        """The layout of a version 2 object (lsbd.crypto.linked), `name`."""
        if self.keyring is None:
            raise FrameError(f"{name}: a linked object, but its volume is not encrypted",
                             key=name)
        try:
            data_key = self.keyring.data_key(tail.key_id)
        except Exception as e:   # noqa: BLE001 - a retired or unknown key
            raise FrameError(f"{name}: {e}", key=name) from None
        keys = localfile.LocalKeys.from_keyring(self.keyring, self.volume_id)
        mac = Cipher(linked.mac_key(data_key, volume_id=self.volume_id, name=name,
                                    file_id=tail.object_id, body_length=tail.plain_length))
        return linked.LinkedLayout(name, tail, linked.ObjectKeys(
            mac, keys.of_file(data_key, tail.key_id, tail.object_id)), index, raw)

    def _new_object(self, name: str) -> dict:
        object_id = new_object_id()
        if self.keyring is None:
            key_id, cipher = 0, None
        else:
            current = self.keyring.current_key()
            key_id = current.id
            cipher = object_cipher(current.key, volume_id=self.volume_id, name=name,
                                   object_id=object_id)
        return dict(name=name, volume_id=self.volume_id, framer=Framer(cipher, self.compressor),
                    key_id=key_id, object_id=object_id, frame_size=self.frame_size)

    def seal(self, name: str, plain: bytes) -> bytes:
        return objects.seal(plain, **self._new_object(name))

    def seal_file(self, name: str, read: Callable[[int, int], bytes | bytearray | memoryview],
                  length: int, fd: int) -> None:
        """Write the sealed object of `length` plain bytes, read with
        read(offset, n), to the file `fd`, a batch of frames at a time."""
        def write(parts: list) -> None:
            for i in range(0, len(parts), 1024):      # writev takes up to IOV_MAX
                worker.write_all(fd, parts[i:i + 1024])

        objects.seal_into(read, length, write, **self._new_object(name))

    def source_cipher(self, path: str) -> localfile.FileCipher | None:
        """The cipher of the segment file `path` if it is an encrypted local
        file (lsbd.crypto.localfile), else None (a file in the clear)."""
        with open(path, "rb") as f:
            head = f.read(localfile.HEADER_SIZE)
        if not localfile.has_header(head):
            return None
        if self.keyring is None:
            raise CorruptionError(f"{path}: encrypted, but its volume is not", key=path)
        keys = localfile.LocalKeys.from_keyring(self.keyring, self.volume_id)
        return keys.from_header(head, where=path)

    def job(self, name: str, *, source: str, length: int, dest: str,
            source_cipher: localfile.FileCipher | None = None) -> worker.SealJob:
        """The sealing of file `source` as object `name`, for the sealing
        process: by link (lsbd.crypto.linked) if it is a segment in an
        encrypted local file and its first frames do not compress."""
        object_id = new_object_id()
        key_id, key = 0, None
        link: dict = {}
        if self.keyring is not None:
            current = self.keyring.current_key()
            key_id = current.id
            key = object_key(current.key, volume_id=self.volume_id, name=name,
                             object_id=object_id)
            if source_cipher is not None and names.parse_seq(name) is not None:
                link = dict(link_mac_key=linked.mac_key(
                                self.keyring.data_key(source_cipher.key_id),
                                volume_id=self.volume_id, name=name,
                                file_id=source_cipher.file_id, body_length=length),
                            link_key_id=source_cipher.key_id,
                            link_file_id=source_cipher.file_id)
        return worker.SealJob(**link, source=source, length=length, dest=dest, name=name,
                              volume_id=self.volume_id, object_key=key, key_id=key_id,
                              object_id=object_id, frame_size=self.frame_size,
                              level=self.compressor.level if self.compressor else 0,
                              source_key=source_cipher.key if source_cipher else None,
                              source_base=localfile.HEADER_SIZE if source_cipher else 0)


#: resolve(volume, settings=None): how `volume` is sealed; `settings`: its
#: config.json as a dict, when the caller has just read it.
Resolver = Callable[..., "VolumeSealing | None"]


def volume_resolver(inner: Store, secret: Callable[[str], Secret] | None) -> Resolver:
    """How each volume is sealed, from its config.json (read here rather than
    through lsbd.meta.config: the store layer sits below the engine), and
    for an encrypted one its keys, opened with `secret(volume)`."""

    def resolve(volume: str, settings: dict | None = None) -> VolumeSealing | None:
        doc = settings
        if doc is None:
            try:
                doc = json.loads(inner.get(names.config_key(volume)))
            except ObjectNotFound:
                raise _NoConfig() from None
            except ValueError:
                raise CorruptionError(f"{names.config_key(volume)}: unreadable volume config") \
                    from None
        compression = doc.get("compression") or "none"
        encryption = doc.get("encryption")
        if compression == "none" and not encryption:
            return None
        keyring = None
        if encryption:
            if encryption != CIPHER_NAME:
                raise UserError(f"volume {volume} is encrypted with {encryption!r}, "
                                "which this lsbd does not know")
            if secret is None:
                raise UserError(f"volume {volume} is encrypted: a passphrase is needed")
            keyring = keystore.unlock(inner, volume, secret(volume))
        codec, _, level = compression.partition(":")
        if codec not in ("zstd", "none"):
            raise UserError(f"volume {volume} is compressed with {codec!r}, "
                            "which this lsbd does not know")
        return VolumeSealing(volume_id=uuid.UUID(hex=doc["volume_id"]).bytes, keyring=keyring,
                             compressor=Compressor(int(level or 1)) if codec == "zstd" else None)

    return resolve


@contextlib.contextmanager
def _scratch_file(folder: str) -> Iterator[tuple[int, str]]:
    """A new file in `folder` and a path to it, gone afterwards.  An unnamed
    file (O_TMPFILE) where the kernel and file system allow, so that a crash
    leaves nothing behind; its path is then /proc/PID/fd/N, which a hard
    link or an open (by the sealing process too) follows."""
    fd = -1
    name = None
    tmpfile = getattr(os, "O_TMPFILE", 0)
    if tmpfile and os.path.isdir("/proc/self/fd"):
        try:
            fd = os.open(folder, tmpfile | os.O_RDWR, 0o600)
        except OSError:
            fd = -1
    if fd < 0:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".sealing-")
    try:
        yield fd, name or f"/proc/{os.getpid()}/fd/{fd}"
    finally:
        os.close(fd)
        if name is not None:
            with contextlib.suppress(OSError):
                os.unlink(name)


def _segment_length(path: str, base: int) -> int:
    """The segment's length in its local file, when the caller did not say:
    the file's size, or the body of a sealing by link whose append is whole."""
    with open(path, "rb") as f:
        tail = linked.complete_tail(f.fileno()) if base else None
        if tail is not None:
            return tail.plain_length
        return os.fstat(f.fileno()).st_size - base


class _NoConfig(Exception):
    """The volume has no config (yet, or any more): ask again next time."""


class SealingStore(Store):
    #: Volume.open refuses a compressed or encrypted volume on any other store.
    seals_objects = True

    def __init__(self, inner: Store, resolve: Resolver):
        self.inner = inner
        self.url = inner.url
        # Declared on Store, so __getattr__ would not pass it on.
        self.lists_etags = inner.lists_etags
        self._resolve = resolve
        self._volumes: dict[str, VolumeSealing | None] = {}
        self._layouts: OrderedDict[str, objects.Layout] = OrderedDict()
        self._layout_bytes = 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)   # store-specific extras (counters, ...)

    # --- which keys are sealed ----------------------------------------------------

    def sealing(self, key: str) -> VolumeSealing | None:
        volume = names.sealed_volume(key)
        if volume is None:
            return None
        with self._lock:
            if volume in self._volumes:
                return self._volumes[volume]
        try:
            found = self._resolve(volume)
        except _NoConfig:
            # Being created or deleted: nothing to seal now, and nothing
            # remembered, so that its objects are sealed once it exists.
            return None
        with self._lock:
            self._volumes[volume] = found
        return found

    def learn(self, volume: str, settings: dict) -> VolumeSealing | None:
        """How `volume` is sealed, from its settings (config.json as a dict)
        that the caller has just read: opening a volume reads them once, not
        once more here."""
        with self._lock:
            if volume in self._volumes:
                return self._volumes[volume]
        found = self._resolve(volume, settings)
        with self._lock:
            self._volumes[volume] = found
        return found

    def forget(self, volume: str) -> None:
        """Ask resolve() again next time (after the volume's settings or keys changed)."""
        with self._lock:
            self._volumes.pop(volume, None)

    def object_file(self, key: str) -> str | None:
        """The inner store's file of `key` when the object is stored as it is
        (a plain volume's, on a file:// store); None when it is sealed."""
        if self.sealing(key) is not None:
            return None
        return self.inner.object_file(key)

    # --- the Store interface --------------------------------------------------------

    def put(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        sealing = self.sealing(key)
        if sealing is not None:
            data = sealing.seal(key, data)
            self._drop(key)
        self.inner.put(key, data, exclusive=exclusive)

    def put_file(self, key: str, path: str, *, exclusive: bool = False,
                 length: int | None = None) -> None:
        """A sealed volume's segment file is sealed in the sealing process
        (lsbd.crypto.worker): by link, the file itself taking the object's
        index and tail and then stored (a file:// store on the same file
        system links it), or into a scratch file next to it, which the store
        then takes; memory stays at a batch of frames whatever the
        segment's size.  With no room on the disk for the scratch file it
        is sealed in memory.  length: the segment's length in the file, as
        the caller knows it (a sealing by link may have appended to the file
        before: lsbd.crypto.linked)."""
        sealing = self.sealing(key)
        if sealing is None:
            self.inner.put_file(key, path, exclusive=exclusive, length=length)
            return
        self._drop(key)
        cipher = sealing.source_cipher(path)
        base = localfile.HEADER_SIZE if cipher is not None else 0
        if length is None:
            length = _segment_length(path, base)
        try:
            self._put_file_sealed(sealing, key, path, cipher, length, exclusive=exclusive)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # No room for the scratch file: seal in memory, as a segment's
            # size allows, rather than wait for room only uploads can make.
            log.warning("sealing %s in memory: %s", key, e)
            with open(path, "rb") as f:
                f.seek(base)
                data = f.read(length)
            if cipher is not None:
                data = cipher.xor(0, [data])
            self.put(key, data, exclusive=exclusive)

    def _put_file_sealed(self, sealing: VolumeSealing, key: str, path: str,
                         cipher: localfile.FileCipher | None, length: int, *,
                         exclusive: bool) -> None:
        base = localfile.HEADER_SIZE if cipher is not None else 0
        with _scratch_file(os.path.dirname(path)) as (fd, scratch):
            try:
                version, size = worker.seal(sealing.job(key, source=path, length=length,
                                                        dest=scratch, source_cipher=cipher))
            except worker.WorkerUnavailable as e:
                log.warning("sealing %s here: the sealing process is unavailable (%s)", key, e)
                os.ftruncate(fd, 0)
                with open(path, "rb") as f:
                    src = f.fileno()
                    with _SEALING_SLOT:
                        sealing.seal_file(key, worker.source_reader(
                            src, cipher.key if cipher else None, base), length, fd)
                os.fdatasync(fd)
                version, size = objects.VERSION, os.fstat(fd).st_size
            if version == objects.LINKED_VERSION:
                self.inner.put_file(key, path, exclusive=exclusive)
                with open(path, "rb") as f:
                    src = f.fileno()
                    self._remember(key, sealing,
                                   os.pread(src, min(size, TAIL_READ), max(0, size - TAIL_READ)),
                                   lambda n: os.pread(src, n, max(0, size - n)))
                return
            self.inner.put_file(key, scratch, exclusive=exclusive)
            self._remember(key, sealing, os.pread(fd, min(size, TAIL_READ), max(0, size - TAIL_READ)),
                           lambda n: os.pread(fd, n, max(0, size - n)))

    def _remember(self, key: str, sealing: VolumeSealing, buf: bytes,
                  fetch_suffix: Callable[[int], bytes]) -> None:
        """Keep the layout of a segment just stored, from its last bytes
        (read back from the file just sealed, in the page cache): once the
        segment leaves the cache dir, its first ranged read needs no read of
        the object's tail (after random writes over a large volume, a read
        meets a stored segment for the first time about twice a MiB,
        docs/scale.md).  For a store whose listing tags objects, with its
        index frame and tail as stored: a clean close puts them in the map
        summary (lsbd.segments.summary), which needs those tags; elsewhere
        they would only take the room of the layouts reads need."""
        if names.parse_seq(key) is None:
            return
        try:
            self._layout(key, sealing, buf, keep_raw=self.lists_etags, fetch_suffix=fetch_suffix)
        except (FrameError, OSError) as e:
            log.warning("%s: layout not kept (%s)", key, e)

    def layout_raw(self, key: str) -> bytes | None:
        """The index frame and tail of `key` as stored, if a layout holding
        them is kept (b"" otherwise); None if `key` is not sealed."""
        if self.sealing(key) is None:
            return None
        with self._lock:
            layout = self._layouts.get(key)
        return layout.raw if layout is not None else b""

    def prime_layout(self, key: str, raw: bytes, stored_size: int) -> int | None:
        """Keep the layout of `key` from its index frame and tail as stored
        (`raw`, from a map summary), so that its first ranged read needs no
        GET of its tail.  Returns the object's plain length.  FrameError if
        they do not open or do not fit `stored_size`; a layout that opens
        but is not the object's fails its first ranged read, which then
        reads the tail afresh (get)."""
        sealing = self.sealing(key)
        if sealing is None:
            raise FrameError(f"{key}: a layout for an object that is not sealed", key=key)

        def missing(n: int) -> bytes:
            raise FrameError(f"{key}: summary layout cut short", key=key)

        layout = self._layout(key, sealing, raw, keep_raw=True, fetch_suffix=missing)
        if layout.stored_length != stored_size:
            self._drop(key)
            raise FrameError(f"{key}: summary layout does not match the object's size", key=key)
        return layout.tail.plain_length

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        sealing = self.sealing(key)
        if sealing is None:
            return self.inner.get(key, start, length)
        if start == 0 and length is None:
            data = self.inner.get(key)
            return objects.open_whole(data, name=key, volume_id=sealing.volume_id,
                                      framer_for=lambda t: sealing.framer_for(t, key),
                                      linked=lambda t, i, r: sealing.linked_layout(key, t, i, r))
        try:
            return self._get_range(key, sealing, start, length)
        except FrameError:
            # A layout kept from an object since replaced (a seq written
            # again after a crash): read it afresh once.
            if not self._drop(key):
                raise
            return self._get_range(key, sealing, start, length)

    def _get_range(self, key: str, sealing: VolumeSealing, start: int,
                   length: int | None) -> bytes:
        layout = self._layout(key, sealing)
        plain = layout.tail.plain_length
        if start < 0:
            lo, hi = max(0, plain + start), plain
        else:
            lo = min(start, plain)
            hi = plain if length is None else min(plain, start + length)
        if lo >= hi:
            return b""
        i, j = layout.frames_for(lo, hi)
        stored = self.inner.get(key, layout.starts[i], layout.starts[j] - layout.starts[i])
        return layout.open_span(lo, hi, stored, where=key)

    def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """get() of each range, the object's layout looked up once and the
        frames that hold them read by one get_ranges of the inner store."""
        sealing = self.sealing(key)
        if sealing is None:
            return self.inner.get_ranges(key, ranges)
        try:
            return self._get_ranges(key, sealing, ranges)
        except FrameError:
            if not self._drop(key):     # as get: a layout kept from a replaced object
                raise
            return self._get_ranges(key, sealing, ranges)

    def _get_ranges(self, key: str, sealing: VolumeSealing,
                    ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        layout = self._layout(key, sealing)
        plain, starts = layout.tail.plain_length, layout.starts
        spans = [(min(start, plain), min(plain, start + length)) for start, length in ranges]
        frames = [layout.frames_for(lo, hi) for lo, hi in spans]
        wanted = [(starts[i], starts[j] - starts[i]) for i, j in frames]
        stored = self.inner.get_ranges(key, [w for w, (lo, hi) in zip(wanted, spans) if lo < hi])
        got = iter(stored)
        return [layout.open_span(lo, hi, next(got), where=key) if lo < hi else b""
                for lo, hi in spans]

    def will_need(self, key: str, ranges: list[tuple[int, int | None]]) -> None:
        """The stored frames that hold these plain ranges; for an object
        whose layout is not kept, its end (the tail and index a get reads
        first, and as much as a get_tail of the last bytes asked for
        reads), the frames being unknown until then."""
        sealing = self.sealing(key)
        if sealing is None:
            self.inner.will_need(key, ranges)
            return
        with self._lock:
            layout = self._layouts.get(key)
        if layout is None:
            n = max([-start for start, _length in ranges if start < 0], default=0)
            self.inner.will_need(key, [(-_end_read(n), None)])
            return
        plain = layout.tail.plain_length
        stored: list[tuple[int, int | None]] = []
        for start, length in ranges:
            lo = max(0, plain + start) if start < 0 else min(start, plain)
            hi = plain if start < 0 or length is None else min(plain, start + length)
            if lo < hi:
                i, j = layout.frames_for(lo, hi)
                stored.append((layout.starts[i], layout.starts[j] - layout.starts[i]))
        if stored:
            self.inner.will_need(key, stored)

    def get_tail(self, key: str, n: int, *, stored_size: int | None = None) -> bytes:
        """The last `n` plain bytes.  Knowing the object's stored size, one
        GET of its end brings the object's index and, most often, the frames
        that hold those bytes (a segment's own index: a cold open reads one
        per segment)."""
        sealing = self.sealing(key)
        if sealing is None:
            return super().get_tail(key, n, stored_size=stored_size)
        try:
            if stored_size is None:
                return self._tail_unsized(key, sealing, n)
            return self._tail(key, sealing, n, stored_size)
        except FrameError:
            # A listing or a kept layout older than the object: ask afresh.
            self._drop(key)
            return self._get_range(key, sealing, -n, None)

    def _tail(self, key: str, sealing: VolumeSealing, n: int, stored_size: int) -> bytes:
        start = max(0, stored_size - _end_read(n))
        buf = self.inner.get(key, start, stored_size - start)
        layout = self._layout(key, sealing, buf,
                              keep_raw=self.lists_etags)
        if layout.stored_length != stored_size:
            raise FrameError(f"{key}: object length does not match its index", key=key)
        return self._tail_from(key, layout, buf, start, n)

    def _tail_unsized(self, key: str, sealing: VolumeSealing, n: int) -> bytes:
        """get_tail() not knowing the object's stored size: a ranged read of
        the frames that hold the last `n` bytes when the object's layout is
        kept; else one read of the object's end that brings its layout and,
        most often, those frames.  (A read after random writes over a large
        volume reads the trailer of each stored segment it visits: that
        read the object's end twice, docs/scale.md.)"""
        with self._lock:
            kept = key in self._layouts
        if kept:
            return self._get_range(key, sealing, -n, None)
        want = _end_read(n)
        buf = self.inner.get(key, -want)
        layout = self._layout(key, sealing, buf, keep_raw=self.lists_etags)
        size = layout.stored_length
        if size < len(buf) or (len(buf) < want and size != len(buf)):
            raise FrameError(f"{key}: object length does not match its index", key=key)
        return self._tail_from(key, layout, buf, size - len(buf), n)

    def _tail_from(self, key: str, layout: objects.Layout, buf: bytes, start: int,
                   n: int) -> bytes:
        """The last `n` plain bytes, from `buf` (the object's stored bytes
        from `start` to its end) where it holds their frames."""
        plain = layout.tail.plain_length
        lo = max(0, plain - n)
        i, j = layout.frames_for(lo, plain)
        if layout.starts[i] >= start:
            stored = buf[layout.starts[i] - start:layout.starts[j] - start]
        else:       # frames that compress badly: what the read missed
            stored = self.inner.get(key, layout.starts[i], layout.starts[j] - layout.starts[i])
        return layout.open_span(lo, plain, stored, where=key)

    def head(self, key: str) -> int:
        sealing = self.sealing(key)
        if sealing is None:
            return self.inner.head(key)
        return self._layout(key, sealing).tail.plain_length

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)     # stored sizes: what the store holds

    def delete(self, key: str) -> None:
        self._drop(key)
        self.inner.delete(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    @property
    def conditional_writes(self) -> bool:
        return self.inner.conditional_writes

    def close(self) -> None:
        self.inner.close()

    # --- object layouts -----------------------------------------------------------------

    def _drop(self, key: str) -> bool:
        with self._lock:
            layout = self._layouts.pop(key, None)
            if layout is None:
                return False
            self._layout_bytes -= layout.nbytes
            return True

    def _layout(self, key: str, sealing: VolumeSealing, buf: bytes | None = None, *,
                keep_raw: bool = False, fetch_suffix: Callable[[int], bytes] | None = None,
                ) -> objects.Layout:
        """The object's layout: kept, or read from `buf` (the object's last
        bytes, when the caller has them) or a read of its tail.  keep_raw:
        a layout read now keeps its index frame and tail as stored."""
        with self._lock:
            layout = self._layouts.get(key)
            if layout is not None and (layout.raw or not keep_raw or buf is None):
                self._layouts.move_to_end(key)
                return layout
        if buf is None:
            buf = self.inner.get(key, -TAIL_READ)
        layout = objects.layout_from_tail(
            buf, name=key, volume_id=sealing.volume_id,
            framer_for=lambda t: sealing.framer_for(t, key),
            fetch_suffix=fetch_suffix or (lambda n: self.inner.get(key, -n)),
            keep_raw=keep_raw, linked=lambda t, i, r: sealing.linked_layout(key, t, i, r))
        with self._lock:
            old = self._layouts.pop(key, None)
            if old is not None:
                self._layout_bytes -= old.nbytes
            self._layouts[key] = layout
            self._layout_bytes += layout.nbytes
            while self._layout_bytes > LAYOUT_BYTES and len(self._layouts) > 1:
                self._layout_bytes -= self._layouts.popitem(last=False)[1].nbytes
        return layout

    @property
    def layout_bytes(self) -> int:
        """Memory held by the layouts kept (at most about LAYOUT_BYTES)."""
        with self._lock:
            return self._layout_bytes


def volume_keys(store: Store, volume: str, segment_key: str) -> localfile.LocalKeys | None:
    """The local-file keys of `volume` if the store seals its objects with
    encryption; None otherwise.  segment_key: the name of any segment object
    of the volume."""
    if not isinstance(store, SealingStore):
        return None
    sealing = store.sealing(segment_key)
    if sealing is None or sealing.keyring is None:
        return None
    return localfile.LocalKeys.from_keyring(sealing.keyring, sealing.volume_id)
