"""`dtgserver prune --store`: the stream's packets received before the cut-off are purged, partition
by partition, but those after the partition's bridge cursor; on a real 3-node JetStream cluster.

The stream dates a packet itself (its PubAck), so "old" here is: stored before a moment the test
notes, the "new" ones after it; the command's own cut-off (at least two days back) is checked for
its wiring only.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner
from natscluster import NatsCluster, free_ports, nats_cluster_fixture
from test_nats_store import opened, running, stream_packets, until_ok
from test_server import OK, exchange

from dtgserver.cli import main
from dtgserver.store.jetstream import STREAM
from dtgserver.store.jetstream.log import KvCursor
from dtgserver.store.jetstream.retention import prune_partitions
from dtgserver.store.packets import shard_of
from dtgserver.testing import dtg_bytes

__all__ = ["nats_cluster_fixture"]

pytestmark = pytest.mark.slow

A = "01011110001"
B = next(f"0101111{n:04d}" for n in range(2, 200) if shard_of(f"0101111{n:04d}", 16) != shard_of(A, 16))


def store(tmp_path: Path, url: str, packets: list[bytes]) -> None:
    async def send_all() -> None:
        async with running(tmp_path, url) as server:
            await until_ok(server.port or 0, packets[0])
            for packet in packets[1:]:
                assert await exchange(server.port or 0, packet) == OK

    trio.run(send_all)


def test_the_older_packets_go_but_what_a_bridge_has_not_published(tmp_path: Path, nats_cluster: NatsCluster) -> None:
    url = nats_cluster.url
    store(tmp_path, url, [dtg_bytes(A, minute=m, bodies=2) for m in range(4)]
          + [dtg_bytes(B, minute=m, bodies=2) for m in range(3)])
    time.sleep(1.0)
    cut = time.time()
    time.sleep(1.0)
    store(tmp_path, url, [dtg_bytes(A, minute=m, bodies=2) for m in range(4, 6)]
          + [dtg_bytes(B, minute=m, bodies=2) for m in range(3, 5)])
    before = {(p.modem, p.id) for p in stream_packets(url)}
    a_ids = sorted(i for modem, i in before if modem == A)
    assert len(a_ids) == 6 and len(before) == 11
    partition_a, partition_b = shard_of(A, 16), shard_of(B, 16)
    with opened(url) as backend:
        cursor = KvCursor(backend, partition_a, owner="a-bridge")
        cursor.save(a_ids[1], {})  # A's bridge has had its first two packets' messages acknowledged
        cursor.close()
        dry = backend.link.call_blocking(prune_partitions(backend, cut, dry_run=True), timeout=120)
        assert [(p.partition, p.removed, p.kept_unpublished) for p in dry if p.removed or p.kept_unpublished] == \
            sorted([(partition_a, 2, 2), (partition_b, 3, 0)])
        assert {(p.modem, p.id) for p in stream_packets(url)} == before  # a dry run removes nothing
        done = backend.link.call_blocking(prune_partitions(backend, cut), timeout=120)
        assert [(p.partition, p.removed, p.kept_unpublished) for p in done if p.removed or p.kept_unpublished] == \
            sorted([(partition_a, 2, 2), (partition_b, 3, 0)])
    after = [(p.modem, p.id) for p in stream_packets(url)]
    assert [i for modem, i in after if modem == A] == a_ids[2:]  # the two published go, the rest stays
    assert len([i for modem, i in after if modem == B]) == 2  # B's newer two
    with opened(url) as backend:  # again: nothing more
        again = backend.link.call_blocking(prune_partitions(backend, cut), timeout=120)
        assert sum(p.removed for p in again) == 0
        consumers = backend.link.call_blocking(backend.js.consumers_info(STREAM))
        # the prune's own consumers are deleted: left are the readers of stream_packets (export's, which
        # expire) and the backlog consumer of A's bridge cursor (store/jetstream/backlog.py)
        left = {c.config.filter_subject for c in consumers if c.name != f"dtg_bridge_{partition_a}"}
        assert left == {"dtg.packets.>"}


def test_the_command_on_a_cluster(nats_cluster: NatsCluster, tmp_path: Path) -> None:
    store(tmp_path, nats_cluster.url, [dtg_bytes(A, minute=0, bodies=2)])
    result = CliRunner().invoke(main, ["prune", "--store", nats_cluster.url, "--keep-days", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("stream DTG_PACKETS: removed 0 packets received before ")  # none is 2 days old
    assert len(stream_packets(nats_cluster.url)) == 1
    port = free_ports(1)[0]
    result = CliRunner().invoke(main, ["prune", "--store", f"nats://127.0.0.1:{port}", "--keep-days", "2"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("dtgserver: error: cannot connect to the NATS cluster")
