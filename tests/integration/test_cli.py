"""The `lsbd` command, run as a subprocess: import/export round trips on both
kinds of store, sparse exports, JSON output, delete/checkpoint/verify, and
user errors (one line, no traceback, exit 1)."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import time

import pytest
from engine_helpers import (BS, MiB, assert_usage_error, assert_user_error, block, keys,
                            open_test_store, run_cli)

from lsbd import names
from lsbd.segments import checkpoints as ckpt
from lsbd.meta.config import create_volume
from lsbd.engine.volume import Volume


def _sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def _random_file(path, size: int) -> None:
    with open(path, "wb") as f:
        f.writelines(os.urandom(16 * MiB) for _ in range(size // (16 * MiB)))
        f.write(os.urandom(size % (16 * MiB)))


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc


@pytest.fixture
def cli(store_url, tmp_path):
    """run_cli bound to this test's store and cache dir."""
    cache = tmp_path / "cache"

    def run(*args, **kw):
        return run_cli(*args, store=store_url, cache=kw.pop("cache", cache), **kw)

    return run


@pytest.fixture
def file_cli(tmp_path):
    """run_cli on a file:// store, for errors where the kind of store does not matter."""
    (tmp_path / "store").mkdir()
    store_url = "file://" + str(tmp_path / "store")

    def run(*args, **kw):
        return run_cli(*args, store=store_url, cache=kw.pop("cache", tmp_path / "cache"), **kw)

    return run


def test_import_export_256mib_round_trip(cli, store_url, tmp_path):
    size = 256 * MiB
    src = tmp_path / "src.img"
    _random_file(src, size)
    _ok(cli("create", "big", "--size", "256M"))
    t0 = time.monotonic()
    _ok(cli("import", "big", src, timeout=300))
    t1 = time.monotonic()
    # Export through an empty cache dir: everything comes from the store.
    dst = tmp_path / "dst.img"
    _ok(cli("export", "big", dst, cache=tmp_path / "other-cache", timeout=300))
    t2 = time.monotonic()
    assert os.path.getsize(dst) == size
    assert _sha(dst) == _sha(src)
    print(f"{store_url.split(':')[0]}: import {t1 - t0:.1f}s, export {t2 - t1:.1f}s")
    _ok(cli("verify", "big", timeout=300))


