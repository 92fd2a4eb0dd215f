"""The length of a segment in its local file, which is not always the file's
size: a sealing by link (lsbd.crypto.linked) appends frame tags past the
segment to an encrypted volume's local file, in place."""

from __future__ import annotations

from lsbd.crypto.localfile import LocalReader
from lsbd.errors import CorruptionError
from lsbd.format.segment import TRAILER, decode_trailer


def local_segment_size(r: LocalReader) -> int:
    """The segment's length in its local file (r: a lsbd.crypto.localfile
    LocalReader): the file's size, short of what a sealing by link has
    appended past the segment (lsbd.crypto.linked), or is appending: the
    append first grows the file to its final size in one step, so a file
    that does not end with the segment's trailer and is the size of a
    linked object whose body ends with it is one being (or cut while
    being) tagged."""
    n = r.size()
    if r.cipher is None:
        return n
    # Here, not at the top: a plain volume's process never loads zstandard
    # and cryptography (tests/unit/test_crypto_import.py).
    from lsbd.crypto import linked
    from lsbd.crypto.compress import FRAME_SIZE

    tail = linked.complete_tail(r.fd)
    if tail is not None and tail.object_id == r.cipher.file_id:
        return tail.plain_length
    if _ends_with_trailer(r.pread, n):
        return n
    body = linked.body_length_for(r.base + n, FRAME_SIZE)
    if body is not None and _ends_with_trailer(r.pread, body):
        return body
    return n


def _ends_with_trailer(pread, n: int) -> bool:
    """Whether a segment's trailer ends at `n` and points at its index."""
    if n < TRAILER.size:
        return False
    try:
        t = decode_trailer(pread(TRAILER.size, n - TRAILER.size))
    except CorruptionError:
        return False
    return t.footer_offset + t.footer_length + TRAILER.size == n
