"""`lsbd mount` in the background: the command does its own remaining work
(loading what prints its last line) while the serving process opens the
volume, not after (#17: the attach of a cold read)."""

import os

import pytest

from lsbd.errors import UserError
from lsbd_fuse import daemon
from lsbd_fuse.mounts import MountError

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")


def test_the_command_works_while_the_serving_process_opens(tmp_path):
    me = os.getpid()
    seen = []

    def opener():
        # Runs in the serving process: fails once the command has done its part.
        raise UserError("cannot open: for the test")

    def while_waiting():
        seen.append((os.getpid(), "waiting"))

    with pytest.raises(MountError, match="for the test"):
        daemon.run(opener, str(tmp_path), name="v", while_waiting=while_waiting)
    assert seen == [(me, "waiting")]
