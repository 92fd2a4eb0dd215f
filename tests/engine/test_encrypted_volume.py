"""Encrypted and compressed volumes through the `lsbd` command: round trips,
no plaintext in the store, a wrong or missing key, key slots and rotation,
snapshots and clones, tampering seen by reads and by `lsbd verify`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from lsbd import names
from lsbd.crypto import objects

MiB = 1 << 20
MARK = b"PLAINTEXT-MARKER-"


class Env:
    def __init__(self, root, url: str | None = None):
        self.root = root
        self.store = root / "store"
        self.cache = root / "cache"
        self.url = url or f"file://{self.store}"

    def run(self, *args: str, passphrase: str | None = "hunter2 is long",
            check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("LSBD_")}
        if passphrase is not None:
            environ["LSBD_PASSPHRASE"] = passphrase
        environ.update(env or {})
        result = subprocess.run([sys.executable, "-m", "lsbd.cli.main", "--store",
                                 self.url, "--cache-dir", str(self.cache), *args],
                                capture_output=True, text=True, timeout=180, env=environ,
                                stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(f"lsbd {' '.join(args)}: {result.stderr}")
        return result

    def objects(self) -> dict[str, bytes]:
        out = {}
        for dirpath, _dirs, files in os.walk(self.store):
            for f in files:
                path = os.path.join(dirpath, f)
                with open(path, "rb") as fh:
                    out[os.path.relpath(path, self.store)] = fh.read()
        return out


@pytest.fixture
def env(tmp_path):
    return Env(tmp_path)


def image(path, size: int, seed: int = 0) -> bytes:
    """Text that compresses, with a marker on every block, and random blocks."""
    blocks = []
    for i in range(size // 4096):
        if i % 5 == 4:
            blocks.append(os.urandom(4096))
        else:
            line = MARK + b"%d-%d " % (seed, i)
            blocks.append((line * (4096 // len(line) + 1))[:4096])
    data = b"".join(blocks)
    path.write_bytes(data)
    return data


def one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_round_trip_no_plaintext_in_store_and_compressed(env, tmp_path):
    data = image(tmp_path / "in.img", 4 * MiB)
    env.run("create", "v", "--size", "8M", "--encrypt", "--segment-size", "1M")
    env.run("import", "v", str(tmp_path / "in.img"))
    env.run("checkpoint", "v")
    env.run("export", "v", str(tmp_path / "out.img"))
    assert (tmp_path / "out.img").read_bytes()[:len(data)] == data
    stored = env.objects()
    assert any("/seg/" in k for k in stored) and any("/ckpt/" in k for k in stored)
    for key, content in stored.items():
        assert MARK not in content, key
        assert b"hunter2" not in content, key
        if names.sealed_volume(key):
            tail = objects.decode_tail(content, where=key)
            assert tail.encrypted and tail.key_id == 1
    seg_bytes = sum(len(c) for k, c in stored.items() if "/seg/" in k)
    assert seg_bytes < len(data) * 0.5          # four blocks in five compress well
    # A new cache dir: everything from the store alone.
    (tmp_path / "out.img").unlink()
    env.run("--cache-dir", str(tmp_path / "cache2"), "export", "v", str(tmp_path / "out.img"))
    assert (tmp_path / "out.img").read_bytes()[:len(data)] == data
    assert "every checksum is good" in env.run("verify", "v").stderr
    info = json.loads(env.run("info", "v", "--json").stdout)
    assert info["encryption"] == "aes-256-gcm" and info["compression"] == "zstd:1"
    assert list(info["data_keys_in_use"]) == ["1"]


def test_compression_by_default_and_none_stays_plain(env, tmp_path):
    data = image(tmp_path / "in.img", 2 * MiB)
    env.run("create", "c", "--size", "4M", passphrase=None)
    env.run("create", "p", "--size", "4M", "--compress", "none", passphrase=None)
    for v in ("c", "p"):
        env.run("import", v, str(tmp_path / "in.img"), passphrase=None)
        env.run("export", v, str(tmp_path / f"{v}.img"), passphrase=None)
        assert (tmp_path / f"{v}.img").read_bytes()[:len(data)] == data
    stored = env.objects()
    seg_c = [c for k, c in stored.items() if k.startswith("volumes/c/seg/")]
    seg_p = [c for k, c in stored.items() if k.startswith("volumes/p/seg/")]
    assert all(objects.is_sealed(c) and not objects.decode_tail(c, where="").encrypted
               for c in seg_c)
    assert all(c.startswith(b"LSBDSEG1") for c in seg_p)        # the first format, as ever
    assert sum(map(len, seg_c)) < sum(map(len, seg_p)) * 0.5
    bad = env.run("create", "x", "--size", "4M", "--compress", "gzip", check=False)
    one_line_error(bad, "zstd")


def test_wrong_or_missing_key_is_one_line_and_changes_nothing(env, tmp_path):
    image(tmp_path / "in.img", 1 * MiB)
    env.run("create", "v", "--size", "4M", "--encrypt")
    env.run("import", "v", str(tmp_path / "in.img"))
    before = env.objects()
    for args in (("export", "v", str(tmp_path / "o.img")), ("import", "v", str(tmp_path / "in.img")),
                 ("verify", "v"), ("checkpoint", "v"), ("snapshot", "create", "v", "s1")):
        result = env.run(*args, passphrase="not it", check=False)
        one_line_error(result, "wrong passphrase")
        assert "not it" not in result.stderr
        assert env.objects() == before, args
    # No passphrase at all, and no terminal to ask on.
    one_line_error(env.run("export", "v", str(tmp_path / "o.img"), passphrase=None, check=False),
                   "passphrase")
    # The keys object gone.
    keys = [k for k in before if "/keys/" in k]
    os.rename(env.store / keys[0], tmp_path / "keys.bak")
    one_line_error(env.run("export", "v", str(tmp_path / "o.img"), check=False), "keys")
    os.rename(tmp_path / "keys.bak", env.store / keys[0])
    env.run("export", "v", str(tmp_path / "o.img"))


def test_a_wrong_passphrase_is_refused_on_an_empty_volume_too(env, tmp_path):
    """With nothing written no sealed object is read, yet the key is checked
    first by every command that takes one; commands that need no key (and
    so ask for none) still work without it."""
    env.run("create", "v", "--size", "4M", "--encrypt")
    before = env.objects()
    for args in (("info", "v"), ("log", "v"), ("restore", "v", "--seq", "0", "--to", "w"),
                 ("export", "v", str(tmp_path / "o.img")), ("checkpoint", "v"),
                 ("stats", "v"), ("snapshot", "create", "v", "s1"), ("resize", "v", "8M")):
        one_line_error(env.run(*args, passphrase="not it", check=False), "wrong passphrase")
        assert env.objects() == before, args
    assert "size" in env.run("info", "v").stdout
    for args in (("list",), ("snapshot", "list", "v"), ("retain", "v", "2h")):
        env.run(*args, passphrase=None)


def test_a_wrong_passphrase_is_refused_when_a_running_writer_does_the_command(env, tmp_path):
    """A served volume's writer holds the keys: checkpoint, snapshot and stats
    through it ask for none, but a wrong one given is refused, not ignored."""
    env.run("create", "v", "--size", "4M", "--encrypt")
    sock = tmp_path / "nbd.sock"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LSBD_")}
    server = subprocess.Popen([sys.executable, "-m", "lsbd.cli.main", "--store", env.url,
                               "--cache-dir", str(env.cache), "serve", "v", "--socket", str(sock)],
                              env={**environ, "LSBD_PASSPHRASE": "hunter2 is long"},
                              stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(300):
            if sock.exists() or server.poll() is not None:
                break
            time.sleep(0.05)
        assert sock.exists()
        for args in (("checkpoint", "v"), ("snapshot", "create", "v", "s1"), ("stats", "v")):
            one_line_error(env.run(*args, passphrase="not it", check=False), "wrong passphrase")
            env.run(*args, passphrase=None)     # no key given: the writer does it
        assert "s1" in env.run("snapshot", "list", "v", passphrase=None).stdout
    finally:
        server.terminate()
        server.communicate(timeout=60)


def test_a_short_new_passphrase_is_refused_unless_allowed(env, tmp_path):
    """A new passphrase needs 8 characters or more (create, key add, key
    change), else one line and nothing made; --allow-short-passphrase keeps it."""
    short = tmp_path / "short.pass"
    short.write_text("x\n")
    one_line_error(env.run("create", "v", "--size", "4M", "--encrypt", passphrase="seven c",
                           check=False),
                   "has 7 characters", "--allow-short-passphrase", "nothing was changed")
    one_line_error(env.run("--passphrase-file", str(short), "create", "v", "--size", "4M",
                           "--encrypt", passphrase=None, check=False), "has 1 character:")
    assert env.objects() == {}
    env.run("--passphrase-file", str(short), "create", "v", "--size", "4M", "--encrypt",
            "--allow-short-passphrase", passphrase=None)
    env.run("--passphrase-file", str(short), "info", "v", passphrase=None)
    before = env.objects()
    for action in ("add", "change"):
        one_line_error(env.run("--passphrase-file", str(short), "key", action, "v",
                               "--new-passphrase-file", str(short), passphrase=None,
                               check=False), "has 1 character:")
        assert env.objects() == before
    env.run("--passphrase-file", str(short), "key", "change", "v", passphrase=None,
            env={"LSBD_NEW_PASSPHRASE": "eight ch"})
    env.run("info", "v", passphrase="eight ch")


def test_key_slots_change_add_remove(env, tmp_path):
    data = image(tmp_path / "in.img", 1 * MiB)
    env.run("create", "v", "--size", "4M", "--encrypt")
    env.run("import", "v", str(tmp_path / "in.img"))
    keyfile = tmp_path / "vol.key"
    # lsbd never makes a key file: a missing one says how to make it.
    one_line_error(env.run("key", "add", "v", "--new-key-file", str(keyfile), check=False),
                   f"no key file {keyfile}", f"head -c 32 /dev/urandom > {keyfile}")
    keyfile.write_bytes(os.urandom(64))
    env.run("key", "add", "v", "--new-key-file", str(keyfile))
    env.run("--key-file", str(keyfile), "export", "v", str(tmp_path / "a.img"), passphrase=None)
    assert (tmp_path / "a.img").read_bytes()[:len(data)] == data

    newpass = tmp_path / "new.pass"
    newpass.write_text("a new passphrase\n")
    env.run("key", "change", "v", "--new-passphrase-file", str(newpass))
    one_line_error(env.run("export", "v", str(tmp_path / "b.img"), check=False),
                   "wrong passphrase")
    env.run("--passphrase-file", str(newpass), "export", "v", str(tmp_path / "b.img"),
            passphrase=None)
    assert (tmp_path / "b.img").read_bytes()[:len(data)] == data

    listing = json.loads(env.run("--passphrase-file", str(newpass), "key", "list", "v",
                                 "--json", passphrase=None).stdout)
    assert [s["kind"] for s in listing["slots"]] == ["passphrase", "keyfile"]
    env.run("--passphrase-file", str(newpass), "key", "remove", "v", "2", passphrase=None)
    one_line_error(env.run("--key-file", str(keyfile), "export", "v", str(tmp_path / "c.img"),
                           passphrase=None, check=False), "wrong key file")
    one_line_error(env.run("--passphrase-file", str(newpass), "key", "remove", "v", "1",
                           passphrase=None, check=False), "last key slot")
    # Only one keys object generation is left.
    assert len([k for k in env.objects() if "/keys/" in k]) == 1


def test_rotate_then_new_objects_use_the_new_key(env, tmp_path):
    data = image(tmp_path / "in.img", 1 * MiB)
    env.run("create", "v", "--size", "4M", "--encrypt")
    env.run("import", "v", str(tmp_path / "in.img"))
    env.run("snapshot", "create", "v", "before")
    env.run("key", "rotate", "v")
    data2 = image(tmp_path / "in2.img", 1 * MiB, seed=1)
    env.run("import", "v", str(tmp_path / "in2.img"))
    used = {k["id"]: k["objects"] for k in
            json.loads(env.run("key", "list", "v", "--json").stdout)["data_keys"]}
    assert used[1] > 0 and used[2] > 0
    one_line_error(env.run("key", "retire", "v", "1", check=False), "still seals")
    one_line_error(env.run("key", "retire", "v", "2", check=False), "current")
    env.run("export", "v", str(tmp_path / "now.img"))
    env.run("export", "v", "--snapshot", "before", str(tmp_path / "then.img"))
    assert (tmp_path / "now.img").read_bytes()[:len(data2)] == data2
    assert (tmp_path / "then.img").read_bytes()[:len(data)] == data


def test_snapshot_clone_and_restore_of_an_encrypted_volume(env, tmp_path):
    data = image(tmp_path / "in.img", 1 * MiB)
    env.run("create", "v", "--size", "4M", "--encrypt")
    env.run("import", "v", str(tmp_path / "in.img"))
    env.run("snapshot", "create", "v", "s")
    image(tmp_path / "in2.img", 1 * MiB, seed=2)
    env.run("import", "v", str(tmp_path / "in2.img"))
    env.run("clone", "--snapshot", "s", "v", "kid")
    env.run("restore", "v", "--snapshot", "s", "--to", "copy")
    for name in ("kid", "copy"):
        env.run("export", name, str(tmp_path / f"{name}.img"))
        assert (tmp_path / f"{name}.img").read_bytes()[:len(data)] == data
        one_line_error(env.run("export", name, str(tmp_path / "x.img"), passphrase="no",
                               check=False), "wrong passphrase")
    for key, content in env.objects().items():
        assert MARK not in content, key


def test_tampering_is_an_io_error_and_a_verify_failure_naming_the_object(env, tmp_path):
    env.run("create", "v", "--size", "4M", "--encrypt")
    for seed in range(3):              # each import ends with its own segment
        image(tmp_path / "in.img", 1 * MiB, seed=seed)
        env.run("import", "v", str(tmp_path / "in.img"))
    segs = sorted(k for k in env.objects() if "/seg/" in k)
    assert len(segs) >= 3
    victim = env.store / segs[-1]          # the live one: each import rewrote the same range
    original = victim.read_bytes()

    def check_bad(what: str) -> None:
        verify = env.run("--cache-dir", str(tmp_path / f"c-{what}"), "verify", "v", check=False)
        assert verify.returncode != 0, what
        assert segs[-1] in verify.stderr, (what, verify.stderr)
        export = env.run("--cache-dir", str(tmp_path / f"e-{what}"), "export", "v",
                         str(tmp_path / "x.img"), check=False)
        assert export.returncode != 0, what
        assert "Traceback" not in export.stderr

    def put(content: bytes) -> None:
        victim.write_bytes(content)

    bad = bytearray(original)
    bad[len(bad) // 3] ^= 0x01
    put(bytes(bad))
    check_bad("flip")
    put((env.store / segs[0]).read_bytes())     # an older segment replayed as the newest seq
    check_bad("replayed")
    put(original[:-100])
    check_bad("truncated")
    # Without the passphrase, the structure is still checked.
    structure = env.run("verify", "v", "--structure-only", passphrase=None, check=False)
    assert structure.returncode != 0 and segs[-1] in structure.stderr, structure.stderr
    put(original)
    assert env.run("--cache-dir", str(tmp_path / "c-ok"), "verify", "v").returncode == 0
    assert env.run("verify", "v", "--structure-only", passphrase=None).returncode == 0


def test_verify_names_every_segment_that_fails_to_authenticate(env, tmp_path):
    env.run("create", "v", "--size", "4M", "--encrypt")
    for seed, size in enumerate((4 * MiB, 2 * MiB, 1 * MiB)):
        image(tmp_path / "in.img", size, seed=seed)     # each import from offset 0, in a
        env.run("import", "v", str(tmp_path / "in.img"))    # segment of its own: all three live
    segs = sorted(k for k in env.objects() if "/seg/" in k)
    assert len(segs) == 3
    victims = segs[:2]          # not the newest one, so the volume still opens
    for key in victims:
        bad = bytearray((env.store / key).read_bytes())
        bad[len(bad) // 3] ^= 0x01                      # in a data frame, not the index
        (env.store / key).write_bytes(bytes(bad))
    verify = env.run("--cache-dir", str(tmp_path / "fresh"), "verify", "v", check=False)
    assert verify.returncode == 1, verify.stderr
    assert "Traceback" not in verify.stderr
    for key in victims:
        assert key in verify.stderr, verify.stderr      # each one, not only the first
    assert "2 problem(s) found" in verify.stderr, verify.stderr
    assert "fails authentication" in verify.stderr, verify.stderr


def test_rotate_compact_rekey_then_retire_the_old_key(env, tmp_path):
    data = image(tmp_path / "in.img", 1 * MiB)
    env.run("create", "v", "--size", "4M", "--encrypt", "--retain", "0")
    env.run("import", "v", str(tmp_path / "in.img"))
    env.run("snapshot", "create", "v", "s")
    env.run("clone", "--snapshot", "s", "v", "kid")
    env.run("key", "rotate", "v")
    held = env.run("compact", "v", "--rekey").stdout
    # The snapshot (and the clone) still need the old segments as they are,
    # and compact says so.
    assert "still sealed with an older data key" in held, held
    one_line_error(env.run("key", "retire", "v", "1", check=False), "still seals")
    env.run("export", "v", "--snapshot", "s", str(tmp_path / "s.img"))
    assert (tmp_path / "s.img").read_bytes()[:len(data)] == data
    env.run("delete", "kid")
    env.run("snapshot", "delete", "v", "s")
    report = json.loads(env.run("compact", "v", "--rekey", "--json").stdout)
    assert report["stale_key_segments"] == 0 and not any("older data key" in w
                                                         for w in report["why"]), report
    listing = json.loads(env.run("key", "list", "v", "--json").stdout)["data_keys"]
    assert {k["id"]: k["objects"] for k in listing}[1] == 0, listing
    env.run("key", "retire", "v", "1")
    assert [k["id"] for k in json.loads(env.run("key", "list", "v", "--json").stdout)
            ["data_keys"]] == [2]
    (tmp_path / "now.img").unlink(missing_ok=True)
    env.run("--cache-dir", str(tmp_path / "fresh"), "export", "v", str(tmp_path / "now.img"))
    assert (tmp_path / "now.img").read_bytes()[:len(data)] == data
    assert env.run("--cache-dir", str(tmp_path / "fresh2"), "verify", "v").returncode == 0


def test_fuse_mount_of_an_encrypted_volume(tmp_path, monkeypatch):
    from fuse_helpers import FuseEnv, require_fuse

    require_fuse()
    monkeypatch.setenv("LSBD_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("LSBD_PASSPHRASE", "fuse passphrase")
    fenv = FuseEnv(tmp_path, "file://" + str(tmp_path / "store"))
    try:
        fenv.lsbd("create", "v", "--size", "16M", "--encrypt")
        mnt = tmp_path / "mnt"
        fenv.mount("v", mnt)
        block = (MARK + b"fuse ") * 200
        fd = os.open(mnt / "v.img", os.O_RDWR)
        try:
            os.pwrite(fd, block, 1 << 20)
            os.fsync(fd)
        finally:
            os.close(fd)
        fenv.umount(mnt)
        monkeypatch.setenv("LSBD_PASSPHRASE", "wrong")
        (tmp_path / "mnt2").mkdir()
        bad = fenv.lsbd("mount", "v", tmp_path / "mnt2", check=False)
        assert bad.returncode != 0 and "wrong passphrase" in bad.stderr
        assert "Traceback" not in bad.stderr
        monkeypatch.setenv("LSBD_PASSPHRASE", "fuse passphrase")
        out = tmp_path / "out.img"
        fenv.lsbd("--cache-dir", tmp_path / "cache2", "export", "v", out)
        assert out.read_bytes()[1 << 20:(1 << 20) + len(block)] == block
        for dirpath, _dirs, files in os.walk(tmp_path / "store"):
            for f in files:
                with open(os.path.join(dirpath, f), "rb") as fh:
                    assert MARK not in fh.read(), f
    finally:
        fenv.cleanup()


def test_round_trip_on_s3(tmp_path, s3_bucket):
    from lsbd.store import open_store

    env = Env(tmp_path, f"s3://{s3_bucket}/lsbd-test")
    data = image(tmp_path / "in.img", 2 * MiB)
    env.run("create", "v", "--size", "4M", "--encrypt")
    env.run("import", "v", str(tmp_path / "in.img"))
    env.run("snapshot", "create", "v", "s")
    env.run("--cache-dir", str(tmp_path / "fresh"), "export", "v", str(tmp_path / "out.img"))
    assert (tmp_path / "out.img").read_bytes()[:len(data)] == data
    assert env.run("--cache-dir", str(tmp_path / "fresh2"), "verify", "v").returncode == 0
    one_line_error(env.run("export", "v", str(tmp_path / "x.img"), passphrase="nope",
                           check=False), "wrong passphrase")
    raw = open_store(env.url, endpoint_url=os.environ["AWS_ENDPOINT_URL"], seal=False)
    try:
        keys = [info.key for info in raw.list("")]
        assert any("/seg/" in k for k in keys)
        for key in keys:
            assert MARK not in raw.get(key), key
    finally:
        raw.close()


def test_compaction_defrag_and_points_in_time_on_an_encrypted_volume(env, tmp_path):
    env.run("create", "v", "--size", "4M", "--encrypt", "--retain", "0")
    states = []
    for seed in range(3):
        states.append(image(tmp_path / f"in{seed}.img", 1 * MiB, seed=seed))
        env.run("import", "v", str(tmp_path / f"in{seed}.img"))
        if seed == 1:
            env.run("snapshot", "create", "v", "mid")
    before = sum(len(c) for k, c in env.objects().items() if "/seg/" in k)
    report = json.loads(env.run("compact", "v", "--json").stdout)
    assert report["segments_deleted"] >= 1
    after = sum(len(c) for k, c in env.objects().items() if "/seg/" in k)
    assert after < before
    env.run("compact", "v", "--defrag")
    env.run("--cache-dir", str(tmp_path / "fresh"), "export", "v", str(tmp_path / "now.img"))
    assert (tmp_path / "now.img").read_bytes()[:1 * MiB] == states[2]
    env.run("export", "v", "--snapshot", "mid", str(tmp_path / "mid.img"))
    assert (tmp_path / "mid.img").read_bytes()[:1 * MiB] == states[1]
    assert env.run("--cache-dir", str(tmp_path / "fresh2"), "verify", "v").returncode == 0
    for key, content in env.objects().items():
        assert MARK not in content, key
