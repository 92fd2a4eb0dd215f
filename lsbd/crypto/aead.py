"""The cryptographic primitives lsbd uses, and the only module that imports
`cryptography`.

AES-256-GCM is the AEAD: with AES-NI it seals a 4 KiB frame in about 1.5 us
and opens it in 1 us here, against 5 us for ChaCha20-Poly1305 (the figures
come from bench/crypto_bench.py).  Every object (segment, checkpoint part)
gets its own key, derived with HKDF-SHA256 from the volume's data key and a
random 16-byte object id, and every frame a random 12-byte nonce, so a key
and nonce pair never repeats, even when a crash makes a seq be written twice,
and no key ever comes near GCM's limit of 2^32 random nonces.  Passphrases
go through Argon2id (RFC 9106's second recommended setting: 64 MiB, 3
passes, 4 lanes).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers import Cipher as _BlockCipher
    from cryptography.hazmat.primitives.ciphers import algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
CIPHER_NAME = "aes-256-gcm"

_loaded = False


def _load() -> None:
    """Import `cryptography` (a 14 MB library) on first use: a volume that is
    only compressed, and every plain one, never loads it (it cost 40-80 ms
    of CPU, more from a cold page cache, at every open of a volume)."""
    global _loaded, InvalidTag, hashes, _BlockCipher, algorithms, modes, AESGCM, Argon2id, HKDF
    if _loaded:
        return
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers import Cipher as _BlockCipher
    from cryptography.hazmat.primitives.ciphers import algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    _loaded = True


class AuthenticationFailed(Exception):
    """A ciphertext, its tag or its associated data was changed (or the key is wrong)."""


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


class Cipher:
    """AES-256-GCM under one key."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes):
        if len(key) != KEY_SIZE:
            raise ValueError("an AES-256-GCM key is 32 bytes")
        _load()
        self._aead = AESGCM(key)

    def seal(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        """Ciphertext followed by the 16-byte tag."""
        return self._aead.encrypt(nonce, plaintext, aad)

    def seal_into(self, nonce: bytes, plaintext, aad: bytes, out) -> None:
        """seal() into `out`, a writable buffer of exactly len(plaintext) + 16 bytes."""
        self._aead.encrypt_into(nonce, plaintext, aad, out)

    def open(self, nonce: bytes, sealed: bytes | memoryview, aad: bytes) -> bytes:
        try:
            return self._aead.decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise AuthenticationFailed() from None

    def tag(self, nonce: bytes, data) -> bytes:
        """AES-GMAC: the 16-byte tag of `data` (AES-GCM with no plaintext,
        `data` the associated data).  1.3 us for 16 KiB here, about half
        of sealing it."""
        return self._aead.encrypt(nonce, b"", data)

    def check(self, nonce: bytes, tag: bytes | memoryview, data) -> bool:
        """Whether `tag` is tag(nonce, data)."""
        try:
            self._aead.decrypt(nonce, tag, data)
            return True
        except InvalidTag:
            return False


class Stream:
    """AES-256-CTR under one key, addressed by byte offset: the bytes at
    offset X are XORed with keystream block X // 16 (the counter block is
    that number, big-endian), so any range can be encrypted or decrypted
    on its own.  Unauthenticated: see lsbd.crypto.localfile for why, and
    where that is safe.  A key must never cover two different plaintexts
    at one offset."""

    __slots__ = ("_aes", "_idle")

    def __init__(self, key: bytes):
        if len(key) != KEY_SIZE:
            raise ValueError("an AES-256 key is 32 bytes")
        _load()
        self._aes = algorithms.AES(key)
        # Contexts not in use.  Setting one up costs 3-15 us, five times
        # and more the XOR of 4 KiB; moving one to another offset
        # (reset_nonce) costs almost nothing.  One per concurrent reader:
        # a context is never shared by two threads at once.
        self._idle: list = []

    def at(self, offset: int):
        """A context of its own whose update(data) XORs data lying at
        `offset` on, and then what follows it (an appender keeps one)."""
        ctx = _BlockCipher(self._aes, modes.CTR(bytes(16))).encryptor()
        seek(ctx, offset)
        return ctx

    def xor_in_place(self, offset: int, buf: bytearray, n: int) -> None:
        """XOR buf[:n], lying at `offset`, with the keystream, in place (buf
        holds at least 15 bytes more, which update_into asks for): a 1 MiB
        read decrypted without a second buffer."""
        idle = self._idle
        try:
            ctx = idle.pop()
        except IndexError:
            ctx = _BlockCipher(self._aes, modes.CTR(bytes(16))).encryptor()
        seek(ctx, offset)
        ctx.update_into(memoryview(buf)[:n], buf)
        if len(idle) < _IDLE_CONTEXTS:
            idle.append(ctx)

    def xor_one(self, offset: int, data) -> bytes:
        """xor() of one buffer: a 4 KiB read's path, kept short (1.15 us
        against 1.45 through xor(), of which the cipher takes 0.7)."""
        idle = self._idle
        try:
            ctx = idle.pop()
        except IndexError:
            ctx = _BlockCipher(self._aes, modes.CTR(bytes(16))).encryptor()
        ctx.reset_nonce((offset >> 4).to_bytes(16, "big"))
        if offset & 15:
            ctx.update(_ZEROS[offset & 15])
        out = ctx.update(data)
        if len(idle) < _IDLE_CONTEXTS:
            idle.append(ctx)
        return out

    def xor(self, offset: int, parts) -> bytes:
        """The parts (bytes-like, contiguous from `offset`) XORed with the
        keystream, as one bytes object.  Safe from any thread."""
        idle = self._idle
        try:
            ctx = idle.pop()
        except IndexError:
            ctx = _BlockCipher(self._aes, modes.CTR(bytes(16))).encryptor()
        seek(ctx, offset)
        if len(parts) == 1:
            out = ctx.update(parts[0])
        else:
            out = b"".join([ctx.update(p) for p in parts])
        if len(idle) < _IDLE_CONTEXTS:
            idle.append(ctx)
        return out


_IDLE_CONTEXTS = 16


_ZEROS = tuple(bytes(n) for n in range(16))


def seek(ctx, offset: int) -> None:
    """Put a CTR context at byte `offset` of its keystream."""
    ctx.reset_nonce((offset >> 4).to_bytes(16, "big"))
    if offset & 15:
        ctx.update(_ZEROS[offset & 15])


def hkdf(key: bytes, *, salt: bytes, info: bytes, length: int = KEY_SIZE) -> bytes:
    _load()
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(key)


@attrs.frozen(kw_only=True)
class Argon2Params:
    memory_kib: int = 64 * 1024
    iterations: int = 3
    lanes: int = 4


def argon2id(secret: bytes, salt: bytes, params: Argon2Params) -> bytes:
    _load()
    return Argon2id(salt=salt, length=KEY_SIZE, iterations=params.iterations,
                    lanes=params.lanes, memory_cost=params.memory_kib).derive(secret)
