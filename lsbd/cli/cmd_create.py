"""lsbd create VOLUME --size SIZE [--compress zstd[:LEVEL]|none] [--encrypt]"""

from lsbd.cli import ui
from lsbd.cli.args import MIN_PASSPHRASE, add_allow_short_passphrase, add_volume, command, size_arg
from lsbd.cli.cmd_history import format_duration, parse_duration
from lsbd.meta.config import (DEFAULT_BLOCK_SIZE, DEFAULT_SEGMENT_SIZE, check_block_size,
                              check_volume_size)
from lsbd.errors import UserError, VolumeExists
from lsbd.names import config_key, keys_key


def register(sub) -> None:
    p = command(sub, "create", help="create a volume",
                examples=["vm1 --size 20G", "db --size 100G --flush-mode store --retain 7d",
                          "secret --size 20G --encrypt --passphrase-file ~/.lsbd-pass"])
    add_volume(p, "the new volume's name (letters, digits, '.', '_', '-')")
    p.add_argument("--size", required=True, type=size_arg,
                   help="size, e.g. 10G or 10GiB (binary: 1G is 2^30 bytes; 10GB is refused)")
    p.add_argument("--block-size", type=block_size_arg, default=DEFAULT_BLOCK_SIZE,
                   help="block size, a power of two from 512 to 64K (default 4K)")
    p.add_argument("--flush-mode", choices=["journal", "store"], default="journal",
                   help="journal: FLUSH returns once the local journal is synced (default); "
                        "store: once the data is in the store")
    p.add_argument("--segment-size", type=segment_size_arg, default=DEFAULT_SEGMENT_SIZE,
                   help="target segment object size, from 64K to 4G (default 32M)")
    p.add_argument("--retain", type=parse_duration, default="24h",
                   help="keep every point in time of this window recoverable (default 24h; "
                        "0: snapshots only)")
    p.add_argument("--compress", type=compress_arg, default="zstd", metavar="zstd[:LEVEL]|none",
                   help="compress segments and checkpoints, frame by frame, where it pays "
                        "(LEVEL 1-19; default zstd, level 1)")
    p.add_argument("--encrypt", action="store_true",
                   help="encrypt segments and checkpoints (AES-256-GCM); the passphrase comes "
                        "from --passphrase-file, --key-file, $LSBD_PASSPHRASE or a prompt "
                        f"({MIN_PASSPHRASE} characters or more)")
    add_allow_short_passphrase(p, "with --encrypt: accept a passphrase")
    p.set_defaults(func=run, creates_store=True)


MIN_SEGMENT_SIZE = 64 << 10
MAX_SEGMENT_SIZE = 4 << 30


def segment_size_arg(text: str) -> int:
    size = size_arg(text)
    if not MIN_SEGMENT_SIZE <= size <= MAX_SEGMENT_SIZE:
        raise UserError(f"bad segment size {text!r}: from 64K to 4G")
    return size


def compress_arg(text: str) -> tuple[str, int]:
    """--compress: (codec, level)."""
    from lsbd.crypto.compress import parse_setting

    try:
        return parse_setting(text)
    except ValueError as e:
        raise UserError(str(e)) from None


def block_size_arg(text: str) -> int:
    return check_block_size(size_arg(text), text)


def run(args, ctx) -> int:
    from lsbd.cli.secrets import new_secret
    from lsbd.crypto import keystore, keyring as kr
    from lsbd.crypto.aead import CIPHER_NAME, random_bytes
    from lsbd.meta.config import create_volume

    retain = args.retain
    codec, level = args.compress
    compression = f"zstd:{level}" if codec == "zstd" else "none"
    size, block_size, segment_size = args.size, args.block_size, args.segment_size
    try:    # against --block-size: after parsing, but before anything is asked or written
        check_volume_size(size, block_size)
    except UserError as e:
        raise UserError(f"argument --size: {e}") from None
    if ctx.plain_store.exists(config_key(args.volume)):
        raise VolumeExists(f"volume {args.volume!r} already exists in {ctx.store.url}")
    if args.encrypt:
        secret = new_secret(key_file=ctx.key_file, passphrase_file=ctx.passphrase_file,
                            env="LSBD_PASSPHRASE", allow_short=args.allow_short_passphrase)
        keystore.save(ctx.plain_store, args.volume,
                      kr.new_keyring(random_bytes(16), secret))
    try:
        config = create_volume(ctx.store, args.volume, size, block_size=block_size,
                               flush_mode=args.flush_mode,
                               segment_size=segment_size, retain_seconds=retain,
                               compression=compression,
                               encryption=CIPHER_NAME if args.encrypt else None)
    except BaseException:
        if args.encrypt:
            ctx.plain_store.delete(keys_key(args.volume, 1))
        raise
    how = ", ".join(x for x in ("encrypted" if args.encrypt else "",
                                f"{compression} compressed" if codec == "zstd" else "") if x)
    ui.done({"name": config.name, "size": config.size, "block_size": config.block_size,
             "flush_mode": config.flush_mode, "segment_size": config.segment_size,
             "retain_seconds": config.retain_seconds, "volume_id": config.volume_id,
             "compression": compression, "encrypted": bool(args.encrypt),
             "store": ctx.store.url},
            f"created volume {ui.bold(config.name)} ({ui.human_size(config.size)}, "
            f"{config.block_size}-byte blocks, retain {format_duration(config.retain_seconds)}"
            f"{', ' + how if how else ''}) in {ctx.store.url}")
    return 0
