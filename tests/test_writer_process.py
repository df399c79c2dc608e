"""`serve --writer-process`: front processes take the sessions, one writer process per shard commits.

In one process first (front and writer DtgServers on one port, as their processes run them), then
as real processes under the supervisor: start order, a writer killed under load, the shutdown
order, and MQTT forwarded from the writer.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import until
from mosquitto import Mosquitto, Subscriber, broker_fixture  # noqa: F401  (the broker fixture)
from serverproc import alive, children, free_port, free_ports, listening, send

from dtgserver.bridge import map_record
from dtgserver.protocol import encode
from dtgserver.server.app import DtgServer
from dtgserver.server.config import ServerConfig
from dtgserver.store import Control, digest
from dtgserver.store.packets import shard_of
from dtgserver.testing import dtg, dtg_bytes

OK, MAINTENANCE, OVERLOADED = b"\x09\x00", b"\x09\x03", b"\x09\x04"


def stored(path: Path) -> list[tuple[str, bytes, str, float]]:
    """modem, raw, peer, received_at of every row of one shard, in id order."""
    db = sqlite3.connect(path)
    try:
        return [(m, bytes(r), p, t) for m, r, p, t in
                db.execute("SELECT modem, raw, peer, received_at FROM packets ORDER BY id")]
    finally:
        db.close()


@asynccontextmanager
async def fronts_and_writers(data_dir: Path, *, shards: int = 1, fronts: int = 1, writers: bool = True,
                             **overrides: Any) -> AsyncIterator[tuple[list[DtgServer], list[DtgServer]]]:
    """The processes of `serve --workers N --writer-process`, as DtgServers in this one process."""
    config = ServerConfig(host="127.0.0.1", port=free_port(), data_dir=data_dir, grace_period=2.0, **overrides)
    writer_servers = [DtgServer(config, shard=i, shards=shards, role="writer") for i in range(shards)] \
        if writers else []
    front_servers = [DtgServer(config, shard=i, shards=shards, reuse_port=True, role="front") for i in range(fronts)]
    async with trio.open_nursery() as nursery:
        for server in writer_servers + front_servers:
            await nursery.start(server.run)
        yield front_servers, writer_servers
        for server in front_servers + writer_servers:
            server.stop()


async def test_the_front_stores_nothing_and_answers_with_the_writers_result(tmp_path: Path) -> None:
    modems = ["01077770001", "01077770002", "01077770003"]
    packets = [dtg_bytes(m, minute=k, bodies=3) for k in range(2) for m in modems]
    started = time.time()
    async with fronts_and_writers(tmp_path) as ([front], [writer]):
        assert front.store is None and front.stores == {} and front.relay is None
        assert front.port == writer.port  # the writer's relay socket is named after the front's port
        assert front.port is not None
        with trio.fail_after(20):
            answers = [await send(front.port, raw) for raw in packets + packets[:1]]  # and one resend
        relayed = front.remotes[0].relayed
        assert writer.relay is not None
        received = writer.relay.received
        assert writer.store is not None
        committed = writer.store.stats.committed_packets
    assert answers == [OK] * 7
    assert relayed == received == 7  # every packet went to the writer, the resend too
    assert committed == 6
    rows = stored(tmp_path / "store-0.db")
    assert [raw for _, raw, _, _ in rows] == packets  # once each, in the order answered
    for _, _, peer, received_at in rows:
        assert peer.startswith("127.0.0.1:")  # the terminal's address, as the front saw it
        assert started <= received_at <= time.time()
    assert sorted(p.name for p in tmp_path.glob("store-*.db")) == ["store-0.db"]


async def test_each_shard_has_its_writer(tmp_path: Path) -> None:
    modems = [f"0107777{n:04d}" for n in range(24)]
    async with fronts_and_writers(tmp_path, shards=2, fronts=2) as (fronts, writers):
        port = fronts[0].port
        assert port is not None
        with trio.fail_after(20):
            answers = [await send(port, dtg_bytes(m, bodies=2)) for m in modems]
        received = [w.relay.received if w.relay else 0 for w in writers]
        relayed = sum(r.relayed for f in fronts for r in f.remotes.values())
    assert answers == [OK] * len(modems)
    assert relayed == sum(received) == len(modems)
    for shard in (0, 1):
        rows = stored(tmp_path / f"store-{shard}.db")
        assert sorted(m for m, _, _, _ in rows) == sorted(m for m in modems if shard_of(m, 2) == shard)
        assert received[shard] == len(rows) > 0


async def test_without_its_writer_a_front_answers_4_and_stores_nothing_until_it_is_up(tmp_path: Path) -> None:
    config = ServerConfig(host="127.0.0.1", port=free_port(), data_dir=tmp_path, grace_period=2.0)
    front = DtgServer(config, role="front")
    writer = DtgServer(config, role="writer")
    async with trio.open_nursery() as nursery:
        await nursery.start(front.run)
        with trio.fail_after(20):
            assert await send(config.port, dtg_bytes("01077770009", minute=0, bodies=2)) == OVERLOADED
            assert not (tmp_path / "store-0.db").exists() or stored(tmp_path / "store-0.db") == []
            await nursery.start(writer.run)
            answer = OVERLOADED
            while answer == OVERLOADED:  # a failed connect is retried after RETRY_S, not per packet
                await trio.sleep(0.1)
                answer = await send(config.port, dtg_bytes("01077770009", minute=1, bodies=2))
            assert answer == OK
        front.stop()
        writer.stop()
    assert [m for m, _, _, _ in stored(tmp_path / "store-0.db")] == ["01077770009"]


async def test_maintenance_and_the_registry_are_answered_by_the_front(tmp_path: Path) -> None:
    control = Control(tmp_path)
    try:
        async with fronts_and_writers(tmp_path, control_poll=0.05) as ([front], [writer]):
            assert front.port is not None
            control.set_maintenance(True)
            with trio.fail_after(10):
                while not front.control_state.maintenance:
                    await trio.sleep(0.02)
                assert await send(front.port, dtg_bytes("01077770010", bodies=2)) == MAINTENANCE
                control.set_maintenance(False)
                control.set_registry_enforced(True)
                await until(lambda: front.control_state.registry_enforced and not front.control_state.maintenance)
                assert await send(front.port, dtg_bytes("01077770010", bodies=2)) == b"\x09\x02"
            assert front.remotes[0].relayed == 0
            assert writer.relay is not None and writer.relay.received == 0
    finally:
        control.close()


async def test_a_data_dir_moves_between_one_process_and_writer_processes(tmp_path: Path) -> None:
    first, second = dtg_bytes("01077770011", minute=0, bodies=2), dtg_bytes("01077770011", minute=1, bodies=2)
    config = ServerConfig(host="127.0.0.1", port=0, data_dir=tmp_path, grace_period=2.0)
    single = DtgServer(config)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(single.run)
        assert await send(port, first) == OK
        single.stop()
    async with fronts_and_writers(tmp_path) as ([front], _):
        assert front.port is not None
        assert await send(front.port, first) == OK  # a resend: the writer finds it stored
        assert await send(front.port, second) == OK
    assert [raw for _, raw, _, _ in stored(tmp_path / "store-0.db")] == [first, second]


# -- real processes ------------------------------------------------------------------------------


async def start_split(data_dir: Path, port: int, *options: str, workers: int = 1) -> subprocess.Popen[bytes]:
    """`serve --writer-process`, returned once its 2 × workers processes run and the fronts listen."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dtgserver", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(data_dir), "--workers", str(workers), "--writer-process", "--grace-period", "2", "-q",
         *options],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        with trio.fail_after(30):
            while len(children(process.pid)) < 2 * workers or \
                    sum(listening(p, port) for p in children(process.pid)) < workers:
                assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
                await trio.sleep(0.05)
    except BaseException:
        code, log = finish(process)  # no process left behind; say what it logged
        raise AssertionError(f"serve --writer-process did not come up (exit {code}): {log}") from None
    return process


