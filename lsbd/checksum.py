"""CRC32C (Castagnoli), the checksum of every stored extent and header.

The hot path uses the `crc32c` package (hardware accelerated, tens of GB/s);
crcmod's C extension is the reference implementation the tests compare it
against, and the fallback where `crc32c` cannot be imported.

Stored checksums are *masked* (as LevelDB does): a CRC computed over bytes
that themselves contain CRCs is weak, and masking also makes an all-zero
region fail its check instead of matching a zero CRC by accident."""

from __future__ import annotations

import crcmod.predefined

_reference = crcmod.predefined.mkCrcFun("crc-32c")

try:
    from crc32c import crc32c as _fast
except ImportError:  # pragma: no cover - exercised only without the package
    _fast = None  # type: ignore[assignment]

MASK_DELTA = _MASK_DELTA = 0xA282EAD8


def crc32c_reference(data: bytes, crc: int = 0) -> int:
    return _reference(data, crc)


def crc32c(data: bytes | memoryview, crc: int = 0) -> int:
    if _fast is not None:
        return _fast(data, crc)
    return _reference(bytes(data), crc)


#: crc32c(data) of one buffer, without the wrapper's call (for hot loops).
crc32c_of = _fast if _fast is not None else (lambda data: _reference(bytes(data)))
#: crc32c(data, crc), going on from `crc`, without the wrapper's call.
crc32c_on = _fast if _fast is not None else (lambda data, crc: _reference(bytes(data), crc))


def mask(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def unmask(masked: int) -> int:
    rot = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


def masked_crc(data: bytes | memoryview) -> int:
    return mask(crc32c(data))
