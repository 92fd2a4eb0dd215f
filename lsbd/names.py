"""Every object key lsbd uses is built and parsed here, and nowhere else.

    volumes/<volume>/config.json                 settings (small, rewritable)
    volumes/<volume>/lease                       the writer lease
    volumes/<volume>/seg/<seq as 16 hex>         a sealed segment
    volumes/<volume>/ckpt/<seq>/manifest         a checkpoint (written last)
    volumes/<volume>/ckpt/<seq>/part-<n>         its extent parts
    volumes/<volume>/snap/<name>                 a snapshot (a name bound to a seq)
    volumes/<volume>/clones/<clone>              a clone of this volume exists (pins its history)
    volumes/<volume>/keys/<generation as 16 hex> the keys of an encrypted volume (newest wins)
    volumes/<volume>/summary                     the map summary (a hint for a cold open)
"""

from __future__ import annotations

import hashlib
import os
import re

VOLUMES = "volumes/"
_VOLUME_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_volume_name(name: str) -> str:
    from lsbd.errors import UserError

    if not _VOLUME_NAME.match(name or ""):
        raise UserError(f"bad volume name {name!r}: use letters, digits, '.', '_' and '-' "
                        "(at most 128, not starting with a punctuation mark)")
    return name


def volume_prefix(volume: str) -> str:
    return f"{VOLUMES}{volume}/"


def config_key(volume: str) -> str:
    return f"{VOLUMES}{volume}/config.json"


def lease_key(volume: str) -> str:
    return f"{VOLUMES}{volume}/lease"


def segment_prefix(volume: str) -> str:
    return f"{VOLUMES}{volume}/seg/"


def segment_key(volume: str, seq: int) -> str:
    return f"{VOLUMES}{volume}/seg/{seq:016x}"


def keys_prefix(volume: str) -> str:
    return f"{VOLUMES}{volume}/keys/"


def keys_key(volume: str, generation: int) -> str:
    return f"{VOLUMES}{volume}/keys/{generation:016x}"


def parse_keys_key(key: str) -> int | None:
    """The generation of a keys object's key, or None for anything else."""
    tail = key.rsplit("/", 1)[-1]
    return int(tail, 16) if re.fullmatch(r"[0-9a-f]{16}", tail) else None


def checkpoint_prefix(volume: str) -> str:
    return f"{VOLUMES}{volume}/ckpt/"


def checkpoint_dir(volume: str, seq: int) -> str:
    """The prefix of every object of one checkpoint."""
    return f"{VOLUMES}{volume}/ckpt/{seq:016x}/"


def checkpoint_manifest_key(volume: str, seq: int) -> str:
    return f"{checkpoint_dir(volume, seq)}manifest"


def checkpoint_part_key(volume: str, seq: int, part: int) -> str:
    return f"{checkpoint_dir(volume, seq)}part-{part:06d}"


def summary_key(volume: str) -> str:
    return f"{VOLUMES}{volume}/summary"


def snapshot_prefix(volume: str) -> str:
    return f"{VOLUMES}{volume}/snap/"


def snapshot_key(volume: str, name: str) -> str:
    return f"{VOLUMES}{volume}/snap/{name}"


def clone_prefix(volume: str) -> str:
    return f"{VOLUMES}{volume}/clones/"


def clone_ref_key(volume: str, clone: str) -> str:
    return f"{VOLUMES}{volume}/clones/{clone}"


def parse_seq(key: str) -> int | None:
    """The seq in a segment key, or None if the key is not one."""
    tail = key.rsplit("/", 1)[-1]
    if len(tail) == 16:
        try:
            return int(tail, 16)
        except ValueError:
            return None
    return None


def parse_checkpoint_seq(key: str) -> int | None:
    """The seq of a checkpoint manifest key, or None."""
    parts = key.split("/")
    if len(parts) >= 2 and parts[-1] == "manifest":
        return parse_seq(parts[-2])
    return None


def volume_from_key(key: str) -> str | None:
    if key.startswith(VOLUMES) and key.endswith("/config.json"):
        return key[len(VOLUMES):-len("/config.json")]
    return None


def cache_dir_for(cache_root: str, store, volume: str) -> str:
    """One folder per (store, volume): the same name in two stores never mixes."""
    tag = hashlib.sha256(store.url.encode()).hexdigest()[:12]
    return os.path.join(cache_root, f"{volume}-{tag}")


_SEALED = re.compile(r"^volumes/([^/]+)/(?:seg/[0-9a-f]{16}|ckpt/[0-9a-f]{16}/(?:part-\d+|manifest)"
                     r"|summary)$")


def sealed_volume(key: str) -> str | None:
    """The volume of a segment, checkpoint or map summary object (what a
    compressed or encrypted volume stores sealed), or None for every other key."""
    m = _SEALED.match(key)
    return m.group(1) if m else None
