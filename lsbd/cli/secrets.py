"""Passphrases and key files: where they come from, never where they go.

An existing volume's passphrase comes from --key-file, --passphrase-file,
$LSBD_PASSPHRASE, or a prompt (only when stdin is a terminal), in that
order.  A new one (create --encrypt, key add, key change) from
--new-key-file, --new-passphrase-file, $LSBD_NEW_PASSPHRASE, or a prompt
asked twice.  A secret is never echoed, logged, put in an error message or
passed on a command line.

A new passphrase has at least MIN_PASSPHRASE characters unless the user
says otherwise (--allow-short-passphrase), as cryptsetup refuses a weak one
unless --force-password: the passphrase is all that stands between whoever
copies the store (and its keys object) and the data, and the KDF only slows
each guess down.
"""

from __future__ import annotations

import getpass
import os
import sys

from lsbd.cli.args import MIN_PASSPHRASE
from lsbd.crypto.keyring import KEYFILE, PASSPHRASE, Secret
from lsbd.errors import UserError


def _read_file(path: str, what: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"argument {flag}: cannot read the {what} {path}: {e.strerror}") from None


def _passphrase_from_file(path: str, flag: str) -> bytes:
    # A passphrase file holds one line; its line end is not part of it.
    return _read_file(path, "passphrase file", flag).rstrip(b"\r\n")


def _prompt(text: str) -> bytes:
    if not sys.stdin.isatty():
        raise UserError("a passphrase is needed: give --passphrase-file FILE, --key-file FILE "
                        "or set LSBD_PASSPHRASE")
    return getpass.getpass(text).encode()


def current_secret(*, key_file: str | None, passphrase_file: str | None,
                   volume: str) -> Secret:
    """The secret that opens an existing encrypted volume."""
    if key_file:
        return Secret(KEYFILE, _read_file(key_file, "key file", "--key-file"))
    if passphrase_file:
        return Secret(PASSPHRASE, _passphrase_from_file(passphrase_file, "--passphrase-file"))
    env = os.environ.get("LSBD_PASSPHRASE")
    if env:
        return Secret(PASSPHRASE, env.encode())
    return Secret(PASSPHRASE, _prompt(f"passphrase of {volume}: "))


def _long_enough(passphrase: bytes, allow_short: bool) -> bytes:
    length = len(passphrase.decode("utf-8", "replace"))
    if length < MIN_PASSPHRASE and not allow_short:
        raise UserError(f"the new passphrase has {length} character{'s' * (length != 1)}: "
                        f"use {MIN_PASSPHRASE} or "
                        "more (a few words are easy to remember), a key file, or "
                        "--allow-short-passphrase to keep it; nothing was changed")
    return passphrase


def new_secret(*, key_file: str | None, passphrase_file: str | None,
               env: str = "LSBD_NEW_PASSPHRASE", fallback_env: str | None = None,
               allow_short: bool = False,
               flags: tuple[str, str] = ("--key-file", "--passphrase-file")) -> Secret:
    """A new passphrase or key file for a key slot; a passphrase shorter than
    MIN_PASSPHRASE characters only with allow_short.  flags: the options
    key_file and passphrase_file came from, which an error names."""
    key_flag, passphrase_flag = flags
    if key_file:
        if not os.path.exists(key_file):
            # lsbd reads key files, never makes them: say how.
            raise UserError(f"argument {key_flag}: no key file {key_file}: make one first, e.g. "
                            f"`head -c 32 /dev/urandom > {key_file}`")
        return Secret(KEYFILE, _read_file(key_file, "key file", key_flag))
    if passphrase_file:
        return Secret(PASSPHRASE, _long_enough(
            _passphrase_from_file(passphrase_file, passphrase_flag), allow_short))
    for name in (env, fallback_env):
        value = os.environ.get(name) if name else None
        if value:
            return Secret(PASSPHRASE, _long_enough(value.encode(), allow_short))
    first = _long_enough(_prompt("new passphrase: "), allow_short)  # said before asking again
    if _prompt("the same again: ") != first:
        raise UserError("the two passphrases differ; nothing was changed")
    return Secret(PASSPHRASE, first)
