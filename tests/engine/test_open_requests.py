"""What opening a volume on a new cache dir asks the store (#17): each
request is a round trip to a store that may be 10-100 ms away, so the
volume's settings are read once, each segment's index is one GET of an
explicit range, and the listings are made once."""

from __future__ import annotations

import threading

import pytest
from engine_helpers import MiB, block

from lsbd import names
from lsbd.cli.context import Context
from lsbd.engine import testing
from lsbd.engine.volume import Volume
from lsbd.meta.config import create_volume
from lsbd.service.serving import open_devices
from lsbd.store.local import LocalStore


@pytest.fixture
def requests(monkeypatch):
    """Every get and list a LocalStore answers: (op, key, start)."""
    seen: list[tuple[str, str, int]] = []
    lock = threading.Lock()
    get, listing = LocalStore.get, LocalStore.list

    def counted_get(self, key, start=0, length=None):
        with lock:
            seen.append(("get", key, start))
        return get(self, key, start, length)

    def counted_list(self, prefix=""):
        with lock:
            seen.append(("list", prefix, 0))
        return listing(self, prefix)

    monkeypatch.setattr(LocalStore, "get", counted_get)
    monkeypatch.setattr(LocalStore, "list", counted_list)
    return seen


@pytest.mark.parametrize("compression", ["zstd:1", "none"])
def test_a_cold_open_asks_each_thing_once(tmp_path, requests, compression):
    url = f"file://{tmp_path / 'store'}"
    writer = Context(store_url=url, endpoint_url=None, cache_dir=str(tmp_path / "a"),
                     create_store=True)
    create_volume(writer.plain_store, "vol", 16 * MiB, segment_size=1 * MiB,
                  compression=compression, flush_mode="store")
    vol = writer.open_volume("vol")
    for i in range(600):
        vol.write(i * 4096 * 5, block(i, i))
    vol.flush()
    vol.close()
    writer.close()
    segments = {i.key for i in LocalStore(str(tmp_path / "store")).list(names.segment_prefix("vol"))}
    assert len(segments) >= 3, "the test needs a few segments"

    requests.clear()
    ctx = Context(store_url=url, endpoint_url=None, cache_dir=str(tmp_path / "b"))
    ctx.before_fork("vol", writer=True)
    devices = open_devices(ctx.store, ["vol"], cache_root=ctx.cache_dir, prepare=ctx.unlock,
                           configs={"vol": ctx.volume_config("vol")}, snapshots=True)
    try:
        gets = [(k, s) for op, k, s in requests if op == "get"]
        lists = [k for op, k, _s in requests if op == "list"]
        assert [k for k, _s in gets].count(names.config_key("vol")) == 1
        for key in segments:
            # Its index: one GET of an explicit range (every S3 server
            # honours those; not all honour suffix ranges).
            assert [s >= 0 for k, s in gets if k == key] == [True], key
        assert len(lists) == len(set(lists)), f"a listing made twice: {lists}"
        assert devices[0].device.read(0, 4096) == block(0, 0)
    finally:
        for d in devices:
            d.device.close()
        ctx.close()


def test_a_serving_process_takes_over_the_store_opened_before_its_fork(tmp_path, s3_url,
                                                                       monkeypatch):
    """The S3 client the mount command built to read the settings is the
    serving process's too (its connections closed before the fork): no
    second client is built, and the volume reads through it."""
    from lsbd.store import s3

    writer = Context(store_url=s3_url, endpoint_url=None, cache_dir=str(tmp_path / "a"))
    create_volume(writer.plain_store, "vol", 16 * MiB, segment_size=1 * MiB,
                  compression="zstd:1", flush_mode="store")
    vol = writer.open_volume("vol")
    vol.write(0, block(0, 7))
    vol.close()
    writer.close()

    built: list[object] = []
    init = s3.S3Store.__init__

    def counted(self, *a, **k):
        built.append(self)
        init(self, *a, **k)

    monkeypatch.setattr(s3.S3Store, "__init__", counted)
    ctx = Context(store_url=s3_url, endpoint_url=None, cache_dir=str(tmp_path / "b"))
    ctx.before_fork("vol", writer=True)
    assert len(built) == 1
    devices = open_devices(ctx.store, ["vol"], cache_root=ctx.cache_dir, prepare=ctx.unlock,
                           configs={"vol": ctx.volume_config("vol")})
    try:
        assert devices[0].device.read(0, 4096) == block(0, 7)
        assert len(built) == 1, "a second S3 client was built after the fork"
    finally:
        for d in devices:
            d.device.close()
        ctx.close()


