"""The store on a real 3-node JetStream cluster: PubAck before 0, dedup, failures answered 4."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
import trio
from natscluster import NatsCluster, nats_cluster_fixture
from serverproc import send
from test_server import MAINTENANCE, OK, OVERLOADED, UNKNOWN, exchange

from dtgserver.protocol import encode
from dtgserver.server.app import DtgServer
from dtgserver.server.config import ServerConfig
from dtgserver.store import DeviceStatus, StoredPacket
from dtgserver.store.jetstream import JetStreamStore, NatsBackend, NatsControl, NatsOptions, StoreUrl, read_stream
from dtgserver.testing import dtg_bytes, status_log

__all__ = ["nats_cluster_fixture"]

pytestmark = pytest.mark.slow


@asynccontextmanager
async def running(tmp_path: Path, url: str, **overrides: object) -> AsyncIterator[DtgServer]:
    """A `serve --store nats://…` server on 127.0.0.1, port 0, stopped gracefully at the end."""
    config = ServerConfig(**{"host": "127.0.0.1", "port": 0, "data_dir": tmp_path / "unused", "control_poll": 0.05,
                             "grace_period": 2.0, "store": url, **overrides})  # type: ignore[arg-type]
    server = DtgServer(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        yield server
        server.stop()


def jetstream_of(server: DtgServer) -> JetStreamStore:
    """The store of a `--store nats://` server (typed as the SQLite store it stands in for)."""
    store: object = server.store
    assert isinstance(store, JetStreamStore)
    return store


async def until_ok(port: int, packet: bytes, timeout_s: float = 30) -> None:
    """Send until answered 0 (a server whose store is still connecting answers 4 meanwhile)."""
    with trio.fail_after(timeout_s):
        while (answer := await exchange(port, packet)) != OK:
            assert answer == OVERLOADED, answer
            await trio.sleep(0.1)


@contextmanager
def opened(url: str) -> Iterator[NatsBackend]:
    """A command's connection (as `export` or `devices` make it)."""
    backend = NatsBackend(NatsOptions(StoreUrl.parse(url)), name="test")
    try:
        backend.open_blocking()
        yield backend
    finally:
        backend.close()


def stream_packets(url: str) -> list[StoredPacket]:
    with opened(url) as backend:
        return list(read_stream(backend))


async def test_answer_0_is_in_the_replicated_stream_with_receive_time_and_peer(
        tmp_path: Path, nats_cluster: NatsCluster) -> None:
    packet, log = dtg_bytes("01011110001"), encode(status_log("01011110001"))
    async with running(tmp_path, nats_cluster.url) as server:
        await until_ok(server.port or 0, packet)
        assert await exchange(server.port or 0, log) == OK
    stored = await trio.to_thread.run_sync(stream_packets, nats_cluster.url)
    assert [(p.modem, p.kind, p.raw) for p in stored] == [("01011110001", "dtg", packet),
                                                          ("01011110001", "status_log", log)]
    assert all(p.peer.startswith("127.0.0.1:") and p.received_at > 1.7e9 for p in stored)
    with opened(nats_cluster.url) as backend:
        info = backend.link.call_blocking(backend.js.stream_info("DTG_PACKETS"))
    assert info.config.num_replicas == 3 and info.state.messages == 2
    assert info.config.subjects == ["dtg.packets.>"]


async def test_a_resend_is_acknowledged_as_a_duplicate_and_stored_once(
        tmp_path: Path, nats_cluster: NatsCluster) -> None:
    packet = dtg_bytes("01011110002")
    async with running(tmp_path, nats_cluster.url) as server:
        await until_ok(server.port or 0, packet)
        assert await exchange(server.port or 0, packet) == OK
        assert await exchange(server.port or 0, packet, packet) == OK + OK
        assert jetstream_of(server).stats.committed_packets == 1
        assert jetstream_of(server).stats.duplicates == 3
    assert [p.raw for p in await trio.to_thread.run_sync(stream_packets, nats_cluster.url)] == [packet]


