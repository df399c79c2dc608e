"""`serve --workers N`: one port, N processes, a terminal's data in one shard, restarts, shutdown.

The store tests open two PacketStores on one shard file, which is what two worker processes do
(SQLite locks the same way between connections of one process as between processes).
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from serverproc import alive, children, free_port, free_ports, listening, send

from dtgserver.protocol import Connection, Received, Result, Role
from dtgserver.server.app import DtgServer
from dtgserver.server.config import ServerConfig
from dtgserver.store import PacketStore, read_stored
from dtgserver.store.packets import ShardCountMismatch, shard_of
from dtgserver.testing import dtg_bytes

OK = b"\x09\x00"
EXPECTED_SHARDS = [0, 1, 2, 2]  # zlib.crc32(b"01012345678") % 2, 3, 4, 8


def received(raw: bytes) -> Received:
    conn = Connection(Role.SERVER)
    conn.receive_data(raw)
    event = conn.next_event()
    assert isinstance(event, Received)
    return event


# -- the shared shard, in process -------------------------------------------------------------


async def test_a_commit_waits_for_a_write_lock_held_elsewhere(tmp_path: Path) -> None:
    """The writer begins on the event loop when the lock is free; when another connection holds
    it (an operator's sqlite3 shell), it waits in a thread and the loop keeps running."""
    store = PacketStore(tmp_path)
    other = sqlite3.connect(store.path, isolation_level=None)
    results: list[Result] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            assert await store.submit(received(dtg_bytes("01055550004", bodies=1)), "peer") is Result.OK
            other.execute("BEGIN IMMEDIATE")

            async def submit() -> None:
                results.append(await store.submit(received(dtg_bytes("01055550004", minute=1, bodies=1)), "peer"))

            nursery.start_soon(submit)
            await trio.sleep(0.3)  # the event loop runs meanwhile: this sleep ends
            assert results == []  # not answered while the lock is held elsewhere
            other.execute("COMMIT")
            with trio.fail_after(5):
                while not results:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        other.close()
        store.close()
    assert results == [Result.OK]
    assert stored_modems(store.path) == ["01055550004"] * 2


def test_shard_of_is_stable_and_spreads() -> None:
    modems = [f"0101234{n:04d}" for n in range(1000)]
    assert all(shard_of(m, 1) == 0 for m in modems)
    counts = [sum(1 for m in modems if shard_of(m, 2) == s) for s in range(2)]
    assert min(counts) > 400
    # zlib.crc32, not the salted hash(): what every worker process and every restart computes
    assert [shard_of("01012345678", n) for n in (2, 3, 4, 8)] == EXPECTED_SHARDS


async def test_a_data_dir_keeps_its_shard_count(tmp_path: Path) -> None:
    DtgServer(ServerConfig(data_dir=tmp_path), shards=2).control.close()
    with pytest.raises(ShardCountMismatch, match=r"2 shard.*--workers 2"):
        DtgServer(ServerConfig(data_dir=tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "dtgserver", "serve", "--port", "0", "--data-dir", str(tmp_path), "--workers", "3"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "re-sharding" in result.stderr or "moving it is not supported" in result.stderr
    assert "Traceback" not in result.stderr


async def test_a_data_dir_from_one_process_cannot_be_split(tmp_path: Path) -> None:
    (tmp_path / "store-0.db").touch()  # served before the count was recorded: one shard
    with pytest.raises(ShardCountMismatch):
        DtgServer(ServerConfig(data_dir=tmp_path), shards=2)


# -- real worker processes ---------------------------------------------------------------------


async def start_workers(data_dir: Path, port: int, workers: int = 2, *options: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "dtgserver", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(data_dir), "--workers", str(workers), "--grace-period", "2", "-q", *options],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    with trio.fail_after(30):
        while len(children(process.pid)) < workers or not all(listening(p, port) for p in children(process.pid)):
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            await trio.sleep(0.05)
    return process


def stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=30)
    finally:
        if process.stderr:
            process.stderr.close()


@pytest.mark.slow
async def test_packets_of_many_modems_stored_once_each_terminal_in_its_shard(tmp_path: Path) -> None:
    port = free_port()
    process = await start_workers(tmp_path, port)
    modems = [f"0107777{n:04d}" for n in range(40)]
    packets = [dtg_bytes(m, minute=minute, bodies=3) for m in modems for minute in range(3)]
    answers: list[bytes] = []
    try:
        async with trio.open_nursery() as nursery:
            limit = trio.CapacityLimiter(20)

            async def one(raw: bytes) -> None:
                async with limit:
                    answers.append(await send(port, raw))

            for raw in packets + packets[::7]:  # and some resends, which go to whichever worker
                nursery.start_soon(one, raw)
    finally:
        assert stop(process) == 0
    assert answers == [OK] * (len(packets) + len(packets[::7]))
    by_shard: dict[int, list[tuple[str, bytes]]] = {}
    for shard in (0, 1):
        db = sqlite3.connect(tmp_path / f"store-{shard}.db")
        try:
            by_shard[shard] = [(m, bytes(r)) for m, r in db.execute("SELECT modem, raw FROM packets")]
        finally:
            db.close()
    assert all(by_shard[0]) and by_shard[1], "both shards hold terminals"
    for shard, rows in by_shard.items():
        assert all(shard_of(modem, 2) == shard for modem, _ in rows)
    stored = [raw for rows in by_shard.values() for _, raw in rows]
    assert sorted(stored) == sorted(packets)  # every packet exactly once
    assert sorted(p.raw for p in read_stored(tmp_path)) == sorted(packets)  # export sees both shards


@pytest.mark.slow
async def test_a_killed_worker_is_restarted_and_serves(tmp_path: Path) -> None:
    port = free_port()
    process = await start_workers(tmp_path, port)
    try:
        victim, survivor = children(process.pid)
        os.kill(victim, signal.SIGKILL)
        with trio.fail_after(30):
            while True:
                now = children(process.pid)
                replacement = [p for p in now if p not in (victim, survivor)]
                if replacement and listening(replacement[0], port):
                    break
                await trio.sleep(0.05)
        assert survivor in now
        # With the survivor frozen, only the replacement can answer: some connections must be answered.
        os.kill(survivor, signal.SIGSTOP)
        answered: list[bytes] = []
        try:
            async with trio.open_nursery() as nursery:
                async def one(n: int) -> None:
                    try:
                        answered.append(await send(port, dtg_bytes(f"0108888{n:04d}", bodies=2), timeout_s=3))
                    except trio.TooSlowError:
                        pass  # queued at the frozen survivor

                for n in range(20):
                    nursery.start_soon(one, n)
        finally:
            os.kill(survivor, signal.SIGCONT)
        assert answered and all(a == OK for a in answered)
        assert await send(port, dtg_bytes("01088889999", bodies=2)) == OK
    finally:
        assert stop(process) == 0


@pytest.mark.slow
async def test_sigterm_stops_every_worker_and_exits_0(tmp_path: Path) -> None:
    port = free_port()
    process = await start_workers(tmp_path, port)
    workers = children(process.pid)
    assert len(workers) == 2
    assert await send(port, dtg_bytes("01099990000", bodies=2)) == OK
    assert stop(process) == 0
    assert not any(alive(pid) for pid in workers)
    with pytest.raises(OSError):
        await send(port, dtg_bytes("01099990001", bodies=2), timeout_s=2)



@pytest.mark.slow
async def test_shutdown_after_relayed_packets_ends_with_the_sessions(tmp_path: Path) -> None:
    """Before: once a worker had relayed a packet, its open link kept the owner (and the owner's
    link kept it) waiting out the whole grace period with no session left."""
    from test_writer_process import metric

    port, metrics_port = free_port(), free_ports(2)
    process = await start_workers(tmp_path, port, 2, "--grace-period", "60", "--metrics-port", str(metrics_port))
    try:
        with trio.fail_after(60):
            for minute in range(200):  # until each worker has relayed one: the kernel picks the worker
                for shard in (0, 1):
                    assert await send(port, dtg_bytes(modem_of_shard(shard), minute=minute, bodies=1)) == OK
                if all(metric(metrics_port + i, "dtg_relayed_packets_total") for i in (0, 1)):
                    break
            else:
                raise AssertionError("no packet relayed in 400 connections")
    finally:
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        try:
            code = process.wait(timeout=90)
        finally:
            if process.stderr:
                process.stderr.close()
    elapsed = time.monotonic() - started
    assert code == 0
    assert elapsed < 30, f"{elapsed:.1f} s: waited for the grace period (60 s), not for the sessions"


@pytest.mark.slow
async def test_workers_stop_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    """No orphan keeps the port: a worker whose supervisor died (SIGKILL) shuts down by itself."""
    port = free_port()
    process = await start_workers(tmp_path, port)
    workers = children(process.pid)
    process.kill()
    process.wait()
    if process.stderr:
        process.stderr.close()
    with trio.fail_after(20):
        while any(alive(pid) for pid in workers):
            await trio.sleep(0.1)
    with pytest.raises(OSError):
        await send(port, dtg_bytes("01099990002", bodies=2), timeout_s=2)


@pytest.mark.slow
async def test_broker_password_not_on_a_workers_command_line(tmp_path: Path) -> None:
    port = free_port()
    # nothing listens on the broker port: the forwarders retry, the workers serve meanwhile
    process = await start_workers(tmp_path, port, 2, "--mqtt", f"mqtt://dtg:s3cret@127.0.0.1:{free_port()}")
    try:
        for pid in children(process.pid):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert b"s3cret" not in f.read()
        assert await send(port, dtg_bytes("01099990003", bodies=2)) == OK
    finally:
        assert stop(process) == 0


@pytest.mark.parametrize("value", ["0", "-1", "two", ""])
def test_workers_option_refuses_what_is_not_a_count(value: str, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from dtgserver.cli import main

    result = CliRunner().invoke(main, ["serve", "--data-dir", str(tmp_path), "--workers", value])
    assert result.exit_code == 2
    assert "neither a positive number nor 'auto'" in result.output
    assert not (tmp_path / "control.db").exists()  # refused before anything was opened


def test_workers_auto_is_the_cpus_this_process_may_use() -> None:
    from dtgserver.server.workers import worker_count

    assert worker_count("auto") == len(os.sched_getaffinity(0))
    assert worker_count("3") == 3


def test_workers_beyond_four_per_cpu_are_refused_before_any_process_starts(tmp_path: Path) -> None:
    """`--workers 999` (a typo for 9, say) on a small machine started 999 processes, and would have
    given the data dir 999 shards for good; four per CPU is accepted, one more is not."""
    from click.testing import CliRunner

    from dtgserver.cli import main
    from dtgserver.server.workers import worker_count

    most = 4 * len(os.sched_getaffinity(0))
    assert worker_count(most) == most
    with pytest.raises(ValueError, match=f"more than 4 per CPU .*at most {most}"):
        worker_count(most + 1)
    for where in (["--workers", str(most + 1)], ["--workers", "999", "--writer-process"]):
        result = CliRunner().invoke(main, ["serve", "--data-dir", str(tmp_path), *where])
        assert result.exit_code == 2, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and "'--workers'" in errors[0] and "more than 4 per CPU" in errors[0], result.output
    assert not (tmp_path / "control.db").exists()  # refused before anything was opened


# -- packets relayed to the worker that owns the terminal (server/relay.py) ----------------------


@asynccontextmanager
async def two_workers_in_process(data_dir: Path) -> AsyncIterator[list[DtgServer]]:
    """Workers 0 and 1 of `--workers 2` in one process: two listeners on one port (SO_REUSEPORT)."""
    port = free_port()
    servers = [DtgServer(ServerConfig(host="127.0.0.1", port=port, data_dir=data_dir, grace_period=2.0),
                         shard=shard, shards=2, reuse_port=True) for shard in (0, 1)]
    async with trio.open_nursery() as nursery:
        for server in servers:
            await nursery.start(server.run)
        yield servers
        for server in servers:
            server.stop()


def stored_modems(path: Path) -> list[str]:
    db = sqlite3.connect(path)
    try:
        return [m for (m,) in db.execute("SELECT modem FROM packets ORDER BY id")]
    finally:
        db.close()


def stored_peers(path: Path) -> list[tuple[str, float]]:
    db = sqlite3.connect(path)
    try:
        return list(db.execute("SELECT peer, received_at FROM packets ORDER BY id"))
    finally:
        db.close()


def modem_of_shard(shard: int, start: int = 0) -> str:
    return next(f"0106666{n:04d}" for n in range(start, 10_000) if shard_of(f"0106666{n:04d}", 2) == shard)


async def test_each_packet_is_stored_by_the_worker_of_its_terminal(tmp_path: Path) -> None:
    modems = [f"0106666{n:04d}" for n in range(24)]
    started = time.time()
    async with two_workers_in_process(tmp_path) as servers:
        port = servers[0].port
        assert port is not None
        with trio.fail_after(20):
            answers = [await send(port, dtg_bytes(m, minute=k, bodies=2)) for k in range(2) for m in modems]
        relayed = [sum(r.relayed for r in s.remotes.values()) for s in servers]
        received_for_others = [s.relay.received if s.relay else 0 for s in servers]
    assert answers == [OK] * len(answers)
    for shard in (0, 1):
        rows = stored_modems(tmp_path / f"store-{shard}.db")
        assert rows and all(shard_of(m, 2) == shard for m in rows)
        assert sorted(set(rows)) == sorted(m for m in modems if shard_of(m, 2) == shard)
        assert len(rows) == 2 * len(set(rows))  # both minutes of each of its terminals
        for peer, received_at in stored_peers(tmp_path / f"store-{shard}.db"):
            assert peer.startswith("127.0.0.1:")  # the terminal's address, not the relaying worker's
            assert started <= received_at <= time.time()
    assert sum(relayed) > 0, "with 48 connections spread by the kernel, some reached the other worker"
    assert relayed[0] == received_for_others[1] and relayed[1] == received_for_others[0]


async def test_one_connection_may_carry_terminals_of_both_shards(tmp_path: Path) -> None:
    first, other = modem_of_shard(0), modem_of_shard(1)
    async with two_workers_in_process(tmp_path) as servers:
        assert servers[0].port is not None
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.1", servers[0].port)
            answers: list[bytes] = []
            for modem in (first, other, first, other):
                await stream.send_all(dtg_bytes(modem, minute=len(answers), bodies=1))
                answers.append(await stream.receive_some(2))
            await stream.aclose()
    assert answers == [OK] * 4
    assert stored_modems(tmp_path / "store-0.db") == [first, first]
    assert stored_modems(tmp_path / "store-1.db") == [other, other]


async def test_a_resend_relayed_to_the_owner_is_not_stored_twice(tmp_path: Path) -> None:
    modem = modem_of_shard(1)
    raw = dtg_bytes(modem, minute=0, bodies=2)
    async with two_workers_in_process(tmp_path) as servers:
        port = servers[0].port
        assert port is not None
        with trio.fail_after(20):
            answers = [await send(port, raw) for _ in range(12)]  # the kernel picks either worker
        duplicates = sum(s.stores[1].stats.duplicates for s in servers if 1 in s.stores)
    assert answers == [OK] * 12
    assert stored_modems(tmp_path / "store-1.db") == [modem]
    assert duplicates == 11


async def test_a_packet_for_an_unreachable_worker_is_answered_4_not_stored(tmp_path: Path) -> None:
    """While its owner is down (the supervisor restarts it), a terminal is answered 4 and sends again."""
    port = free_port()
    config = ServerConfig(host="127.0.0.1", port=port, data_dir=tmp_path, grace_period=1.0)
    survivor = DtgServer(config, shard=0, shards=2, reuse_port=True)  # worker 1 never started
    async with trio.open_nursery() as nursery:
        await nursery.start(survivor.run)
        with trio.fail_after(10):
            orphan = await send(port, dtg_bytes(modem_of_shard(1), minute=0, bodies=1))
            own = await send(port, dtg_bytes(modem_of_shard(0), minute=0, bodies=1))
            again = await send(port, dtg_bytes(modem_of_shard(1), minute=1, bodies=1))  # within RETRY_S
        survivor.stop()
    assert (orphan, own, again) == (b"\x09\x04", OK, b"\x09\x04")
    assert stored_modems(tmp_path / "store-0.db") == [modem_of_shard(0)]
    assert not (tmp_path / "store-1.db").exists()  # worker 1's shard: nobody else writes it


async def test_a_link_that_breaks_answers_4_and_the_next_packet_reconnects(tmp_path: Path) -> None:
    """The owner restarted between two packets: the first after the restart finds a new link."""
    port = free_port()
    def config() -> ServerConfig:
        return ServerConfig(host="127.0.0.1", port=port, data_dir=tmp_path, grace_period=0.5)
    accepting = DtgServer(config(), shard=0, shards=2, reuse_port=True)
    modem = modem_of_shard(1)
    answers = []
    async with trio.open_nursery() as outer:
        await outer.start(accepting.run)
        with trio.fail_after(20):
            for minute in range(2):  # owner up, then restarted
                owner = DtgServer(config(), shard=1, shards=2, reuse_port=True)
                async with trio.open_nursery() as nursery:
                    await nursery.start(owner.run)
                    for _ in range(40):  # until the kernel gives a connection to worker 0 (each: 1 in 2)
                        before = sum(r.relayed for r in accepting.remotes.values())
                        answer = await send(port, dtg_bytes(modem, minute=minute, bodies=1))
                        if sum(r.relayed for r in accepting.remotes.values()) > before:
                            answers.append(answer)
                            break
                    owner.stop()
                await trio.sleep(0.6)  # past RETRY_S if a packet met the owner down
        accepting.stop()
    assert answers == [OK, OK]
    assert stored_modems(tmp_path / "store-1.db") == [modem, modem]


async def test_the_relay_refuses_a_frame_the_framer_would_refuse(tmp_path: Path) -> None:
    """A relay link speaks for other workers, which framed the packet already: a frame that does
    not frame is refused (answered 1), one of a modem of another shard answered 4, neither stored."""
    from dtgserver.server.relay import ANSWER, REQUEST

    async with two_workers_in_process(tmp_path) as servers:
        port = servers[0].port
        assert port is not None
        good = dtg_bytes(modem_of_shard(1), minute=0, bodies=1)
        requests = [(1, good[:-1]), (2, dtg_bytes(modem_of_shard(0), minute=0, bodies=1)), (3, good)]
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with trio.fail_after(10):
            await sock.connect(str(tmp_path / ".relay" / f"{port}-1"))
            stream = trio.SocketStream(sock)
            await stream.send_all(b"".join(REQUEST.pack(i, time.time(), len(f), 4) + b"test" + f for i, f in requests))
            data = b""
            while len(data) < 3 * ANSWER.size:
                data += await stream.receive_some(64)
            await stream.aclose()
    assert list(ANSWER.iter_unpack(data)) == [(1, 1), (2, 4), (3, 0)]
    assert stored_peers(tmp_path / "store-1.db")[0][0] == "test"
    assert stored_modems(tmp_path / "store-1.db") == [modem_of_shard(1)]
    assert stored_modems(tmp_path / "store-0.db") == []
