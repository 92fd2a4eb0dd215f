"""A store outage (issue #16): the running writer answers `stats` and `info`
without the store, SIGTERM stops it cleanly and soon, leaving no temporary
files, and after the store returns the next open uploads the rest and
everything reads back.  The store is S3 (moto over HTTP) behind a proxy the
test cuts."""

from __future__ import annotations

import json
import os
import time

import pytest
from engine_helpers import MiB
from fault_helpers import CuttableProxy, Machine, wait_until


@pytest.fixture
def cut_store(moto_server, s3_bucket):
    proxy = CuttableProxy(moto_server)
    yield f"s3://{s3_bucket}/outage", proxy
    proxy.close()


def _leftovers(cache: str) -> list[str]:
    """Files a clean stop must not leave: temporary read-only cache dirs,
    control sockets, pid files."""
    out = []
    for root, dirs, files in os.walk(cache):
        out += [os.path.join(root, d) for d in dirs if "-ro-" in d]
        out += [os.path.join(root, f) for f in files if f.endswith((".sock", ".pid"))]
    return out


def test_outage_stats_info_sigterm_and_recovery(tmp_path, cut_store):
    store_url, proxy = cut_store
    a = Machine("machine-a", tmp_path / "cache", store_url, env={"AWS_ENDPOINT_URL": proxy.url})
    a.run("create", "vol", "--size", "64M", "--segment-size", "1M", check=True)
    served = a.serve("vol", "--with-snapshots")
    written = {}
    try:
        client = served.client("vol")
        for i in range(4):                        # uploaded while the store is up
            data = os.urandom(MiB)
            client.write(i * MiB, data)
            written[i] = data
        assert client.try_flush() == 0
        a.run("checkpoint", "vol", check=True)

        proxy.set_cut(True)
        for i in range(4, 8):                     # journal only: the store is down
            data = os.urandom(MiB)
            client.write(i * MiB, data)
            written[i] = data
        assert client.try_flush() == 0
        assert client.read(5 * MiB, MiB) == written[5]

        started = time.monotonic()
        stats = a.run("stats", "vol", "--json", timeout=60)
        assert stats.returncode == 0, stats.stderr
        report = json.loads(stats.stdout)
        assert report["source"] == "the running writer"
        assert wait_until(lambda: json.loads(a.run("stats", "vol", "--json").stdout)
                          ["uploads_pending"] > 0, timeout=30)
        info = a.run("info", "vol", "--json", timeout=60)
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["store_error"]
        assert time.monotonic() - started < 60
        client.close()

        started = time.monotonic()
        code = served.stop(timeout=90)
        took = time.monotonic() - started
    finally:
        if served.proc.poll() is None:
            served.kill()
    assert code == 0, served.stderr()
    print(f"lsbd serve stopped by SIGTERM during the outage in {took:.1f}s")
    assert took < 25, f"SIGTERM during an outage took {took:.0f}s"
    assert "stopping" in served.stderr()
    assert "the next open uploads" in served.lines[-1], served.stderr()
    assert _leftovers(a.cache) == []

    # The store is back: the next open uploads the rest.
    proxy.set_cut(False)
    served = a.serve("vol")
    try:
        assert wait_until(lambda: json.loads(a.run("stats", "vol", "--json").stdout)
                          ["uploads_pending"] == 0, timeout=60)
    finally:
        assert served.stop() == 0, served.stderr()
    assert "the next open" not in served.lines[-1]
    b = Machine("machine-b", tmp_path / "other-cache", store_url,
                env={"AWS_ENDPOINT_URL": proxy.url})
    out = tmp_path / "out"
    b.run("export", "vol", out, check=True)
    with open(out, "rb") as f:
        for i, data in written.items():
            f.seek(i * MiB)
            assert f.read(MiB) == data, f"MiB {i} did not read back"
    assert b.run("verify", "vol").returncode == 0


def test_a_stalled_store_does_not_hold_the_stopped_server(tmp_path, cut_store):
    """A store that takes requests and never answers: an upload attempt
    fails only at the read timeout (60 s, per retry), so stopping at once
    takes a second signal (docs/operations.md); once the volumes are closed, the
    attempts still hanging in their threads must not keep the process
    alive (they kept `lsbd serve` for minutes after 'flushed and closed')."""
    store_url, proxy = cut_store
    a = Machine("machine-a", tmp_path / "cache", store_url, env={"AWS_ENDPOINT_URL": proxy.url})
    a.run("create", "vol", "--size", "64M", "--segment-size", "1M", check=True)
    served = a.serve("vol")
    try:
        client = served.client("vol")
        client.write(0, os.urandom(MiB))
        assert client.try_flush() == 0
        proxy.set_stalled(True)
        for i in range(1, 4):
            client.write(i * MiB, os.urandom(MiB))
        assert client.try_flush() == 0                 # the journal has them
        client.close()
        time.sleep(2)                                  # uploads are hanging now
        served.proc.terminate()
        time.sleep(3)
        served.proc.terminate()                        # stop waiting for the store
        assert wait_until(lambda: any("flushed and closed" in x for x in served.lines),
                          timeout=30), served.stderr()
        closed = time.monotonic()
        code = served.proc.wait(timeout=60)
        took = time.monotonic() - closed
    finally:
        if served.proc.poll() is None:
            served.kill()
        proxy.set_stalled(False)
    assert code == 0, served.stderr()
    assert took < 5, f"the process lived {took:.0f}s past closing its volumes"
    served.stop()
    # What waited is uploaded by the next open, once the store answers.
    a.run("checkpoint", "vol", check=True)