def test_before_the_fork_other_work_runs_while_the_store_answers(tmp_path, requests,
                                                                 monkeypatch):
    """`lsbd mount` imports the serving process's modules before the fork
    (beside=): in a thread, while the config's request is in flight, not
    after its answer."""
    url = f"file://{tmp_path / 'store'}"
    writer = Context(store_url=url, endpoint_url=None, cache_dir=str(tmp_path / "a"),
                     create_store=True)
    create_volume(writer.plain_store, "vol", 16 * MiB, segment_size=1 * MiB)
    writer.close()

    asked, ran = threading.Event(), threading.Event()
    overlapped: list[bool] = []
    get = LocalStore.get

    def slow_config(self, key, start=0, length=None):
        if key == names.config_key("vol"):
            asked.set()
            overlapped.append(ran.wait(10))     # the answer comes once the work is done
        return get(self, key, start, length)

    def beside():
        overlapped.append(asked.wait(10))
        ran.set()

    monkeypatch.setattr(LocalStore, "get", slow_config)
    ctx = Context(store_url=url, endpoint_url=None, cache_dir=str(tmp_path / "b"))
    ctx.before_fork("vol", writer=True, beside=beside)
    try:
        assert overlapped == [True, True]
        assert ctx.volume_config("vol").name == "vol"
    finally:
        ctx.close()


def test_lsbd_mount_imports_the_serving_modules_before_its_fork(tmp_path):
    """In a new interpreter, `lsbd mount` hands before_fork the serving
    process's imports, the engine's and the sealing store's (stopped there:
    no mount is made)."""
    import subprocess
    import sys

    (tmp_path / "mnt").mkdir()
    code = ("import sys\n"
            "from lsbd.cli import context, main\n"
            "from lsbd.errors import UserError\n"
            "def before_fork(self, volume, *, writer, beside=None):\n"
            "    assert 'lsbd.service.serving' not in sys.modules\n"
            "    assert 'lsbd.crypto.store' not in sys.modules\n"
            "    beside()\n"
            "    print('serving' in dir(sys.modules['lsbd.service']),\n"
            "          'store' in dir(sys.modules['lsbd.crypto']))\n"
            "    raise UserError('stopped before the fork')\n"
            "context.Context.before_fork = before_fork\n"
            f"main.main(['--store', 'file://{tmp_path}/s', 'mount', 'v', '{tmp_path}/mnt'])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.stdout.strip() == "True True", proc.stderr
    assert "stopped before the fork" in proc.stderr


def test_a_new_cache_dir_builds_its_map_in_few_commits(tmp_path):
    """Each commit of the map is a sync of its file, which waits behind
    whatever else the disk is writing.  A new cache dir is not cleared and
    made again (nothing in it to keep or distrust), and its map's
    databases are created in one commit: then the checkpoint's load, its
    segment table and the identity: 4 commits and a final sync (there
    were 15 commits)."""
    store = LocalStore(str(tmp_path / "store"))
    create_volume(store, "vol", 16 * MiB, segment_size=1 * MiB)
    vol = Volume.open(store, "vol", cache_root=str(tmp_path / "a"))
    vol.write(0, block(0, 3))
    vol.flush_to_store()
    vol.checkpoint(force=True)
    vol.close()

    with testing.cache_dir_resets() as resets:
        vol = Volume.open(store, "vol", cache_root=str(tmp_path / "b"))
    try:
        assert resets == [], "a new cache dir was cleared and made again"
        assert testing.map_commits(vol) == 4
        assert vol.read(0, 4096) == block(0, 3)
    finally:
        vol.close()
