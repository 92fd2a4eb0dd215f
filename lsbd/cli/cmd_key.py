"""`lsbd key list|add|change|remove|rotate|retire VOLUME`: the passphrases,
key files and data keys of an encrypted volume (docs/security.md)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from lsbd.cli import ui
from lsbd.cli.args import add_allow_short_passphrase, add_volume, command
from lsbd.errors import UserError

if TYPE_CHECKING:
    from lsbd.crypto import keyring as kr


def register(sub) -> None:
    p = sub.add_parser("key", help="passphrases, key files and data keys of an encrypted volume",
                       description="Passphrases, key files and data keys of an encrypted "
                                   "volume (docs/security.md).")
    keys = p.add_subparsers(dest="key_command", metavar="ACTION")
    keys.required = True
    examples = {"list": ["secret", "secret --json"],
                "add": ["secret --new-key-file /etc/lsbd/secret.key"],
                "change": ["secret --passphrase-file old.txt --new-passphrase-file new.txt"],
                "remove": ["secret 2"], "rotate": ["secret"], "retire": ["secret 1"]}

    def action(name: str, help: str, func, *, new: bool = False):
        q = command(keys, name, help=help, examples=examples[name])
        add_volume(q, "an encrypted volume")
        if new:
            q.add_argument("--new-passphrase-file", metavar="FILE",
                           help="the new passphrase, on the file's first line "
                                "(default: $LSBD_NEW_PASSPHRASE, else a prompt)")
            q.add_argument("--new-key-file", metavar="FILE",
                           help="a key file (16 bytes or more) instead of a passphrase")
            add_allow_short_passphrase(q, "accept a new passphrase")
        q.set_defaults(func=func)
        return q

    action("list", "show key slots, data keys and what still needs each", run_list)
    action("add", "add a passphrase or key file", run_add, new=True)
    action("change", "replace the passphrase or key file given with a new one "
                     "(only the key slot is rewrapped)", run_change, new=True)
    q = action("remove", "remove a key slot", run_remove)
    q.add_argument("slot", type=int, metavar="SLOT", help="the key slot's number (key list)")
    action("rotate", "start a new data key for everything written from now on "
                     "(compact then rewrites older segments under it)", run_rotate)
    q = action("retire", "drop a data key that no stored object needs any more", run_retire)
    q.add_argument("key_id", type=int, metavar="KEY",
                   help="the data key's number (key list)")


def _encrypted(ctx, volume: str) -> None:
    from lsbd.meta.config import load_config

    if not load_config(ctx.plain_store, volume).encryption:
        raise UserError(f"volume {volume} is not encrypted")


def _in_use(ctx, volume: str) -> dict[int, int]:
    """Key id -> objects sealed with it, in the volume and the volumes it
    was cloned from (a clone reads their older segments with its copy of
    their keys)."""
    from lsbd.crypto import keystore
    from lsbd.meta.config import Lineage, load_config

    counts: dict[int, int] = {}
    chain = Lineage.load(ctx.plain_store, load_config(ctx.plain_store, volume)).chain
    for config in chain:
        for key_id, n in keystore.keys_in_use(ctx.plain_store, config.name).items():
            counts[key_id] = counts.get(key_id, 0) + n
    return counts


def _new(args) -> kr.Secret:
    from lsbd.cli.secrets import new_secret

    return new_secret(key_file=args.new_key_file, passphrase_file=args.new_passphrase_file,
                      allow_short=args.allow_short_passphrase,
                      flags=("--new-key-file", "--new-passphrase-file"))


def _save(ctx, volume: str, ring: kr.Keyring, message: str) -> int:
    from lsbd.crypto import keystore

    keystore.save(ctx.plain_store, volume, ring)
    ui.done({"volume": volume, "slots": [s.number for s in ring.slots],
             "data_keys": [k.id for k in ring.keys], "current_key": ring.current}, message)
    return 0


def run_list(args, ctx) -> int:
    _encrypted(ctx, args.volume)
    ring = ctx.keyring(args.volume)
    used = _in_use(ctx, args.volume)
    info = {
        "slots": [{"slot": s.number, "kind": s.kind, "created_ns": s.created_ns,
                   "opened_now": s.number == ring.opened_with} for s in ring.slots],
        "data_keys": [{"id": k.id, "created_ns": k.created_ns, "current": k.id == ring.current,
                       "objects": used.get(k.id, 0)} for k in ring.keys],
    }
    if args.json:
        ui.print_json(info)
        return 0

    def when(ns: int) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))

    ui.table(f"key slots of {args.volume}", ["slot", "kind", "created", ""],
             [[s["slot"], s["kind"], when(s["created_ns"]),
               "opened now" if s["opened_now"] else ""] for s in info["slots"]])
    ui.table("data keys", ["data key", "created", "objects sealed with it", ""],
             [[k["id"], when(k["created_ns"]), k["objects"], "current" if k["current"] else
               ("retirable" if not k["objects"] else "")] for k in info["data_keys"]])
    return 0


def run_add(args, ctx) -> int:
    from lsbd.crypto import keyring as kr

    _encrypted(ctx, args.volume)
    ring = ctx.keyring(args.volume)
    ring = kr.add_slot(ring, _new(args))
    return _save(ctx, args.volume, ring, f"added key slot {ring.slots[-1].number} to "
                                         f"{args.volume}")


def run_change(args, ctx) -> int:
    from lsbd.crypto import keyring as kr

    _encrypted(ctx, args.volume)
    ring = ctx.keyring(args.volume)
    ring = kr.change_slot(ring, ring.opened_with, _new(args))
    return _save(ctx, args.volume, ring, f"changed key slot {ring.opened_with} of "
                                         f"{args.volume}; the old secret no longer opens it")


def run_remove(args, ctx) -> int:
    from lsbd.crypto import keyring as kr

    _encrypted(ctx, args.volume)
    ring = kr.remove_slot(ctx.keyring(args.volume), args.slot)
    return _save(ctx, args.volume, ring, f"removed key slot {args.slot} of {args.volume}")


def run_rotate(args, ctx) -> int:
    from lsbd.crypto import keyring as kr

    _encrypted(ctx, args.volume)
    ring = kr.rotate(ctx.keyring(args.volume))
    return _save(ctx, args.volume, ring,
                 f"data key {ring.current} of {args.volume} is now current (for writers "
                 "opened from now on); `lsbd compact --rekey` rewrites older segments")


def run_retire(args, ctx) -> int:
    from lsbd.crypto import keyring as kr

    _encrypted(ctx, args.volume)
    ring = kr.retire(ctx.keyring(args.volume), args.key_id)   # checks it is not current
    used = _in_use(ctx, args.volume).get(args.key_id, 0)
    if used:
        raise UserError(f"data key {args.key_id} still seals {used} stored objects of "
                        f"{args.volume}: compact first")
    return _save(ctx, args.volume, ring, f"retired data key {args.key_id} of {args.volume}")