def roles(process: subprocess.Popen[bytes], port: int) -> tuple[list[int], list[int]]:
    """(front processes, writers): the fronts are the ones listening on the port."""
    pids = children(process.pid)
    return [p for p in pids if listening(p, port)], [p for p in pids if not listening(p, port)]


def started_at(pid: int) -> int:
    """The process's start time, in clock ticks since boot (/proc/PID/stat, field 22)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def finish(process: subprocess.Popen[bytes], sig: int | None = signal.SIGTERM) -> tuple[int, str]:
    """Signal the supervisor (unless `sig` is None: signalled already) and wait: exit code, log."""
    if sig is not None:
        process.send_signal(sig)
    try:
        code = process.wait(timeout=30)
    except subprocess.TimeoutExpired:  # stuck: no process left behind (its workers follow), and the test fails
        process.kill()
        process.wait()
        raise
    finally:
        assert process.stderr is not None
        log = process.stderr.read().decode("utf-8", "replace")
        process.stderr.close()
    return code, log


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not on :{port}")


@pytest.mark.slow
async def test_serve_writer_process_runs_a_writer_then_a_front(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_ports(2)  # the front's endpoint, then the writer's
    process = await start_split(tmp_path, port, "--metrics-port", str(metrics_port))
    try:
        fronts, writers = roles(process, port)
        assert len(fronts) == 1 and len(writers) == 1
        assert started_at(writers[0]) <= started_at(fronts[0])  # the writer first
        raw = dtg_bytes("01077770020", bodies=3)
        assert await send(port, raw) == OK
        assert metric(metrics_port, "dtg_relayed_packets_total") == 1  # the front's endpoint
        assert metric(metrics_port + 1, "dtg_committed_packets_total") == 1  # the writer's
        assert metric(metrics_port + 1, "dtg_relay_received_packets_total") == 1
    finally:
        code, log = finish(process)
    assert code == 0, log
    assert not any(alive(pid) for pid in fronts + writers)
    assert [r for _, r, _, _ in stored(tmp_path / "store-0.db")] == [raw]


@pytest.mark.slow
async def test_two_workers_with_writer_processes_store_each_terminal_in_its_shard(tmp_path: Path) -> None:
    port = free_port()
    process = await start_split(tmp_path, port, workers=2)
    modems = [f"0107779{n:04d}" for n in range(30)]
    packets = [dtg_bytes(m, minute=k, bodies=2) for k in range(2) for m in modems]
    answers: list[bytes] = []
    try:
        fronts, writers = roles(process, port)
        assert len(fronts) == 2 and len(writers) == 2
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                limit = trio.CapacityLimiter(16)

                async def one(raw: bytes) -> None:
                    async with limit:
                        answers.append(await send(port, raw))

                for raw in packets:
                    nursery.start_soon(one, raw)
    finally:
        code, log = finish(process)
    assert code == 0, log
    assert answers == [OK] * len(packets)
    for shard in (0, 1):
        rows = stored(tmp_path / f"store-{shard}.db")
        assert rows and all(shard_of(m, 2) == shard for m, _, _, _ in rows)
    assert sorted(r for shard in (0, 1) for _, r, _, _ in stored(tmp_path / f"store-{shard}.db")) == sorted(packets)
    assert not any(alive(pid) for pid in fronts + writers)


@pytest.mark.slow
async def test_a_writer_killed_under_load_loses_no_acknowledged_packet(tmp_path: Path) -> None:
    """SIGKILL the writer mid-stream: what was answered 0 is stored once; the restarted writer serves."""
    port = free_port()
    process = await start_split(tmp_path, port)
    _, [writer] = roles(process, port)
    acked: list[bytes] = []
    answers: list[bytes] = []
    killed_at_ack = signal_sent = -1

    async def terminal(n: int) -> None:
        for minute in range(10_000):
            packet = dtg_bytes(f"0107778{n:04d}", minute=minute, bodies=5)
            answer = await send(port, packet)
            answers.append(answer)
            if answer == OK:
                acked.append(packet)
            if killed_at_ack >= 0 and len(acked) >= killed_at_ack + 40:
                return  # the replacement writer has committed plenty

    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for n in range(8):
                    nursery.start_soon(terminal, n)
                while len(acked) < 40:
                    await trio.sleep(0.01)
                killed_at_ack, signal_sent = len(acked), len(answers)
                os.kill(writer, signal.SIGKILL)
    finally:
        code, log = finish(process)
    assert code == 0, log
    assert OVERLOADED in answers[signal_sent:], "the packets in flight at the kill were answered 4"
    assert set(answers) <= {OK, OVERLOADED}
    assert "writer 0 (pid" in log and "SIGKILL" in log and "restarting" in log
    rows = [raw for _, raw, _, _ in stored(tmp_path / "store-0.db")]
    assert len(rows) == len(set(rows))  # nothing stored twice
    assert not set(acked) - set(rows)  # nothing answered 0 is missing
    db = sqlite3.connect(tmp_path / "store-0.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()


@pytest.mark.slow
async def test_a_killed_front_process_is_restarted_and_the_writer_keeps_its_data(tmp_path: Path) -> None:
    port = free_port()
    process = await start_split(tmp_path, port)
    first, second = dtg_bytes("01077770025", minute=0, bodies=2), dtg_bytes("01077770025", minute=1, bodies=2)
    try:
        [front], [writer] = roles(process, port)
        assert await send(port, first) == OK
        os.kill(front, signal.SIGKILL)
        with trio.fail_after(30):
            while not (replacement := [p for p in roles(process, port)[0] if p != front]):
                await trio.sleep(0.05)
        assert roles(process, port)[1] == [writer]  # the writer ran on
        assert await send(port, first) == OK  # a resend: stored once
        assert await send(port, second) == OK
    finally:
        code, log = finish(process)
    assert code == 0, log
    assert replacement
    assert [r for _, r, _, _ in stored(tmp_path / "store-0.db")] == [first, second]


@pytest.mark.slow
async def test_a_session_finishing_in_the_grace_period_is_committed(tmp_path: Path) -> None:
    """The fronts stop first: a packet completed after SIGTERM still reaches a running writer."""
    port = free_port()
    process = await start_split(tmp_path, port)
    raw = dtg_bytes("01077770030", bodies=4)
    signalled: int | None = signal.SIGTERM
    try:
        with trio.fail_after(20):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(raw[:40])
            await trio.sleep(0.2)  # the front has the connection
            process.send_signal(signal.SIGTERM)
            signalled = None
            await trio.sleep(0.5)  # the supervisor and the front are shutting down
            await stream.send_all(raw[40:])
            answer = await stream.receive_some(2)
            await stream.aclose()
    finally:
        code, log = finish(process, signalled)
    assert answer == OK, log
    assert code == 0, log
    assert [r for _, r, _, _ in stored(tmp_path / "store-0.db")] == [raw]


def handles_sigterm(pid: int) -> bool:
    """SIGTERM blocked or caught by `pid`'s main thread: its first instruction has run."""
    with open(f"/proc/{pid}/status") as f:
        masks = dict(line.split(":\t") for line in f.read().splitlines() if line.startswith(("SigBlk", "SigCgt")))
    return any(int(masks[key], 16) & (1 << (signal.SIGTERM - 1)) for key in ("SigBlk", "SigCgt"))


