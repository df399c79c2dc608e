"""A data dir from before 2026-12 whose old outbox still held messages: they are published, once, first."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import trio
from mosquitto import Mosquitto, Subscriber, broker_fixture  # noqa: F401  (the broker fixture)
from serverproc import send
from test_bridge_e2e import OK, server_with_broker

from dtgserver.bridge.leftovers import LeftoverOutbox
from dtgserver.protocol import encode
from dtgserver.server.app import DtgServer
from dtgserver.server.config import ServerConfig
from dtgserver.store.log import LeftoverMessage
from dtgserver.store.sqlite_log import SqlitePacketLog
from dtgserver.testing import basic_info, dtg

pytestmark = pytest.mark.slow

# the table as versions before 2026-12 made it in each shard
OLD_OUTBOX = """
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    packet_id INTEGER NOT NULL REFERENCES packets(id),
    modem TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    retain INTEGER NOT NULL
)"""


def leave_old_messages(shard: Path, count: int) -> list[tuple[str, bytes, bool]]:
    """What an old server would have left queued: `count` messages (the last one retained)."""
    rows = [(f"v1/sensors/0104444000{n % 2}/attributes" if n == count - 1 else f"v1/sensors/0104444000{n % 2}/ts",
             json.dumps({"id": f"old-{n}", "ts": 1_700_000_000_000 + n}).encode(), n == count - 1)
            for n in range(count)]
    with sqlite3.connect(shard) as db:
        db.execute(OLD_OUTBOX)
        # ids need not start at 1: the old forwarder had deleted what it had delivered
        db.execute("INSERT INTO sqlite_sequence(name, seq) VALUES ('outbox', 40)")
        db.executemany("INSERT INTO outbox(packet_id, modem, topic, payload, retain) VALUES (1, ?, ?, ?, ?)",
                       [(topic.split("/")[2], topic, payload, retain) for topic, payload, retain in rows])
    return rows


async def test_an_upgraded_data_dir_publishes_what_the_old_outbox_held_then_goes_on(
        tmp_path: Path, broker: Mosquitto) -> None:
    async with server_with_broker(tmp_path, broker, mqtt_url=None) as server:  # the "old" server's packets
        assert server.port
        assert await send(server.port, encode(basic_info("01044440000"))) == OK
    old = leave_old_messages(tmp_path / "data" / "store-0.db", 5)
    with Subscriber(broker, "pre/v1/sensors/#") as subscriber:
        async with server_with_broker(tmp_path, broker, topic_prefix="pre") as server:
            assert server.port and server.bridge is not None
            with trio.fail_after(20):
                await server.bridge.consumers[0].ready.wait()
            assert await send(server.port, encode(dtg("01044440001", minute=0))) == OK
            await subscriber.wait_count(6)
            await trio.sleep(0.3)  # nothing more may arrive
            assert server.bridge.leftovers_published == 5
        got = [(m.topic, m.payload) for m in subscriber.messages]
        assert got[:5] == [("pre/" + topic, payload) for topic, payload, _ in old]
        assert got[5][0] == "pre/v1/sensors/01044440001/tre" and json.loads(got[5][1])["ty"] == 2  # derived after
        assert (tmp_path / "data" / "bridge-0.db").exists()

        # restarted: the cursor is saved, so the old messages are not published again
        async with server_with_broker(tmp_path, broker, topic_prefix="pre") as server:
            assert server.port and server.bridge is not None
            with trio.fail_after(20):
                await server.bridge.consumers[0].ready.wait()
            assert await send(server.port, encode(dtg("01044440001", minute=1))) == OK
            await subscriber.wait_count(7)
            await trio.sleep(0.3)
            assert server.bridge.leftovers_published == 0
    assert len(subscriber.messages) == 7
    assert not any(m.payload.startswith(b'{"id": "old-') for m in subscriber.messages[5:])
    with Subscriber(broker, "pre/v1/sensors/+/attributes", client_id="late") as late:  # published retained
        await late.wait_count(1)
    assert [(m.payload, m.retain) for m in late.messages] == [(old[4][1], True)]
    with sqlite3.connect(tmp_path / "data" / "store-0.db") as db:  # the old table is left as it was
        assert db.execute("SELECT count(*) FROM outbox").fetchone()[0] == 5


async def test_the_old_table_is_read_in_order_and_a_new_data_dir_has_none(tmp_path: Path) -> None:
    server = DtgServer(ServerConfig(host="127.0.0.1", port=0, data_dir=tmp_path / "data", grace_period=2.0))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        assert server.port
        assert await send(server.port, encode(basic_info("01044440000"))) == OK
        server.stop()
    log = SqlitePacketLog(tmp_path / "data", shards=1)
    try:
        assert await log.leftover_messages(0) == []  # made by this version: no outbox table
        old = leave_old_messages(tmp_path / "data" / "store-0.db", 3)
        assert [(m.id, m.topic, m.payload, m.retain) for m in await log.leftover_messages(0)] == [
            (41 + n, topic, payload, retain) for n, (topic, payload, retain) in enumerate(old)]
    finally:
        log.close()


async def test_the_leftover_outbox_is_done_only_when_every_message_is_acknowledged() -> None:
    outbox = LeftoverOutbox([LeftoverMessage(41 + n, "01044440000", "t", b"%d" % n, False) for n in range(3)])
    assert [row.id for row in await outbox.fetch(0, 2)] == [1, 2]
    assert [row.id for row in await outbox.fetch(2, 10)] == [3]
    await outbox.mark_delivered([1, 3])
    assert not outbox.done.is_set() and outbox.backlog() == 1
    await outbox.mark_delivered([2])
    assert outbox.done.is_set() and outbox.backlog() == 0
    with trio.move_on_after(0.05) as waited:
        await outbox.fetch(3, 10)  # nothing left to hand out: waits (the forwarder is then cancelled)
    assert waited.cancelled_caught
    assert LeftoverOutbox([]).done.is_set()
