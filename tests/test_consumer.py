"""The store's packet log and the bridge's consumer, in process: real shards, real cursor files.

The consumer is driven here the way the forwarder drives it (fetch rows after the last one
taken, report PUBACKs with mark_delivered); tests/test_bridge_e2e.py and
tests/test_bridge_process.py drive it through a real forwarder and a real Mosquitto.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

import attrs
import pytest
import trio

from dtgserver.bridge.consumer import BridgeOptions, Consumer
from dtgserver.bridge.cursor import CursorBusy, MemoryCursor, SqliteCursor, read_position
from dtgserver.bridge.outbox import OutboxRow
from dtgserver.protocol import Connection, Received, Result, Role, encode
from dtgserver.store import PacketStore
from dtgserver.store.log import LoggedPacket
from dtgserver.store.sqlite_log import SqlitePacketLog
from dtgserver.testing import KEY_ON, basic_info, dtg_bytes, key_off

MODEMS = ("01044440001", "01044440002", "01044440003")
FAST = BridgeOptions(flush_interval_s=0.01, backoff_initial_s=0.05, backoff_max_s=0.2)


def received(raw: bytes) -> Received:
    conn = Connection(Role.SERVER)
    conn.receive_data(raw)
    event = conn.next_event()
    assert isinstance(event, Received)
    return event


def trip(modem: str, minutes: int = 3) -> list[bytes]:
    """A trip whose messages depend on the state carried between packets: attributes, minutes, KEY OFF."""
    return ([encode(basic_info(modem))] + [dtg_bytes(modem, minute=m, bodies=5) for m in range(minutes)]
            + [encode(key_off(modem, battery_v=11.0))])


def interleaved(*modems: str) -> list[bytes]:
    trips = [trip(m) for m in modems]
    return [packet for group in zip(*trips, strict=True) for packet in group]


async def store_all(data_dir: Path, packets: list[bytes], *, bridge_from_the_start: bool = True) -> None:
    """Store packets; by default as if the bridge had been on since before the first (its cursor at 0)."""
    if bridge_from_the_start and read_position(data_dir, 0) is None:
        cursor = SqliteCursor(data_dir, 0)
        cursor.save(0, {})
        cursor.close()
    store = PacketStore(data_dir)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            for raw in packets:
                assert await store.submit(received(raw), "peer") is Result.OK
            nursery.cancel_scope.cancel()
    finally:
        store.close()


@asynccontextmanager
async def consuming(consumer: Consumer) -> AsyncIterator[Consumer]:
    async with trio.open_nursery() as nursery:
        await nursery.start(consumer.run)
        yield consumer
        nursery.cancel_scope.cancel()


async def take(consumer: Consumer, count: int, after: int = 0) -> list[OutboxRow]:
    """`count` rows after row `after`, as the forwarder fetches them (a window at a time)."""
    rows: list[OutboxRow] = []
    with trio.fail_after(10):
        while len(rows) < count:
            rows += await consumer.fetch(rows[-1].id if rows else after, 7)
    return rows


async def everything(data_dir: Path, options: BridgeOptions = FAST) -> list[OutboxRow]:
    """What a fresh consumer derives from the whole shard (a replay's view)."""
    packet_log = SqlitePacketLog(data_dir, 1)
    try:
        consumer = Consumer(packet_log, 0, MemoryCursor(0), options, end=await packet_log.last(0))
        rows: list[OutboxRow] = []
        async with consuming(consumer):
            with trio.fail_after(10):
                while True:
                    with trio.move_on_after(0.5):
                        rows += await consumer.fetch(rows[-1].id if rows else 0, 50)
                        continue
                    break
        return rows
    finally:
        packet_log.close()


# -- the log ---------------------------------------------------------------------------------------


async def test_the_log_reads_each_shard_in_commit_order_and_wakes_on_commit(tmp_path: Path) -> None:
    packets = interleaved(*MODEMS[:2])
    store = PacketStore(tmp_path)
    in_process = SqlitePacketLog(tmp_path, 1, writers={0: store})
    other_process = SqlitePacketLog(tmp_path, 1, poll_s=0.01)  # as `dtgserver bridge` beside `serve`
    woken: list[int] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            for raw in packets[:4]:
                assert await store.submit(received(raw), "peer") is Result.OK
            for packet_log in (in_process, other_process):
                read = await packet_log.read(0, 0, 100)
                assert [p.position for p in read] == [1, 2, 3, 4]
                assert [p.raw for p in read] == packets[:4]
                assert read[0].modem == MODEMS[0] and read[1].modem == MODEMS[1]
                assert await packet_log.read(0, 2, 1) == read[2:3]
                assert await packet_log.read(0, 4, 100) == []  # never waits
                assert [p.position for p in await packet_log.read(0, 0, 100, modem=MODEMS[1])] == [2, 4]
                assert await packet_log.last(0) == 4

            async def wait(packet_log: SqlitePacketLog) -> None:
                woken.append(await packet_log.wait(0, 4))

            nursery.start_soon(wait, in_process)
            nursery.start_soon(wait, other_process)
            await trio.sleep(0.1)
            assert woken == []  # nothing after 4 yet
            assert await store.submit(received(packets[4]), "peer") is Result.OK
            with trio.fail_after(5):
                while len(woken) < 2:
                    await trio.sleep(0.01)
            assert woken == [5, 5]
            assert await store.submit(received(packets[4]), "peer") is Result.OK  # a resend: no new position
            assert await in_process.last(0) == await other_process.last(0) == 5
            nursery.cancel_scope.cancel()
    finally:
        for packet_log in (in_process, other_process):
            packet_log.close()
        store.close()


async def test_a_log_on_a_shard_not_yet_written_waits_for_it(tmp_path: Path) -> None:
    packet_log = SqlitePacketLog(tmp_path, 1, poll_s=0.01)
    try:
        assert await packet_log.read(0, 0, 10) == [] and await packet_log.last(0) == 0
        assert not (tmp_path / "store-0.db").exists()  # reading created nothing
        await store_all(tmp_path, trip(MODEMS[0])[:1], bridge_from_the_start=False)
        with trio.fail_after(5):
            assert await packet_log.wait(0, 0) == 1
    finally:
        packet_log.close()


# -- the consumer ------------------------------------------------------------------------------------


async def test_restarted_at_its_cursor_it_derives_the_same_messages_with_the_same_ids(tmp_path: Path) -> None:
    packets = interleaved(*MODEMS)
    await store_all(tmp_path, packets)
    reference = await everything(tmp_path)
    assert len(reference) > len(packets)  # KEY OFF gives a Trip, a parking microtrip and a battery warning

    packet_log = SqlitePacketLog(tmp_path, 1)
    try:
        first = Consumer(packet_log, 0, SqliteCursor(tmp_path, 0), FAST)
        async with consuming(first):
            rows = await take(first, len(reference))
            assert [r.payload for r in rows] == [r.payload for r in reference]
            with pytest.raises(CursorBusy):
                SqliteCursor(tmp_path, 0)  # one bridge per shard
            # the broker acknowledges the first 13 messages, then the connection is gone
            await first.mark_delivered([r.id for r in rows[:13]])
        cut = reference[12].payload.split(b'"id":"')[1].split(b":")[0]  # the packet of the 13th message
        same_packet = [r for r in reference if b'"id":"' + cut + b":" in r.payload]
        last_done = reference.index(same_packet[-1]) + 1 == 13
        saved = read_position(tmp_path, 0)
        assert saved == first.position and saved is not None and saved > 0

        second = Consumer(packet_log, 0, SqliteCursor(tmp_path, 0), FAST)
        async with consuming(second):
            resumed_at = 13 if last_done else reference.index(same_packet[0])
            again = await take(second, len(reference) - resumed_at)
            # exactly the messages not yet acknowledged (plus the acknowledged rest of a packet
            # cut in the middle), byte for byte, same ids, in order
            assert [r.payload for r in again] == [r.payload for r in reference[resumed_at:]]
            await second.mark_delivered([r.id for r in again])
        assert read_position(tmp_path, 0) == len(packets)
        assert second.backlog() == 0
    finally:
        packet_log.close()


async def test_a_bounded_trip_cache_gives_the_same_messages(tmp_path: Path) -> None:
    packets = interleaved(*MODEMS)
    await store_all(tmp_path, packets)
    reference = await everything(tmp_path)
    packet_log = SqlitePacketLog(tmp_path, 1)
    small = attrs.evolve(FAST, trip_cache=1, read_batch=2)
    try:
        consumer = Consumer(packet_log, 0, SqliteCursor(tmp_path, 0), small)
        rows: list[OutboxRow] = []
        largest = 0
        async with consuming(consumer):
            while len(rows) < len(reference):
                batch = await take(consumer, 1, rows[-1].id if rows else 0)
                rows += batch
                await consumer.mark_delivered([r.id for r in batch])
                with trio.fail_after(5):
                    while consumer.position < consumer.acked:  # saved: its states may leave the cache
                        await trio.sleep(0.005)
                largest = max(largest, len(consumer._states))
        assert [r.payload for r in rows] == [r.payload for r in reference]
        assert largest <= 2  # the cache (1) plus the terminal of the packet in flight
        assert len(consumer._states) <= 1
    finally:
        packet_log.close()


async def test_a_cursor_write_blocked_by_a_foreign_lock_is_retried_and_catches_up(tmp_path: Path) -> None:
    """`sqlite3 bridge-0.db 'BEGIN EXCLUSIVE'` held while acknowledgements come: deriving goes on."""
    packets = interleaved(*MODEMS[:2])
    await store_all(tmp_path, packets)
    packet_log = SqlitePacketLog(tmp_path, 1)
    try:
        consumer = Consumer(packet_log, 0, SqliteCursor(tmp_path, 0), FAST)
        async with consuming(consumer):
            rows = await take(consumer, 3)
            foreign = sqlite3.connect(tmp_path / "bridge-0.db", isolation_level=None)
            foreign.execute("BEGIN EXCLUSIVE")
            try:
                await consumer.mark_delivered([r.id for r in rows])
                with trio.fail_after(15):
                    while consumer.stats.cursor_errors < 1:
                        await trio.sleep(0.05)
                assert consumer.position == 0 < consumer.acked  # acknowledged, not saved
                more = await take(consumer, 3, rows[-1].id)  # deriving goes on meanwhile
            finally:
                foreign.execute("ROLLBACK")
                foreign.close()
            await consumer.mark_delivered([r.id for r in more])
            with trio.fail_after(15):
                while consumer.position < consumer.acked:
                    await trio.sleep(0.05)
        assert read_position(tmp_path, 0) == consumer.acked > 0
    finally:
        packet_log.close()


async def test_a_full_bridge_file_is_retried_and_catches_up(tmp_path: Path) -> None:
    """SQLITE_FULL on the cursor file (its page count capped at what it has): logged, counted, retried."""
    modems = [f"0105555{n:04d}" for n in range(200)]  # many trip states: the file must grow
    packets = [dtg_bytes(m, bodies=1) for m in modems]
    await store_all(tmp_path, packets)
    packet_log = SqlitePacketLog(tmp_path, 1)
    try:
        cursor = SqliteCursor(tmp_path, 0)
        consumer = Consumer(packet_log, 0, cursor, FAST)
        async with consuming(consumer):
            await consumer.ready.wait()
            pages = cursor.db.execute("PRAGMA page_count").fetchone()[0]
            cursor.db.execute(f"PRAGMA max_page_count = {pages}")  # "the disk is full"
            rows = await take(consumer, len(packets))
            await consumer.mark_delivered([r.id for r in rows])
            with trio.fail_after(15):
                while consumer.stats.cursor_errors < 2:
                    await trio.sleep(0.05)
            assert consumer.position < len(packets) and consumer.acked == len(packets)
            cursor.db.execute("PRAGMA max_page_count = 1073741823")  # space again
            with trio.fail_after(15):
                while consumer.position < len(packets):
                    await trio.sleep(0.05)
        assert read_position(tmp_path, 0) == len(packets)
        assert len(SqliteCursor(tmp_path, 0).states(modems)) == len(modems)
    finally:
        packet_log.close()


class FlakyLog(SqlitePacketLog):
    """The shard's reads fail the first `failures` times (an I/O error), then work."""

    failures = 3

    async def read(self, shard: int, after: int, limit: int, *, modem: str | None = None) -> list[LoggedPacket]:
        if self.failures:
            self.failures -= 1
            await trio.lowlevel.checkpoint()
            raise sqlite3.OperationalError("disk I/O error")
        return await super().read(shard, after, limit, modem=modem)


async def test_read_errors_are_retried_with_backoff_and_counted(tmp_path: Path) -> None:
    packets = trip(MODEMS[0])
    await store_all(tmp_path, packets)
    reference = await everything(tmp_path)
    packet_log = FlakyLog(tmp_path, 1)
    try:
        consumer = Consumer(packet_log, 0, MemoryCursor(0), FAST)
        async with consuming(consumer):
            rows = await take(consumer, len(reference))
        assert [r.payload for r in rows] == [r.payload for r in reference]
        assert consumer.stats.read_errors == 3
    finally:
        packet_log.close()


async def test_first_start_on_a_store_with_history(tmp_path: Path) -> None:
    """No cursor yet: it starts after the store's last packet (history is not published), with
    the trip states of the recent packets rebuilt, so a trip under way ends with a whole Trip."""
    history = trip(MODEMS[0])[:3]  # attributes and two minutes: the trip is under way
    # the third minute and the KEY OFF at its last body: the trip is complete there
    rest = [trip(MODEMS[0])[3], encode(key_off(MODEMS[0], battery_v=11.0,
                                               key_off_time=KEY_ON + timedelta(minutes=2, seconds=4)))]
    await store_all(tmp_path, history, bridge_from_the_start=False)
    packet_log = SqlitePacketLog(tmp_path, 1)
    try:
        consumer = Consumer(packet_log, 0, SqliteCursor(tmp_path, 0), FAST)
        async with consuming(consumer):
            await consumer.ready.wait()
            assert consumer.position == len(history) and consumer.backlog() == 0
            assert consumer.stats.warmup_packets == len(history)
            await store_all(tmp_path, rest)
            rows = await take(consumer, 4)  # the microtrip, the Trip, the parking microtrip, the warning
        reference = await everything(tmp_path)  # the whole history, as a replay sees it
        assert [r.payload for r in rows] == [r.payload for r in reference[-4:]]
        assert b'"ty":1' in rows[1].payload  # the Trip, over all three minutes
    finally:
        packet_log.close()

    # a state rebuilt from nothing: with no warm-up window the trip's first minutes are unknown
    cold = tmp_path / "cold"
    await store_all(cold, history, bridge_from_the_start=False)
    packet_log = SqlitePacketLog(cold, 1)
    try:
        consumer = Consumer(packet_log, 0, SqliteCursor(cold, 0), attrs.evolve(FAST, warmup_s=0))
        async with consuming(consumer):
            await consumer.ready.wait()
            assert consumer.stats.warmup_packets == 0
            await store_all(cold, rest)
            rows = await take(consumer, 4)
        assert [r.payload for r in rows] != [r.payload for r in reference[-4:]]
    finally:
        packet_log.close()


async def test_a_replay_range_publishes_only_its_packets_and_ends(tmp_path: Path) -> None:
    packets = interleaved(*MODEMS[:2])
    await store_all(tmp_path, packets)
    reference = await everything(tmp_path)
    packet_log = SqlitePacketLog(tmp_path, 1)
    try:
        consumer = Consumer(packet_log, 0, MemoryCursor(0), FAST, modem=MODEMS[1], end=await packet_log.last(0),
                            publish=lambda p: p.raw != packets[1])  # not the second terminal's attributes
        async with consuming(consumer):
            rows: list[OutboxRow] = []
            with trio.fail_after(10):
                while not consumer.done.is_set():
                    with trio.move_on_after(0.2):
                        batch = await consumer.fetch(rows[-1].id if rows else 0, 50)
                        rows += batch
                        await consumer.mark_delivered([r.id for r in batch])
        expected = [r.payload for r in reference if f"/{MODEMS[1]}/tre" in r.topic]
        assert [r.payload for r in rows] == expected
        assert read_position(tmp_path, 0) == 0  # a replay never moves the live cursor
    finally:
        packet_log.close()


def test_trip_states_in_memory_are_measured() -> None:
    """Not a speed test: the figure docs/performance.md quotes for --trip-cache sizing."""
    import tracemalloc

    from dtgserver.bridge.trips import TripState

    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    states = {f"0106666{n:04d}": TripState(tid=1795215600 + n, kind="dtg", key_on_ms=n, first_total_km=n,
                                           last_total_km=n + 1, first_lat=37.5, first_lon=127.0, last_lat=37.6,
                                           last_lon=127.1, last_ms=n, max_speed_kmh=80, speed_sum_kmh=n * 40,
                                           speed_count=n, driving_s=n, fwv="1.0.2")
              for n in range(1000)}
    per_state = (tracemalloc.get_traced_memory()[0] - before) / len(states)
    tracemalloc.stop()
    print(f"trip state in memory: {per_state:.0f} bytes per terminal")
    assert 100 < per_state < 4096


async def test_a_first_start_begins_where_the_server_was_when_it_started(tmp_path: Path) -> None:
    """`serve --mqtt` tells its bridge the store's last id before it accepts connections: packets
    answered while the cursor was being opened are published, not taken for history."""
    packets = trip(MODEMS[0])
    await store_all(tmp_path, packets[:1], bridge_from_the_start=False)  # history: the attributes
    await store_all(tmp_path, packets[1:], bridge_from_the_start=False)  # answered once the server started
    reference = await everything(tmp_path)
    packet_log = SqlitePacketLog(tmp_path, 1)
    try:
        consumer = Consumer(packet_log, 0, SqliteCursor(tmp_path, 0), FAST, start_at=1)
        async with consuming(consumer):
            rows = await take(consumer, len(reference) - 1)
        assert [r.payload for r in rows] == [r.payload for r in reference[1:]]
    finally:
        packet_log.close()


# -- a packet stored twice (JetStream after its duplicate window) ----------------------------------


class ListLog:
    """A `PacketLog` of one shard over a list: a store that may hold a packet twice, as a stream does."""

    shards = 1

    def __init__(self, raws: list[bytes], modem: str):
        from dtgserver.store import digest

        self.packets = [LoggedPacket(i + 1, modem, 1_700_000_000.0 + i, digest(raw), raw)
                        for i, raw in enumerate(raws)]
        self.grown = trio.Event()

    def append(self, raw: bytes) -> None:
        from dtgserver.store import digest

        self.packets.append(LoggedPacket(len(self.packets) + 1, self.packets[0].modem, 1_700_000_000.0, digest(raw),
                                         raw))
        self.grown.set()

    async def read(self, shard: int, after: int, limit: int, *, modem: str | None = None) -> list[LoggedPacket]:
        return [p for p in self.packets if p.position > after][:limit]

    async def wait(self, shard: int, after: int) -> int:
        while self.packets[-1].position <= after:
            self.grown = trio.Event()
            await self.grown.wait()
        return self.packets[-1].position

    async def last(self, shard: int) -> int:
        return self.packets[-1].position

    def close(self) -> None:
        pass


async def acknowledge_all(consumer: Consumer, until: int) -> list[OutboxRow]:
    """Fetch and acknowledge rows until packet `until` is saved under the cursor."""
    rows: list[OutboxRow] = []
    with trio.fail_after(10):
        while consumer.position < until:
            with trio.move_on_after(0.2):
                batch = await consumer.fetch(rows[-1].id if rows else 0, 50)
                rows += batch
                await consumer.mark_delivered(r.id for r in batch)
            await trio.sleep(0.02)
    return rows


async def test_a_packet_stored_twice_is_derived_once_also_by_the_next_owner_of_the_cursor() -> None:
    modem = MODEMS[0]
    packets = trip(modem, minutes=3)  # attributes, 3 minutes, KEY OFF
    minute = packets[2]
    # the second minute stored again after the first (a resend after the duplicate window), then the rest
    packet_log = ListLog([*packets[:3], minute, *packets[3:]], modem)
    cursor = MemoryCursor(0)
    consumer = Consumer(packet_log, 0, cursor, FAST)
    async with consuming(consumer):
        rows = await acknowledge_all(consumer, len(packet_log.packets))
    reference = await derive_all(packets)
    assert [(r.topic, r.payload) for r in rows] == reference  # as if it had been stored once
    assert consumer.stats.resends_dropped == 1
    assert len(cursor.published() or []) >= 1

    # the partition's next owner, from the saved cursor: resends of packets derived before are skipped
    packet_log.append(minute)
    packet_log.append(packets[-1])
    nxt = Consumer(packet_log, 0, cursor, FAST)
    async with consuming(nxt):
        with trio.fail_after(10):
            while nxt.position < len(packet_log.packets):
                with trio.move_on_after(0.05):
                    await nxt.fetch(0, 50)  # nothing to fetch: the consumer derives meanwhile
        assert nxt.stats.resends_dropped == 2
        assert nxt.stats.messages == 0
        packet_log.append(dtg_bytes(modem, minute=3, bodies=5))  # a new packet is derived as ever
        new = await take(nxt, 1)
        assert new[0].topic.endswith("/tre")


async def derive_all(packets: list[bytes]) -> list[tuple[str, bytes]]:
    """What a consumer derives from `packets`, each stored once."""
    packet_log = ListLog(packets, MODEMS[0])
    consumer = Consumer(packet_log, 0, MemoryCursor(0), FAST)
    async with consuming(consumer):
        rows = await acknowledge_all(consumer, len(packets))
    return [(r.topic, r.payload) for r in rows]


def test_published_digests_are_kept_for_the_horizon_and_dropped_by_the_hour() -> None:
    from dtgserver.bridge.published import PublishedDigests
    from dtgserver.store import digest

    kept = PublishedDigests(horizon_s=48 * 3600, chunk_s=3600)
    digests = [digest(bytes([n]) * 10) for n in range(200)]
    for hour in range(50):  # 4 digests an hour, 50 hours
        for d in digests[4 * hour:4 * hour + 4]:
            kept.add(d, 1_700_000_000.0 + hour * 3600 + 1)
    assert len(kept) < 200
    assert digests[0] not in kept  # added 49 h before the last
    assert all(d in kept for d in digests[16:])  # the last 46 hours: kept (and looked up in sorted chunks)
    assert digest(b"never") not in kept
    assert digests[199][:8] + bytes(8) not in kept  # the same first half is not the same digest
