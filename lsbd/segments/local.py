"""Reads of sealed segments, from their local copies (the cache folder of
lsbd.segments.copies) or from the store.  Every block read from a sealed
segment, local or remote, is checked against its CRC (docs/durability.md).

A segment that is not local is read with ranged GETs of just the blocks
asked for, checked against its index (fetched once from the object's tail,
in parallel with the first data, and kept in a bounded LRU): a random read
costs one small GET, not a whole segment.  From a store in a local
directory, blocks that are whole one-block records are read with their
record's header and CRC and checked against those when the index is not
in memory (the index is a copy of every record's header), so a read that
finds a block or two in each of thousands of segments loads no index; the
segments a read finds there are all named to the store before the first
is read (name_stored), so that the disk reads them together.  When the
read pattern says more of a segment will be read, it is fetched whole in
the background (lsbd.segments.fetch); reads of it are served from the
fetched bytes, held in memory within a bound, while they are written into
the cache dir (lsbd.segments.held): a reader never waits for that write."""

from __future__ import annotations

import functools
import logging
from itertools import repeat

from lsbd.checksum import crc32c_of
from lsbd.format.segment import (HEADER, ONE_BLOCK_HEAD, TRAILER, SegmentIndex, decode_trailer,
                                 one_block_record_holds, read_sealed_footer_from)
from lsbd.segments.checks import check_blocks
from lsbd.segments.copies import DATA_ENDS_REMEMBERED, LocalCopies
from lsbd.segments.openfile import OpenFile
from lsbd.segments.spans import Bytes, Span, apart, coalesce, split_span, will_need
from lsbd.segments.remote import fetch_index_by_key
from lsbd.errors import CorruptionError, ObjectNotFound, WouldBlock

log = logging.getLogger(__name__)

#: A sequential read that finds this many pieces of one local segment has
#: the kernel read all of that segment ahead (once per segment, in the
#: order of the reads).  After random writes over a range, each 1 MiB read
#: of it finds a few blocks of each of the segments that hold the range
#: (the 1 GiB region of docs/scale.md: about 5 of each of 32), so a pass
#: reads every one of their blocks, each a random read of the disk; read
#: whole, in order, the segments come in at the disk's sequential speed and
#: the pieces from the page cache.  One read of a range takes at most
#: 32 MiB of disk reads per segment it touches this densely.
WHOLE_FROM = 4
#: Segments remembered as read ahead whole (then not asked for again).
_WHOLE_REMEMBERED = 1024


