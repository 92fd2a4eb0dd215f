"""A new passphrase asked on a terminal: a short one is refused before it is
asked again, two that differ are refused, and --allow-short-passphrase keeps
a short one."""

from __future__ import annotations

import sys

import pytest

from lsbd.cli import secrets
from lsbd.errors import UserError


@pytest.fixture
def terminal(monkeypatch):
    """The answers typed, and the prompts shown."""
    answers: list[str] = []
    asked: list[str] = []

    def getpass(prompt: str) -> str:
        asked.append(prompt)
        return answers.pop(0)

    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr(secrets.getpass, "getpass", getpass)
    monkeypatch.delenv("LSBD_NEW_PASSPHRASE", raising=False)
    return answers, asked


def test_a_short_passphrase_is_refused_before_it_is_asked_again(terminal):
    answers, asked = terminal
    answers += ["abc", "abc"]
    with pytest.raises(UserError, match="has 3 characters: use 8 or more"):
        secrets.new_secret(key_file=None, passphrase_file=None)
    assert asked == ["new passphrase: "]


def test_two_passphrases_that_differ_are_refused(terminal):
    answers, asked = terminal
    answers += ["correct horse", "correct horse!"]
    with pytest.raises(UserError, match="differ"):
        secrets.new_secret(key_file=None, passphrase_file=None)
    assert len(asked) == 2


def test_a_short_passphrase_allowed_is_kept(terminal):
    answers, _asked = terminal
    answers += ["abc", "abc"]
    secret = secrets.new_secret(key_file=None, passphrase_file=None, allow_short=True)
    assert secret.value == b"abc"
