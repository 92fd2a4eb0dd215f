"""The NBD server spoken to over raw sockets: the handshake, every command,
every error reply, malformed input, concurrency and ordering.  The engine is
the in-memory FakeVolume."""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading
import time

import pytest
from fakes import FakeVolume
from nbd_helpers import Background, RawClient, decode_info, running_server

from lsbd.errors import CorruptionError, InvalidRequest, StoreError
from lsbd_nbd import protocol as p

MiB = 1024 * 1024
SIZE = 16 * MiB


@pytest.fixture
def volumes():
    return {"vol": FakeVolume("vol", SIZE), "other": FakeVolume("other", 4 * MiB),
            "ro": FakeVolume("ro", 4 * MiB, read_only=True)}


@pytest.fixture
def server(volumes):
    with running_server(volumes, tcp=True, handshake_timeout=2.0) as srv:
        yield srv


def client_for(server) -> RawClient:
    return RawClient(server.connect())


def connected(server, export="vol", **kw) -> RawClient:
    c = client_for(server)
    c.connect_export(export, **kw)
    return c


# --- handshake ------------------------------------------------------------------


def test_greeting_is_fixed_newstyle(server):
    c = client_for(server)
    flags = c.greeting()
    assert flags == p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES
    c.option(p.OPT_ABORT)
    assert c.option_replies() == [(p.REP_ACK, b"")]
    assert c.is_closed()


def test_unknown_client_flags_close_only_that_connection(server):
    with Background(server, "vol") as bg:
        c = client_for(server)
        c.greeting(client_flags=0x80)
        assert c.is_closed()
        time.sleep(0.05)
        bg.check()


def test_list_shows_every_export(server):
    c = client_for(server)
    c.greeting()
    c.option(p.OPT_LIST)
    replies = c.option_replies()
    assert replies[-1] == (p.REP_ACK, b"")
    names = []
    for reply, data in replies[:-1]:
        assert reply == p.REP_SERVER
        (n,) = struct.unpack(">I", data[:4])
        names.append(data[4:4 + n].decode())
    assert names == ["vol", "other", "ro"]


def test_list_with_data_is_invalid_and_negotiation_continues(server):
    c = client_for(server)
    c.greeting()
    c.option(p.OPT_LIST, b"junk")
    assert c.option_replies()[-1][0] == p.REP_ERR_INVALID
    assert c.go("vol")["size"] == SIZE


@pytest.mark.parametrize("option", [p.OPT_STARTTLS, p.OPT_EXTENDED_HEADERS, p.OPT_PEEK_EXPORT,
                                    99, 0xFFFFFFFF])
def test_unknown_options_are_unsupported_and_negotiation_continues(server, option):
    c = client_for(server)
    c.greeting()
    c.option(option, b"some data the server must skip")
    (reply, _), = c.option_replies()
    assert reply == p.REP_ERR_UNSUP
    info = c.go("vol")
    assert info["size"] == SIZE
    c.write(0, b"x" * 512)
    c.disconnect()


def test_info_reports_size_flags_and_block_sizes(server):
    c = client_for(server)
    c.greeting()
    c.structured_replies()
    c.option(p.OPT_INFO, c.info_data("vol", (p.INFO_BLOCK_SIZE, p.INFO_NAME, p.INFO_DESCRIPTION)))
    replies = c.option_replies()
    assert replies[-1][0] == p.REP_ACK
    info = decode_info(replies[:-1])
    assert info["size"] == SIZE
    assert info["block_size"] == (1, 4096, 32 * MiB)
    assert info["name"] == "vol"
    assert "vol" in info["description"]
    expected = (p.FLAG_HAS_FLAGS | p.FLAG_SEND_FLUSH | p.FLAG_SEND_FUA | p.FLAG_SEND_TRIM
                | p.FLAG_SEND_WRITE_ZEROES | p.FLAG_SEND_FAST_ZERO | p.FLAG_SEND_DF
                | p.FLAG_CAN_MULTI_CONN)
    assert info["flags"] == expected
    # INFO does not end negotiation: GO still works afterwards.
    assert c.go("vol")["flags"] == expected


def test_read_only_export_flags(server):
    c = client_for(server)
    c.greeting()
    info = c.go("ro")
    assert info["flags"] & p.FLAG_READ_ONLY
    assert not info["flags"] & (p.FLAG_SEND_TRIM | p.FLAG_SEND_WRITE_ZEROES | p.FLAG_SEND_FUA
                                | p.FLAG_SEND_DF)   # DF needs structured replies
    assert info["flags"] & p.FLAG_SEND_FLUSH


def test_info_and_go_for_an_unknown_export(server):
    c = client_for(server)
    c.greeting()
    for option in (p.OPT_INFO, p.OPT_GO):
        c.option(option, c.info_data("nope"))
        (reply, message), = c.option_replies()
        assert reply == p.REP_ERR_UNKNOWN
        assert b"nope" in message
    assert c.go("other")["size"] == 4 * MiB


def test_default_export_is_the_first_volume(server):
    c = client_for(server)
    c.greeting()
    info = c.go("", (p.INFO_NAME,))
    assert info["size"] == SIZE and info["name"] == "vol"


@pytest.mark.parametrize("data", [b"", b"\0\0\0", b"\0\0\0\x10vol\0\0",
                                  b"\0\0\0\x03vol\0\x01",        # one request, none sent
                                  b"\0\0\0\x03vol\0\0extra", b"\0\0\0\x02\xff\xfe\0\0"])
def test_malformed_info_is_invalid(server, data):
    c = client_for(server)
    c.greeting()
    c.option(p.OPT_GO, data)
    (reply, _), = c.option_replies()
    assert reply == p.REP_ERR_INVALID
    assert c.go("vol")["size"] == SIZE


