"""Sizes as a user writes them: '20G', '512MiB', '1.5T', '4096'.

A module of its own, with nothing heavy to import: the command line's
parser reads every size flag with it."""

from __future__ import annotations

import re
from fractions import Fraction

from lsbd.errors import UserError

MAX_SIZE = 1 << 60          # bytes: beyond any device, and far inside the formats' 64 bits

#: Size units, all binary: K, Ki and KiB are 1024 bytes.  KB, MB, GB ... are
#: refused: truncate reads GB as 10^9 bytes, fio as 2^30, and qemu-img and
#: nbdkit refuse it, so whichever lsbd chose, some user would be misled.
SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[A-Za-z]*)")


def parse_size(text: str | int) -> int:
    """'10G', '10GiB', '512M', '1.5T', '4096' -> bytes (binary units); '10GB'
    is refused with a message naming its binary spelling."""
    if isinstance(text, int):
        return text
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        why = "negative" if text.strip().startswith("-") else \
            "use a number with K, M, G or T (binary: 1K is 1024 bytes), e.g. 20G"
        raise UserError(f"bad size {text!r}: {why}")
    number, unit = match["number"], match["unit"].upper()
    prefix, rest = unit[:1], unit[1:]
    if unit in ("", "B"):
        multiplier = 1
    elif prefix in SIZE_UNITS and rest in ("", "I", "IB"):
        multiplier = SIZE_UNITS[prefix]
    elif prefix in SIZE_UNITS and rest == "B":
        power = list(SIZE_UNITS).index(prefix) + 1
        raise UserError(f"bad size {text!r}: {match['unit']} means 10^{3 * power} bytes to "
                        f"some tools and 2^{10 * power} to others; write {number}{prefix} or "
                        f"{number}{prefix}iB for {number} x 2^{10 * power} bytes, or the "
                        f"number of bytes")
    else:
        raise UserError(f"bad size {text!r}: unknown unit {match['unit']!r}; use K, M, G or T "
                        f"(binary: 1K is 1024 bytes)")
    value = Fraction(number) * multiplier
    if value > MAX_SIZE:
        raise UserError(f"bad size {text!r}: larger than {MAX_SIZE >> 50}P")
    if value.denominator != 1:
        raise UserError(f"bad size {text!r}: not a whole number of bytes")
    return int(value)
