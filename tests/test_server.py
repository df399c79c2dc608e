"""The ingest server: sessions, timeouts and every result code, in memory and over real TCP."""

from __future__ import annotations

import hashlib
import math
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio.testing
from conftest import store_of, until

from dtgserver.protocol import Connection, Result, encode
from dtgserver.server.app import DtgServer
from dtgserver.server.config import ServerConfig
from dtgserver.server.timeouts import DEFAULT_TICK
from dtgserver.store import Control
from dtgserver.testing import basic_info, dtg_bytes, key_off, status_log

OK, FORMAT_ERROR, UNKNOWN, MAINTENANCE, OVERLOADED = (bytes([0x09, r]) for r in range(5))


def stored(data_dir: Path) -> list[tuple[str, str, bytes]]:
    db = sqlite3.connect(data_dir / "store-0.db")
    try:
        return [(m, k, bytes(r)) for m, k, r in db.execute("SELECT modem, kind, raw FROM packets ORDER BY id")]
    finally:
        db.close()


@asynccontextmanager
async def running(tmp_path: Path, **overrides: object) -> AsyncIterator[DtgServer]:
    """A server on 127.0.0.1, port 0, stopped (gracefully) at the end."""
    config = ServerConfig(**{"host": "127.0.0.1", "port": 0, "data_dir": tmp_path, "control_poll": 0.05,
                             "grace_period": 2.0, **overrides})  # type: ignore[arg-type]
    server = DtgServer(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        yield server
        server.stop()


async def exchange(port: int, *packets: bytes, read: int | None = None) -> bytes:
    """Send packets on one connection; return the answers (2 bytes a packet), or all until closed."""
    read = 2 * len(packets) if read is None else read
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            for packet in packets:
                await stream.send_all(packet)
            answer = b""
            while read < 0 or len(answer) < read:
                chunk = await stream.receive_some(64)
                if not chunk:
                    break
                answer += chunk
            return answer


# -- in memory, virtual time ------------------------------------------------------------------


@asynccontextmanager
async def memory_session(tmp_path: Path,
                         **overrides: object) -> AsyncIterator[tuple[DtgServer, trio.abc.HalfCloseableStream]]:
    # No commit timeout: in virtual time the clock jumps while a commit runs in its thread.
    config = ServerConfig(**{"data_dir": tmp_path, "commit_timeout": math.inf, **overrides})  # type: ignore[arg-type]
    server = DtgServer(config)
    client, server_side = trio.testing.memory_stream_pair()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store_of(server).run)
            nursery.start_soon(server.handle, server_side)
            yield server, client
            nursery.cancel_scope.cancel()
    finally:
        store_of(server).close()
        server.control.close()


def fired_after(elapsed: float, timeout: float) -> bool:
    """Session timeouts are checked every DEFAULT_TICK s (server/timeouts.py): never early, at most a tick late."""
    return timeout - 1e-9 <= elapsed <= timeout + DEFAULT_TICK + 1e-9


