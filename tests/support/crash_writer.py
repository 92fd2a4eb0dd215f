"""The victim of the crash tests (tests/crash/test_crash.py): opens a volume and
writes to it until it is killed.

    python tests/support/crash_writer.py STORE_URL VOLUME CACHE_ROOT SEED [FLUSH_MODE [FIRST]]

The operations are a pure function of the seed (`operations`), so the checker
regenerates them instead of being told their data.  Every block a write
stores names the operation and the block ((op, lba) repeated, see `content`),
so a block read back tells which operation it came from.  FIRST (default 1)
is the number of the first operation: successive runs on one volume use
disjoint numbers.

On stdout (line-buffered) it reports:
    R            the volume is open; writing starts
    W <i>        operation i returned (acknowledged)
    F <i>        a flush that started after operation i returned
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterator
from typing import NamedTuple

BS = 4096
DATA, ZERO, TRIM = "data", "zero", "trim"
HOT_BLOCKS = 2048          # most writes land in the first 8 MiB, so they overlap a lot
MAX_BLOCKS = 64            # 256 KiB: a write as large as a whole segment


def singles() -> bool:
    """One-block writes only, the map's staged segments merged every few
    segments in ranges of a few blocks (the merge test of tests/crash/test_crash.py);
    `covers`: with a longer write or a trim now and then, whose segment
    covers the staged writes in its blocks."""
    return os.environ.get("LSBD_CRASH_SINGLES") in ("1", "covers")


def _longer(rng: random.Random) -> bool:
    return os.environ.get("LSBD_CRASH_SINGLES") == "covers" and rng.random() < 0.01


class Piece(NamedTuple):
    kind: str
    lba: int
    nblocks: int


class Op(NamedTuple):
    index: int               # 1-based
    pieces: tuple            # one piece, or several that commit as one transaction
    flush_after: bool


def is_zero_block(index: int, lba: int) -> bool:
    """Some blocks of data writes are all zeros (the engine stores them as holes)."""
    return (index * 7919 + lba * 104729) % 13 == 0


def content(index: int, lba: int) -> bytes:
    if is_zero_block(index, lba):
        return bytes(BS)
    return (index.to_bytes(8, "little") + lba.to_bytes(8, "little")) * (BS // 16)


def data_for(index: int, piece: Piece) -> bytes:
    return b"".join(content(index, piece.lba + i) for i in range(piece.nblocks))


def _piece(rng: random.Random, volume_blocks: int) -> Piece:
    if singles():
        if _longer(rng):
            n = rng.randint(2, MAX_BLOCKS)
            return Piece(DATA if rng.random() < 0.7 else TRIM, rng.randrange(HOT_BLOCKS - n), n)
        return Piece(DATA, rng.randrange(HOT_BLOCKS), 1)
    r = rng.random()
    if r < 0.35:
        n = rng.randint(1, 4)
    elif r < 0.7:
        n = rng.randint(5, 32)
    else:
        n = rng.randint(33, MAX_BLOCKS)
    zone = HOT_BLOCKS if rng.random() < 0.9 else volume_blocks
    lba = rng.randrange(0, zone - n + 1)
    k = rng.random()
    kind = DATA if k < 0.84 else (ZERO if k < 0.92 else TRIM)
    return Piece(kind, lba, n)


def operations(seed: int, volume_blocks: int, first: int = 1) -> Iterator[Op]:
    rng = random.Random(seed)
    index = first - 1
    while True:
        index += 1
        count = rng.choice((2, 3)) if rng.random() < 0.12 else 1
        pieces = tuple(_piece(rng, volume_blocks) for _ in range(count))
        yield Op(index, pieces, rng.random() < 0.15)


def apply_op(vol, op: Op) -> None:
    if len(op.pieces) == 1:
        _do(vol, op.index, op.pieces[0])
        return
    with vol.transaction() as txn:
        for piece in op.pieces:
            _do(txn, op.index, piece)


def _do(target, index: int, piece: Piece) -> None:
    if piece.kind == DATA:
        target.write(piece.lba * BS, data_for(index, piece))
    elif piece.kind == ZERO:
        target.write_zeroes(piece.lba * BS, piece.nblocks * BS)
    else:
        target.trim(piece.lba * BS, piece.nblocks * BS)


def main(argv: list[str]) -> int:
    store_url, volume, cache_root, seed = argv[1], argv[2], argv[3], int(argv[4])
    flush_mode = argv[5] if len(argv) > 5 and argv[5] != "-" else None
    first = int(argv[6]) if len(argv) > 6 else 1
    sys.stdout.reconfigure(line_buffering=True)

    from lsbd.engine.volume import Volume
    from lsbd.store import open_store

    if singles():
        from lsbd.map import merge

        for knob, value in (("STAGE_SEGMENTS", 3), ("MERGE_RANGE", 16), ("MERGE_STEPS", 1)):
            # Set where the merge reads it: a name set on another module
            # would leave the merge at its defaults without a word.
            assert hasattr(merge, knob), f"lsbd.map.merge has no {knob}"
            setattr(merge, knob, value)

    secret = None
    if os.environ.get("LSBD_TEST_PASSPHRASE"):      # an encrypted volume
        from lsbd.crypto.keyring import PASSPHRASE, Secret

        key = Secret(PASSPHRASE, os.environ["LSBD_TEST_PASSPHRASE"].encode())
        secret = lambda _volume: key   # noqa: E731
    store = open_store(store_url, secret=secret)
    vol = Volume.open(store, volume, cache_root=cache_root, flush_mode=flush_mode)
    assert vol.block_size == BS
    print("R")
    for op in operations(seed, vol.size // BS, first):
        apply_op(vol, op)
        print(f"W {op.index}")
        if op.flush_after:
            vol.flush()
            print(f"F {op.index}")
    return 0  # never reached: the parent kills us


if __name__ == "__main__":
    sys.exit(main(sys.argv))