def test_export_name_option(server):
    c = client_for(server)
    c.greeting(client_flags=p.FLAG_C_FIXED_NEWSTYLE)      # zeroes wanted
    c.option(p.OPT_EXPORT_NAME, b"other")
    size, flags = p.EXPORT_NAME_REPLY.unpack(c.recv_exact(10))
    assert size == 4 * MiB and flags & p.FLAG_SEND_FLUSH
    assert c.recv_exact(124) == bytes(124)
    c.write(4096, b"a" * 4096)
    assert c.read(4096, 4096) == b"a" * 4096


def test_export_name_without_zeroes_and_non_fixed_client(server):
    c = client_for(server)
    c.greeting(client_flags=p.FLAG_C_NO_ZEROES)           # not even fixed newstyle
    c.option(p.OPT_EXPORT_NAME, b"")
    size, _ = p.EXPORT_NAME_REPLY.unpack(c.recv_exact(10))
    assert size == SIZE
    assert c.read(0, 512) == bytes(512)                     # no padding in the way


def test_export_name_for_an_unknown_export_closes(server):
    c = client_for(server)
    c.greeting()
    c.option(p.OPT_EXPORT_NAME, b"nope")
    assert c.is_closed()


def test_non_fixed_client_cannot_use_other_options(server):
    c = client_for(server)
    c.greeting(client_flags=0)
    c.option(p.OPT_LIST)
    assert c.is_closed()


def test_structured_reply_negotiation(server):
    c = client_for(server)
    c.greeting()
    c.option(p.OPT_STRUCTURED_REPLY, b"x")
    assert c.option_replies()[-1][0] == p.REP_ERR_INVALID
    c.structured_replies()
    c.option(p.OPT_STRUCTURED_REPLY)
    assert c.option_replies()[-1][0] == p.REP_ERR_INVALID   # twice
    assert c.go("vol")["flags"] & p.FLAG_SEND_DF


def test_meta_context_needs_structured_replies(server):
    c = client_for(server)
    c.greeting()
    replies = c.set_meta_context("vol", [p.META_BASE_ALLOCATION])
    assert replies[-1][0] == p.REP_ERR_INVALID


def test_list_and_set_meta_context(server):
    c = client_for(server)
    c.greeting()
    c.structured_replies()
    for queries in ([], ["base:"], [p.META_BASE_ALLOCATION]):
        c.option(p.OPT_LIST_META_CONTEXT, c.meta_data("vol", queries))
        replies = c.option_replies()
        assert replies[-1] == (p.REP_ACK, b"")
        assert replies[:-1] == [(p.REP_META_CONTEXT, b"\0\0\0\0" + b"base:allocation")]
    c.option(p.OPT_LIST_META_CONTEXT, c.meta_data("vol", ["qemu:dirty-bitmap:x"]))
    assert c.option_replies() == [(p.REP_ACK, b"")]
    c.option(p.OPT_LIST_META_CONTEXT, c.meta_data("vol", ["nonamespace"]))
    assert c.option_replies()[-1][0] == p.REP_ERR_INVALID
    replies = c.set_meta_context("vol", ["x-other:thing", p.META_BASE_ALLOCATION])
    assert replies == [(p.REP_META_CONTEXT, struct.pack(">I", p.META_BASE_ALLOCATION_ID)
                        + b"base:allocation"), (p.REP_ACK, b"")]
    c.go("vol")
    assert c.block_status(0, 4096) == [(4096, p.STATE_HOLE | p.STATE_ZERO)]


def test_meta_context_for_another_export_does_not_carry_over(server):
    c = client_for(server)
    c.greeting()
    c.structured_replies()
    c.set_meta_context("other", [p.META_BASE_ALLOCATION])
    c.go("vol")
    error, _ = c.call(p.CMD_BLOCK_STATUS, 0, 4096)
    assert error == p.EINVAL


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",                      # wrong protocol
    struct.pack(">QII", 0x1234, p.OPT_GO, 0),                  # bad option magic
    struct.pack(">QII", p.IHAVEOPT, p.OPT_GO, 1 << 30),        # absurd option length
    struct.pack(">QII", p.IHAVEOPT, p.OPT_GO, 100) + b"short",  # then EOF
])
def test_malformed_handshakes_lose_only_their_connection(server, garbage):
    with Background(server, "vol") as bg:
        c = client_for(server)
        c.greeting()
        c.send(garbage)
        if garbage.endswith(b"short"):
            c.sock.shutdown(socket.SHUT_WR)
        assert c.is_closed()
        time.sleep(0.05)
        bg.check()
    # The server still accepts new clients.
    connected(server).disconnect()


def test_silent_client_is_dropped_after_the_handshake_timeout(server):
    c = client_for(server)
    c.recv_exact(18)
    start = time.monotonic()
    assert c.is_closed(timeout=10)
    assert time.monotonic() - start < 5


def test_tcp_works_and_sets_nodelay(server):
    sock = socket.create_connection(("127.0.0.1", server.tcp_address[1]), timeout=10)
    c = RawClient(sock)
    c.connect_export("vol")
    c.write(1, b"tcp!")
    assert c.read(0, 6) == b"\0tcp!\0"
    c.disconnect()


def test_a_unix_connection_queues_a_large_reply_without_waiting_for_the_client(volumes):
    """A Unix connection's send buffer holds a 1 MiB reply whole
    (server.SEND_BUFFER): the thread that sends it goes on to the next
    request before the client reads any of it."""
    from lsbd_nbd.server import SEND_BUFFER
    with open("/proc/sys/net/core/wmem_max") as f:
        if int(f.read()) < SEND_BUFFER and os.geteuid() != 0:
            pytest.skip("the kernel caps send buffers below server.SEND_BUFFER, "
                        "and only root may go past the cap")
    vol = volumes["vol"]
    with running_server(volumes) as srv:
        c = connected(srv)
        read = c.request(p.CMD_READ, 0, MiB)
        write = c.request(p.CMD_WRITE, 2 * MiB, 4096, data=b"w" * 4096)
        deadline = time.monotonic() + 5
        while vol.read(2 * MiB, 4096) != b"w" * 4096 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert vol.read(2 * MiB, 4096) == b"w" * 4096      # before any reply was read
        assert c.reply(MiB) == (read, 0, bytes(MiB))
        assert c.reply() == (write, 0, b"")
        c.disconnect()