async def read_until_closed(stream: trio.abc.Stream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(64):
        data += chunk
    return data


async def test_idle_connection_closed_after_3s(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    async with memory_session(tmp_path) as (_server, client):
        start = trio.current_time()
        assert await read_until_closed(client) == b""
        assert fired_after(trio.current_time() - start, 3.0)


async def test_half_packet_dropped_unanswered_after_3s(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    packet = dtg_bytes()
    async with memory_session(tmp_path) as (_server, client):
        await trio.sleep(2.5)
        await client.send_all(packet[:100])
        start = trio.current_time()
        assert await read_until_closed(client) == b""
        assert fired_after(trio.current_time() - start, 3.0)  # measured from the last byte
    assert stored(tmp_path) == []


async def test_idle_timeout_after_an_answer(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    async with memory_session(tmp_path) as (_server, client):
        await client.send_all(dtg_bytes())
        sent = trio.current_time()  # the idle timeout runs from the last byte received
        assert await client.receive_some(2) == OK
        assert await read_until_closed(client) == b""
        assert fired_after(trio.current_time() - sent, 3.0)
    assert len(stored(tmp_path)) == 1


async def test_slow_drip_cut_by_packet_timeout(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    packet = dtg_bytes()
    async with memory_session(tmp_path, packet_timeout=30.0) as (_server, client):
        start = trio.current_time()
        with trio.move_on_after(60):
            for byte in packet:  # one byte every 2 s: never idle for 3 s, never done
                try:
                    await client.send_all(bytes([byte]))
                except trio.BrokenResourceError:
                    break
                await trio.sleep(2)
        assert await read_until_closed(client) == b""
        assert trio.current_time() - start < 33
    assert stored(tmp_path) == []


async def test_several_packets_on_one_connection_answered_in_order(tmp_path: Path,
                                                                   autojump_clock: trio.abc.Clock) -> None:
    packets = [encode(basic_info()), dtg_bytes(), encode(key_off()), encode(status_log())]
    async with memory_session(tmp_path) as (_server, client):
        await client.send_all(b"".join(packets))  # all in one chunk
        answers = b""
        while len(answers) < 8:
            answers += await client.receive_some(8)
        assert answers == OK * 4
    assert [kind for _, kind, _ in stored(tmp_path)] == ["basic_info", "dtg", "key_off", "status_log"]


async def test_format_error_answers_1_and_closes(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    async with memory_session(tmp_path) as (_server, client):
        await client.send_all(b"\x05" + bytes(40))
        assert await read_until_closed(client) == FORMAT_ERROR
    assert stored(tmp_path) == []


# -- real TCP ---------------------------------------------------------------------------------


async def test_end_to_end_store_and_answer(tmp_path: Path) -> None:
    packet = dtg_bytes("01099998888")
    async with running(tmp_path) as server:
        assert server.port
        assert await exchange(server.port, packet) == OK
    assert stored(tmp_path) == [("01099998888", "dtg", packet)]


async def test_resent_packet_answered_0_and_stored_once(tmp_path: Path) -> None:
    packet = dtg_bytes()
    async with running(tmp_path) as server:
        assert server.port
        assert await exchange(server.port, packet) == OK
        assert await exchange(server.port, packet) == OK  # the answer was lost; the terminal resends
        assert await exchange(server.port, packet, packet) == OK + OK
    assert len(stored(tmp_path)) == 1
    assert store_of(server).stats.duplicates == 3


async def test_status_log_written_as_file(tmp_path: Path) -> None:
    record = status_log("01055556666", "첫 줄\nsecond line")
    async with running(tmp_path) as server:
        assert server.port
        assert await exchange(server.port, encode(record)) == OK
    files = list((tmp_path / "logs" / "01055556666").iterdir())
    assert [f.name for f in files] == ["2026112108000000.log"]
    assert files[0].read_text("utf-8") == "첫 줄\nsecond line"


async def test_maintenance_toggled_on_running_server(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        assert server.port
        control = Control(tmp_path)
        try:
            control.set_maintenance(True)
            with trio.fail_after(5):
                while not server.control_state.maintenance:
                    await trio.sleep(0.01)
            assert await exchange(server.port, dtg_bytes()) == MAINTENANCE
            control.set_maintenance(False)
            with trio.fail_after(5):
                await until(lambda: not server.control_state.maintenance)
            assert await exchange(server.port, dtg_bytes()) == OK
        finally:
            control.close()
    assert len(stored(tmp_path)) == 1  # nothing stored while in maintenance


async def test_registry_unknown_and_cancelled_terminals_get_2(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        assert server.port
        control = Control(tmp_path)
        try:
            control.add_device("01011112222")
            control.set_registry_enforced(True)
            with trio.fail_after(5):
                while not server.control_state.registry_enforced:
                    await trio.sleep(0.01)
            assert await exchange(server.port, dtg_bytes("01011112222")) == OK
            assert await exchange(server.port, dtg_bytes("01033334444")) == UNKNOWN
            from dtgserver.store import DeviceStatus

            control.add_device("01011112222", status=DeviceStatus.CANCELLED)
            with trio.fail_after(5):
                while "01011112222" not in server.control_state.cancelled:
                    await trio.sleep(0.01)
            assert await exchange(server.port, dtg_bytes("01011112222", minute=1)) == UNKNOWN
        finally:
            control.close()
    assert [m for m, _, _ in stored(tmp_path)] == ["01011112222"]


async def test_too_many_connections_get_4(tmp_path: Path) -> None:
    async with running(tmp_path, max_connections=1) as server:
        assert server.port
        with trio.fail_after(10):
            holder = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with holder:
                while server.metrics.open_connections < 1:
                    await trio.sleep(0.01)
                assert await exchange(server.port, dtg_bytes()) == OVERLOADED
    assert stored(tmp_path) == []


async def test_commit_queue_over_high_water_gets_4(tmp_path: Path) -> None:
    async with running(tmp_path, queue_high_water=1) as server:
        port = server.port
        assert port
        # Hold the database so the writer's transaction waits and later packets queue behind it.
        blocker = sqlite3.connect(tmp_path / "store-0.db", timeout=30)
        blocker.execute("BEGIN EXCLUSIVE")
        answers: dict[str, bytes] = {}

        async def terminal(modem: str) -> None:
            answers[modem] = await exchange(port, dtg_bytes(modem))

        try:
            async with trio.open_nursery() as nursery:
                with trio.fail_after(5):
                    nursery.start_soon(terminal, "01000000001")  # taken by the writer, which waits
                    while server.metrics.packets["dtg"] < 1 or store_of(server).queued:
                        await trio.sleep(0.01)
                    nursery.start_soon(terminal, "01000000002")  # queued: the queue is at its mark
                    while store_of(server).queued < 1:
                        await trio.sleep(0.01)
                    assert await exchange(port, dtg_bytes("01000000003")) == OVERLOADED
                blocker.execute("ROLLBACK")
        finally:
            blocker.close()
        assert answers == {"01000000001": OK, "01000000002": OK}
    assert sorted(m for m, _, _ in stored(tmp_path)) == ["01000000001", "01000000002"]


async def test_a_commit_that_hangs_is_answered_4_after_the_commit_timeout(tmp_path: Path) -> None:
    """The store locked by another connection (the commit waits for it, as on a hung disk): the
    session is answered 4 after --commit-timeout, not when the lock goes; the server is unhealthy
    until a commit is answered in time; the commit itself goes on, so the resend is a duplicate."""
    raw = dtg_bytes("01000000009")
    async with running(tmp_path, commit_timeout=0.5) as server:
        assert server.port and server.healthy()
        blocker = sqlite3.connect(tmp_path / "store-0.db", timeout=30)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            with trio.fail_after(8):  # the store would wait up to its 10 s busy timeout
                assert await exchange(server.port, raw) == OVERLOADED
            assert server.commit_timeouts == 1 and not server.healthy()
            assert server.metrics.gauges["commit_timeouts_total"]() == 1
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        with trio.fail_after(10):
            while server.store is not None and store_of(server).stats.committed_packets < 1:
                await trio.sleep(0.01)  # the commit went on once the lock was gone
        assert await exchange(server.port, raw) == OK
        assert server.healthy()
        assert server.store is not None and store_of(server).stats.duplicates == 1
    assert [r for _, _, r in stored(tmp_path)] == [raw]  # answered 4, stored, and stored once


async def test_metrics_and_health_endpoint(tmp_path: Path) -> None:
    async with running(tmp_path, metrics_port=0) as server:
        assert server.port
        assert await exchange(server.port, dtg_bytes()) == OK
        assert await exchange(server.port, b"\x05\x00") == FORMAT_ERROR
        assert server.metrics_port
        http = await exchange(server.metrics_port, b"GET /metrics HTTP/1.0\r\n\r\n", read=-1)
        assert http.startswith(b"HTTP/1.0 200 OK")
        text = http.decode()
        assert 'dtg_packets_total{kind="dtg"} 1' in text
        assert 'dtg_answers_total{result="0"} 1' in text
        assert 'dtg_answers_total{result="1"} 1' in text
        assert "dtg_bodies_total 60" in text
        assert "dtg_committed_packets_total 1" in text
        health = await exchange(server.metrics_port, b"GET /healthz HTTP/1.0\r\n\r\n", read=-1)
        assert health.startswith(b"HTTP/1.0 200 OK") and health.endswith(b"ok\n")


async def test_answer_is_the_response_packet() -> None:
    assert Connection.send(Result.OVERLOADED) == OVERLOADED


async def test_status_log_file_left_by_a_failed_commit_is_reused(tmp_path: Path) -> None:
    record = status_log("01055556666", "같은 로그")
    other = status_log("01055556666", "다른 로그, 같은 시각")
    folder = tmp_path / "logs" / "01055556666"
    folder.mkdir(parents=True)
    (folder / "2026112108000000.log").write_text("같은 로그", "utf-8")  # as a failed commit leaves it
    async with running(tmp_path) as server:
        assert server.port
        assert await exchange(server.port, encode(record)) == OK
        assert await exchange(server.port, encode(other)) == OK
    second = f"2026112108000000_{hashlib.sha256('다른 로그, 같은 시각'.encode()).hexdigest()[:16]}.log"
    assert sorted(f.name for f in folder.iterdir()) == ["2026112108000000.log", second]
    assert (folder / second).read_text("utf-8") == "다른 로그, 같은 시각"


async def test_serve_tunes_the_collector_only_while_it_runs(tmp_path: Path) -> None:
    import gc

    from dtgserver.server.app import serve

    before = gc.get_threshold()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve, ServerConfig(host="127.0.0.1", port=0, data_dir=tmp_path))
        assert gc.get_threshold() != before and gc.get_freeze_count() > 0
        assert await exchange(port, dtg_bytes()) == OK
        nursery.cancel_scope.cancel()
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