async def test_many_sessions_publish_concurrently_not_one_round_trip_each(
        tmp_path: Path, nats_cluster: NatsCluster) -> None:
    packets = [dtg_bytes(f"0102{i:07d}", bodies=5) for i in range(120)]
    async with running(tmp_path, nats_cluster.url) as server:
        await until_ok(server.port or 0, packets[0])
        answers: list[bytes] = []

        async def one(packet: bytes) -> None:
            answers.append(await exchange(server.port or 0, packet))

        async with trio.open_nursery() as nursery:
            for packet in packets[1:]:
                nursery.start_soon(one, packet)
        assert answers == [OK] * (len(packets) - 1)
        assert jetstream_of(server).max_in_flight > 1  # several packets waited for their PubAcks at once
    stored = await trio.to_thread.run_sync(stream_packets, nats_cluster.url)
    assert sorted(p.raw for p in stored) == sorted(packets)


async def test_cluster_unreachable_answers_4_and_keeps_accepting_until_it_is_back(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cluster = NatsCluster(tmp_path / "nats")  # not started yet
    packet = dtg_bytes("01011110003")
    caplog.set_level(logging.INFO, logger="dtgserver")
    try:
        async with running(tmp_path, cluster.url) as server:
            for _ in range(3):
                assert await exchange(server.port or 0, packet) == OVERLOADED
            await trio.sleep(1.5)  # nats-py retries every half second meanwhile
            # at the default verbosity the operator is told why, once, not once per attempt
            down = [r for r in caplog.records if r.levelno == logging.WARNING and "unreachable" in r.getMessage()]
            assert len(down) == 1 and str(cluster.url) in down[0].getMessage(), caplog.text
            attempts = jetstream_of(server).link.failed_attempts
            assert attempts >= 2, attempts
            await trio.to_thread.run_sync(cluster.start_all)
            await until_ok(server.port or 0, packet, timeout_s=60)
            assert jetstream_of(server).link.failed_attempts == 0
        assert any("connected to the NATS cluster" in r.getMessage() for r in caplog.records), caplog.text
        assert [p.raw for p in await trio.to_thread.run_sync(stream_packets, cluster.url)] == [packet]
    finally:
        cluster.stop_all()


async def test_quorum_lost_answers_4_never_0_and_0_again_once_it_is_back(
        tmp_path: Path, nats_cluster: NatsCluster) -> None:
    first = dtg_bytes("01011110004")
    async with running(tmp_path, nats_cluster.url, store_ack_timeout=3.0) as server:
        port = server.port or 0
        await until_ok(port, first)
        nats_cluster.kill(1)
        nats_cluster.kill(2)
        without_quorum = [dtg_bytes("01011110004", minute=m) for m in range(1, 4)]
        for packet in without_quorum:
            assert await exchange(port, packet) == OVERLOADED
        await trio.to_thread.run_sync(nats_cluster.start, 1)
        await trio.to_thread.run_sync(nats_cluster.start, 2)
        for packet in without_quorum:  # the terminal's resends
            await until_ok(port, packet, timeout_s=60)
    with opened(nats_cluster.url) as backend:
        info = backend.link.call_blocking(backend.js.stream_info("DTG_PACKETS"))
    stored = await trio.to_thread.run_sync(stream_packets, nats_cluster.url)
    assert sorted(p.raw for p in stored) == sorted([first, *without_quorum]), info


async def test_one_node_killed_mid_load_answers_stay_0_and_nothing_acknowledged_is_lost(
        tmp_path: Path, nats_cluster: NatsCluster) -> None:
    acknowledged: list[bytes] = []
    other: list[bytes] = []
    async with running(tmp_path, nats_cluster.url, store_ack_timeout=30.0) as server:
        port = server.port or 0
        await until_ok(port, dtg_bytes("01033330000", bodies=2))
        acknowledged.append(dtg_bytes("01033330000", bodies=2))
        with opened(nats_cluster.url) as backend:  # the stream's leader: the node whose death matters most
            leader = backend.link.call_blocking(backend.js.stream_info("DTG_PACKETS")).cluster.leader
        killed = trio.Event()

        async def terminal(n: int) -> None:
            minute = 0
            while not killed.is_set() or minute < 40:  # on until well after the kill
                packet = dtg_bytes(f"0103333{n:04d}", minute=minute, bodies=2)
                answer = await send(port, packet, timeout_s=60)
                (acknowledged if answer == OK else other).append(packet)
                minute += 1
                await trio.sleep(0.02)

        async with trio.open_nursery() as nursery:
            for n in range(1, 9):
                nursery.start_soon(terminal, n)
            await trio.sleep(0.5)
            nats_cluster.kill(int(leader[1:]))
            killed.set()
        assert jetstream_of(server).retries > 0  # some publishes were in flight to the dead leader and went again
    assert other == []
    await trio.to_thread.run_sync(nats_cluster.wait_for_leader)
    stored = await trio.to_thread.run_sync(stream_packets, nats_cluster.url)
    assert sorted(p.raw for p in stored) == sorted(acknowledged)


async def test_devices_and_maintenance_changed_through_one_node_reach_another_within_a_second(
        tmp_path: Path, nats_cluster: NatsCluster) -> None:
    node_a = nats_cluster.nodes[0].url
    node_b = "nats://127.0.0.1:" + str(nats_cluster.nodes[1].port)
    packet = dtg_bytes("01044440001")
    async with running(tmp_path, node_a) as server:
        port = server.port or 0
        await until_ok(port, packet)
        with opened(node_b) as backend:
            control = NatsControl(backend)

            async def seen_within_a_second(answer: bytes) -> None:
                with trio.fail_after(1.0):
                    while await exchange(port, packet) != answer:
                        await trio.sleep(0.02)

            await trio.to_thread.run_sync(control.set_maintenance, True)
            await seen_within_a_second(MAINTENANCE)
            await trio.to_thread.run_sync(control.set_maintenance, False)
            await seen_within_a_second(OK)
            await trio.to_thread.run_sync(control.set_registry_enforced, True)
            await seen_within_a_second(UNKNOWN)
            await trio.to_thread.run_sync(control.add_device, "01044440001")
            await seen_within_a_second(OK)
            await trio.to_thread.run_sync(lambda: control.add_device("01044440001", "stolen",
                                                                     DeviceStatus.CANCELLED))
            await seen_within_a_second(UNKNOWN)
            assert [(d.modem, d.status, d.note) for d in control.devices()] == [
                ("01044440001", DeviceStatus.CANCELLED, "stolen")]
            assert await trio.to_thread.run_sync(control.remove_device, "01044440001")
            assert not await trio.to_thread.run_sync(control.remove_device, "01044440001")
            await trio.to_thread.run_sync(control.set_registry_enforced, False)
            await seen_within_a_second(OK)
        assert server.control_state.maintenance is False


async def test_workers_publish_for_themselves_and_the_password_stays_out_of_ps_and_logs(
        tmp_path: Path, nats_cluster: NatsCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve --workers 2` with the URL (and a password: the test cluster takes any) from DTGSERVER_STORE."""
    from serverproc import children, free_port, start_server, stop

    monkeypatch.setenv("DTGSERVER_STORE", nats_cluster.url.replace("nats://", "nats://dtg:hunter2@", 1))
    port = free_port()
    process = await start_server(tmp_path / "unused", port, "--workers", "2")
    packets = [dtg_bytes(f"0107777{i:04d}", bodies=3) for i in range(30)]
    try:
        for packet in packets:
            await until_ok(port, packet)
        pids = [process.pid, *children(process.pid)]
        assert len(pids) == 3
        for pid in pids:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert b"hunter2" not in f.read()
    finally:
        code, log = stop(process)
    assert code == 0, log
    assert "hunter2" not in log  # warnings name the cluster (quiet: warnings only), never with the password
    stored = await trio.to_thread.run_sync(stream_packets, nats_cluster.url)
    assert sorted(p.raw for p in stored) == sorted(packets)


async def test_a_server_node_killed_under_load_the_terminals_retries_on_the_other_node_succeed(
        tmp_path: Path, nats_cluster: NatsCluster) -> None:
    """Two `serve --store` processes; terminals alternate between them; one is SIGKILLed mid-load."""
    import signal

    from serverproc import free_port, start_server, stop

    ports = [free_port(), free_port()]
    nodes = [await start_server(tmp_path / f"node{i}", port, "--store", nats_cluster.url)
             for i, port in enumerate(ports)]
    acknowledged: list[bytes] = []
    retried_elsewhere = 0
    try:
        for port in ports:
            await until_ok(port, dtg_bytes("01099990000", bodies=2, minute=ports.index(port)))

        async def terminal(n: int) -> None:
            nonlocal retried_elsewhere
            for minute in range(2, 30):
                packet = dtg_bytes(f"0109999{n:04d}", minute=minute, bodies=2)
                first = ports[(n + minute) % 2]  # alternate nodes, as a balancer without stickiness would
                try:
                    answer = await send(first, packet, timeout_s=30)
                except (OSError, trio.BrokenResourceError):  # refused, or reset by the dying node
                    answer = b""
                if answer != OK:  # cut off (or refused): the terminal sends it again, the balancer picks the other
                    assert answer in (b"", OVERLOADED), answer
                    retried_elsewhere += 1
                    answer = await send(ports[1], packet, timeout_s=30)
                assert answer == OK
                acknowledged.append(packet)
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            for n in range(1, 7):
                nursery.start_soon(terminal, n)
            with trio.fail_after(60):  # mid-load: some answered, most still to send
                while len(acknowledged) < 24:
                    await trio.sleep(0.01)
            nodes[0].send_signal(signal.SIGKILL)
        assert retried_elsewhere > 0  # node 0 died while terminals were using it
    finally:
        for process in nodes:
            stop(process, signal.SIGKILL if process is nodes[0] else signal.SIGTERM)
    stored = {p.raw for p in await trio.to_thread.run_sync(stream_packets, nats_cluster.url)}
    assert set(acknowledged) <= stored
    assert len(acknowledged) == 6 * 28


async def test_the_control_watch_survives_the_loss_of_the_node_it_was_on_and_of_quorum(
        tmp_path: Path, nats_cluster: NatsCluster) -> None:
    packet = dtg_bytes("01044440009")
    nodes = nats_cluster.nodes
    # connected to node 0 or 1, both killed below: its connection and its watch must move
    async with running(tmp_path, f"nats://127.0.0.1:{nodes[0].port},127.0.0.1:{nodes[1].port}") as server:
        port = server.port or 0
        await until_ok(port, packet)
        nats_cluster.kill(0)
        nats_cluster.kill(1)  # and with them the quorum
        await trio.to_thread.run_sync(nats_cluster.start, 0)
        await trio.to_thread.run_sync(nats_cluster.start, 1)
        await trio.to_thread.run_sync(nats_cluster.wait_for_leader)
        with opened(nats_cluster.nodes[2].url) as backend:
            control = NatsControl(backend)
            with trio.fail_after(60):  # the bucket answers again once it has a leader
                while True:
                    try:
                        await trio.to_thread.run_sync(control.set_maintenance, True)
                        break
                    except Exception:  # no leader yet: any of nats-py's errors
                        await trio.sleep(0.5)
            with trio.fail_after(30):
                while await exchange(port, packet) != MAINTENANCE:
                    await trio.sleep(0.1)
            await trio.to_thread.run_sync(control.set_maintenance, False)
            with trio.fail_after(30):
                while await exchange(port, packet) != OK:
                    await trio.sleep(0.1)


def test_a_command_reads_back_what_another_node_just_wrote(nats_cluster: NatsCluster) -> None:
    """`devices add` through one node, then `devices list` through another, at once: the list has it.
    The read waits for the bucket's last revision, not only for a replica's view of what is pending."""
    urls = ["nats://127.0.0.1:" + str(node.port) for node in nats_cluster.nodes]
    with opened(urls[1]) as writer, opened(urls[2]) as reader:
        writing, reading = NatsControl(writer), NatsControl(reader)
        for n in range(40):
            modem = f"0105555{n:04d}"
            writing.add_device(modem, f"note {n}")
            assert modem in [d.modem for d in reading.devices()], n
            writing.set_maintenance(n % 2 == 0)
            assert reading.load().maintenance is (n % 2 == 0), n
