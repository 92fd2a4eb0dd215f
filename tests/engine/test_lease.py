"""One writer at a time (DESIGN invariant 7): the writer lease refuses a
second writer with a message naming the holder, is taken over silently when
its holder died on this machine, can be broken explicitly, and never stops
readers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest
from engine_helpers import (
    BS,
    PYTHON,
    MiB,
    assert_user_error,
    block,
    fenced_writer,
    open_test_store,
    read_from_store,
    run_cli,
)

from lsbd import names
from lsbd.meta.config import create_volume
from lsbd.engine.volume import Volume
from lsbd.errors import LeaseHeld, StoreError

# A writer in a child process that obeys commands on stdin:
#   write LBA TAG   write block(TAG, LBA), flush; answers "ok" or "err <message>"
HOLDER = r"""
import sys
from lsbd.engine.volume import Volume
from lsbd.store import open_store
store_url, cache = sys.argv[1], sys.argv[2]
vol = Volume.open(open_store(store_url), "vol", cache_root=cache)
print("ready", flush=True)
for line in sys.stdin:
    cmd = line.split()
    try:
        if cmd[0] == "write":
            lba, tag = int(cmd[1]), int(cmd[2])
            data = (tag.to_bytes(8, "little") + lba.to_bytes(8, "little")) * 256
            vol.write(lba * 4096, data)
            vol.flush()
        print("ok", flush=True)
    except Exception as e:
        print("err", type(e).__name__, str(e).replace("\n", " "), flush=True)
