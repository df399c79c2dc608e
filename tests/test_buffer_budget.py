"""The buffer budget: bytes of partly received packets, per connection and per process, bounded and given back.

A connection holds at most one frame (it reads no more than the frame lacks); all of a process's
sessions together at most `--buffer-budget` MiB: the session whose bytes would go past it, and a
new connection while less than one maximal frame is left, are answered 4 and closed. Functional
tests only: the memory figures are bench/buffers.py's (docs/performance.md).
"""

from __future__ import annotations

import gc
import logging
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from click.testing import CliRunner
from test_server import OK, OVERLOADED, memory_session, read_until_closed, running, stored

from dtgserver.cli import main
from dtgserver.protocol import NEED_DATA, Connection, ProtocolError, Received, Role, max_frame_length
from dtgserver.server import app
from dtgserver.server.config import MIB, ServerConfig
from dtgserver.testing import dtg_bytes

BIG = 23 + 51 * 3600  # a DTG packet of the default --max-body-count, 3,600 bodies


async def until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(20):
        while not condition():
            await trio.sleep(0.01)


def test_the_framer_asks_for_what_the_frame_lacks_once_its_header_tells() -> None:
    packet = dtg_bytes(bodies=3600)
    assert len(packet) == BIG == max_frame_length()
    conn = Connection(Role.SERVER)

    def wanted() -> int | None:  # read anew each time (mypy would keep `wanted is None` from above)
        return conn.wanted

    assert conn.next_event() is NEED_DATA and wanted() is None  # nothing begun
    conn.receive_data(packet[:10])
    assert conn.next_event() is NEED_DATA and wanted() is None  # the body count not in yet
    conn.receive_data(packet[10:70_000])
    assert conn.next_event() is NEED_DATA and wanted() == BIG - 70_000
    conn.receive_data(packet[70_000:])
    event = conn.next_event()
    assert isinstance(event, Received) and event.raw == packet
    assert conn.next_event() is NEED_DATA and wanted() is None


def test_a_connection_that_failed_lets_its_buffer_go_without_the_cycle_collector() -> None:
    """As the session does: the error caught in the frame that holds the Connection."""

    def session() -> weakref.ref[Connection]:
        conn = Connection(Role.SERVER)
        conn.receive_data(dtg_bytes(bodies=3600)[:100_000])
        conn.receive_data(b"")  # the peer closed inside the packet
        try:
            conn.next_event()
        except ProtocolError:
            assert conn.buffered == 0  # let go at once
        with pytest.raises(ProtocolError, match="stream ended inside a packet"):
            conn.next_event()  # and the same error again
        return weakref.ref(conn)

    gc.disable()
    try:
        assert session()() is None  # freed by its reference count: no cycle through a traceback
    finally:
        gc.enable()


def test_the_longest_frame_follows_max_body_count_and_the_log_size_field() -> None:
    assert max_frame_length(max_body_count=3600) == BIG
    assert max_frame_length(max_body_count=1) == 21 + 32_767  # a status log of the 2-byte size's maximum
    assert max_frame_length(max_body_count=32_767) == 23 + 51 * 32_767


async def test_a_session_past_the_budget_and_new_connections_get_4_and_it_all_comes_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "dtgserver.session")
    monkeypatch.setattr(app, "TRIM_CHECK_S", 0.05)
    monkeypatch.setattr(app, "TRIM_AFTER", 4 * BIG)
    packets = [dtg_bytes(f"0105555000{i}", bodies=3600) for i in range(7)]
    async with running(tmp_path, buffer_budget=1, idle_timeout=60.0, packet_timeout=60.0) as server:
        assert server.port
        budget = server.budget
        assert budget.limit == MIB  # room for 5 partial maximal packets, not 6
        streams = [await trio.open_tcp_stream("127.0.0.1", server.port) for _ in range(6)]
        await until(lambda: server.metrics.open_connections == 6)  # all in while nothing was buffered
        for i in range(5):
            await streams[i].send_all(packets[i][:-1])
            await until(lambda i=i: budget.used == (i + 1) * (BIG - 1))  # type: ignore[misc]

        async def send_all_it_can(stream: trio.abc.Stream, data: bytes) -> None:
            try:
                await stream.send_all(data)
            except trio.BrokenResourceError:
                pass  # closed by the server after its answer

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all_it_can, streams[5], packets[5][:-1])
            assert await read_until_closed(streams[5]) == OVERLOADED  # the sixth: past the budget
        assert budget.refused == 1
        await until(lambda: budget.used == 5 * (BIG - 1))  # its bytes given back when it ended, the others' held

        late = await trio.open_tcp_stream("127.0.0.1", server.port)  # less than one packet left: 4 at once
        async with late:
            assert await read_until_closed(late) == OVERLOADED
        assert budget.refused == 2

        await streams[0].send_all(packets[0][-1:])  # a held packet completes: stored, its bytes released
        assert await streams[0].receive_some(2) == OK
        assert budget.used == 4 * (BIG - 1)
        for stream in streams:
            await stream.aclose()
        await until(lambda: budget.used == 0)
        await until(lambda: budget.trims >= 1)  # the freed buffers handed back to the OS
        fresh = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with fresh:
            await fresh.send_all(packets[6])
            assert await fresh.receive_some(2) == OK
        assert budget.used == 0
    assert [raw for _, _, raw in stored(tmp_path)] == [packets[0], packets[6]]
    ends = [r.getMessage().rsplit(" end=", 1)[1] for r in caplog.records if r.name == "dtgserver.session"]
    assert sum(e.startswith("buffer budget spent, ") and e.endswith(" bytes of a packet dropped") for e in ends) == 1
    assert ends.count("buffer budget spent") == 1  # the late connection


async def test_bytes_of_a_session_ended_by_a_format_error_are_given_back_before_its_drain(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    async with memory_session(tmp_path) as (server, client):
        await client.send_all(dtg_bytes(bodies=3600)[:100_000])
        await until(lambda: server.budget.used == 100_000)
        await client.send_eof()  # the peer closes inside the packet: a format error, answered 1
        assert await client.receive_some(2) == b"\x09\x01"
        assert server.budget.used == 0  # while the server still drains for 1 s before it closes
        assert await read_until_closed(client) == b""


async def test_bytes_of_a_packet_cut_by_the_packet_timeout_are_given_back(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    async with memory_session(tmp_path) as (server, client):
        await client.send_all(dtg_bytes(bodies=3600)[:100_000])
        await until(lambda: server.budget.used == 100_000)
        assert await read_until_closed(client) == b""  # cut at the packet timeout, unanswered
        assert server.budget.used == 0


def test_a_budget_below_one_packet_is_refused_before_anything_starts() -> None:
    with pytest.raises(ValueError, match="--buffer-budget 1 MiB is less than one packet"):
        ServerConfig(buffer_budget=1, max_body_count=32_767)
    result = CliRunner().invoke(main, ["serve", "--buffer-budget", "1", "--max-body-count", "32767"])
    assert result.exit_code == 2
    assert ("--buffer-budget 1 MiB is less than one packet of --max-body-count 32767 (1,671,140 bytes)"
            in result.output)
    result = CliRunner().invoke(main, ["serve", "--buffer-budget", "0"])
    assert result.exit_code == 2 and "--buffer-budget" in result.output