@pytest.mark.slow
@pytest.mark.parametrize("whom", ["supervisor", "every process"])
async def test_sigterm_during_start_up_stops_everything_and_exits_0(tmp_path: Path, whom: str) -> None:
    """SIGTERM while the program is still importing, before any handler of trio's is in place:
    to the supervisor alone, or (as a service manager stopping the unit does) also to the writer
    just started. Before: acted on only after the writer wait, a writer killed by it restarted,
    then a front process started anyway."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "dtgserver", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(tmp_path), "--writer-process", "--grace-period", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    kids: list[int] = []
    try:
        with trio.fail_after(30):
            while not handles_sigterm(process.pid):
                await trio.sleep(0.001)
            if whom == "every process":
                while not (kids := children(process.pid)):
                    await trio.sleep(0.001)
                for pid in kids:
                    os.kill(pid, signal.SIGTERM)
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
    finally:
        code, log = finish(process, None)
    elapsed = time.monotonic() - started
    assert code == 0, log
    assert "SIGTERM: stopping" in log
    assert "front process 0 started" not in log, "nothing started after the signal"
    assert "exited with" not in log and "restarting" not in log, log
    assert elapsed < 25, f"{elapsed:.1f} s: the writer wait (30 s) is not what it waits for"
    started_pids = [int(pid) for pid in re.findall(r"started \(pid (\d+)\)", log)]
    assert not any(alive(pid) for pid in kids + started_pids)


def health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


@pytest.mark.slow
async def test_a_stopped_writer_makes_the_front_unhealthy_and_sessions_wait_at_most_the_commit_timeout(
        tmp_path: Path) -> None:
    """SIGSTOP the writer: before, /healthz said 200 and each session waited as long as it was
    stopped. Now 4 after --commit-timeout, 503 within a probe and the timeout, 200 once it runs."""
    port, metrics_port = free_port(), free_ports(2)
    process = await start_split(tmp_path, port, "--metrics-port", str(metrics_port), "--commit-timeout", "2")
    first, second = dtg_bytes("01077770050", minute=0, bodies=2), dtg_bytes("01077770050", minute=1, bodies=2)
    try:
        _, [writer] = roles(process, port)
        with trio.fail_after(20):
            while health(metrics_port) != 200:  # the first probe answered
                await trio.sleep(0.05)
        assert await send(port, first) == OK
        os.kill(writer, signal.SIGSTOP)
        try:
            with trio.fail_after(8):
                assert await send(port, second) == OVERLOADED
            with trio.fail_after(10):
                while health(metrics_port) != 503:
                    await trio.sleep(0.1)
            assert metric(metrics_port, "dtg_commit_timeouts_total") == 1
        finally:
            os.kill(writer, signal.SIGCONT)
        with trio.fail_after(20):
            while health(metrics_port) != 200:
                await trio.sleep(0.1)
            assert await send(port, second) == OK  # its first copy may have been committed after all
    finally:
        code, log = finish(process)
    assert code == 0, log
    assert "not committed within 2 s" in log
    assert [r for _, r, _, _ in stored(tmp_path / "store-0.db")] == [first, second]


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--writer-process"], []], ids=["writer-process", "one-process"])
async def test_a_metrics_port_that_cannot_be_bound_fails_start_up_in_one_line(tmp_path: Path,
                                                                              layout: list[str]) -> None:
    """Before: with --writer-process the writer's port (--metrics-port + 1) taken made it restart
    forever while every packet was answered 4 and the front's /healthz said 200."""
    port, metrics_port = free_port(), free_ports(2)
    taken = metrics_port + 1 if layout else metrics_port
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", taken))
        holder.listen()
        result = subprocess.run(
            [sys.executable, "-m", "dtgserver", "serve", "--host", "127.0.0.1", "--port", str(port), "-q",
             "--data-dir", str(tmp_path), "--metrics-port", str(metrics_port), *layout],
            capture_output=True, timeout=60, check=False,
        )
    options = "--metrics-port + 1, writer 0" if layout else "--metrics-host, --metrics-port"
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        f"dtgserver: error: cannot listen on 127.0.0.1:{taken} ({options}): Address already in use"]


@pytest.mark.slow
async def test_the_writer_forwards_its_shard_to_mqtt(tmp_path: Path, broker: Mosquitto) -> None:
    port = free_port()
    record = dtg("01077770040", minute=0)
    raw = encode(record)
    messages, _ = map_record(record, None, packet_id=digest(raw).hex())
    with Subscriber(broker, "v1/sensors/#") as subscriber:
        process = await start_split(tmp_path / "data", port, "--mqtt", broker.url, "--client-id", "split-e2e")
        try:
            assert await send(port, raw) == OK
            await subscriber.wait_count(len(messages))
            await trio.sleep(0.3)  # nothing more may arrive
        finally:
            code, log = finish(process)
    assert code == 0, log
    assert [(m.topic, json.loads(m.payload)) for m in subscriber.messages] == \
        [(m.topic, m.payload) for m in messages]


def test_a_writer_needs_the_port_of_its_front_processes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not port 0"):
        DtgServer(ServerConfig(port=0, data_dir=tmp_path), role="writer")
