"""Compression, encryption and keys, as pure functions over bytes.

    aead.py      the one module that imports `cryptography`: AES-256-GCM,
                 HKDF-SHA256, Argon2id
    compress.py  the one module that imports `zstandard`
    frames.py    the frame: a compressed, then authenticated-encrypted piece
                 of an object, bound to its place (volume, object, position)
    keyring.py   the keys object: data keys wrapped by passphrases and key files
    keystore.py  keys objects in the store (numbered generations)

    objects.py   the sealed object: frames, an index frame and a tail
    localfile.py segment files in an encrypted volume's cache dir: a clear
                 header, then AES-256-CTR at each byte's segment offset
    store.py     a store wrapper that seals the segments and checkpoints of
                 the volumes whose settings ask for it

This package sits with the store layer: it imports only lsbd.store.base,
lsbd.names, lsbd.checksum and lsbd.errors, and lsbd.store.open puts its
wrapper around every store it opens, as it does the retry wrapper.  Nothing
here knows the segment or checkpoint formats; docs/format.md has the byte
tables and docs/security.md the threat model.
"""
