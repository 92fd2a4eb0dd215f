"""How a size is read (`--size`, `resize`, `--segment-size`, `--cache-limit`,
`--readahead`, bench flags): binary units, and no unit that reads as decimal
to some tools and binary to others."""

from __future__ import annotations

import pytest

from lsbd.errors import UserError
from lsbd.meta.config import parse_size

GiB = 1 << 30


@pytest.mark.parametrize("text,size", [
    ("4096", 4096), ("4096B", 4096), ("20G", 20 * GiB), ("20g", 20 * GiB),
    ("20GiB", 20 * GiB), ("20gib", 20 * GiB), ("20Gi", 20 * GiB), (" 20 G ", 20 * GiB),
    ("1.5T", 3 << 39), (".5M", 1 << 19), ("1.5K", 1536), ("2P", 2 << 50), (4096, 4096),
])
def test_sizes_are_read_in_binary_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text,needles", [
    ("20GB", ["10^9", "2^30", "20G or 20GiB"]),
    ("20gb", ["20G or 20GiB"]),
    ("1kB", ["10^3", "1K or 1KiB"]),
    ("512MB", ["10^6", "512M or 512MiB"]),
    ("3TB", ["10^12", "3T or 3TiB"]),
    ("-1G", ["negative"]),
    ("12X", ["unknown unit 'X'"]),
    ("20GiBs", ["unknown unit"]),
    ("0.3K", ["not a whole number of bytes"]),
    ("2000P", ["larger than"]),
    ("1e3", ["K, M, G or T"]),
    ("nan", ["K, M, G or T"]),
    ("", ["K, M, G or T"]),
])
def test_a_size_that_could_mislead_is_refused_with_what_to_write(text, needles):
    with pytest.raises(UserError) as refused:
        parse_size(text)
    for needle in needles:
        assert needle in str(refused.value)