def test_export_of_a_sparse_volume_is_a_sparse_file(cli, store_url, tmp_path):
    _ok(cli("create", "sp", "--size", "64M"))
    # Import a sparse file: its holes (zero blocks) must not become data.
    src = tmp_path / "sparse.img"
    with open(src, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(10 * MiB)
        f.write(block(1, 2560))
        f.seek(40 * MiB + 512)
        f.write(b"tail data not block aligned")
    _ok(cli("import", "sp", src))
    info = json.loads(_ok(cli("info", "sp", "--json")).stdout)
    assert info["stored_bytes"] < 1 * MiB, info

    dst = tmp_path / "dst.img"
    _ok(cli("export", "sp", dst, cache=tmp_path / "c2"))
    st = os.stat(dst)
    assert st.st_size == 64 * MiB
    assert st.st_blocks * 512 <= 256 * 1024, f"export is not sparse: {st.st_blocks * 512} bytes"
    assert _sha(dst) == _sha(src)


def test_export_of_an_empty_volume_is_all_hole(cli, tmp_path):
    _ok(cli("create", "empty", "--size", "32M"))
    dst = tmp_path / "dst.img"
    _ok(cli("export", "empty", dst))
    st = os.stat(dst)
    assert st.st_size == 32 * MiB and st.st_blocks == 0


@pytest.mark.parametrize("argv", [
    ["info", "nosuch"],
    ["export", "nosuch", "OUT"],
    ["import", "nosuch", "IN"],
    ["delete", "nosuch"],
    ["checkpoint", "nosuch"],
    ["verify", "nosuch"],
])
def test_missing_volume_is_one_line(file_cli, tmp_path, argv):
    src = tmp_path / "in"
    src.write_bytes(b"x" * BS)
    argv = [str(tmp_path / "out") if a == "OUT" else str(src) if a == "IN" else a for a in argv]
    line = assert_user_error(file_cli(*argv))
    assert "nosuch" in line and "no volume" in line, line
    assert not (tmp_path / "out").exists()


def test_missing_volume_on_s3_is_one_line(s3_url, tmp_path):
    line = assert_user_error(run_cli("info", "nosuch", store=s3_url, cache=tmp_path / "c"))
    assert "nosuch" in line and "no volume" in line and s3_url in line, line


def test_create_existing_volume_is_one_line(cli):
    _ok(cli("create", "v", "--size", "16M"))
    line = assert_user_error(cli("create", "v", "--size", "16M"))
    assert "already exists" in line


def test_bad_size_is_one_line(file_cli):
    # What does not parse as a size is refused by the parser, naming the flag;
    # a size that is not a whole number of blocks, by create.
    for size in ["abc", "--size=-5", "12X"]:
        args = ["create", "v", size] if size.startswith("--") else ["create", "v", "--size", size]
        assert_usage_error(file_cli(*args), "argument --size: bad size")
    for size in ["0", "1000", "1.5K"]:
        assert_user_error(file_cli("create", "v", "--size", size),
                          "argument --size: bad size", "a positive multiple of the block size")
    assert_usage_error(file_cli("create", "v", "--size", "16M", "--block-size", "3000"),
                       "argument --block-size: bad block size")
    assert _ok(file_cli("list", "--json")).stdout.strip() == "[]", "a bad create left a volume"


def test_sizes_are_binary_and_a_decimal_looking_unit_is_refused(file_cli, tmp_path):
    """GB is 10^9 bytes to truncate and 2^30 to fio: every size lsbd takes
    refuses it, naming the flag it came from and the binary spelling, and
    takes K/KiB/Ki alike."""
    (tmp_path / "mnt").mkdir()
    _ok(file_cli("create", "v", "--size", "16MiB"))
    for argv, flag, value, spelling in [
            (["create", "w", "--size", "20GB"], "--size", "20GB", "20G or 20GiB"),
            (["create", "w", "--size", "16M", "--segment-size", "1MB"], "--segment-size", "1MB",
             "1M or 1MiB"),
            (["create", "w", "--segment-size", "32M", "--size", "1MB"], "--size", "1MB",
             "1M or 1MiB"),
            (["create", "w", "--size", "16M", "--block-size", "4KB"], "--block-size", "4KB",
             "4K or 4KiB"),
            (["resize", "v", "32mb"], "SIZE", "32mb", "32M or 32MiB"),
            (["serve", "v", "--cache-limit", "1GB"], "--cache-limit", "1GB", "1G or 1GiB"),
            (["mount", "v", tmp_path / "mnt", "--readahead", "4MB"], "--readahead", "4MB",
             "4M or 4MiB")]:
        line = assert_usage_error(file_cli(*argv), f"argument {flag}: bad size {value!r}",
                                  spelling)
        assert line.endswith("--help`)"), line      # where the allowed forms are
    # A size that parses but is out of the flag's bounds names the flag too.
    for argv, flag, why in [
            (["create", "w", "--size", "16M", "--segment-size", "1K"], "--segment-size",
             "bad segment size '1K': from 64K to 4G"),
            (["create", "w", "--size", "16M", "--block-size", "1000"], "--block-size",
             "bad block size '1000': a power of two from 512 to 64K"),
            (["mount", "v", tmp_path / "mnt", "--readahead", "1G"], "--readahead",
             "bad readahead '1G': at most 256M")]:
        assert_usage_error(file_cli(*argv), f"argument {flag}: {why}")
    assert [v["name"] for v in json.loads(_ok(file_cli("list", "--json")).stdout)] == ["v"]
    info = json.loads(_ok(file_cli("info", "v", "--json")).stdout)
    assert info["size"] == 16 * MiB
    _ok(file_cli("resize", "v", "24Mi"))
    _ok(file_cli("resize", "v", "0.03125G"))
    assert json.loads(_ok(file_cli("info", "v", "--json")).stdout)["size"] == 32 * MiB


@pytest.mark.parametrize("argv, named", [
    (["create", "w", "--size", "16M", "--retain", "7x"],
     "argument --retain: bad duration '7x': use e.g. 30m, 24h, 7d or 0"),
    (["retain", "v", "soon"], "argument DURATION: bad duration 'soon'"),
    (["create", "w", "--size", "16M", "--compress", "zstd:99"],
     "argument --compress: compression must be zstd, zstd:LEVEL (1..19) or none"),
    (["clone", "v", "a/b"], "argument NEWVOLUME: bad volume name 'a/b': use letters"),
    (["restore", "v", "--seq", "0", "--to", "a/b"], "argument --to: bad volume name 'a/b'"),
    (["serve", "v", "a/b", "--socket", "s"], "argument VOLUME: bad volume name 'a/b'"),
    (["export", "v", "o.raw", "--snapshot", "a/b"],
     "argument --snapshot: bad snapshot name 'a/b': use letters"),
    (["snapshot", "delete", "v", "a/b"], "argument NAME: bad snapshot name 'a/b'"),
    (["export", "v", "o.raw", "--at", "yesterday"], "argument --at: bad time 'yesterday': use ISO"),
    (["diff", "v", "--from", "@yesterday"], "argument --from: bad time 'yesterday'"),
    (["diff", "v", "--from", "seq:x"], "argument --from: bad seq 'x'"),
    (["export", "v", "o.raw", "--from", "a/b"], "argument --from: bad snapshot name 'a/b'"),
    (["serve", "v", "--socket", "s", "--cache-full-wait", "x"],
     "argument --cache-full-wait: bad value 'x': a number of seconds, 0 or more"),
    (["--store", "ftp://x", "list"], "argument --store: bad store URL 'ftp://x': unknown store "
     "kind 'ftp'; use file:///absolute/path, a path, or s3://bucket[/prefix]"),
    (["list", "--store", "s3://"], "argument --store: bad store URL 's3://': write s3://bucket"),
    (["--endpoint-url", "localhost:9000", "list"],
     "argument --endpoint-url: bad endpoint URL 'localhost:9000': write http://HOST[:PORT]"),
])
def test_a_bad_value_names_its_flag_and_the_allowed_form(file_cli, tmp_path, argv, named):
    """Every value a flag or argument takes is checked by the parser: one
    line naming the flag (argparse's `argument --flag: ...`) and the form it
    takes, exit 2, before anything is read or written."""
    line = assert_usage_error(file_cli(*argv), named)
    assert line.endswith("--help`)"), line
    assert os.listdir(tmp_path / "store") == [], "a refused command line touched the store"


def test_a_bad_store_url_from_the_environment_names_the_variable(tmp_path):
    proc = run_cli("list", env={"LSBD_STORE": "s3://"}, cache=tmp_path / "c")
    assert_user_error(proc, "$LSBD_STORE: bad store URL 's3://': write s3://bucket[/prefix]")


def test_a_missing_passphrase_or_key_file_names_its_flag(file_cli, tmp_path):
    """create and key add each take a passphrase file or key file of their
    own: the error says which flag named the file that cannot be read."""
    missing = tmp_path / "missing"
    assert_user_error(file_cli("create", "e", "--size", "16M", "--encrypt",
                               "--passphrase-file", missing),
                      f"argument --passphrase-file: cannot read the passphrase file {missing}")
    pw = tmp_path / "pw"
    pw.write_text("a long passphrase\n")
    _ok(file_cli("create", "e", "--size", "16M", "--encrypt", "--passphrase-file", pw))
    for flag, needle in [("--new-passphrase-file", "cannot read the passphrase file"),
                         ("--new-key-file", "no key file")]:
        assert_user_error(file_cli("key", "add", "e", "--passphrase-file", pw, flag, missing),
                          f"argument {flag}: {needle} {missing}")
    assert_user_error(file_cli("info", "e", "--key-file", missing),
                      f"argument --key-file: cannot read the key file {missing}")


def test_bad_volume_name_is_one_line(file_cli):
    assert_usage_error(file_cli("create", "bad/name", "--size", "16M"),
                       "argument VOLUME: bad volume name 'bad/name'")


def test_import_of_a_file_larger_than_the_volume(cli, store_url, tmp_path):
    _ok(cli("create", "small", "--size", "1M"))
    src = tmp_path / "big"
    src.write_bytes(os.urandom(1 * MiB + BS))
    line = assert_user_error(cli("import", "small", src))
    assert "larger than" in line
    info = json.loads(_ok(cli("info", "small", "--json")).stdout)
    assert info["segments"] == 0, "a refused import wrote data"
    assert info["writer"] is None, "a refused import kept the lease"


def test_import_of_a_missing_file_is_one_line(file_cli, tmp_path):
    _ok(file_cli("create", "v", "--size", "1M"))
    line = assert_user_error(file_cli("import", "v", tmp_path / "no-such-file"))
    assert "no-such-file" in line


def _serve(tmp_path, sock):
    """`lsbd serve v` on the test's file:// store, its stderr piped."""
    import subprocess

    from engine_helpers import LSBD

    return subprocess.Popen([LSBD, "--store", "file://" + str(tmp_path / "store"),
                             "--cache-dir", str(tmp_path / "cache"), "serve", "v",
                             "--socket", str(sock)],
                            stderr=subprocess.PIPE, text=True)


def _unreachable(tmp_path):
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    t0 = time.monotonic()
    proc = run_cli("--endpoint-url", "http://127.0.0.1:1", "list", store="s3://bucket/prefix",
                   cache=tmp_path / "cache", env=env, timeout=120)
    return proc, time.monotonic() - t0


def test_unreachable_s3_endpoint_fails_fast_with_a_clear_message(tmp_path):
    proc, took = _unreachable(tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("lsbd: ") and "127.0.0.1:1" in last, proc.stderr
    assert took < 10, f"took {took:.1f}s to give up"


def test_unreachable_s3_endpoint_is_one_line(tmp_path):
    proc, _took = _unreachable(tmp_path)
    assert_user_error(proc)


def test_missing_bucket_is_one_line(moto_server, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    line = assert_user_error(run_cli("list", store="s3://no-such-bucket-lsbd/x",
                                   cache=tmp_path / "cache"))
    assert "no-such-bucket-lsbd" in line


def test_list_and_info_json(cli, store_url, tmp_path):
    if store_url.startswith("file://"):      # a store that exists but holds no volume
        pathlib.Path(store_url[len("file://"):]).mkdir(parents=True, exist_ok=True)
    assert json.loads(_ok(cli("list", "--json")).stdout) == []
    _ok(cli("create", "a", "--size", "16M"))
    _ok(cli("create", "b", "--size", "32M", "--block-size", "8K"))
    listing = json.loads(_ok(cli("list", "--json")).stdout)
    assert [v["name"] for v in listing] == ["a", "b"]
    by_name = {v["name"]: v for v in listing}
    assert by_name["a"]["size"] == 16 * MiB and by_name["a"]["block_size"] == 4096
    assert by_name["b"]["size"] == 32 * MiB and by_name["b"]["block_size"] == 8192
    assert all(len(v["volume_id"]) == 32 and v["created"] > 0 for v in listing)

    src = tmp_path / "in"
    src.write_bytes(os.urandom(3 * MiB))
    _ok(cli("import", "a", src))
    info = json.loads(_ok(cli("info", "a", "--json")).stdout)
    assert info["name"] == "a" and info["size"] == 16 * MiB and info["block_size"] == 4096
    assert info["volume_id"] == by_name["a"]["volume_id"]
    assert info["segments"] >= 1 and info["newest_seq"] >= 1
    assert info["stored_bytes"] >= 3 * MiB
    assert info["writer"] is None
    # a short import closes without a checkpoint; an explicit one covers the newest seq
    _ok(cli("checkpoint", "a"))
    info = json.loads(_ok(cli("info", "a", "--json")).stdout)
    assert info["checkpoints"] and max(info["checkpoints"]) == info["newest_seq"]
    assert info["flush_mode"] == "journal"
    assert info["store"] == store_url


def test_delete_removes_every_object(cli, store_url, tmp_path):
    store = open_test_store(store_url)
    try:
        _ok(cli("create", "gone", "--size", "16M"))
        _ok(cli("create", "kept", "--size", "16M"))
        src = tmp_path / "in"
        src.write_bytes(os.urandom(2 * MiB))
        _ok(cli("import", "gone", src))
        _ok(cli("checkpoint", "gone"))
        assert len(keys(store, names.volume_prefix("gone"))) > 3
        _ok(cli("delete", "gone"))
        assert keys(store, names.volume_prefix("gone")) == []
        assert [v["name"] for v in json.loads(_ok(cli("list", "--json")).stdout)] == ["kept"]
        assert keys(store, names.volume_prefix("kept")) == [names.config_key("kept")]
        cache = tmp_path / "cache"
        assert not any(p.name.startswith("gone-") for p in cache.iterdir()), \
            "delete left the volume's cache dir"
        # The name can be used again, for a new, empty volume.
        _ok(cli("create", "gone", "--size", "16M"))
        dst = tmp_path / "out"
        _ok(cli("export", "gone", dst))
        assert os.stat(dst).st_blocks == 0
    finally:
        store.close()


def test_delete_refuses_a_volume_in_use(cli, store_url, tmp_path):
    store = open_test_store(store_url)
    try:
        create_volume(store, "busy", 16 * MiB)
        vol = Volume.open(store, "busy", cache_root=str(tmp_path / "c"))
        try:
            line = assert_user_error(cli("delete", "busy"))
            assert f"pid {os.getpid()}" in line
            assert store.exists(names.config_key("busy"))
        finally:
            vol.close()
    finally:
        store.close()


def test_checkpoint_command_writes_a_checkpoint(cli, store_url, tmp_path, monkeypatch):
    store = open_test_store(store_url)
    try:
        create_volume(store, "v", 16 * MiB, flush_mode="store")
        # Another machine (a live process of this one is never broken).
        monkeypatch.setenv("LSBD_HOST", "crashed.example")
        vol = Volume.open(store, "v", cache_root=str(tmp_path / "cache"))
        monkeypatch.delenv("LSBD_HOST")
        for i in range(3):
            vol.write(i * 64 * BS, block(i + 1, i * 64))
            vol.flush()
        top = vol.applied_seq
        vol.abandon()  # a crash: no checkpoint at close
        assert ckpt.list_checkpoints(store, "v") == []
        line = assert_user_error(cli("checkpoint", "v"))
        assert "in use" in line and "--break-lease" in line
        _ok(cli("checkpoint", "--break-lease", "v"))
        assert ckpt.list_checkpoints(store, "v") == [top]
        assert store.exists(names.checkpoint_manifest_key("v", top))
        manifest = ckpt.read_manifest(store, "v", top)
        assert manifest.extents == 3
        _ok(cli("verify", "v"))
    finally:
        store.close()


def test_verify_good_volume_exits_zero(cli, tmp_path):
    _ok(cli("create", "v", "--size", "16M"))
    src = tmp_path / "in"
    src.write_bytes(os.urandom(5 * MiB))
    _ok(cli("import", "v", src))
    proc = _ok(cli("verify", "v", "--json"))
    assert json.loads(proc.stdout) == {"volume": "v", "ok": True, "problems": []}
    _ok(cli("verify", "v"))


def test_environment_names_the_store_and_cache(store_url, tmp_path):
    env = {"LSBD_STORE": store_url, "LSBD_CACHE_DIR": str(tmp_path / "envcache")}
    _ok(run_cli("create", "e", "--size", "8M", env=env))
    src = tmp_path / "in"
    src.write_bytes(os.urandom(256 * 1024))
    _ok(run_cli("import", "e", src, env=env))
    assert (tmp_path / "envcache").is_dir()
    listing = json.loads(_ok(run_cli("list", "--json", env=env)).stdout)
    assert [v["name"] for v in listing] == ["e"]


_RSS_PROBE = """
import sys, threading
if sys.argv[1] == "tuned":
    from lsbd.cli.context import tune_serving_process
    tune_serving_process()

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

result = []
def work():   # on a thread, as request payloads are
    bufs = [bytearray(1 << 20) for _ in range(64)]
    before = rss()
    del bufs[:]
    result.append((before, rss()))
t = threading.Thread(target=work)
t.start()
t.join()
print(result[0][0] - result[0][1])
"""


def test_a_serving_process_keeps_freed_request_buffers(tmp_path):
    """`serve` and `mount` keep freed payload buffers instead of giving them
    back to the kernel (each reuse would fault in zeroed pages again): 64
    buffers of 1 MiB freed leave the process's resident size where it was;
    with glibc's defaults the same frees give the memory back."""
    import subprocess
    import sys

    def released(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _RSS_PROBE, mode], check=True,
                             capture_output=True, text=True).stdout
        return int(out)

    assert released("default") > 32 * MiB     # the probe sees memory given back
    assert released("tuned") < 8 * MiB


def test_commands_go_through_the_writer_of_a_served_volume(file_cli, tmp_path):
    """checkpoint (which failed with "in use"), snapshot, resize, stats and
    compact on a volume `lsbd serve` holds: its writer does them."""
    import signal

    _ok(file_cli("create", "v", "--size", "16M", "--retain", "0"))
    src = tmp_path / "in"
    src.write_bytes(os.urandom(2 * MiB))
    _ok(file_cli("import", "v", src))
    sock = tmp_path / "nbd.sock"
    server = _serve(tmp_path, sock)
    try:
        assert "serving" in server.stderr.readline()
        done = json.loads(_ok(file_cli("checkpoint", "v", "--json")).stdout)
        assert done["by_writer"] is True and done["seq"] >= 1
        info = json.loads(_ok(file_cli("info", "v", "--json")).stdout)
        assert done["seq"] in info["checkpoints"] and info["writer"]
        snap = json.loads(_ok(file_cli("snapshot", "create", "v", "s1", "--json")).stdout)
        assert snap["seq"] >= done["seq"]
        grown = json.loads(_ok(file_cli("resize", "v", "32M", "--json")).stdout)
        assert grown["by_writer"] is True
        listed = json.loads(_ok(file_cli("list", "--json")).stdout)
        info = json.loads(_ok(file_cli("info", "v", "--json")).stdout)
        assert listed[0]["size"] == info["size"] == 32 * MiB, "list and info disagree"
        stats = json.loads(_ok(file_cli("stats", "v", "--json")).stdout)
        assert stats["source"] == "the running writer" and stats["size"] == 32 * MiB
        table = _ok(file_cli("stats", "v")).stdout
        assert "evicted from the cache" in table and "read from the cache / the store" in table
        report = json.loads(_ok(file_cli("compact", "v", "--json")).stdout)
        assert report["dry_run"] is False and isinstance(report["why"], list)
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    # Closed: list and info still agree on the new size, now from the store.
    listed = json.loads(_ok(file_cli("list", "--json")).stdout)
    assert listed[0]["size"] == json.loads(_ok(file_cli("info", "v", "--json")).stdout)["size"]
    assert listed[0]["size"] == 32 * MiB


def test_compact_tables_say_what_would_be_and_what_was_done(file_cli, tmp_path):
    """A dry run's table says what compaction would delete and reclaim; a
    real run's says what it deleted and reclaimed."""
    raw = tmp_path / "disk.raw"
    _random_file(raw, 4 * MiB)
    _ok(file_cli("create", "v", "--size", "4M", "--retain", "0"))
    _ok(file_cli("import", "v", raw))
    _ok(file_cli("import", "v", raw))      # the first copy is all dead now
    plan = _ok(file_cli("compact", "v", "--dry-run")).stdout
    for label in ("segments it would delete", "checkpoints it would delete",
                  "bytes it would reclaim"):
        assert label in plan, plan
    done = _ok(file_cli("compact", "v")).stdout
    rows = {ln.split("│")[1].strip(): ln.split("│")[2].strip()
            for ln in done.splitlines() if ln.count("│") == 3}
    assert rows["segments deleted"] == "1" and rows["bytes reclaimed"] != "0 B", done
    assert "checkpoints deleted" in rows and "would" not in done, done
    # A key/value table has no (empty) header row.
    assert "┃" not in done and "┃" not in _ok(file_cli("info", "v")).stdout, done


def test_import_of_a_sparse_image_replaces_what_the_volume_held(file_cli, tmp_path):
    """The holes of an imported sparse image read as zeros afterwards, also
    where the volume held data before: the volume is a copy of the image."""
    old = tmp_path / "old.raw"
    _random_file(old, 4 * MiB)
    sparse = tmp_path / "sparse.raw"
    with open(sparse, "wb") as f:
        f.truncate(3 * MiB)                 # a hole, data, and a hole up to the end
        f.seek(MiB)
        f.write(os.urandom(64 * 1024))
    _ok(file_cli("create", "v", "--size", "4M"))
    _ok(file_cli("import", "v", old))
    _ok(file_cli("import", "v", sparse))
    out = tmp_path / "out.raw"
    _ok(file_cli("export", "v", out))
    got = out.read_bytes()
    assert got[:3 * MiB] == sparse.read_bytes(), "the image's holes still hold old data"
    assert got[3 * MiB:] == old.read_bytes()[3 * MiB:]      # past the image: as it was


INTERRUPT_IMPORT = r'''
import sys
from lsbd.cli import main
from lsbd.service import images

real = images.import_image

def interrupted_after_one_chunk(volume, path, *, raw=False, progress=None):
    def stop(done, size):
        raise KeyboardInterrupt     # Ctrl-C once the first chunk is written
    return real(volume, path, raw=raw, progress=stop)

images.import_image = interrupted_after_one_chunk
sys.exit(main.main(sys.argv[1:]))
'''


def test_an_interrupted_import_says_what_it_left_and_keeps_it(tmp_path):
    """Ctrl-C during an import: exit 130, one line saying that the volume
    holds the part copied so far, and that part is in the volume."""
    import subprocess
    import sys

    store, cache = tmp_path / "store", tmp_path / "cache"
    store.mkdir()
    url = f"file://{store}"
    raw = tmp_path / "disk.raw"
    _random_file(raw, 12 * MiB)
    _ok(run_cli("create", "v", "--size", "16M", store=url, cache=cache))
    proc = subprocess.run([sys.executable, "-c", INTERRUPT_IMPORT, "--store", url,
                           "--cache-dir", str(cache), "import", "v", str(raw)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines() == [f"lsbd: interrupted: v holds the part of {raw} copied "
                                        "so far; import again to copy all of it"], proc.stderr
    out = tmp_path / "out.raw"
    _ok(run_cli("export", "v", out, store=url, cache=cache))
    got, want = out.read_bytes(), raw.read_bytes()
    assert got[:4 * MiB] == want[:4 * MiB], "the part copied before Ctrl-C is lost"
    assert got[4 * MiB:] != want[4 * MiB:]


def test_a_failed_export_leaves_the_file_that_was_there(file_cli, tmp_path):
    """An export writes beside its file and renames over it once whole: one
    that fails halfway (a segment fails its checksum) leaves the older export
    as it was, and no half file; one that succeeds keeps the file's mode."""
    image = tmp_path / "data.raw"
    image.write_bytes(os.urandom(8 * MiB))
    _ok(file_cli("create", "v", "--size", "8M"))
    _ok(file_cli("import", "v", image))
    out = tmp_path / "out.raw"
    out.write_bytes(b"an older export")
    out.chmod(0o640)
    _ok(file_cli("export", "v", out))
    assert out.read_bytes() == image.read_bytes()
    assert out.stat().st_mode & 0o777 == 0o640
    out.write_bytes(b"an older export")
    segment = tmp_path / "store" / "volumes" / "v" / "seg" / "0000000000000001"
    body = bytearray(segment.read_bytes())
    body[len(body) // 2] ^= 0xFF
    segment.chmod(0o600)
    segment.write_bytes(bytes(body))
    assert_user_error(file_cli("export", "v", out, cache=tmp_path / "new-cache"), "checksum")
    assert out.read_bytes() == b"an older export"
    assert sorted(p.name for p in tmp_path.iterdir() if "partial" in p.name) == []


def test_export_of_a_served_volume_is_its_state_now(file_cli, tmp_path):
    """`lsbd export` of a volume `lsbd serve` holds copies what was written
    through NBD (the writer puts it in the store first); after the server is
    killed, export says that writes it did not upload wait in its journal."""
    import signal

    from nbd_helpers import require_tools, run_tool

    require_tools("nbdcopy")
    _ok(file_cli("create", "v", "--size", "4M"))
    sock = tmp_path / "nbd.sock"
    server = _serve(tmp_path, sock)
    try:
        assert "serving" in server.stderr.readline()
        first, second = tmp_path / "first", tmp_path / "second"
        first.write_bytes(os.urandom(4 * MiB))
        second.write_bytes(os.urandom(4 * MiB))
        uri = f"nbd+unix:///v?socket={sock}"
        run_tool("nbdcopy", str(first), uri)       # ends with a FLUSH: in the journal
        out = tmp_path / "out.raw"
        proc = _ok(file_cli("export", "v", out, "--json"))
        assert out.read_bytes() == first.read_bytes(), "export missed the served writes"
        assert "last writer" not in proc.stderr
        exported = json.loads(proc.stdout)["seq"]
        run_tool("nbdcopy", str(second), uri)
        # diff to the live state sees the new writes too.
        diff = json.loads(_ok(file_cli("diff", "v", "--from", f"#{exported}", "--json")).stdout)
        assert diff["to_seq"] > exported and diff["changed_bytes"] == 4 * MiB, diff
        assert json.loads(_ok(file_cli("info", "v", "--json")).stdout)["writer_exited"] is False
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=60)
    proc = _ok(file_cli("export", "v", out))
    assert "stopped without closing: writes it did not upload are in its journal" in proc.stderr
    assert json.loads(_ok(file_cli("info", "v", "--json")).stdout)["writer_exited"] is True
    assert "exited without closing" in _ok(file_cli("info", "v")).stdout
    # The next writer replays the journal: the note goes, the writes come.
    _ok(file_cli("checkpoint", "v"))
    proc = _ok(file_cli("export", "v", out))
    assert "last writer" not in proc.stderr and out.read_bytes() == second.read_bytes()


def test_info_reads_the_volumes_config_once(file_cli, tmp_path, monkeypatch, capsys):
    """The passphrase check reads the config; the description uses that one
    rather than asking the store again."""
    from lsbd.cli import main as cli
    from lsbd.store.local import LocalStore

    _ok(file_cli("create", "v", "--size", "16M"))
    gets: list[str] = []
    real_get = LocalStore.get

    def counting_get(self, key, start=0, length=None):
        gets.append(key)
        return real_get(self, key, start, length)

    monkeypatch.setattr(LocalStore, "get", counting_get)
    argv = ["--store", f"file://{tmp_path}/store", "--cache-dir", str(tmp_path / "cache")]
    assert cli.main([*argv, "info", "v", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["size"] == 16 * MiB
    assert gets.count(names.config_key("v")) == 1, gets
