"""Which commands keep retrying a failing store, and which give up soon:
the CLI chooses (lsbd.cli.main), the store takes the bound."""

import pytest

from lsbd.cli import main as cli


class _Chosen(Exception):
    pass


@pytest.fixture
def chosen(monkeypatch):
    """The store_retry_within each command line gets (the command is not run)."""

    def record(**kwargs):
        raise _Chosen(kwargs["store_retry_within"])

    monkeypatch.setattr(cli, "Context", record)

    def run(*argv: str):
        with pytest.raises(_Chosen) as got:
            cli.main(list(argv))
        return got.value.args[0]

    return run


@pytest.mark.parametrize("argv", [["serve", "vol", "--socket", "s"], ["mount", "vol", "mnt"],
                                  ["export", "vol", "f.raw"], ["import", "f.raw", "vol"],
                                  ["compact", "vol"], ["verify", "vol"]])
def test_serving_and_copying_commands_make_every_attempt(chosen, argv):
    assert chosen(*argv) is None


@pytest.mark.parametrize("argv", [["info", "vol"], ["list"], ["stats", "vol"], ["log", "vol"],
                                  ["snapshot", "list", "vol"], ["checkpoint", "vol"]])
def test_one_shot_commands_give_up_on_a_request_failing_for_8s(chosen, argv):
    assert chosen(*argv) == cli.ONE_SHOT_RETRY_WITHIN == 8.0