# --- transmission: data ----------------------------------------------------------


@pytest.mark.parametrize("structured", [False, True])
def test_write_and_read_at_odd_offsets(server, volumes, structured):
    c = connected(server, structured=structured)
    data = os.urandom(10000)
    c.write(12345, data)
    assert c.read(12345, 10000) == data
    assert c.read(12340, 10) == bytes(5) + data[:5]
    assert volumes["vol"].read(12345, 10000) == data
    # A read at the very end of the export.
    c.write(SIZE - 3, b"end")
    assert c.read(SIZE - 3, 3) == b"end"
    c.disconnect()


@pytest.mark.parametrize("structured", [False, True])
def test_zero_length_requests_succeed(server, volumes, structured):
    c = connected(server, structured=structured)
    for cmd in (p.CMD_READ, p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES):
        assert c.call(cmd, 4096, 0) == (0, b"")
    assert volumes["vol"].calls["write"] == 0
    c.disconnect()


def test_largest_requests_round_trip(server, volumes):
    volumes["big"] = FakeVolume("big", 2 * p.MAX_BLOCK)
    c = connected(server, "big")
    data = os.urandom(p.MAX_BLOCK)
    c.write(p.MAX_BLOCK - 1, data)
    assert c.read(p.MAX_BLOCK - 1, p.MAX_BLOCK) == data
    c.disconnect()


def test_write_zeroes_and_trim_read_back_as_zeroes(server, volumes):
    c = connected(server, meta=True)
    c.write(0, b"\xff" * 3 * 4096)
    for flags in (0, p.CMD_FLAG_NO_HOLE, p.CMD_FLAG_FAST_ZERO,
                  p.CMD_FLAG_NO_HOLE | p.CMD_FLAG_FAST_ZERO | p.CMD_FLAG_FUA):
        c.write(0, b"\xff" * 3 * 4096)
        assert c.call(p.CMD_WRITE_ZEROES, 100, 8000, flags=flags) == (0, b"")
        assert c.read(0, 3 * 4096) == b"\xff" * 100 + bytes(8000) + b"\xff" * (3 * 4096 - 8100)
    assert c.call(p.CMD_TRIM, 0, 3 * 4096) == (0, b"")
    assert c.read(0, 3 * 4096) == bytes(3 * 4096)
    assert c.block_status(0, 3 * 4096) == [(3 * 4096, p.STATE_HOLE | p.STATE_ZERO)]
    c.disconnect()


def test_write_zeroes_larger_than_the_engine_maximum(server, volumes):
    volumes["big"] = big = FakeVolume("big", 128 * MiB)
    c = connected(server, "big")
    c.write(100 * MiB, b"x" * 4096)
    assert c.call(p.CMD_WRITE_ZEROES, 0, 128 * MiB) == (0, b"")
    assert big.calls["write_zeroes"] == 4             # in MAX_REQUEST pieces
    assert c.read(100 * MiB, 4096) == bytes(4096)
    c.disconnect()


def test_flush_and_fua_reach_the_engine(server, volumes):
    vol = volumes["vol"]
    c = connected(server)
    c.write(0, b"a" * 4096, flags=p.CMD_FLAG_FUA)
    assert vol.flushed_calls == 1
    assert c.call(p.CMD_FLUSH) == (0, b"")
    assert vol.calls["flush"] == 1
    assert c.call(p.CMD_TRIM, 0, 4096, flags=p.CMD_FLAG_FUA) == (0, b"")
    assert vol.flushed_calls == 3
    c.disconnect()


def test_block_status_reports_holes_and_data(server, volumes):
    c = connected(server, meta=True)
    c.write(64 * 1024, b"d" * 8192)
    c.write(1 * MiB, b"e" * 100)
    hole = p.STATE_HOLE | p.STATE_ZERO
    assert c.block_status(0, 2 * MiB) == [
        (64 * 1024, hole), (8192, 0), (MiB - 64 * 1024 - 8192, hole), (4096, 0),
        (MiB - 4096, hole)]
    assert c.block_status(0, 2 * MiB, flags=p.CMD_FLAG_REQ_ONE) == [(64 * 1024, hole)]
    assert c.block_status(70 * 1024, 100, flags=p.CMD_FLAG_REQ_ONE) == [(100, 0)]
    c.disconnect()


# --- transmission: errors -------------------------------------------------------------


def test_errors_for_bad_requests(server):
    with Background(server, "other") as bg:
        c = connected(server, structured=False)
        cases = [
            ((p.CMD_READ, SIZE - 10, 20), p.EINVAL),                      # beyond the end
            ((p.CMD_READ, 1 << 63, 512), p.EINVAL),
            ((p.CMD_TRIM, SIZE, 1), p.EINVAL),
            ((p.CMD_WRITE_ZEROES, SIZE - 1, 2), p.ENOSPC),                # spec: ENOSPC
            ((p.CMD_FLUSH, 1, 0), p.EINVAL),                              # reserved fields
            ((p.CMD_CACHE, 0, 512), p.EINVAL),                            # not advertised
            ((p.CMD_RESIZE, 0, 0), p.EINVAL),
            ((42, 0, 512), p.EINVAL),                                     # unknown command
            ((0xFFFF, 0, 0), p.EINVAL),
            ((p.CMD_BLOCK_STATUS, 0, 512), p.EINVAL),                     # not negotiated
        ]
        for (cmd, offset, length), expected in cases:
            handle = c.request(cmd, offset, length)
            assert c.reply() == (handle, expected, b""), (cmd, offset, length)
        # A write beyond the end: the payload is consumed, the stream stays in step.
        handle = c.request(p.CMD_WRITE, SIZE - 10, 20, data=b"z" * 20)
        assert c.reply() == (handle, p.ENOSPC, b"")
        # Bad flags.
        for cmd, flags in [(p.CMD_WRITE, p.CMD_FLAG_NO_HOLE), (p.CMD_READ, p.CMD_FLAG_DF),
                           (p.CMD_READ, p.CMD_FLAG_REQ_ONE), (p.CMD_READ, 0x100),
                           (p.CMD_TRIM, p.CMD_FLAG_FAST_ZERO)]:
            data = b"q" * 512 if cmd == p.CMD_WRITE else b""
            handle = c.request(cmd, 0, 512, flags=flags, data=data)
            assert c.reply() == (handle, p.EINVAL, b""), (cmd, flags)
        assert c.read(0, 512) == bytes(512)                               # nothing was written
        c.disconnect()
        bg.check()


