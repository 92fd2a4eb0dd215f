"""A volume's settings, kept in the store as volumes/<name>/config.json."""

from __future__ import annotations

import json
import re
import time
import uuid
from fractions import Fraction

import attrs

from lsbd import names
from lsbd.errors import (
    CorruptionError,
    ObjectExists,
    ObjectNotFound,
    UserError,
    VolumeExists,
    VolumeNotFound,
)
from lsbd.store import Store

DEFAULT_BLOCK_SIZE = 4096
MAX_SIZE = 1 << 60          # bytes: beyond any device, and far inside the formats' 64 bits
DEFAULT_SEGMENT_SIZE = 32 * 1024 * 1024
FLUSH_MODES = ("journal", "store")


@attrs.define(kw_only=True)
class VolumeConfig:
    name: str
    volume_id: str                      # uuid4 hex: ties every object to this volume
    size: int                           # size at creation; resizes are in the log
    block_size: int = DEFAULT_BLOCK_SIZE
    created: float = attrs.field(factory=time.time)
    flush_mode: str = "journal"
    segment_size: int = DEFAULT_SEGMENT_SIZE
    seal_interval: float = 5.0          # seconds an open segment may wait before sealing
    checkpoint_segments: int = 64       # checkpoint after this many new segments ...
    checkpoint_interval: float = 600.0  # ... or this many seconds, whichever first
    retain_seconds: float = 86400.0
    # Ranges that reads find scattered are written again in order, in the
    # background (lsbd/engine/readdefrag.py); the old copies cost space
    # until compaction may reclaim them.
    read_defrag: bool = True
    # A clone: {"volume": name, "volume_id": id, "seq": N}.  Seqs up to N are
    # the parent's segments (shared, never copied); the clone's own start at N+1.
    parent: dict | None = None
    format: int = 1
    # Segments and checkpoints stored sealed (lsbd/crypto): "zstd:LEVEL" or
    # "none", and "aes-256-gcm" or None.  Volumes made before these settings
    # existed have neither and are stored plain.
    compression: str = "none"
    encryption: str | None = None

    @property
    def sealed(self) -> bool:
        return self.compression != "none" or self.encryption is not None

    @property
    def base_seq(self) -> int:
        return int(self.parent["seq"]) if self.parent else 0

    @property
    def volume_id_bytes(self) -> bytes:
        return uuid.UUID(hex=self.volume_id).bytes

    def to_json(self) -> bytes:
        return json.dumps(attrs.asdict(self), indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes, *, where: str) -> "VolumeConfig":
        try:
            data = json.loads(raw)
            known = {a.name for a in attrs.fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in known})
        except (ValueError, TypeError) as e:
            raise CorruptionError(f"{where}: unreadable volume config ({e})", key=where) from e


class Lineage:
    """A volume and the volumes it was cloned from, newest first: which
    volume owns the segment with a given seq."""

    def __init__(self, chain: list[VolumeConfig]):
        self.chain = chain

    @property
    def config(self) -> VolumeConfig:
        return self.chain[0]

    @classmethod
    def load(cls, store: Store, config: VolumeConfig) -> "Lineage":
        chain = [config]
        while chain[-1].parent:
            parent = chain[-1].parent
            try:
                cfg = load_config(store, parent["volume"])
            except VolumeNotFound:
                raise CorruptionError(f"volume {chain[-1].name} is a clone of "
                                      f"{parent['volume']!r}, which is gone") from None
            if cfg.volume_id != parent["volume_id"]:
                raise CorruptionError(f"volume {chain[-1].name} is a clone of a volume "
                                      f"{parent['volume']!r} that was deleted and recreated")
            chain.append(cfg)
        return cls(chain)

    def owner(self, seq: int) -> VolumeConfig:
        for cfg in self.chain:
            if seq > cfg.base_seq:
                return cfg
        return self.chain[-1]

    def segment_key(self, seq: int) -> str:
        return names.segment_key(self.owner(seq).name, seq)


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


def create_volume(store: Store, name: str, size: int, *, block_size: int = DEFAULT_BLOCK_SIZE,
                  **settings) -> VolumeConfig:
    names.check_volume_name(name)
    if block_size < 512 or block_size > 65536 or block_size & (block_size - 1):
        raise UserError(f"bad block size {block_size}: a power of two from 512 to 64K")
    if size <= 0 or size % block_size:
        raise UserError(f"bad size {size}: a positive multiple of the block size ({block_size})")
    if settings.get("flush_mode", "journal") not in FLUSH_MODES:
        raise UserError(f"bad flush mode {settings['flush_mode']!r}: journal or store")
    config = VolumeConfig(name=name, volume_id=uuid.uuid4().hex, size=size, block_size=block_size,
                          **settings)
    try:
        store.put(names.config_key(name), config.to_json(), exclusive=True)
    except ObjectExists:
        raise VolumeExists(f"volume {name!r} already exists in {store.url}") from None
    return config


def load_config(store: Store, name: str) -> VolumeConfig:
    names.check_volume_name(name)
    key = names.config_key(name)
    try:
        raw = store.get(key)
    except ObjectNotFound:
        raise VolumeNotFound(f"no volume {name!r} in {store.url}") from None
    return VolumeConfig.from_json(raw, where=key)


def save_config(store: Store, config: VolumeConfig) -> None:
    store.put(names.config_key(config.name), config.to_json())


def list_volumes(store: Store) -> list[str]:
    out = []
    for info in store.list(names.VOLUMES):
        vol = names.volume_from_key(info.key)
        if vol is not None and "/" not in vol:
            out.append(vol)
    return out
