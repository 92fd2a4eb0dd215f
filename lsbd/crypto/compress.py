"""Per-frame compression, and the only module that imports `zstandard`.

A frame is stored compressed only when that saves at least 1/8 of it (the
rule ZFS and borg use): below that, the cost of decompressing on every read
buys too little.  The codec is recorded in each frame, so a volume can
change codec or level without rewriting what it holds.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import zstandard

# Codec numbers, written in every frame; never reused.
RAW = 0
ZSTD = 1

CODEC_NAMES = {RAW: "none", ZSTD: "zstd"}
#: Level 1: on 16 KiB frames of real files it stores about 1% more than
#: level 3 and compresses about twice as fast (bench/crypto_bench.py).
DEFAULT_LEVEL = 1
#: Plain bytes per frame: within about 3% of the ratio of 64 KiB frames,
#: while a random 4 KiB read opens and decompresses 16 KiB, not 64 or more
#: (bench/crypto_bench.py and docs/format.md have the measurements).
FRAME_SIZE = 16 * 1024
#: Threads that compress the frames of one object together, in zstd's C code
#: without the GIL: 85 -> 187 MiB/s for 32 MiB in 16 KiB frames on 2 cores.
#: The sealing process uses one: it must leave the other cores to the
#: threads serving requests.
THREADS = max(1, min(4, os.cpu_count() or 1))
MAX_LEVEL = 19
#: compress_many() tries every this-many-th chunk first (see there).
SAMPLE_EVERY = 8
#: ... and compresses the rest only if the sample saved at least 1/this of
#: its bytes.
SAMPLE_WORTH = 16
#: ... at zstd's fast level -3: on fio's buffers the sample costs a quarter
#: of what level 1 costs, and on the ext4 image's trees, binaries and
#: random data the same batches pass as at level 1 (docs/security.md).
SAMPLE_LEVEL = -3


class DecompressionFailed(Exception):
    """Stored bytes that do not decompress to the recorded length."""


class Compressor:
    """zstd at one level; one compression context per thread (they are not
    thread-safe, and creating one per frame costs more than compressing 4 KiB)."""

    def __init__(self, level: int = DEFAULT_LEVEL, *, threads: int = THREADS):
        if not 1 <= level <= MAX_LEVEL:
            raise ValueError(f"zstd level must be 1..{MAX_LEVEL}")
        self.level = level
        self.threads = threads
        self._local = threading.local()

    def _ctx(self) -> zstandard.ZstdCompressor:
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            ctx = self._local.ctx = zstandard.ZstdCompressor(level=self.level,
                                                             write_content_size=False)
        return ctx

    def _sample(self, data: bytes | bytearray | memoryview
                ) -> tuple[int, bytes | bytearray | memoryview]:
        """compress() at SAMPLE_LEVEL: what compress_many() tries first."""
        ctx = getattr(self._local, "sampler", None)
        if ctx is None:
            ctx = self._local.sampler = zstandard.ZstdCompressor(level=SAMPLE_LEVEL,
                                                                 write_content_size=False)
        return _choose(data, ctx.compress(data))

    def compress(self, data: bytes | bytearray | memoryview
                 ) -> tuple[int, bytes | bytearray | memoryview]:
        """(codec, stored bytes): ZSTD when it saves at least 1/8, else RAW."""
        return _choose(data, self._ctx().compress(data))

    def compress_many(self, chunks: Sequence[bytes | bytearray | memoryview]
                      ) -> list[tuple[int, bytes | bytearray | memoryview]]:
        """compress() of each chunk, the chunks compressed in parallel, or
        kept raw when a sample says compressing them does not pay.  Every
        SAMPLE_EVERY-th chunk is tried first, at zstd's fast SAMPLE_LEVEL;
        unless those save at least 1/SAMPLE_WORTH of their bytes together,
        the others are kept raw without trying them (zstd spends about as
        long failing on random data as succeeding on text), and a sampled
        chunk that passed the 1/8 rule keeps its bytes of the fast level.
        That finds data that does not compress (media, archives, encrypted
        files) and data that barely does: fio's buffers save about 11%, so
        that a few frames in five pass the 1/8 rule, and compressing every
        frame for them took the sealing process 5-10 times the CPU of
        sealing raw frames.  The sample stops as soon as what it saved
        passes (text: after its first chunk), and then every chunk is
        compressed at the compressor's own level."""
        n = len(chunks)
        if n < 2 * SAMPLE_EVERY:
            return self._many(chunks)
        sample = range(0, n, SAMPLE_EVERY)
        enough = sum(len(chunks[i]) for i in sample)      # saved * SAMPLE_WORTH
        out: list = [None] * n
        saved = 0
        for i in sample:
            codec, stored = out[i] = self._sample(chunks[i])
            if codec != RAW:
                saved += len(chunks[i]) - len(stored)
                if saved * SAMPLE_WORTH >= enough:
                    return self._many(chunks)
        return [packed if packed is not None else (RAW, chunks[i])
                for i, packed in enumerate(out)]

    def any_compressed(self, chunks: Sequence[bytes | bytearray | memoryview]) -> bool:
        """Whether compress_many(chunks) stores any chunk compressed, told
        from its sample alone (the sealing process's choice between sealing
        a segment and sealing it by link), stopping at the first sampled
        chunk that passes the 1/8 rule.  compress_many() then compresses
        every chunk at the compressor's level, which in practice passes
        where the fast level did; if it ever did not, the segment is sealed
        into frames of its own rather than by link, which stores the same."""
        if len(chunks) < 2 * SAMPLE_EVERY:
            return any(self.compress(c)[0] != RAW for c in chunks)
        return any(self._sample(chunks[i])[0] != RAW for i in range(0, len(chunks), SAMPLE_EVERY))

    def _many(self, chunks: Sequence) -> list[tuple[int, bytes | bytearray | memoryview]]:
        if len(chunks) < 4 or self.threads == 1:
            return [self.compress(c) for c in chunks]
        packed = self._ctx().multi_compress_to_buffer(list(chunks), threads=self.threads)
        return [_choose(c, packed[i].tobytes()) for i, c in enumerate(chunks)]


