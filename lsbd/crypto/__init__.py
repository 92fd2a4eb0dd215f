"""Compression, encryption and keys, as pure functions over bytes.

    aead.py      the one module that imports `cryptography`: AES-256-GCM,
                 HKDF-SHA256, Argon2id
    compress.py  the one module that imports `zstandard`
    frames.py    the frame: a compressed, then authenticated-encrypted piece
                 of an object, bound to its place (volume, object, position)
    keyring.py   the keys object: data keys wrapped by passphrases and key files
    keystore.py  keys objects in the store (numbered generations)

Nothing here knows segments or checkpoints; docs/format.md has the byte
tables and docs/security.md the threat model.
"""
