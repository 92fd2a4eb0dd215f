"""`lsbd verify`: read segments from the store and check every checksum,
reporting each problem by segment and offset."""

from __future__ import annotations

from typing import Callable

from lsbd import names
from lsbd.meta.config import Lineage, VolumeConfig
from lsbd.format.segment import (
    DATA,
    TRAILER,
    block_crcs,
    decode_footer,
    decode_header,
    decode_trailer,
)
from lsbd.errors import CorruptionError, ObjectNotFound


def verify_segment(data: bytes, config: VolumeConfig, seq: int) -> list[str]:
    """Every problem in one segment object's bytes."""
    key = names.segment_key(config.name, seq)
    problems = []
    try:
        header = decode_header(data, where=key)
        if header.volume_id != config.volume_id_bytes or header.seq != seq:
            problems.append(f"{key}: header names another volume or seq")
        trailer = decode_trailer(data, where=key)
        footer_end = trailer.footer_offset + trailer.footer_length
        if footer_end + TRAILER.size != len(data):
            raise CorruptionError(f"{key}: trailer does not match the object size", key=key)
        records = decode_footer(data[trailer.footer_offset:footer_end], trailer, where=key)
    except CorruptionError as e:
        return problems + [str(e)]
    bs = config.block_size
    for r in records:
        if r.kind != DATA:
            continue
        chunk = data[r.data_offset:r.data_offset + r.nblocks * bs]
        if len(chunk) != r.nblocks * bs:
            problems.append(f"{key}: record at offset {r.data_offset} runs past the end")
            continue
        if block_crcs(chunk, bs) != r.crcs:
            got = block_crcs(chunk, bs)
            for i in range(r.nblocks):
                if got[4 * i:4 * i + 4] != r.crcs[4 * i:4 * i + 4]:
                    problems.append(f"{key}: checksum mismatch at offset {r.data_offset + i * bs} "
                                    f"(block {r.lba + i})")
    return problems


def verify_segments(store, lineage: Lineage, seqs: list[int], *,
                    progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Every problem in the segments `seqs`, each read whole from the store."""
    problems = []
    for i, seq in enumerate(seqs):
        config = lineage.owner(seq)
        key = names.segment_key(config.name, seq)
        try:
            data = store.get(key)
        except ObjectNotFound:
            problems.append(f"{key}: missing from the store but the map refers to it")
        except CorruptionError as e:
            # A sealed object that does not open (a frame fails to
            # authenticate, a cut tail): name it and go on to the next.
            problems.append(str(e) if key in str(e) else f"{key}: {e}")
        else:
            problems.extend(verify_segment(data, config, seq))
        if progress:
            progress(i + 1, len(seqs))
    return problems