def _choose(data, packed: bytes) -> tuple[int, bytes | bytearray | memoryview]:
    """Raw frames keep the caller's buffer: they are sealed from it, not copied."""
    if len(packed) <= len(data) - len(data) // 8:
        return ZSTD, packed
    return RAW, data


_decompressors = threading.local()


def decompress(codec: int, stored: bytes | memoryview, plain_length: int) -> bytes:
    if codec == RAW:
        if len(stored) != plain_length:
            raise DecompressionFailed("raw frame of the wrong length")
        return bytes(stored)
    if codec != ZSTD:
        raise DecompressionFailed(f"unknown codec {codec}")
    ctx = getattr(_decompressors, "ctx", None)
    if ctx is None:
        ctx = _decompressors.ctx = zstandard.ZstdDecompressor()
    try:
        out = ctx.decompress(stored, max_output_size=plain_length)
    except zstandard.ZstdError as e:
        raise DecompressionFailed(str(e)) from None
    if len(out) != plain_length:
        raise DecompressionFailed("frame decompressed to the wrong length")
    return out


def parse_setting(text: str) -> tuple[str, int]:
    """`zstd`, `zstd:LEVEL` or `none` -> (codec name, level)."""
    name, _, level = text.partition(":")
    if name == "none" and not level:
        return "none", 0
    if name == "zstd":
        try:
            value = int(level) if level else DEFAULT_LEVEL
        except ValueError:
            value = -1
        if 1 <= value <= MAX_LEVEL:
            return "zstd", value
    raise ValueError(f"compression must be zstd, zstd:LEVEL (1..{MAX_LEVEL}) or none, "
                     f"not {text!r}")