def test_one_sigterm_stops_the_server_when_the_store_answers_nothing(tmp_path, cut_store):
    """A store that takes requests and never answers: an attempt fails only
    at the read timeout, so "failed for 10 s in a row" never starts; the
    first SIGTERM still ends the wait once the store has answered nothing
    (uploads, probes) for 20 s, and the last line says what waits and why.
    Nothing is lost: the next open uploads it once the store answers."""
    store_url, proxy = cut_store
    a = Machine("machine-a", tmp_path / "cache", store_url, env={"AWS_ENDPOINT_URL": proxy.url})
    a.run("create", "vol", "--size", "64M", "--segment-size", "1M", check=True)
    served = a.serve("vol")
    written = {}
    try:
        client = served.client("vol")
        proxy.set_stalled(True)
        for i in range(3):
            written[i] = os.urandom(MiB)
            client.write(i * MiB, written[i])
        assert client.try_flush() == 0                 # the journal has them
        client.close()
        time.sleep(2)                                  # uploads are hanging now
        started = time.monotonic()
        code = served.stop(timeout=90)                 # one SIGTERM
        took = time.monotonic() - started
    finally:
        if served.proc.poll() is None:
            served.kill()
        proxy.set_stalled(False)
    assert code == 0, served.stderr()
    print(f"one SIGTERM against a stalled store: stopped in {took:.1f}s")
    assert took < 40, f"the first SIGTERM waited {took:.0f}s"
    assert "the next open uploads" in served.lines[-1], served.stderr()
    assert "the store answered nothing for" in served.lines[-1], served.stderr()
    served = a.serve("vol")
    try:
        assert wait_until(lambda: json.loads(a.run("stats", "vol", "--json").stdout)
                          ["uploads_pending"] == 0, timeout=60)
    finally:
        assert served.stop() == 0, served.stderr()
    out = tmp_path / "out"
    Machine("machine-b", tmp_path / "other-cache", store_url,
            env={"AWS_ENDPOINT_URL": proxy.url}).run("export", "vol", out, check=True)
    with open(out, "rb") as f:
        assert f.read(3 * MiB) == b"".join(written[i] for i in range(3))


def test_a_one_shot_command_against_a_stalled_store_says_so_in_seconds(tmp_path, cut_store):
    """A store that takes requests and never answers: `info` and `list`
    (no writer here) give up after two attempts at the short read timeout
    of small requests (5 s each), and name the store, instead of five
    (26 s) or 60 s an attempt (5 minutes)."""
    store_url, proxy = cut_store
    a = Machine("machine-a", tmp_path / "cache", store_url, env={"AWS_ENDPOINT_URL": proxy.url})
    a.run("create", "vol", "--size", "64M", check=True)
    proxy.set_stalled(True)
    try:
        for command in (["info", "vol"], ["list"]):
            started = time.monotonic()
            done = a.run(*command, timeout=120)
            took = time.monotonic() - started
            print(f"{command[0]} against a stalled store: exit {done.returncode} after {took:.1f}s")
            assert done.returncode == 1, done.stderr
            last = done.stderr.strip().splitlines()[-1]
            assert "timeout" in last and "gave up after 2 attempts" in last, done.stderr
            assert 9 < took < 16, f"{command[0]} waited {took:.0f}s"
            assert "retry 1/4" in done.stderr, "the slow attempt went without a word"
    finally:
        proxy.set_stalled(False)
    assert a.run("info", "vol").returncode == 0


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:1", "http://no-such-host.invalid:9000"])
def test_a_one_shot_command_against_an_unreachable_store_fails_at_once(tmp_path, endpoint):
    """Connection refused, or a name that does not resolve: each attempt
    fails at once, so all five are made, in a second or two."""
    a = Machine("machine-a", tmp_path / "cache", "s3://bucket/p",
                env={"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "x",
                     "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"})
    started = time.monotonic()
    done = a.run("list", timeout=60)
    took = time.monotonic() - started
    print(f"list against {endpoint}: exit {done.returncode} after {took:.1f}s")
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "cannot reach" in last and "gave up after 5 attempts" in last, done.stderr
    assert took < 8, f"list waited {took:.1f}s"   # 26 s if it were stalled
