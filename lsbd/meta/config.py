"""A volume's settings, kept in the store as volumes/<name>/config.json."""

from __future__ import annotations

import json
import time
import uuid

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
#: Blocks in a volume at most: the map's keys are 6 bytes (lsbd.map.encoding),
#: which name 128 PiB of 512-byte blocks (and 1 EiB of 4 KiB ones).
MAX_BLOCKS = 1 << 48
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


def check_block_size(block_size: int, spelled: str | None = None) -> int:
    """block_size, if it is one lsbd takes (`spelled`: as the user wrote it)."""
    if block_size < 512 or block_size > 65536 or block_size & (block_size - 1):
        raise UserError(f"bad block size {spelled or block_size!r}: a power of two from 512 "
                        "to 64K")
    return block_size


def create_volume(store: Store, name: str, size: int, *, block_size: int = DEFAULT_BLOCK_SIZE,
                  **settings) -> VolumeConfig:
    names.check_volume_name(name)
    check_block_size(block_size)
    check_volume_size(size, block_size)
    if settings.get("flush_mode", "journal") not in FLUSH_MODES:
        raise UserError(f"bad flush mode {settings['flush_mode']!r}: journal or store")
    config = VolumeConfig(name=name, volume_id=uuid.uuid4().hex, size=size, block_size=block_size,
                          **settings)
    try:
        store.put(names.config_key(name), config.to_json(), exclusive=True)
    except ObjectExists:
        raise VolumeExists(f"volume {name!r} already exists in {store.url}") from None
    return config


def check_volume_size(size: int, block_size: int) -> int:
    """`size`, if a volume of `block_size` blocks can have it."""
    if size <= 0 or size % block_size:
        raise UserError(f"bad size {size}: a positive multiple of the block size ({block_size})")
    if too_many_blocks(size, block_size):
        raise UserError(too_many_blocks(size, block_size))
    return size


def too_many_blocks(size: int, block_size: int) -> str:
    """Why a volume of `size` bytes cannot be made of `block_size` blocks
    (more than MAX_BLOCKS of them), or '' if it can."""
    if size // block_size <= MAX_BLOCKS:
        return ""
    return (f"bad size {size}: more than 2^48 blocks of {block_size} bytes (at most "
            f"{MAX_BLOCKS * block_size >> 40}T; a larger block size allows more)")


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