def test_oversize_requests(server, volumes):
    volumes["big"] = FakeVolume("big", 2 * p.MAX_BLOCK)
    c = connected(server, "big")
    big = p.MAX_BLOCK + 1
    assert c.call(p.CMD_READ, 0, big)[0] == p.EINVAL
    assert c.call(p.CMD_READ, 0, big, flags=p.CMD_FLAG_DF)[0] == p.EOVERFLOW
    # An oversize WRITE: refused, its payload skipped, the connection goes on.
    handle = c.request(p.CMD_WRITE, 0, big, data=b"\xee" * big)
    assert c.reply()[:2] == (handle, p.EINVAL)
    assert c.read(0, 4096) == bytes(4096)
    # One too large to skip ends the connection.
    c.request(p.CMD_WRITE, 0, 0xFFFFFFFF)
    assert c.is_closed()


def test_structured_errors_carry_a_message(server):
    c = connected(server)
    handle = c.request(p.CMD_READ, SIZE, 1)
    magic, flags, rtype, got, length = p.STRUCTURED_REPLY.unpack(c.recv_exact(20))
    assert (magic, flags, rtype, got) == (p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE,
                                          p.REPLY_TYPE_ERROR, handle)
    payload = c.recv_exact(length)
    error, mlen = struct.unpack(">IH", payload[:6])
    assert error == p.EINVAL and b"beyond" in payload[6:6 + mlen]


def test_read_only_export_refuses_writes_with_eperm(server, volumes):
    c = connected(server, "ro")
    assert c.call(p.CMD_WRITE, 0, 4, data=b"nope")[0] == p.EPERM
    assert c.call(p.CMD_TRIM, 0, 4096)[0] == p.EPERM
    assert c.call(p.CMD_WRITE_ZEROES, 0, 4096)[0] == p.EPERM
    assert c.read(0, 4) == bytes(4)
    assert c.call(p.CMD_FLUSH) == (0, b"")
    assert volumes["ro"].calls["write"] == 0
    c.disconnect()


@pytest.mark.parametrize("exc, expected, logged", [
    (StoreError("bucket unreachable"), p.EIO, True),
    (StoreError("quota", errno.ENOSPC), p.ENOSPC, True),
    (CorruptionError("crc mismatch", key="seg/1", offset=5), p.EIO, True),
    (InvalidRequest("bad range"), p.EINVAL, False),
    (RuntimeError("a bug"), p.EIO, True),
])
@pytest.mark.parametrize("structured", [False, True])
def test_engine_failures_become_errors_for_that_request(server, volumes, caplog, exc,
                                                        expected, logged, structured):
    c = connected(server, structured=structured)
    c.write(0, b"ok" * 2048)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="lsbd.nbd"):
        volumes["vol"].fail_next(exc)
        assert c.call(p.CMD_READ, 0, 4096)[0] == expected
        volumes["vol"].fail_next(exc)
        assert c.call(p.CMD_WRITE, 0, 4096, data=b"x" * 4096)[0] == expected
    assert bool([r for r in caplog.records if r.name == "lsbd.nbd"]) == logged
    assert c.read(0, 4096) == b"ok" * 2048          # the connection is fine
    c.disconnect()


# --- connections, concurrency, ordering ------------------------------------------------


def test_disconnect_mid_request_and_without_disc(server, volumes, caplog):
    with Background(server, "vol", offset=8 * MiB) as bg:
        with caplog.at_level(logging.WARNING, logger="lsbd.nbd"):
            # EOF between requests, the way fio leaves.
            c = connected(server)
            c.write(0, b"1" * 4096)
            c.close()
            # EOF in the middle of a write payload.
            c = connected(server)
            c.request(p.CMD_WRITE, 4096, 4096, data=b"2" * 1000)
            c.close()
            # EOF in the middle of a request header.
            c = connected(server)
            c.send(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_READ, 1, 0, 512)[:13])
            c.close()
            # Garbage instead of a request.
            c = connected(server)
            c.send(b"\xde\xad\xbe\xef" * 7)
            assert c.is_closed()
            time.sleep(0.2)
        bg.check(min_rounds=5)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    c = connected(server)
    assert c.read(0, 4096) == b"1" * 4096
    assert c.read(4096, 4096) == bytes(4096)       # the cut write never happened
    c.disconnect()


def test_replies_complete_out_of_order(volumes):
    vol = volumes["vol"]
    # With nowait=True this read would block: it goes to the pool.
    vol.delay_for = lambda op, offset: 0.5 if op == "read" and offset == 0 else 0
    with running_server(volumes) as srv:
        c = connected(srv)
        slow = c.request(p.CMD_READ, 0, 4096)
        fast = [c.request(p.CMD_READ, 4096 * i, 4096) for i in range(1, 6)]
        order = [c.reply(4096)[0] for _ in range(6)]
        assert order[-1] == slow
        assert sorted(order[:-1]) == fast
        c.disconnect()


