"""The fixed newstyle handshake: greeting, option haggling, and the choice of
an export.  It runs over any stream with `recv_exact(n)` and `send(data)`
(see server.SocketStream) and returns the negotiated Session, or None when
the client ended the session with NBD_OPT_ABORT.

Supported options: EXPORT_NAME, ABORT, LIST, INFO, GO (with NBD_INFO_EXPORT,
NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE),
STRUCTURED_REPLY, LIST_META_CONTEXT and SET_META_CONTEXT (`base:allocation`),
and STARTTLS when the server has TLS credentials (after which the stream is
the TLS session).  When TLS is required, every option before STARTTLS other
than ABORT is answered with NBD_REP_ERR_TLS_REQD (EXPORT_NAME, which cannot
carry an error, ends the session).  Every other option, EXTENDED_HEADERS
included, is answered with NBD_REP_ERR_UNSUP and negotiation continues.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Protocol

import attrs

from lsbd.engine.api import BlockDevice
from lsbd_nbd import protocol as p
from lsbd_nbd.errors import ProtocolError

#: A client that sends more options than this without choosing an export is
#: disconnected (the options loop is otherwise unbounded).
MAX_OPTIONS = 1024

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


class Stream(Protocol):
    def recv_exact(self, n: int) -> bytes: ...
    def send(self, data: bytes) -> None: ...


@attrs.frozen(kw_only=True)
class Session:
    """What the handshake agreed on; the transmission phase works from this."""

    export_name: str
    device: BlockDevice
    size: int
    flags: int                  # transmission flags as sent to the client
    structured: bool            # NBD_OPT_STRUCTURED_REPLY was acknowledged
    base_allocation: bool       # base:allocation selected for this export


def transmission_flags(device: BlockDevice, *, structured: bool) -> int:
    """The transmission flags for `device`: only what the server really does.

    FLUSH covers every write completed on any connection (the engine is
    shared), hence CAN_MULTI_CONN.  WRITE_ZEROES stores no data, so a zero
    request is always faster than the equivalent write: FAST_ZERO is honest.
    """
    flags = p.FLAG_HAS_FLAGS | p.FLAG_SEND_FLUSH | p.FLAG_CAN_MULTI_CONN
    if device.read_only:
        flags |= p.FLAG_READ_ONLY
    else:
        flags |= (p.FLAG_SEND_FUA | p.FLAG_SEND_TRIM | p.FLAG_SEND_WRITE_ZEROES
                  | p.FLAG_SEND_FAST_ZERO)
    if structured:
        flags |= p.FLAG_SEND_DF
    if callable(getattr(device, "prefetch", None)):
        flags |= p.FLAG_SEND_CACHE     # a real prefetch into the local cache
    return flags


class _OptionError(Exception):
    """An option that gets an error reply; negotiation continues."""

    def __init__(self, reply: int, message: str):
        super().__init__(message)
        self.reply = reply
        self.message = message


def _decode_name(raw: bytes) -> str:
    if len(raw) > p.MAX_STRING:
        raise _OptionError(p.REP_ERR_TOO_BIG, "name longer than 4096 bytes")
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _OptionError(p.REP_ERR_INVALID, "name is not valid UTF-8") from None
    if "\0" in name:
        raise _OptionError(p.REP_ERR_INVALID, "name contains NUL")
    return name


class _Reader:
    """Bounds-checked parsing of option data; any overrun is ERR_INVALID."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise _OptionError(p.REP_ERR_INVALID, "option data is too short")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u16(self) -> int:
        return _U16.unpack(self.take(2))[0]

    def u32(self) -> int:
        return _U32.unpack(self.take(4))[0]

    def string(self) -> str:
        return _decode_name(self.take(self.u32()))

    def end(self) -> None:
        if self.pos != len(self.data):
            raise _OptionError(p.REP_ERR_INVALID, "trailing bytes in option data")


