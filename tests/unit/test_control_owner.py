"""A command asks a volume's running writer over its control socket only
when the socket is this user's: a long cache dir's socket lives in the
temporary directory, where another account could make one first and answer
for the volume."""

from __future__ import annotations

import os
import socket

import pytest

from lsbd.engine import control
from lsbd.errors import LsbdError


def _bound(path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    return s


def test_no_socket_is_no_writer(tmp_path):
    assert control.call(str(tmp_path / "control.sock"), {"op": "info"}) is None


def test_our_socket_with_no_one_listening_is_no_writer(tmp_path):
    with _bound(tmp_path / "control.sock"):
        assert control.call(str(tmp_path / "control.sock"), {"op": "info"}) is None


def test_a_socket_of_another_account_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("giving a socket to another account needs root")
    path = tmp_path / "control.sock"
    with _bound(path) as s:
        s.listen(1)
        os.chown(path, 65534, 65534)
        with pytest.raises(LsbdError, match="not a control socket of this user"):
            control.call(str(path), {"op": "info"}, timeout=2)


def test_a_file_that_is_no_socket_is_refused(tmp_path):
    (tmp_path / "control.sock").write_text("")
    with pytest.raises(LsbdError, match="not a control socket"):
        control.call(str(tmp_path / "control.sock"), {"op": "info"})
