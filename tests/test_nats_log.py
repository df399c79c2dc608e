"""The packet stream read as a log (partitions, positions, waiting) and the bridge's cursor in the cluster."""

from __future__ import annotations

import json
from pathlib import Path

import nats.errors
import pytest
import trio
from nats.js.api import AckPolicy, ConsumerConfig
from natscluster import NatsCluster, nats_cluster_fixture
from test_nats_store import opened, running, until_ok
from test_server import OK, exchange

from dtgserver.store.jetstream.backend import STREAM, SUBJECT_PREFIX, NatsBackend, subject
from dtgserver.store.jetstream.backlog import NatsBacklog, backlog_consumer
from dtgserver.store.jetstream.log import CursorBusy, JetStreamLog, KvCursor
from dtgserver.store.packets import digest, shard_of
from dtgserver.testing import dtg_bytes

__all__ = ["nats_cluster_fixture"]

pytestmark = pytest.mark.slow

A, B = "01088880001", "01088880002"


async def test_a_terminal_through_two_nodes_is_one_partition_in_acknowledged_order(
        tmp_path: Path, nats_cluster: NatsCluster) -> None:
    minutes = [dtg_bytes(A, minute=m, bodies=2) for m in range(6)]
    async with running(tmp_path / "a", nats_cluster.nodes[0].url) as node_a, \
            running(tmp_path / "b", nats_cluster.nodes[1].url) as node_b:
        await until_ok(node_b.port or 0, dtg_bytes(B, bodies=2))  # both nodes have read the registry
        await until_ok(node_a.port or 0, minutes[0])
        for i, packet in enumerate(minutes[1:], 1):  # alternating nodes, as behind a load balancer
            assert await exchange((node_b if i % 2 else node_a).port or 0, packet) == OK
    with opened(nats_cluster.url) as backend:
        log = JetStreamLog(backend)

        async def read_all() -> None:
            partition = shard_of(A, log.shards)
            packets = await log.read(partition, 0, 100, modem=A)
            assert [p.raw for p in packets] == minutes
            assert [p.modem for p in packets] == [A] * 6
            assert [p.digest for p in packets] == [digest(raw) for raw in minutes]
            positions = [p.position for p in packets]
            assert positions == sorted(positions) and len(set(positions)) == 6
            assert all(p.received_at > 1.7e9 for p in packets)
            whole = await log.read(partition, 0, 100)  # the partition: A's packets, and B's if B is in it
            assert [p.raw for p in whole if p.modem == A] == minutes
            assert await log.last(partition) == whole[-1].position
            # continuing from a read (on the same consumer, though positions have gaps), and from any position
            first = await log.read(partition, 0, 2)
            consumer = log._readers[(partition, None, "read")]
            one_by_one = [*first]
            while more := await log.read(partition, one_by_one[-1].position, 1):
                one_by_one += more
            assert log._readers[(partition, None, "read")] is consumer
            assert [p.position for p in one_by_one] == [p.position for p in whole]
            rest = await log.read(partition, whole[1].position, 100)
            assert [p.position for p in rest] == [p.position for p in whole[2:]]
            assert await log.read(partition, whole[-1].position, 10) == []
            await log.aclose()

        await trio.to_thread.run_sync(lambda: trio.run(read_all))


async def test_wait_returns_once_a_packet_beyond_the_position_is_acknowledged(
        tmp_path: Path, nats_cluster: NatsCluster) -> None:
    async with running(tmp_path, nats_cluster.url) as server:
        port = server.port or 0
        await until_ok(port, dtg_bytes(A, bodies=2))
        with opened(nats_cluster.url) as backend:
            log = JetStreamLog(backend)
            partition = shard_of(A, log.shards)
            last = await log.last(partition)
            assert last > 0
            woke: list[int] = []

            async def waiter() -> None:
                woke.append(await log.wait(partition, last))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiter)
                await trio.sleep(1.5)
                assert woke == []  # nothing new: still waiting
                assert await exchange(port, dtg_bytes(A, minute=1, bodies=2)) == OK
                with trio.fail_after(10):
                    while not woke:
                        await trio.sleep(0.02)
            assert woke[0] > last == (await log.read(partition, 0, 10))[0].position
            assert [p.position for p in await log.read(partition, last, 10)] == [woke[0]]
            await log.aclose()


def test_cursor_saves_position_and_states_and_a_save_cut_short_reads_as_the_one_before(
        nats_cluster: NatsCluster) -> None:
    with opened(nats_cluster.url) as backend:
        cursor = KvCursor(backend, 3, owner="bridge-1")
        assert cursor.load() is None
        cursor.save(10, {A: '["s10"]', B: '["b10"]'})
        cursor.save(20, {A: '["s20"]'})
        assert cursor.load() == 20
        assert cursor.states([A, B, "01099999999"]) == {A: '["s20"]', B: '["b10"]'}
        # killed between the states and the cursor of a save to 30: A's state is ahead of the cursor
        backend.link.call_blocking(cursor.kv.put(f"state.3.{A}", json.dumps(
            {"at": 30, "state": '["s30"]', "before": '["s20"]'}).encode()))
        cursor.close()
        again = KvCursor(backend, 3, owner="bridge-2")
        assert again.load() == 20
        assert again.states([A, B]) == {A: '["s20"]', B: '["b10"]'}
        again.save(30, {A: '["s30 again"]'})
        assert again.states([A]) == {A: '["s30 again"]'}
        again.close()