def test_reads_that_would_block_overlap_on_the_pool(volumes):
    vol = volumes["vol"]
    vol.delay_for = lambda op, offset: 0.05 if op == "read" else 0
    with running_server(volumes) as srv:
        c = connected(srv)
        start = time.monotonic()
        handles = [c.request(p.CMD_READ, i * 4096, 4096) for i in range(16)]
        got = sorted(c.reply(4096)[0] for _ in handles)
        elapsed = time.monotonic() - start
        assert got == handles
        assert elapsed < 16 * 0.05 / 2                       # they overlapped
        # Reads that do not block run inline: none of these reaches the pool.
        vol.delay_for = None
        submitted = srv.server.pool.submit
        calls = []
        srv.server.pool.submit = lambda *a: calls.append(a) or submitted(*a)
        handles = [c.request(p.CMD_READ, i * 4096, 4096) for i in range(16)]
        assert sorted(c.reply(4096)[0] for _ in handles) == handles
        assert calls == []
        srv.server.pool.submit = submitted
        c.disconnect()


def _record_nowait_tries(vol) -> list[int]:
    """The offsets of the reads tried inline (nowait) on `vol`, in order."""
    tried: list[int] = []
    real_read = vol.read

    def read(offset, length, *, nowait=False):
        if nowait:
            tried.append(offset)
        return real_read(offset, length, nowait=nowait)

    vol.read = read
    return tried


def test_large_reads_after_a_cold_one_skip_the_inline_try(volumes):
    """After a large read found the cache cold, the next READS_AFTER_MISS
    large reads go to the pool untried (a sequential reader on a cold cache
    would otherwise keep the connection's thread busy failing them), then
    one tries inline again; small reads always try inline."""
    from lsbd_nbd.dispatch import POOL_READ_FROM, READS_AFTER_MISS
    vol = volumes["vol"]
    big = POOL_READ_FROM
    tried = _record_nowait_tries(vol)
    vol.delay_for = lambda op, offset: 0.01 if op == "read" and offset < 64 * big else 0
    with running_server(volumes) as srv:
        c = connected(srv)
        for i in range(READS_AFTER_MISS + 3):
            assert c.read(i * big, big) == bytes(big)
        # The first tried and blocked; the next READS_AFTER_MISS were not
        # tried; then one was tried again, blocked, and the next was not.
        assert tried == [0, (READS_AFTER_MISS + 1) * big]
        assert c.read(0, 4096) == bytes(4096)             # a small read still tries
        assert tried[-1] == 0
        # The cache warm: the untried ones left go to the pool, then the try
        # succeeds and every large read after it runs inline.
        vol.delay_for = None
        tried.clear()
        for i in range(READS_AFTER_MISS + 2):
            assert c.read(i * big, big) == bytes(big)
        assert tried == [i * big for i in range(READS_AFTER_MISS - 1, READS_AFTER_MISS + 2)]
        c.disconnect()


def test_large_reads_of_a_device_that_reads_in_turn_skip_the_inline_try_longer():
    """On a device whose long reads run in turn (the read lane), the next
    READS_AFTER_MISS_IN_TURN large reads after a cold one go to the lane
    untried: an inline try of a cold read plans it on the connection's
    thread beside the lane, for nothing."""
    from lsbd_nbd.dispatch import POOL_READ_FROM, READS_AFTER_MISS, READS_AFTER_MISS_IN_TURN

    class InTurn(FakeVolume):
        long_reads_in_turn = True

    assert READS_AFTER_MISS_IN_TURN > READS_AFTER_MISS
    vol = InTurn("vol", SIZE)
    big = POOL_READ_FROM
    tried = _record_nowait_tries(vol)
    vol.delay_for = lambda op, offset: 0.002 if op == "read" else 0
    with running_server({"vol": vol}) as srv:
        c = connected(srv)
        for i in range(READS_AFTER_MISS_IN_TURN + 3):
            assert c.read(i * big, big) == bytes(big)
        assert tried == [0, (READS_AFTER_MISS_IN_TURN + 1) * big]
        c.disconnect()