class SegmentFiles(LocalCopies):
    """A volume's segment files as the engine reads them: journals, and
    sealed segments checked block by block, local or from the store."""

    def read_journal(self, seq: int, offset: int, length: int, *,
                     nowait: bool = False) -> bytes | None:
        """Bytes of a local journal file (the open or a sealing segment; the
        caller checks them), or None if the file is gone (it was sealed,
        uploaded and evicted meanwhile)."""
        f = self._acquire(seq)
        if f is None:
            return None
        try:
            return f.read(length, offset, nowait)
        finally:
            self._release(f)

    # --- reads -------------------------------------------------------------------

    def read_blocks(self, seq: int, offset: int, nblocks: int, *, nowait: bool = False,
                    sequential: bool = False) -> bytes:
        """nblocks blocks at file offset `offset` of sealed segment `seq`, checked.
        nowait: raise WouldBlock rather than read from the store.  sequential:
        the read continues the previous one (lsbd.segments.fetch)."""
        length = nblocks * self.block_size
        if self.held and seq in self.held:
            data = self._read_held(seq, offset, nblocks, nowait)
            if data is not None:
                if self._unread and self._first_read(seq):
                    self._streaming(seq)
                return data
        try:
            f = self._acquire(seq)
        except CorruptionError as e:   # an unreadable local file (its header)
            if nowait:
                raise WouldBlock(f"segment {seq}: the local copy is damaged") from None
            return self._read_after_bad_local_copy(seq, offset, nblocks, e)
        if f is None:
            if nowait:
                raise WouldBlock(f"segment {seq} is not cached locally")
            data = None
            if self.fetcher.wait_if_fetching(seq):   # for its bytes, not its copy
                data = self._read_held(seq, offset, nblocks)
            if data is None:
                f = self._acquire(seq)      # a fetch that ended just now, or failed
            if data is not None or f is not None:
                if self._unread and self._first_read(seq):
                    self._streaming(seq)
            if data is not None:
                return data
        elif self._unread and self._first_read(seq):
            self._streaming(seq)
        if f is None:
            # Not here (evicted, or written elsewhere): a ranged GET of just
            # these blocks, and of the index at the same time if need be.
            key = self.key_of(seq)
            idx = self._cached_index(seq)
            if idx is None:
                data, idx = self.fetcher.map_reads([lambda: self.store.get(key, offset, length),
                                                    lambda: self._remote_index(seq)])
            else:
                data = self.store.get(key, offset, length)
            self._check(seq, idx, offset, data, nblocks)
            self.count_read(store=length)
            self.fetcher.note_remote_read(seq, length, sequential)
            return data
        try:
            idx = self._local_index(seq, f)   # from the bounded cache, not the descriptor
            data = f.read(length, offset, nowait)
            self._check(seq, idx, offset, data, nblocks)
            self.count_read(local=length)
            return data
        except CorruptionError as local_error:
            # A damaged local copy: the store's may be good (if it is there yet).
            if nowait:
                raise WouldBlock(f"segment {seq}: the local copy is damaged") from None
            return self._read_after_bad_local_copy(seq, offset, nblocks, local_error)
        finally:
            self._release(f)

    def read_batch(self, groups: dict[int, list[tuple[int, int]]], *,
                   nowait: bool = False, sequential: bool = False
                   ) -> dict[tuple[int, int], Bytes]:
        """The pieces (file offset, nblocks) of several sealed segments read
        together, checked: {(seq, offset): bytes}.  Segments not local, or
        with a piece that fails its check, are left out: the caller reads
        those with read_blocks (which names the bad block and tries the
        store's copy).  Nearby pieces share one pread (lsbd.segments.spans).
        On a page-cache miss nowait raises WouldBlock at once; else every
        span left is handed to the kernel at once, then the reads wait.
        sequential: the read continues the one before; a segment it finds
        dense (WHOLE_FROM pieces or more) is read ahead whole."""
        if self._unread:
            return {}   # a segment fetched whole waits for its first read: read_blocks
        bs = self.block_size
        # (seq, file, offsets of pieces far apart (apart()) or None, spans or None)
        held: list[tuple[int, OpenFile, list[int] | None, list[Span] | None]] = []
        out: dict[tuple[int, int], Bytes] = {}
        blocks = 0
        try:
            for seq, pieces in groups.items():
                if seq in self.held:
                    continue     # read from memory by read_blocks
                try:
                    f = self._acquire(seq)
                except CorruptionError:
                    continue     # an unreadable local file: read_blocks tries the store
                if f is not None:
                    offsets = apart(pieces, bs) if f.in_clear else None
                    held.append((seq, f, offsets,
                                 coalesce(pieces, bs) if offsets is None else None))
            if sequential and not nowait:
                for seq, f, _offsets, _spans in held:
                    if len(groups[seq]) >= WHOLE_FROM and self._first_whole(seq):
                        self._advise_whole(f)
            cached = True       # from the page cache alone, until a miss
            for k, (seq, f, offsets, spans) in enumerate(held):
                try:
                    idx = self._local_index(seq, f)
                    check = functools.partial(self._check, seq, idx)
                    if offsets is not None:
                        try:
                            datas = f.read_apart(bs, offsets, cached)
                        except WouldBlock:
                            if nowait:
                                raise       # nothing advised: see below
                            cached = self._advise(held[k:])
                            datas = f.read_apart(bs, offsets, False)
                        try:    # the whole file's blocks compared at once
                            good = list(map(idx.crc_at, offsets)) == list(map(crc32c_of, datas))
                        except KeyError:
                            good = False
                        if not good:
                            for off, data in zip(offsets, datas):
                                check(off, data, 1)     # names the bad block
                        out.update(zip(zip(repeat(seq), offsets), datas))
                        blocks += len(offsets)
                        continue
                    assert spans is not None
                    for i, (start, end, members) in enumerate(spans):
                        try:
                            data = f.read(end - start, start, cached)
                        except WouldBlock:
                            if nowait:
                                # Nothing advised here: the caller runs the read
                                # again where it may wait, which advises it all
                                # (doing it twice cost a sixth of an NBD server's
                                # cold sequential reads, docs/scale.md).
                                raise
                            will_need(f.fd, spans[i:], f.reader.base)
                            cached = self._advise(held[k + 1:])
                            data = f.read(end - start, start, False)
                        for off, piece in split_span(data, start, members, bs,
                                                     idx.crc_at, check):
                            out[seq, off] = piece
                    blocks += sum(n for _off, n in groups[seq])
                except CorruptionError:
                    for off, _n in groups[seq]:
                        out.pop((seq, off), None)
            if blocks:
                self.count_read(local=blocks * bs)
            return out
        finally:
            for _seq, f, _offsets, _spans in held:
                self._release(f)

    def _advise(self, held: list[tuple[int, OpenFile, list[int] | None, list[Span] | None]]
                ) -> bool:
        """A read of read_batch missed the page cache: have the kernel start
        on every piece left (held, from the one that missed) before it
        waits for any.  False: read_batch reads on without RWF_NOWAIT."""
        bs = self.block_size
        for _seq, f, offsets, spans in held:
            if spans is None:
                spans = [(off, off + bs, []) for off in offsets or ()]
            will_need(f.fd, spans, f.reader.base)
        return False

    def _advise_whole(self, f: OpenFile) -> None:
        """Have the kernel read all of file `f` ahead, on the advice thread
        (lsbd.segments.advice), which holds it until then."""
        with self._lock:
            f.users += 1
        if not self.whole_advice.put(f):
            self._release(f)     # closed: nothing more to read ahead

    def _first_whole(self, seq: int) -> bool:
        """Whether `seq` is read ahead whole for the first time (noted now)."""
        if seq in self._whole:
            return False
        with self._lock:
            if seq in self._whole:
                return False
            self._whole[seq] = None
            if len(self._whole) > _WHOLE_REMEMBERED:
                self._whole.popitem(last=False)
            return True

    def name_stored(self, groups: dict[int, list[tuple[int, int]]]) -> None:
        """Tell the store of every read read_stored(groups) will make (the
        segments' pieces; a sealed object whose layout is not known yet, by
        its end, where its layout is), so the disk reads them together:
        after random writes over a large volume a read finds a block or two
        in each of some 16 stored segments a MiB, each a wait on the disk
        when read one after another.  Nothing for a segment alone."""
        if len(groups) > 1:
            for seq, pieces in groups.items():
                self.will_need_stored(seq, pieces)

    def read_stored(self, groups: dict[int, list[tuple[int, int]]]
                    ) -> dict[tuple[int, int], Bytes]:
        """read_store_batch of each segment in `groups` (none of them
        local), named to the store first (name_stored): where the data of
        segments read without their index ends is read first, for all of
        them (each from the object's end, which holds a sealed object's
        layout), and their pieces named then."""
        if len(groups) > 1:
            for seq, pieces in groups.items():
                if seq in self._data_ends or not all(n == 1 for _off, n in pieces):
                    continue
                if self._cached_index(seq) is not None:
                    continue
                try:
                    self._data_end(seq, self.key_of(seq))
                except (CorruptionError, ObjectNotFound):
                    continue        # read_store_batch says what is wrong
                self.will_need_stored(seq, pieces)
        out: dict[tuple[int, int], Bytes] = {}
        for seq, pieces in groups.items():
            out.update(self.read_store_batch(seq, pieces))
        return out

    def will_need_stored(self, seq: int, pieces: list[tuple[int, int]]) -> None:
        """Have the store start reading what read_store_batch will read of
        these pieces: each span with the record header before it, and the
        segment's trailer if where its data ends is not known yet (a sealed
        object whose layout is not known is named by its end)."""
        ranges: list[tuple[int, int | None]] = []
        for start, end, _members in coalesce(pieces, self.block_size):
            first = max(0, start - ONE_BLOCK_HEAD)
            ranges.append((first, end - first))
        if seq not in self._data_ends:
            ranges.append((-TRAILER.size, None))
        self.store.will_need(self.key_of(seq), ranges)

    def read_store_batch(self, seq: int, pieces: list[tuple[int, int]]
                         ) -> dict[tuple[int, int], Bytes]:
        """The pieces (file offset, nblocks) of sealed segment `seq`, not
        local, from the store: nearby pieces in one ranged GET (a span, as
        read_batch reads a local file; a compressed object's frame is then
        opened once for all the pieces in it, not once per piece), all the
        spans in one call to the store (get_ranges), each
        piece checked against the store's index: {(seq, offset): bytes}.
        Empty if a span fails its check or is not there: the caller reads
        those pieces with read_blocks, which names the bad block."""
        if self._cached_index(seq) is None and all(n == 1 for _off, n in pieces):
            got = self._read_store_records(seq, pieces)
            if got is not None:
                return got
        key = self.key_of(seq)
        out: dict[tuple[int, int], Bytes] = {}
        try:
            idx = self._remote_index(seq)
            check = functools.partial(self._check, seq, idx)
            spans = coalesce(pieces, self.block_size)
            ranges = [(start, end - start) for start, end, _members in spans]
            for (start, _end, members), data in zip(spans, self.store.get_ranges(key, ranges)):
                for off, piece in split_span(data, start, members, self.block_size,
                                             idx.crc_at, check):
                    out[seq, off] = piece
        except (CorruptionError, ObjectNotFound):
            return {}
        self.count_read(store=sum(n for _off, n in pieces) * self.block_size)
        return out

    def _read_store_records(self, seq: int, pieces: list[tuple[int, int]]
                            ) -> dict[tuple[int, int], Bytes] | None:
        """read_store_batch's pieces of one block each, for a segment whose
        index is not in memory: each read with its record's header and CRC
        (ONE_BLOCK_HEAD bytes before it) and checked against them, so no
        index is loaded.  After random writes over a large volume a read
        finds a few blocks of each of thousands of segments, and loading a
        segment's index (8,192 records: 23 frames of a compressed object
        opened) for a block or two was most of what a piece cost
        (docs/scale.md).  The object's trailer is read once per segment
        (seq, and where its data ends), unless the cache noted where its
        data ends when it evicted the local copy.  None when a piece is not
        a whole one-block record (a block inside a longer record) or fails
        its check: the caller then reads them against the index."""
        key = self.key_of(seq)
        bs = self.block_size
        try:
            data_end = self._data_end(seq, key)
            out: dict[tuple[int, int], Bytes] = {}
            spans = coalesce(pieces, bs)
            ranges = []
            for start, end, _members in spans:
                first = start - ONE_BLOCK_HEAD
                if first < HEADER.size or end > data_end:
                    return None
                ranges.append((first, end - first))
            # all of the segment's spans in one call: one way through the
            # store's layers, not one each
            for (first, _length), (_start, _end, members), data in zip(
                    ranges, spans, self.store.get_ranges(key, ranges)):
                view = memoryview(data)
                for off, _n in members:
                    at = off - first - ONE_BLOCK_HEAD
                    if not one_block_record_holds(view, at, bs):
                        return None
                    out[seq, off] = view[at + ONE_BLOCK_HEAD:at + ONE_BLOCK_HEAD + bs]
            self.count_read(store=len(pieces) * bs)
            return out
        except (CorruptionError, ObjectNotFound):
            return None

    def _data_end(self, seq: int, key: str) -> int:
        """Where the data of stored segment `seq` ends (its index's offset):
        as noted when its local copy was evicted (LocalCopies._leave), or
        from the object's trailer, which must name it, kept for the next
        reads."""
        with self._lock:
            end = self._data_ends.get(seq)
            if end is not None:
                self._data_ends.move_to_end(seq)
                return end
        tail = self.store.get_tail(key, TRAILER.size)
        trailer = decode_trailer(tail, where=key)
        if trailer.seq != seq:
            raise CorruptionError(f"{key}: trailer names seq {trailer.seq}", key=key)
        with self._lock:
            self._data_ends[seq] = trailer.footer_offset
            while len(self._data_ends) > DATA_ENDS_REMEMBERED:
                self._data_ends.popitem(last=False)
        return trailer.footer_offset

    def _read_held(self, seq: int, offset: int, nblocks: int,
                   nowait: bool = False) -> bytes | None:
        """Blocks of a segment fetched whole, from its bytes held in memory,
        checked; None if they are not held."""
        data = self.held.get(seq)
        if data is None:
            return None
        where = self.key_of(seq)
        try:
            idx = self._index(seq, lambda: read_sealed_footer_from(
                lambda n, off: data[off:off + n], len(data), where=where))
            piece = data[offset:offset + nblocks * self.block_size]
            self._check(seq, idx, offset, piece, nblocks)
            self.count_read(local=len(piece))
            return piece
        except CorruptionError as e:
            if nowait:
                raise WouldBlock(f"segment {seq}: the fetched copy is damaged") from None
            return self._read_after_bad_fetch(seq, offset, nblocks, e)

    def _read_after_bad_fetch(self, seq: int, offset: int, nblocks: int,
                              error: CorruptionError) -> bytes:
        """The bytes of a fetch failed their check (damaged on the way, or in
        the store): they never stay in the cache; the blocks are read again
        with a ranged GET, checked against the store's own index."""
        self.forget(seq)      # and a fetch still writing it forgets it once written
        where = self.key_of(seq)
        log.warning("segment %s: a fetched copy failed its check (%s): reading the "
                    "store's again", where, error)
        try:
            idx = self._remote_index(seq)
            data = self.store.get(where, offset, nblocks * self.block_size)
            self._check(seq, idx, offset, data, nblocks)
        except (CorruptionError, ObjectNotFound):
            raise error from None
        self.count_read(store=len(data))
        return data

    def _first_read(self, seq: int) -> bool:
        with self._lock:
            if seq in self._unread:
                self._unread.discard(seq)
                return True
            return False

    def _streaming(self, seq: int) -> None:
        call = self.on_stream
        if call is not None and self.fetcher.enabled:
            try:
                call(seq)
            except Exception as e:  # noqa: BLE001 - only a prefetch: the read goes on
                log.info("prefetch after segment %s failed: %s", self.key_of(seq), e)

    def _read_after_bad_local_copy(self, seq: int, offset: int, nblocks: int,
                                   local_error: CorruptionError) -> bytes:
        with self._lock:
            uploaded = seq in self._cached  # only uploaded segments are in the LRU
        if not uploaded:
            raise local_error
        try:
            _trailer, records = fetch_index_by_key(self.store, self.key_of(seq), seq)
            idx = SegmentIndex(records, self.block_size)
            data = self.store.get(self.key_of(seq), offset, nblocks * self.block_size)
            self._check(seq, idx, offset, data, nblocks)
        except (CorruptionError, ObjectNotFound):
            raise local_error from None
        log.warning("segment %s: the local copy is damaged, the store's is good: dropping "
                    "the local copy", self.key_of(seq))
        self.forget(seq)
        self._keep_index(seq, idx)
        self.count_read(store=len(data))
        return data

    def _check(self, seq: int, idx: SegmentIndex, offset: int, data, nblocks: int) -> None:
        check_blocks(idx, data, offset, nblocks, self.block_size, where=self.key_of(seq))
