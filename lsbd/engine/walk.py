"""A whole volume's allocation, a chunk at a time: what a copy of the
volume (a restore into a new volume, an export to an image) reads, and
what it leaves as holes."""

from __future__ import annotations

from typing import Iterator

from lsbd.engine.api import Allocation
from lsbd.engine.reader import ReadFace


def allocation_chunks(volume: ReadFace, chunk: int) -> Iterator[tuple[int, int, list[Allocation]]]:
    """(offset, length, runs) of each `chunk` bytes of `volume` (a Volume or
    a past state), from its start to its size: the runs of allocated data
    and holes that cover it.  One chunk's runs at a time, so that the work
    and memory of a step stay bounded however large the volume."""
    offset = 0
    while offset < volume.size:
        length = min(chunk, volume.size - offset)
        yield offset, length, volume.allocation(offset, length)
        offset += length