def test_one_bridge_per_partition_and_a_dead_owners_lease_runs_out(nats_cluster: NatsCluster) -> None:
    with opened(nats_cluster.url) as backend:
        first = KvCursor(backend, 5, owner="bridge-1", lease_s=1.5)
        with pytest.raises(CursorBusy, match="bridge-1"):
            KvCursor(backend, 5, owner="bridge-2", lease_s=1.5)
        other_partition = KvCursor(backend, 6, owner="bridge-2", lease_s=1.5)
        other_partition.close()
        import time

        time.sleep(2.0)  # renewed meanwhile (every 0.5 s): still bridge-1's
        with pytest.raises(CursorBusy):
            KvCursor(backend, 5, owner="bridge-2", lease_s=1.5)
        first._keeper.cancel()  # bridge-1 "SIGKILLed": no renewal, no release
        time.sleep(2.0)
        second = KvCursor(backend, 5, owner="bridge-2", lease_s=1.5)
        with pytest.raises(CursorBusy):
            first.save(1, {})
        second.save(1, {A: '["x"]'})
        second.close()
        third = KvCursor(backend, 5, owner="bridge-3", lease_s=1.5)  # a released lease is free at once
        assert third.load() == 1
        third.close()


def test_log_partitions_are_the_stream_partitions(nats_cluster: NatsCluster) -> None:
    with opened(nats_cluster.url) as backend:
        assert isinstance(backend, NatsBackend)
        assert JetStreamLog(backend).shards == backend.partitions == 16


def test_the_backlog_is_read_from_one_listing_of_the_consumers_a_page_at_a_time(nats_cluster: NatsCluster) -> None:
    """`NatsBacklog` reads every partition's backlog consumer from the stream's consumer list: one
    request when they fit on a page (not one per partition), the next pages when other consumers
    fill the first; a partition without its consumer keeps the figure last read."""
    with opened(nats_cluster.url) as backend:
        partitions = backend.partitions
        nc = backend.link.nc
        assert nc is not None

        async def setup() -> None:
            js = backend.js
            for partition in range(partitions):
                for n in range(partition % 4):  # 0–3 packets waiting per partition
                    await js.publish(subject(partition, f"0101111{n:04d}"), b"packet")
                await js.add_consumer(STREAM, ConsumerConfig(
                    durable_name=backlog_consumer(partition), filter_subject=f"{SUBJECT_PREFIX}.{partition}.>",
                    ack_policy=AckPolicy.ALL, headers_only=True))

        backend.link.call_blocking(setup())
        requests = backend.link.call_blocking(nc.subscribe("$JS.API.CONSUMER.>"))  # every consumer API request
        backend.link.call_blocking(nc.flush())
        backlog = NatsBacklog(backend)

        async def seen() -> list[str]:
            subjects = []
            while True:
                try:
                    subjects.append((await requests.next_msg(timeout=0.3)).subject)
                except nats.errors.TimeoutError:
                    return [s.rsplit(".", 1)[0] for s in subjects]  # without the stream's name

        def read() -> list[str]:
            backend.link.call_blocking(seen())  # not the setting up's own requests
            trio.run(backlog.read)
            return backend.link.call_blocking(seen())

        expected = {partition: partition % 4 for partition in range(partitions)}
        assert read() == ["$JS.API.CONSUMER.LIST"]
        assert backlog.partitions == expected and backlog.total() == sum(expected.values())

        backend.link.call_blocking(backend.js.delete_consumer(STREAM, backlog_consumer(3)))
        backend.link.call_blocking(backend.js.publish(subject(3, "01011119999"), b"packet"))
        assert read() == ["$JS.API.CONSUMER.LIST"] * 2  # the page it is not on, then an empty one
        assert backlog.partitions == expected  # partition 3 as last read (3), not 4, not 0

        async def crowd() -> None:  # 300 consumers whose names sort before the backlog's
            for n in range(300):
                await backend.js.add_consumer(STREAM, ConsumerConfig(
                    durable_name=f"another_{n:03d}", ack_policy=AckPolicy.NONE, headers_only=True,
                    mem_storage=True, num_replicas=1))
            await backend.js.add_consumer(STREAM, ConsumerConfig(
                durable_name=backlog_consumer(3), filter_subject=f"{SUBJECT_PREFIX}.3.>",
                ack_policy=AckPolicy.ALL, headers_only=True))

        backend.link.call_blocking(crowd(), timeout=120)
        assert read() == ["$JS.API.CONSUMER.LIST"] * 2  # 256 others, then the rest with every partition's
        assert backlog.partitions == expected | {3: 4}