"""


class Holder:
    def __init__(self, store_url: str, cache, host: str | None = None):
        env = {**os.environ, **({"LSBD_HOST": host} if host else {})}
        self.proc = subprocess.Popen([PYTHON, "-c", HOLDER, store_url, str(cache)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            raise AssertionError(f"the holder did not start: {line}{self.proc.stderr.read()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def command(self, text: str) -> str:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()  # reaped: a zombie would still look alive

    def stop(self) -> None:
        self.kill()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            f.close()


@pytest.fixture
def holder_factory():
    made = []

    def make(store_url, cache, host=None):
        h = Holder(store_url, cache, host)
        made.append(h)
        return h

    yield make
    for h in made:
        h.stop()


@pytest.fixture
def store(store_url):
    s = open_test_store(store_url)
    create_volume(s, "vol", 16 * MiB, flush_mode="store")
    yield s
    s.close()


def test_second_writer_in_the_same_process_is_refused(tmp_path, store):
    first = Volume.open(store, "vol", cache_root=str(tmp_path / "a"))
    try:
        with pytest.raises(LeaseHeld) as info:
            Volume.open(store, "vol", cache_root=str(tmp_path / "b"))
        message = str(info.value)
        assert f"pid {os.getpid()}" in message and socket.gethostname() in message
        assert "--break-lease" not in message, "advises breaking a live holder's lease"
        assert isinstance(info.value, PermissionError)
        first.write(0, block(1, 0))  # the holder is unaffected
        # Readers are welcome meanwhile, and see what the writer flushed.
        first.flush()
        assert read_from_store(store, tmp_path / "r", 0, BS) == block(1, 0)
        first.write(BS, block(2, 1))
    finally:
        first.close()
    assert not store.exists(names.lease_key("vol")), "close did not release the lease"
    second = Volume.open(store, "vol", cache_root=str(tmp_path / "b"))
    try:
        assert second.read(0, 2 * BS) == block(1, 0) + block(2, 1)
    finally:
        second.close()


def test_cli_writer_refused_while_a_process_holds_it_and_admitted_after_sigkill(
        tmp_path, store, store_url, holder_factory):
    cache = tmp_path / "cache"
    holder = holder_factory(store_url, cache)
    assert holder.command("write 1000 7") == "ok"
    image = tmp_path / "image"
    image.write_bytes(os.urandom(1 * MiB))

    proc = run_cli("import", "vol", image, store=store_url, cache=cache)
    line = assert_user_error(proc)
    assert f"pid {holder.pid}" in line and socket.gethostname() in line, line

    # A reader (export) is allowed while the writer holds it, and sees its flushed write.
    out = tmp_path / "out1"
    proc = run_cli("export", "vol", out, store=store_url, cache=cache)
    assert proc.returncode == 0, proc.stderr
    with open(out, "rb") as f:
        f.seek(1000 * BS)
        assert f.read(BS) == block(7, 1000)

    holder.kill()
    # The holder is dead and was on this machine: no flag needed.
    proc = run_cli("import", "vol", image, store=store_url, cache=cache)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out2"
    assert run_cli("export", "vol", out, store=store_url, cache=cache).returncode == 0
    data = out.read_bytes()
    assert data[:MiB] == image.read_bytes()
    assert data[1000 * BS:1001 * BS] == block(7, 1000)
    assert not store.exists(names.lease_key("vol"))


def test_writer_after_sigkill_opens_in_process_without_flag(tmp_path, store, store_url,
                                                            holder_factory):
    holder = holder_factory(store_url, tmp_path / "cache")
    assert holder.command("write 5 1") == "ok"
    with pytest.raises(LeaseHeld):
        Volume.open(store, "vol", cache_root=str(tmp_path / "cache"))
    holder.kill()
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "cache"))
    try:
        assert vol.read(5 * BS, BS) == block(1, 5)
    finally:
        vol.close()


def _foreign_lease(store, *, host="elsewhere.example", pid=4242) -> None:
    holder = {"host": host, "pid": pid, "since": time.time() - 60, "token": "f" * 32,
              "boot_id": "00000000-0000-0000-0000-000000000000", "process_start": "1"}
    store.put(names.lease_key("vol"), json.dumps(holder).encode())


def test_lease_of_another_host_needs_break_lease(tmp_path, store, store_url):
    _foreign_lease(store)
    with pytest.raises(LeaseHeld) as info:
        Volume.open(store, "vol", cache_root=str(tmp_path / "cache"))
    assert "pid 4242 on elsewhere.example" in str(info.value)

    image = tmp_path / "image"
    image.write_bytes(os.urandom(256 * 1024))
    line = assert_user_error(run_cli("import", "vol", image, store=store_url, cache=tmp_path / "c"))
    assert "pid 4242 on elsewhere.example" in line and "--break-lease" in line
    proc = run_cli("import", "--break-lease", "vol", image, store=store_url, cache=tmp_path / "c")
    assert proc.returncode == 0, proc.stderr
    assert not store.exists(names.lease_key("vol"))
    out = tmp_path / "out"
    assert run_cli("export", "vol", out, store=store_url, cache=tmp_path / "c").returncode == 0
    assert out.read_bytes()[:256 * 1024] == image.read_bytes()


def test_lease_of_this_host_but_another_boot_needs_break_lease(tmp_path, store):
    """Same host name, a pid that does not exist, but another boot id: it may be
    another machine with the same name, so it is not taken over silently."""
    _foreign_lease(store, host=socket.gethostname(), pid=2 ** 22 + 17)
    with pytest.raises(LeaseHeld):
        Volume.open(store, "vol", cache_root=str(tmp_path / "cache"))
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "cache"), break_lease=True)
    vol.close()


def test_unreadable_lease_is_held_by_unknown_and_can_be_broken(tmp_path, store):
    store.put(names.lease_key("vol"), b"\x00garbage")
    with pytest.raises(LeaseHeld) as info:
        Volume.open(store, "vol", cache_root=str(tmp_path / "cache"))
    assert "unknown" in str(info.value)
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "cache"), break_lease=True)
    try:
        vol.write(0, block(1, 0))
    finally:
        vol.close()
    assert not store.exists(names.lease_key("vol"))


def test_reader_opens_while_a_foreign_writer_holds_the_lease(tmp_path, store):
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "cache"))
    vol.write(0, block(3, 0))
    vol.close()
    _foreign_lease(store)
    assert read_from_store(store, tmp_path / "r", 0, BS) == block(3, 0)
    assert store.exists(names.lease_key("vol")), "a reader must not touch the lease"


def test_broken_lease_fences_the_old_writer(tmp_path, store, store_url, holder_factory):
    """--break-lease over a live holder on another machine: the new writer
    wins; the old one's next durable write fails loudly instead of
    overwriting the new writer's segments."""
    holder = holder_factory(store_url, tmp_path / "old-cache", "elsewhere.example")
    assert holder.command("write 0 1") == "ok"
    image = tmp_path / "image"
    image.write_bytes(os.urandom(64 * 1024))
    line = assert_user_error(run_cli("import", "vol", image, store=store_url, cache=tmp_path / "new"))
    assert f"pid {holder.pid}" in line
    proc = run_cli("import", "--break-lease", "vol", image, store=store_url, cache=tmp_path / "new")
    assert proc.returncode == 0, proc.stderr

    answer = holder.command("write 0 2")
    assert answer.startswith("err"), f"the fenced-off writer's flush succeeded: {answer}"
    out = tmp_path / "out"
    assert run_cli("export", "vol", out, store=store_url, cache=tmp_path / "new").returncode == 0
    assert out.read_bytes()[:64 * 1024] == image.read_bytes()
    # And that failure is permanent for the old writer.
    assert holder.command("write 1 3").startswith("err")


def test_fenced_writer_segments_never_join_the_volume(tmp_path, store_url, monkeypatch):
    store = open_test_store(store_url)
    old = fenced_writer(store, tmp_path, monkeypatch)
    try:
        # The old writer does not know yet: it writes three segments' worth.
        with pytest.raises(StoreError):
            for i in range(3):
                old.write((100 + 64 * i) * BS, bytes([0x61 + i]) * (256 * 1024))
            old.flush()
    finally:
        old.abandon()
    time.sleep(0.5)  # let its last uploads land
    reader = Volume.open(store, "vol", cache_root=str(tmp_path / "r"), read_only=True)
    try:
        assert reader.read(0, BS) == block(2, 0)
        assert reader.read(100 * BS, 3 * 64 * BS) == bytes(3 * 64 * BS), \
            "data the old writer wrote after losing the lease is part of the volume"
        assert reader.applied_seq == 2
    finally:
        reader.close()
        store.close()