class Handshake:
    """One client's option haggling.  `exports` is read at every lookup, so
    exports added to the mapping later are visible to new options.

    `starttls`, when given, runs the TLS handshake after NBD_OPT_STARTTLS was
    acknowledged and returns the stream to go on with; `tls_required` makes
    every other option before it fail with NBD_REP_ERR_TLS_REQD."""

    def __init__(self, stream: Stream, exports: Mapping[str, BlockDevice],
                 default_export: Callable[[], str | None],
                 shutting_down: Callable[[], bool] = lambda: False, *,
                 starttls: Callable[[], Stream] | None = None,
                 tls_required: bool = False):
        assert starttls is not None or not tls_required
        self.stream = stream
        self.starttls = starttls
        self.tls_required = tls_required
        self.in_tls = False
        self.exports = exports
        self.default_export = default_export
        self.shutting_down = shutting_down
        self.structured = False
        self.meta_export: str | None = None   # export base:allocation was selected for

    # --- replies ------------------------------------------------------------

    def _reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self.stream.send(p.OPTION_REPLY.pack(p.REPLY_MAGIC, option, reply, len(data)) + data)

    # --- exports -------------------------------------------------------------

    def _resolve(self, name: str) -> tuple[str, BlockDevice]:
        canonical = name or (self.default_export() or "")
        device = self.exports.get(canonical)
        if device is None:
            what = f"no export named {name!r}" if name else "no default export"
            raise _OptionError(p.REP_ERR_UNKNOWN, what)
        return canonical, device

    # --- the loop --------------------------------------------------------------

    def run(self) -> Session | None:
        stream = self.stream
        stream.send(p.SERVER_GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, p.SERVER_HANDSHAKE_FLAGS))
        (client_flags,) = p.CLIENT_FLAGS.unpack(stream.recv_exact(4))
        if client_flags & ~p.KNOWN_CLIENT_FLAGS:
            raise ProtocolError(f"unknown client flags {client_flags:#x}")
        fixed = bool(client_flags & p.FLAG_C_FIXED_NEWSTYLE)
        no_zeroes = bool(client_flags & p.FLAG_C_NO_ZEROES)

        for _ in range(MAX_OPTIONS):
            stream = self.stream            # the TLS session after STARTTLS
            magic, option, length = p.OPTION_HEADER.unpack(stream.recv_exact(16))
            if magic != p.IHAVEOPT:
                raise ProtocolError(f"bad option magic {magic:#x}")
            if length > p.MAX_OPTION_LENGTH:
                raise ProtocolError(f"option {option} carries {length} bytes of data")
            data = stream.recv_exact(length) if length else b""

            if option == p.OPT_EXPORT_NAME:
                if self.tls_required and not self.in_tls:
                    raise ProtocolError("NBD_OPT_EXPORT_NAME before TLS, which is required")
                return self._export_name(data, no_zeroes)
            if not fixed:
                # Old (non-fixed) newstyle clients cannot parse option replies.
                raise ProtocolError(f"option {option} from a non-fixed-newstyle client")
            if option == p.OPT_ABORT:
                self._reply(option, p.REP_ACK)
                return None
            try:
                if self.shutting_down():
                    raise _OptionError(p.REP_ERR_SHUTDOWN, "server is shutting down")
                if option == p.OPT_STARTTLS and self.starttls is not None:
                    self._starttls(data)
                    continue
                if self.tls_required and not self.in_tls:
                    raise _OptionError(p.REP_ERR_TLS_REQD, "TLS is required: use NBD_OPT_STARTTLS")
                session = self._option(option, data)
            except _OptionError as e:
                self._reply(option, e.reply, e.message.encode())
                continue
            if session is not None:
                return session
        raise ProtocolError("too many options")

    def _starttls(self, data: bytes) -> None:
        if data:
            raise _OptionError(p.REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        if self.in_tls:
            raise _OptionError(p.REP_ERR_INVALID, "TLS is already on")
        assert self.starttls is not None
        self._reply(p.OPT_STARTTLS, p.REP_ACK)
        self.stream = self.starttls()       # a failed TLS handshake ends the session
        self.in_tls = True
        # Whatever was negotiated in the clear does not carry over (the spec).
        self.structured = False
        self.meta_export = None

    def _option(self, option: int, data: bytes) -> Session | None:
        if option in (p.OPT_INFO, p.OPT_GO):
            return self._info(option, data)
        if option == p.OPT_LIST:
            if data:
                raise _OptionError(p.REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
            for name in list(self.exports):
                raw = name.encode()
                self._reply(option, p.REP_SERVER, _U32.pack(len(raw)) + raw)
            self._reply(option, p.REP_ACK)
            return None
        if option == p.OPT_STRUCTURED_REPLY:
            if data:
                raise _OptionError(p.REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            if self.structured:
                raise _OptionError(p.REP_ERR_INVALID, "structured replies already negotiated")
            self.structured = True
            self._reply(option, p.REP_ACK)
            return None
        if option in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
            self._meta_context(option, data)
            return None
        raise _OptionError(p.REP_ERR_UNSUP, f"option {option} is not supported")

    def _export_name(self, data: bytes, no_zeroes: bool) -> Session:
        # NBD_OPT_EXPORT_NAME cannot be answered with an error: an unknown
        # export ends the session.
        try:
            name, device = self._resolve(_decode_name(data))
        except _OptionError as e:
            raise ProtocolError(f"NBD_OPT_EXPORT_NAME: {e.message}") from None
        session = self._session(name, device)
        reply = p.EXPORT_NAME_REPLY.pack(session.size, session.flags)
        self.stream.send(reply if no_zeroes else reply + p.ZERO_PAD)
        return session

    def _session(self, name: str, device: BlockDevice) -> Session:
        return Session(export_name=name, device=device, size=device.size,
                       flags=transmission_flags(device, structured=self.structured),
                       structured=self.structured,
                       base_allocation=self.meta_export is not None and self.meta_export == name)

    def _info(self, option: int, data: bytes) -> Session | None:
        reader = _Reader(data)
        requested_name = reader.string()
        count = reader.u16()
        requests = {reader.u16() for _ in range(count)}
        reader.end()
        name, device = self._resolve(requested_name)
        session = self._session(name, device)
        info = p.INFO_EXPORT_PAYLOAD.pack(p.INFO_EXPORT, session.size, session.flags)
        self._reply(option, p.REP_INFO, info)
        # Block sizes are sent whether asked for or not: the values are the
        # protocol defaults a client may assume anyway, plus the preferred size.
        preferred = max(device.block_size, 512)
        self._reply(option, p.REP_INFO, p.INFO_BLOCK_SIZE_PAYLOAD.pack(
            p.INFO_BLOCK_SIZE, p.MIN_BLOCK, preferred, p.MAX_BLOCK))
        if p.INFO_NAME in requests:
            self._reply(option, p.REP_INFO, _U16.pack(p.INFO_NAME) + name.encode())
        if p.INFO_DESCRIPTION in requests:
            text = f"lsbd volume {name}" + (" (read-only)" if device.read_only else "")
            self._reply(option, p.REP_INFO, _U16.pack(p.INFO_DESCRIPTION) + text.encode())
        self._reply(option, p.REP_ACK)
        return session if option == p.OPT_GO else None

    def _meta_context(self, option: int, data: bytes) -> None:
        setting = option == p.OPT_SET_META_CONTEXT
        if setting:
            self.meta_export = None   # replaced even when this option fails
        if not self.structured:
            raise _OptionError(p.REP_ERR_INVALID, "negotiate structured replies first")
        reader = _Reader(data)
        requested_name = reader.string()
        queries = [reader.string() for _ in range(reader.u32())]
        reader.end()
        name, _device = self._resolve(requested_name)
        for query in queries:
            if ":" not in query:
                raise _OptionError(p.REP_ERR_INVALID, f"query {query!r} has no namespace")
        if setting:
            selected = p.META_BASE_ALLOCATION in queries
        else:
            # Listing: no query lists everything; "base:" is the namespace wildcard.
            selected = (not queries or p.META_BASE_ALLOCATION in queries or "base:" in queries)
        if selected:
            context_id = p.META_BASE_ALLOCATION_ID if setting else 0
            self._reply(option, p.REP_META_CONTEXT,
                        _U32.pack(context_id) + p.META_BASE_ALLOCATION.encode())
            if setting:
                self.meta_export = name
        self._reply(option, p.REP_ACK)
