"""The keys of an encrypted volume: an envelope, as one JSON object.

    data keys    random 32-byte keys; new segments and checkpoints use the
                 current one, older objects name the key they were written
                 with (by id).  `key rotate` adds one and makes it current.
    ring key     a random 32-byte key that seals the list of data keys.
    slots        each one wraps the ring key under a key derived from a
                 passphrase (Argon2id) or a key file (HKDF-SHA256).  Adding,
                 changing or removing a passphrase rewraps; the data keys and
                 everything written with them stay as they are.

docs/format.md has the JSON layout.  Nothing here does I/O: keystore.py
reads and writes these objects.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import attrs

from lsbd.crypto.aead import (CIPHER_NAME, KEY_SIZE, NONCE_SIZE, Argon2Params,
                              AuthenticationFailed, Cipher, argon2id, hkdf, random_bytes)
from lsbd.errors import CorruptionError, UserError

FORMAT = 1
PASSPHRASE = "passphrase"
KEYFILE = "keyfile"
SALT_SIZE = 16
MIN_KEYFILE = 16
DEFAULT_PARAMS = Argon2Params()


class WrongSecret(UserError, PermissionError):
    """No slot opens with the passphrase or key file given."""


class KeysDamaged(CorruptionError):
    """The keys object does not parse, or its key list fails authentication."""


@attrs.frozen
class Secret:
    """A passphrase or the content of a key file.  repr() never shows it."""

    kind: str
    value: bytes = attrs.field(repr=False)

    def __attrs_post_init__(self) -> None:
        if self.kind not in (PASSPHRASE, KEYFILE):
            raise ValueError(self.kind)
        if not self.value:
            raise UserError(f"an empty {self.kind} is not allowed")
        if self.kind == KEYFILE and len(self.value) < MIN_KEYFILE:
            raise UserError(f"a key file must hold at least {MIN_KEYFILE} bytes")


@attrs.frozen
class DataKey:
    id: int
    key: bytes = attrs.field(repr=False)
    created_ns: int


@attrs.frozen
class Slot:
    number: int
    kind: str
    kdf: dict
    nonce: bytes
    wrapped: bytes = attrs.field(repr=False)
    created_ns: int


@attrs.frozen
class Keyring:
    """An unlocked keys object."""

    volume_id: bytes
    generation: int
    ring_key: bytes = attrs.field(repr=False)
    keys: tuple[DataKey, ...]
    current: int
    slots: tuple[Slot, ...]
    opened_with: int = 0      # the slot that unlocked it (0: just made)

    def data_key(self, key_id: int) -> bytes:
        for k in self.keys:
            if k.id == key_id:
                return k.key
        raise KeysDamaged(f"data key {key_id} is not in the volume's keys "
                          "(retired, or the keys object is older than the data)")

    def current_key(self) -> DataKey:
        return next(k for k in self.keys if k.id == self.current)


# --- slots ---------------------------------------------------------------------------


def _slot_key(secret: Secret, kdf: dict) -> bytes:
    salt = bytes.fromhex(kdf["salt"])
    if kdf["name"] == "argon2id":
        params = Argon2Params(memory_kib=kdf["memory_kib"], iterations=kdf["iterations"],
                              lanes=kdf["lanes"])
        return argon2id(secret.value, salt, params)
    if kdf["name"] == "hkdf-sha256":
        return hkdf(secret.value, salt=salt, info=b"lsbd key file")
    raise KeysDamaged(f"unknown key derivation {kdf['name']!r}")


def _slot_aad(volume_id: bytes, number: int) -> bytes:
    return b"lsbd slot" + volume_id + number.to_bytes(4, "little")


def _new_slot(volume_id: bytes, number: int, ring_key: bytes, secret: Secret, *,
              params: Argon2Params, rand: Callable[[int], bytes], now: int) -> Slot:
    salt = rand(SALT_SIZE).hex()
    if secret.kind == PASSPHRASE:
        kdf = {"name": "argon2id", "salt": salt, "memory_kib": params.memory_kib,
               "iterations": params.iterations, "lanes": params.lanes}
    else:
        kdf = {"name": "hkdf-sha256", "salt": salt}
    nonce = rand(NONCE_SIZE)
    wrapped = Cipher(_slot_key(secret, kdf)).seal(nonce, ring_key, _slot_aad(volume_id, number))
    return Slot(number, secret.kind, kdf, nonce, wrapped, now)


# --- making and changing -----------------------------------------------------------------


def new_keyring(volume_id: bytes, secret: Secret, *, params: Argon2Params = DEFAULT_PARAMS,
                rand: Callable[[int], bytes] = random_bytes,
                now: Callable[[], int] = time.time_ns) -> Keyring:
    t = now()
    ring_key = rand(KEY_SIZE)
    first = DataKey(1, rand(KEY_SIZE), t)
    slot = _new_slot(volume_id, 1, ring_key, secret, params=params, rand=rand, now=t)
    return Keyring(volume_id, 1, ring_key, (first,), 1, (slot,), 1)


def add_slot(ring: Keyring, secret: Secret, *, params: Argon2Params = DEFAULT_PARAMS,
             rand: Callable[[int], bytes] = random_bytes) -> Keyring:
    number = max(s.number for s in ring.slots) + 1
    slot = _new_slot(ring.volume_id, number, ring.ring_key, secret, params=params, rand=rand,
                     now=time.time_ns())
    return attrs.evolve(ring, generation=ring.generation + 1, slots=ring.slots + (slot,))


def remove_slot(ring: Keyring, number: int) -> Keyring:
    if not any(s.number == number for s in ring.slots):
        raise UserError(f"no key slot {number}")
    if len(ring.slots) == 1:
        raise UserError("that is the last key slot: the volume could no longer be opened")
    return attrs.evolve(ring, generation=ring.generation + 1,
                        slots=tuple(s for s in ring.slots if s.number != number))


def change_slot(ring: Keyring, number: int, secret: Secret, *,
                params: Argon2Params = DEFAULT_PARAMS,
                rand: Callable[[int], bytes] = random_bytes) -> Keyring:
    """Slot `number` now opens with `secret` (and no longer with the old one)."""
    if not any(s.number == number for s in ring.slots):
        raise UserError(f"no key slot {number}")
    slot = _new_slot(ring.volume_id, number, ring.ring_key, secret, params=params, rand=rand,
                     now=time.time_ns())
    return attrs.evolve(ring, generation=ring.generation + 1,
                        slots=tuple(slot if s.number == number else s for s in ring.slots))


def rotate(ring: Keyring, *, rand: Callable[[int], bytes] = random_bytes) -> Keyring:
    """A new data key for everything written from now on."""
    key = DataKey(max(k.id for k in ring.keys) + 1, rand(KEY_SIZE), time.time_ns())
    return attrs.evolve(ring, generation=ring.generation + 1, keys=ring.keys + (key,),
                        current=key.id)


def retire(ring: Keyring, key_id: int) -> Keyring:
    """Drop a data key that nothing needs any more (the caller checks that)."""
    if key_id == ring.current:
        raise UserError(f"data key {key_id} is the current one: rotate first")
    if not any(k.id == key_id for k in ring.keys):
        raise UserError(f"no data key {key_id}")
    return attrs.evolve(ring, generation=ring.generation + 1,
                        keys=tuple(k for k in ring.keys if k.id != key_id))


# --- bytes -------------------------------------------------------------------------------


def _ring_aad(volume_id: bytes, generation: int) -> bytes:
    return b"lsbd keyring" + volume_id + generation.to_bytes(8, "little")


def encode(ring: Keyring, *, rand: Callable[[int], bytes] = random_bytes) -> bytes:
    inner = json.dumps({"current": ring.current,
                        "keys": [{"id": k.id, "key": k.key.hex(), "created_ns": k.created_ns}
                                 for k in ring.keys]}, sort_keys=True).encode()
    nonce = rand(NONCE_SIZE)
    sealed = Cipher(ring.ring_key).seal(nonce, inner, _ring_aad(ring.volume_id, ring.generation))
    doc = {"format": FORMAT, "cipher": CIPHER_NAME, "volume_id": ring.volume_id.hex(),
           "generation": ring.generation,
           "slots": [{"slot": s.number, "kind": s.kind, "kdf": s.kdf, "nonce": s.nonce.hex(),
                      "wrapped": s.wrapped.hex(), "created_ns": s.created_ns}
                     for s in ring.slots],
           "keyring": {"nonce": nonce.hex(), "sealed": sealed.hex()}}
    return json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n"


@attrs.frozen
class Locked:
    """A parsed keys object before any secret opened it: what anyone can see."""

    volume_id: bytes
    generation: int
    slots: tuple[Slot, ...]
    nonce: bytes
    sealed: bytes = attrs.field(repr=False)


def decode(data: bytes, *, where: str = "keys") -> Locked:
    try:
        doc = json.loads(data)
        if doc.get("format") != FORMAT or doc.get("cipher") != CIPHER_NAME:
            raise KeysDamaged(f"{where}: unknown keys format {doc.get('format')!r} "
                              f"or cipher {doc.get('cipher')!r}")
        slots = tuple(Slot(int(s["slot"]), s["kind"], dict(s["kdf"]), bytes.fromhex(s["nonce"]),
                           bytes.fromhex(s["wrapped"]), int(s["created_ns"]))
                      for s in doc["slots"])
        return Locked(bytes.fromhex(doc["volume_id"]), int(doc["generation"]), slots,
                      bytes.fromhex(doc["keyring"]["nonce"]),
                      bytes.fromhex(doc["keyring"]["sealed"]))
    except KeysDamaged:
        raise
    except (ValueError, KeyError, TypeError, AttributeError):
        raise KeysDamaged(f"{where}: the keys object does not parse") from None


def unlock(locked: Locked, secret: Secret, *, where: str = "keys") -> Keyring:
    """Open the keys with a passphrase or key file; WrongSecret if no slot takes it."""
    for slot in locked.slots:
        if slot.kind != secret.kind:
            continue
        try:
            ring_key = Cipher(_slot_key(secret, slot.kdf)).open(
                slot.nonce, slot.wrapped, _slot_aad(locked.volume_id, slot.number))
        except AuthenticationFailed:
            continue
        try:
            inner = json.loads(Cipher(ring_key).open(
                locked.nonce, locked.sealed, _ring_aad(locked.volume_id, locked.generation)))
            keys = tuple(DataKey(int(k["id"]), bytes.fromhex(k["key"]), int(k["created_ns"]))
                         for k in inner["keys"])
            current = int(inner["current"])
        except AuthenticationFailed:
            raise KeysDamaged(f"{where}: the key list fails authentication") from None
        except (ValueError, KeyError, TypeError):
            raise KeysDamaged(f"{where}: the key list does not parse") from None
        return Keyring(locked.volume_id, locked.generation, ring_key, keys, current,
                       locked.slots, slot.number)
    what = "passphrase" if secret.kind == PASSPHRASE else "key file"
    raise WrongSecret(f"wrong {what}: it opens none of the volume's key slots")