class CountingReads(FakeVolume):
    """Counts the long reads running at once (most) and the threads that ran
    them; each long read that blocks takes 20 ms."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.guard = threading.Lock()
        self.running = self.most = 0
        self.threads: set[int] = set()
        self.delay_for = lambda op, offset: 0.02 if op == "read" and offset >= MiB else 0

    def read(self, offset, length, *, nowait=False):
        if length < 128 * 1024 or nowait:
            return super().read(offset, length, nowait=nowait)
        with self.guard:
            self.running += 1
            self.most = max(self.most, self.running)
            self.threads.add(threading.get_ident())
        try:
            return super().read(offset, length, nowait=nowait)
        finally:
            with self.guard:
                self.running -= 1


class ReadsInTurn(CountingReads):
    long_reads_in_turn = True


def _long_reads_and_a_short_one(c, vol):
    """Eight large READs that block, then a small one that does not; the
    handles in the order their replies came, and whether each large reply
    carried its own bytes."""
    from lsbd_nbd.dispatch import POOL_READ_FROM
    big = POOL_READ_FROM
    for i in range(8):
        vol.write(MiB + i * big, bytes([i + 1]) * big)
    handles = [c.request(p.CMD_READ, MiB + i * big, big) for i in range(8)]
    small = c.request(p.CMD_READ, 0, 4096)
    replies = [c.reply(big) for _ in range(9)]
    assert all(error == 0 for _h, error, _d in replies)
    got = {h: d for h, _e, d in replies}
    assert got[small] == bytes(4096)
    assert [got[h] for h in handles] == [bytes([i + 1]) * big for i in range(8)]
    return [h for h, _e, _d in replies], handles, small


def test_long_reads_of_a_device_that_reads_in_turn_run_in_its_read_lane():
    """long_reads_in_turn (a volume on a local store): the large READs that
    would block run one after another on one pool thread, in the order they
    came, while the connection goes on answering others."""
    vol = ReadsInTurn("vol", SIZE)
    with running_server({"vol": vol}) as srv:
        c = connected(srv)
        order, handles, small = _long_reads_and_a_short_one(c, vol)
        assert order.index(small) < 8            # the connection did not wait for them all
        assert [h for h in order if h != small] == handles   # in turn, in the order sent
        assert vol.most == 1
        assert len(vol.threads) == 1
        # A failing one gets its error; the lane goes on with the next.
        vol.fail_next(CorruptionError("bad block"))
        bad = c.request(p.CMD_READ, MiB, 128 * 1024)
        good = c.request(p.CMD_READ, MiB + 128 * 1024, 128 * 1024)
        first, second = c.reply(128 * 1024), c.reply(128 * 1024)
        assert (first[0], first[1]) == (bad, errno.EIO)
        assert second == (good, 0, bytes([2]) * 128 * 1024)
        c.disconnect()


class SlowSends:
    """ReplySender.send patched: each reply of a long read takes `seconds`
    to go out, and the first one waits (up to 5 s) for the second long read
    of `vol` to start.  Records the thread of every such send, and how many
    were out when each long read started."""

    def __init__(self, monkeypatch, vol, seconds: float):
        from lsbd_nbd.replies import ReplySender
        self.sent: list[int] = []
        self.out_at_start: list[int] = []
        self.release = threading.Event()
        self.first_waited: list[bool] = []
        send, read = ReplySender.send, vol.read

        def slow_send(conn, reply):
            if reply[1] is None or len(reply[1]) < 128 * 1024:
                return send(conn, reply)
            if not self.first_waited:
                self.first_waited.append(self.release.wait(5))
            time.sleep(seconds)
            send(conn, reply)
            self.sent.append(threading.get_ident())

        def noted_read(offset, length, *, nowait=False):
            if length >= 128 * 1024 and not nowait:
                self.out_at_start.append(len(self.sent))
                if len(self.out_at_start) == 2:
                    self.release.set()
            return read(offset, length, nowait=nowait)

        monkeypatch.setattr(ReplySender, "send", slow_send)
        vol.read = noted_read


def test_the_read_lane_reads_the_next_while_the_last_reply_goes_out(monkeypatch):
    """The read lane hands each reply to the connection's sender thread and
    goes on to the next read; it waits for the reply before that, so at
    most one reply of a read done waits to go out."""
    vol = ReadsInTurn("vol", SIZE)
    sends = SlowSends(monkeypatch, vol, seconds=0.05)    # slower than a read (20 ms)
    with running_server({"vol": vol}) as srv:
        c = connected(srv)
        order, handles, _small = _long_reads_and_a_short_one(c, vol)
        assert [h for h in order if h in handles] == handles     # in the order they came
        # The second read ran while the first reply was still going out ...
        assert sends.first_waited == [True]
        # ... and no read ran with more than one reply before it left unsent.
        assert len(sends.out_at_start) == 8
        assert all(out >= k - 1 for k, out in enumerate(sends.out_at_start)), sends.out_at_start
        # The replies went out on one thread, not the lane's.
        assert len(set(sends.sent)) == 1 and not set(sends.sent) & vol.threads
        c.disconnect()


def test_a_connection_ends_only_once_its_sender_has_sent_every_reply(monkeypatch):
    """A client that asks for long reads and disconnects at once still gets
    every reply, even from a server whose pool has one thread (the lane
    holds it: its sender is not the pool's); the sender thread ends with
    the connection."""
    from lsbd_nbd.dispatch import POOL_READ_FROM
    vol = ReadsInTurn("vol", SIZE)
    SlowSends(monkeypatch, vol, seconds=0.05)
    big = POOL_READ_FROM
    with running_server({"vol": vol}, workers=1) as srv:
        c = connected(srv)
        handles = [c.request(p.CMD_READ, MiB + i * big, big) for i in range(4)]
        c.request(p.CMD_DISC)
        assert [c.reply(big)[:2] for _ in handles] == [(h, 0) for h in handles]
        assert c.is_closed()
        c.close()
        deadline = time.monotonic() + 5
        while (any(t.name.startswith("nbd-send") for t in threading.enumerate())
               and time.monotonic() < deadline):
            time.sleep(0.01)
        assert not [t for t in threading.enumerate() if t.name.startswith("nbd-send")]


def test_long_reads_of_other_devices_overlap_on_the_pool():
    """Without long_reads_in_turn (a distant store: reads wait on the
    network) the large READs that would block still run at once."""
    vol = CountingReads("vol", SIZE)
    with running_server({"vol": vol}) as srv:
        c = connected(srv)
        _long_reads_and_a_short_one(c, vol)
        assert vol.most > 1
        c.disconnect()


class NoNowaitVolume(FakeVolume):
    """A device whose calls do not take nowait (as BlockDevice allows)."""

    supports_nowait = False

    def read(self, offset, length):
        return super().read(offset, length)

    def write(self, offset, data, *, fua=False):
        return super().write(offset, data, fua=fua)

    def write_zeroes(self, offset, length, *, fua=False):
        return super().write_zeroes(offset, length, fua=fua)

    def trim(self, offset, length, *, fua=False):
        return super().trim(offset, length, fua=fua)


def test_devices_without_nowait_run_requests_inline():
    vol = NoNowaitVolume("vol", SIZE)
    with running_server({"vol": vol}) as srv:
        c = connected(srv)
        big = os.urandom(MiB)
        c.write(0, big)                                       # on the pool
        c.write(MiB + 1, b"x" * 5000)                         # inline
        assert c.call(p.CMD_WRITE_ZEROES, 100, 50) == (0, b"")
        assert c.call(p.CMD_TRIM, 2 * MiB, 8192) == (0, b"")
        assert c.read(0, MiB) == big[:100] + bytes(50) + big[150:]
        assert c.read(MiB, 5002) == b"\0" + b"x" * 5000 + b"\0"
        # A slow read holds up the connection (it cannot tell that it blocks).
        vol.delay_for = lambda op, offset: 0.3 if op == "read" and offset == 0 else 0
        slow = c.request(p.CMD_READ, 0, 4096)
        fast = c.request(p.CMD_READ, 4096, 4096)
        assert [c.reply(4096)[0] for _ in range(2)] == [slow, fast]
        c.disconnect()


def test_large_writes_run_on_the_pool_in_order_with_overlapping_requests():
    # Without nowait, only its size can send the slow write to the pool.
    vol = NoNowaitVolume("vol", SIZE)
    big = 256 * 1024
    vol.delay_for = lambda op, offset: 0.3 if op == "write" and offset == 0 else 0
    with running_server({"vol": vol}) as srv:
        c = connected(srv)
        first = c.request(p.CMD_WRITE, 0, big, data=b"A" * big)        # slow, on the pool
        second = c.request(p.CMD_WRITE, 4096, 4096, data=b"B" * 4096)  # overlaps: waits
        read = c.request(p.CMD_READ, 0, 3 * 4096)                       # sees both
        third = c.request(p.CMD_WRITE, big - 4096, big, data=b"C" * big)   # overlaps first
        other = c.request(p.CMD_READ, 4 * MiB, 4096)                    # independent
        replies = []
        for _ in range(5):
            handle, error, data = c.reply(3 * 4096)
            assert error == 0
            replies.append((handle, data))
        order = [h for h, _ in replies]
        # The connection went on while the large write ran: the independent
        # read was answered first.
        assert order[0] == other
        assert order.index(first) < order.index(second) < order.index(read)
        assert order.index(first) < order.index(third)
        assert dict(replies)[read] == b"A" * 4096 + b"B" * 4096 + b"A" * 4096
        expected = b"A" * 4096 + b"B" * 4096 + b"A" * (big - 3 * 4096) + b"C" * big
        assert vol.read(0, 2 * big - 4096) == expected
        c.disconnect()


def test_large_writes_of_a_connection_run_one_at_a_time():
    class Counting(NoNowaitVolume):
        running = most = 0

        def write(self, offset, data, *, fua=False):
            with lock:
                self.running += 1
                self.most = max(self.most, self.running)
            try:
                time.sleep(0.05)
                return super().write(offset, data, fua=fua)
            finally:
                with lock:
                    self.running -= 1

    lock = threading.Lock()
    vol = Counting("vol", SIZE)
    big = 256 * 1024
    with running_server({"vol": vol}) as srv:
        c = connected(srv)
        handles = [c.request(p.CMD_WRITE, i * big, big, data=bytes([i]) * big)
                   for i in range(6)]
        other = c.request(p.CMD_READ, 4 * MiB, 4096)
        order = [c.reply(4096)[0] for _ in range(7)]
        assert order[0] == other                # the connection did not wait for them
        assert order[1:] == handles             # in turn, in the order sent
        assert vol.most == 1
        assert vol.read(0, 6 * big) == b"".join(bytes([i]) * big for i in range(6))
        c.disconnect()


def test_small_writes_that_would_block_go_to_the_pool(volumes):
    vol = volumes["vol"]
    vol.delay_for = lambda op, offset: 0.3 if op == "write" and offset == 0 else 0
    with running_server(volumes) as srv:
        c = connected(srv)
        slow = c.request(p.CMD_WRITE, 0, 4096, data=b"S" * 4096)
        read = c.request(p.CMD_READ, 0, 4096)                           # waits for it
        other = c.request(p.CMD_WRITE, 8192, 4096, data=b"O" * 4096)    # does not
        replies = {}
        order = []
        for _ in range(3):
            handle, error, data = c.reply(4096)
            assert error == 0
            replies[handle] = data
            order.append(handle)
        assert order[0] == other
        assert order.index(slow) < order.index(read)
        assert replies[read] == b"S" * 4096
        c.disconnect()


def test_overlapping_writes_keep_their_order(volumes):
    vol = volumes["vol"]
    vol.delay_for = lambda op, offset: 0.3 if op == "write" and offset == 0 else 0
    with running_server(volumes) as srv:
        c = connected(srv)
        # FUA sends the first write to the pool, where it takes a while.
        first = c.request(p.CMD_WRITE, 0, 8192, data=b"A" * 8192, flags=p.CMD_FLAG_FUA)
        second = c.request(p.CMD_WRITE, 4096, 4096, data=b"B" * 4096)    # overlaps
        zero = c.request(p.CMD_WRITE_ZEROES, 6000, 100)                  # overlaps both
        read = c.request(p.CMD_READ, 0, 8192)                            # sees all three
        other = c.request(p.CMD_WRITE, 65536, 4096, data=b"C" * 4096)    # independent
        replies = {}
        for _ in range(5):
            handle, error, data = c.reply(8192)
            assert error == 0
            replies[handle] = data
            if handle == other:
                assert first not in replies                               # did not wait
        assert set(replies) == {first, second, zero, read, other}
        expected = b"A" * 4096 + b"B" * (6000 - 4096) + bytes(100) + b"B" * (8192 - 6100)
        assert replies[read] == expected
        assert vol.read(0, 8192) == expected
        c.disconnect()


def _burst(requests) -> bytes:
    """Several requests as one byte string, for one send: the server then
    finds them all in one receive, as with a pipelining client."""
    return b"".join(p.REQUEST.pack(p.REQUEST_MAGIC, flags, cmd, handle, offset, len(data) or length)
                    + data for cmd, flags, handle, offset, length, data in requests)


def test_a_burst_of_small_writes_reaches_the_engine_as_one_call(server, volumes):
    vol = volumes["vol"]
    c = connected(server)
    blocks = [os.urandom(4096) for _ in range(20)]
    burst = [(p.CMD_WRITE, 0, i, (i % 8) * 4096, 0, data) for i, data in enumerate(blocks)]
    # A later write to a block wins over an earlier one in the same burst, and
    # a read in the burst sees every write before it.
    burst.append((p.CMD_READ, 0, 100, 0, 8 * 4096, b""))
    c.send(_burst(burst))
    replies = {}
    for _ in burst:
        handle, error, data = c.reply(8 * 4096)
        assert error == 0
        replies[handle] = data
    newest = {i % 8: data for i, data in enumerate(blocks)}
    expected = b"".join(newest[i] for i in range(8))
    assert replies[100] == expected
    assert vol.read(0, 8 * 4096) == expected
    assert vol.calls["write_many"] >= 1
    assert vol.calls["write_many"] < len(blocks)      # batched, not one call each
    c.disconnect()


def test_a_burst_whose_batch_would_block_still_completes_in_order(volumes):
    vol = volumes["vol"]
    # The write at 0 waits for "the store": the batch holding it is refused
    # with WouldBlock, its writes go one by one, that one to the pool.
    vol.delay_for = lambda op, offset: 0.3 if op == "write" and offset == 0 else 0
    with running_server(volumes) as srv:
        c = connected(srv)
        burst = [(p.CMD_WRITE, 0, 1, 0, 0, b"A" * 4096),
                 (p.CMD_WRITE, 0, 2, 4096, 0, b"B" * 4096),
                 (p.CMD_WRITE, 0, 3, 0, 0, b"C" * 4096),          # overlaps the slow one
                 (p.CMD_READ, 0, 4, 0, 8192, b"")]
        c.send(_burst(burst))
        replies = {}
        for _ in burst:
            handle, error, data = c.reply(8192)
            assert error == 0
            replies[handle] = data
        assert replies[4] == b"C" * 4096 + b"B" * 4096
        assert vol.read(0, 8192) == b"C" * 4096 + b"B" * 4096
        c.disconnect()


def test_a_failing_batch_gives_each_write_its_own_outcome(server, volumes):
    vol = volumes["vol"]
    c = connected(server)
    vol.fail_next(StoreError("the store is unreachable"))
    burst = [(p.CMD_WRITE, 0, 1, 0, 0, b"A" * 4096),
             (p.CMD_WRITE, 0, 2, 4096, 0, b"B" * 4096)]
    c.send(_burst(burst))
    errors = dict(c.reply()[:2] for _ in burst)
    assert errors == {1: errno.EIO, 2: 0}        # only the first write met the failure
    assert vol.read(0, 8192) == bytes(4096) + b"B" * 4096
    c.disconnect()


def test_many_clients_at_once(server, volumes):
    errors = []

    def worker(i):
        try:
            c = connected(server)
            base = i * 512 * 1024
            for n in range(50):
                data = os.urandom(4096)
                off = base + (n % 64) * 4096 + (n % 7)
                c.write(off, data)
                assert c.read(off, 4096) == data
            c.close()
        except BaseException as e:  # noqa: BLE001 - the test reports every worker's error
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []


def test_pipelined_requests_on_one_connection(server, volumes):
    c = connected(server)
    blocks = {i: os.urandom(4096) for i in range(200)}
    for i, data in blocks.items():
        c.request(p.CMD_WRITE, i * 4096, 4096, data=data, handle=i)
    assert sorted(c.reply()[0] for _ in blocks) == sorted(blocks)
    # Send all the reads before reading any reply (from another thread: the
    # replies would otherwise fill the socket buffers both ways).
    sender = threading.Thread(target=lambda: [
        c.request(p.CMD_READ, i * 4096, 4096, handle=1000 + i) for i in blocks])
    sender.start()
    for _ in blocks:
        handle, error, data = c.reply(4096)
        assert error == 0 and data == blocks[handle - 1000]
    sender.join()
    c.disconnect()


def test_flush_on_one_connection_covers_writes_of_another(server, volumes):
    vol = volumes["vol"]
    a, b = connected(server), connected(server)
    a.write(0, b"a" * 4096)
    b.write(4096, b"b" * 4096)
    before = vol.calls["flush"]
    assert a.call(p.CMD_FLUSH) == (0, b"")
    # One engine is shared by all connections, and its flush covers every
    # write that returned: so b's write is covered by a's flush.
    assert vol.calls["flush"] == before + 1
    a.disconnect()
    b.disconnect()


def test_shutdown_finishes_in_flight_requests(volumes):
    vol = volumes["vol"]
    vol.delay_for = lambda op, offset: 0.5 if op == "write" else 0
    srv = RunningServerFor(volumes)
    c = connected(srv.inner)
    handle = c.request(p.CMD_WRITE, 0, 4096, data=b"s" * 4096)
    time.sleep(0.1)                     # the write is running
    closer = threading.Thread(target=srv.inner.close)
    closer.start()
    assert c.reply() == (handle, 0, b"")   # its reply still comes
    assert c.is_closed()
    closer.join(10)
    assert not closer.is_alive()
    assert vol.read(0, 4096) == b"s" * 4096
    with pytest.raises(OSError):
        srv.inner.connect()


class RunningServerFor:
    def __init__(self, volumes, **kw):
        from nbd_helpers import RunningServer
        self.inner = RunningServer(volumes, **kw)


def test_close_cuts_off_a_client_that_does_not_read_its_replies(volumes):
    srv = RunningServerFor(volumes).inner
    c = connected(srv)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    # Ask for far more reply data than the socket buffers hold, read none.
    for _ in range(64):
        c.request(p.CMD_READ, 0, 4 * MiB)
    time.sleep(0.3)
    start = time.monotonic()
    srv.close(timeout=1)
    assert time.monotonic() - start < 8


def test_a_second_server_on_a_live_socket_is_refused_and_a_stale_one_replaced(volumes, tmp_path):
    """listen_unix: a socket another server listens on is an error that
    leaves the first server serving; a socket nobody listens on (a server
    that died) is replaced; a file that is not a socket is left alone."""
    from lsbd_nbd.server import NBDServer
    with running_server(volumes) as srv:
        second = NBDServer(volumes)
        with pytest.raises(OSError, match="another server is listening there"):
            second.listen_unix(srv.socket_path)
        second.close()
        c = connected(srv)                      # the first still serves
        assert c.read(0, 4096) == volumes["vol"].read(0, 4096)
        c.disconnect()
    stale = str(tmp_path / "stale.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(stale)
    dead.close()                                # a socket file, nobody listening
    server = NBDServer(volumes)
    try:
        assert server.listen_unix(stale) == stale
    finally:
        server.close()
    plain = tmp_path / "plain"
    plain.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="is not a socket"):
        NBDServer(volumes).listen_unix(str(plain))
    assert plain.read_bytes() == b"keep me"
