"""How a size is read (`--size`, `resize`, `--segment-size`, `--cache-limit`,
`--readahead`, bench flags): binary units, and no unit that reads as decimal
to some tools and binary to others."""

from __future__ import annotations

import pytest

from lsbd.errors import UserError
from lsbd.sizes import parse_size

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


def test_the_benches_give_fio_a_size_in_bytes(monkeypatch):
    """fio reads 1GiB as 10^9 bytes (its kb_base=1024 default) and 1GB as
    2^30: a bench's --size goes to fio in bytes, as lsbd reads it."""
    import pathlib
    import subprocess

    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[2] / "bench"))
    import benchlib

    argv: list[str] = []

    def fake_sh(*args, **kwargs):
        argv.extend(args)
        out = ('{"jobs": [{"error": 0, "usr_cpu": 1, "sys_cpu": 1, '
               '"read": {"runtime": 1000, "bw": 1024, "iops": 1}}]}')
        return subprocess.CompletedProcess(args, 0, stdout=out, stderr="")

    monkeypatch.setattr(benchlib, "sh", fake_sh)
    benchlib.fio("/dev/null", "read", "4k", size="1GiB")
    assert f"--size={GiB}" in argv
    with pytest.raises(UserError):
        benchlib.fio("/dev/null", "read", "4k", size="1GB")
