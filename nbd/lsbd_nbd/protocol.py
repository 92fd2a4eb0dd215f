"""NBD wire constants and struct layouts (fixed newstyle protocol).

Everything here comes from the protocol specification, doc/proto.md of
NetworkBlockDevice/nbd; names follow it with the NBD_ prefix dropped.  All
integers on the wire are big-endian.  Nothing in this module does I/O.
"""

from __future__ import annotations

import struct

# --- handshake -------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054          # "IHAVEOPT", also the option request magic
REPLY_MAGIC = 0x0003E889045565A9       # option reply magic

# handshake flags (server) and client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1
SERVER_HANDSHAKE_FLAGS = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
KNOWN_CLIENT_FLAGS = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

# transmission flags
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4   # withdrawn; never implemented
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# option replies
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9

# NBD_REP_INFO types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# metadata contexts: the only one this server knows, and the id it gets
META_BASE_ALLOCATION = "base:allocation"
META_BASE_ALLOCATION_ID = 1
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# --- transmission ----------------------------------------------------------

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# commands
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_RESIZE = 8

CMD_NAMES = {
    CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM", CMD_CACHE: "CACHE", CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS", CMD_RESIZE: "RESIZE",
}

# command flags
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# structured reply flags and chunk types
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

# error values (the protocol's own numbering, which happens to match Linux errno)
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# --- limits this server advertises ----------------------------------------

MIN_BLOCK = 1                          # any byte offset and length is accepted
MAX_BLOCK = 32 * 1024 * 1024           # largest READ / WRITE payload
MAX_OPTION_LENGTH = 64 * 1024          # option data beyond this: hard disconnect
MAX_STRING = 4096                      # export names, queries (spec limit)

# --- struct layouts --------------------------------------------------------

# S: NBDMAGIC, IHAVEOPT, handshake flags
SERVER_GREETING = struct.Struct(">QQH")
# C: client flags
CLIENT_FLAGS = struct.Struct(">I")
# C: IHAVEOPT, option, length
OPTION_HEADER = struct.Struct(">QII")
# S: reply magic, option, reply type, length
OPTION_REPLY = struct.Struct(">QIII")
# S: reply to NBD_OPT_EXPORT_NAME: size, transmission flags (+124 zero bytes)
EXPORT_NAME_REPLY = struct.Struct(">QH")
# NBD_INFO_EXPORT payload: type, size, transmission flags
INFO_EXPORT_PAYLOAD = struct.Struct(">HQH")
# NBD_INFO_BLOCK_SIZE payload: type, minimum, preferred, maximum
INFO_BLOCK_SIZE_PAYLOAD = struct.Struct(">HIII")

# C: magic, command flags, type, handle, offset, length
REQUEST = struct.Struct(">IHHQQI")
# S: magic, error, handle
SIMPLE_REPLY = struct.Struct(">IIQ")
# S: magic, flags, type, handle, length
STRUCTURED_REPLY = struct.Struct(">IHHQI")
# S: structured reply header followed by the offset of an OFFSET_DATA chunk
STRUCTURED_READ_REPLY = struct.Struct(">IHHQIQ")
# S: structured ERROR chunk: header, error, message length
STRUCTURED_ERROR_REPLY = struct.Struct(">IHHQIIH")
# one BLOCK_STATUS descriptor: length, status flags
BLOCK_DESCRIPTOR = struct.Struct(">II")

ZERO_PAD = bytes(124)
