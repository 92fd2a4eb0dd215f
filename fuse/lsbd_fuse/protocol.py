"""The FUSE kernel protocol: opcodes, flags and structures.

Follows the kernel's include/uapi/linux/fuse.h, protocol 7.38 (Linux 6.2 and
later; the kernel here speaks 7.45 and adapts to the minor we answer with).
All integers are little-endian native structs, padded to 8 bytes.  Only what
a file system of image files uses is here; the rest of the header's opcodes
are answered ENOSYS without being named.
"""

from __future__ import annotations

import struct

KERNEL_VERSION = 7
KERNEL_MINOR_VERSION = 38

ROOT_ID = 1

# --- opcodes (enum fuse_opcode) ---------------------------------------------------

LOOKUP = 1
FORGET = 2            # no reply
GETATTR = 3
SETATTR = 4
READLINK = 5
SYMLINK = 6
MKNOD = 8
MKDIR = 9
UNLINK = 10
RMDIR = 11
RENAME = 12
LINK = 13
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
SETXATTR = 21
GETXATTR = 22
LISTXATTR = 23
REMOVEXATTR = 24
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
ACCESS = 34
CREATE = 35
INTERRUPT = 36        # no reply
DESTROY = 38
BATCH_FORGET = 42     # no reply
FALLOCATE = 43
RENAME2 = 45
LSEEK = 46
SYNCFS = 50
TMPFILE = 51

#: Requests the kernel expects no reply to.
NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT})

# --- notifications (enum fuse_notify_code), sent with unique 0 --------------------

NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_ENTRY = 3

# --- INIT flags -------------------------------------------------------------------

ASYNC_READ = 1 << 0
ATOMIC_O_TRUNC = 1 << 3
BIG_WRITES = 1 << 5
ASYNC_DIO = 1 << 15
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
INIT_EXT = 1 << 30

# --- open_out flags ---------------------------------------------------------------

FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6

# --- setattr_in.valid -------------------------------------------------------------

FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8

# --- fallocate modes (linux/falloc.h) ---------------------------------------------

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# --- /dev/fuse ioctl ----------------------------------------------------------------

#: _IOR(229, 0, uint32_t): a new /dev/fuse fd becomes another queue of the
#: session whose fd it is given.
DEV_IOC_CLONE = (2 << 30) | (4 << 16) | (229 << 8) | 0

# --- structures ---------------------------------------------------------------------

#: fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
IN_HEADER = struct.Struct("<IIQQIIIHH")
#: fuse_out_header: len, error (a negative errno), unique
OUT_HEADER = struct.Struct("<IiQ")

#: fuse_attr: ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec,
#: ctimensec, mode, nlink, uid, gid, rdev, blksize, flags
ATTR = "QQQQQQIIIIIIIIII"
#: fuse_entry_out: nodeid, generation, entry_valid, attr_valid,
#: entry_valid_nsec, attr_valid_nsec, attr
ENTRY_OUT = struct.Struct("<QQQQII" + ATTR)
#: fuse_attr_out: attr_valid, attr_valid_nsec, dummy, attr
ATTR_OUT = struct.Struct("<QII" + ATTR)

#: fuse_init_in: major, minor, max_readahead, flags (then flags2 from 7.36)
INIT_IN = struct.Struct("<IIII")
INIT_IN_FLAGS2 = struct.Struct("<I")  # at offset 16, if the request is that long
#: fuse_init_out: major, minor, max_readahead, flags, max_background,
#: congestion_threshold, max_write, time_gran, max_pages, map_alignment,
#: flags2, unused[7]
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")

#: fuse_getattr_in: getattr_flags, dummy, fh
GETATTR_IN = struct.Struct("<IIQ")
#: fuse_setattr_in: valid, padding, fh, size, lock_owner, atime, mtime, ctime,
#: atimensec, mtimensec, ctimensec, mode, unused4, uid, gid, unused5
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
#: fuse_open_in: flags, open_flags
OPEN_IN = struct.Struct("<II")
#: fuse_open_out: fh, open_flags, padding
OPEN_OUT = struct.Struct("<QII")
#: fuse_release_in: fh, flags, release_flags, lock_owner
RELEASE_IN = struct.Struct("<QIIQ")
#: fuse_flush_in: fh, unused, padding, lock_owner
FLUSH_IN = struct.Struct("<QIIQ")
#: fuse_read_in: fh, offset, size, read_flags, lock_owner, flags, padding
READ_IN = struct.Struct("<QQIIQII")
#: fuse_write_in: fh, offset, size, write_flags, lock_owner, flags, padding;
#: the data follows
WRITE_IN = struct.Struct("<QQIIQII")
#: fuse_write_out: size, padding
WRITE_OUT = struct.Struct("<II")
#: fuse_fsync_in: fh, fsync_flags, padding
FSYNC_IN = struct.Struct("<QII")
#: fuse_fallocate_in: fh, offset, length, mode, padding
FALLOCATE_IN = struct.Struct("<QQQII")
#: fuse_interrupt_in: unique
INTERRUPT_IN = struct.Struct("<Q")
#: fuse_kstatfs: blocks, bfree, bavail, files, ffree, bsize, namelen, frsize,
#: padding, spare[6]
STATFS_OUT = struct.Struct("<QQQQQIIII24x")
#: fuse_dirent: ino, off, namelen, type; the name follows, padded to 8 bytes
DIRENT = struct.Struct("<QQII")
#: fuse_notify_inval_inode_out: ino, off (< 0: only the attributes), len
NOTIFY_INVAL_INODE_OUT = struct.Struct("<Qqq")
#: fuse_access_in: mask, padding
ACCESS_IN = struct.Struct("<II")

#: The shortest valid body (after the in-header) of each request we serve.
#: A shorter one is answered EINVAL before it reaches a handler.  Requests
#: that carry a name (LOOKUP) need at least its terminating NUL.
MIN_BODY = {
    LOOKUP: 1,
    FORGET: 8,
    GETATTR: GETATTR_IN.size,
    SETATTR: SETATTR_IN.size,
    OPEN: OPEN_IN.size,
    READ: READ_IN.size,
    WRITE: WRITE_IN.size,
    STATFS: 0,
    RELEASE: RELEASE_IN.size,
    FSYNC: FSYNC_IN.size,
    FLUSH: FLUSH_IN.size,
    INIT: INIT_IN.size,
    OPENDIR: OPEN_IN.size,
    READDIR: READ_IN.size,
    RELEASEDIR: RELEASE_IN.size,
    FSYNCDIR: FSYNC_IN.size,
    ACCESS: ACCESS_IN.size,
    INTERRUPT: INTERRUPT_IN.size,
    DESTROY: 0,
    BATCH_FORGET: 8,
    FALLOCATE: FALLOCATE_IN.size,
}

#: A read of /dev/fuse needs room for the largest request: a WRITE of
#: max_write bytes after its headers (the kernel refuses a smaller buffer
#: with EINVAL); a page more for safety.
REQUEST_OVERHEAD = 4096


def dirent(ino: int, off: int, name: bytes, kind: int) -> bytes:
    """One fuse_dirent record, padded to 8 bytes (FUSE_DIRENT_ALIGN)."""
    record = DIRENT.pack(ino, off, len(name), kind) + name
    return record + bytes(-len(record) % 8)
