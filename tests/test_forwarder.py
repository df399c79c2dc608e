"""The forwarder against a real Mosquitto and a real paho subscriber: order, PUBACK, outages, shutdown."""

from __future__ import annotations

import json
import os
import threading
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
from mosquitto import Mosquitto, Subscriber, broker_fixture, free_port, make_test_ca  # noqa: F401  (the broker fixture)

from dtgserver.bridge import OutboxRow, encode_payload
from dtgserver.bridge.forwarder import BrokerUrl, Forwarder, topic_with_prefix

CLIENT_ID = "dtg-forwarder-test"
MODEMS = ("01011110001", "01011110002", "01011110003")


class MemoryOutbox:
    """The Outbox interface over a dict, as the store's would behave (cancel-safe fetch)."""

    def __init__(self) -> None:
        self.undelivered: dict[int, OutboxRow] = {}
        self.delivered: list[int] = []
        self.mark_calls = 0
        self._next_id = 1
        self._wake = trio.Event()

    def add(self, modem: str, payload: dict[str, Any] | None = None, *, topic: str | None = None,
            retain: bool = False) -> OutboxRow:
        row_id = self._next_id
        self._next_id += 1
        body = payload if payload is not None else {"ts": row_id, "ty": 2, "pld": [], "id": f"row{row_id}"}
        row = OutboxRow(row_id, modem, topic or f"v1/sensors/{modem}/tre", encode_payload(body), retain)
        self.undelivered[row_id] = row
        self._wake.set()
        return row

    async def fetch(self, after_id: int, limit: int) -> list[OutboxRow]:
        while True:
            rows = [row for row_id, row in sorted(self.undelivered.items()) if row_id > after_id][:limit]
            if rows:
                await trio.lowlevel.checkpoint()
                return rows
            self._wake = trio.Event()
            await self._wake.wait()

    async def mark_delivered(self, ids: Sequence[int]) -> None:
        await trio.lowlevel.checkpoint()
        self.mark_calls += 1
        for row_id in ids:
            if self.undelivered.pop(row_id, None) is not None:
                self.delivered.append(row_id)

    def backlog(self) -> int:
        return len(self.undelivered)


def row_ids(subscriber: Subscriber) -> list[int]:
    return [int(json.loads(p)["id"].removeprefix("row")) for p in subscriber.payloads]


def forwarder_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"paho-mqtt-client-{CLIENT_ID}")]


async def wait_until(condition: Any, timeout_s: float = 20.0) -> None:
    with trio.fail_after(timeout_s):
        while not condition():
            await trio.sleep(0.02)


def make_forwarder(outbox: MemoryOutbox, url: str, **kwargs: Any) -> Forwarder:
    kwargs.setdefault("backoff_initial_s", 0.1)
    kwargs.setdefault("backoff_max_s", 1.0)
    return Forwarder(outbox, url, client_id=CLIENT_ID, **kwargs)


# -- configuration ---------------------------------------------------------------------------------


def test_broker_url_forms() -> None:
    assert BrokerUrl.parse("mqtt://broker.example") == BrokerUrl("broker.example", 1883)
    assert BrokerUrl.parse("mqtts://broker.example") == BrokerUrl("broker.example", 8883, tls=True)
    url = BrokerUrl.parse("mqtt://fleet%40gw:p%3Ass@10.0.0.5:1884")
    assert url == BrokerUrl("10.0.0.5", 1884, username="fleet@gw", password="p:ss")
    assert "p:ss" not in str(url)  # logs never show the password


@pytest.mark.parametrize("url", ["http://x", "mqtt://", "mqtt://x:notaport", "mqtt://x/topic", "x:1883"])
def test_bad_broker_urls_are_refused_with_a_message(url: str) -> None:
    with pytest.raises(ValueError, match="broker URL"):
        BrokerUrl.parse(url)


def test_bad_forwarder_options_are_refused(tmp_path: Path) -> None:
    outbox = MemoryOutbox()
    with pytest.raises(ValueError, match="mqtts://"):
        Forwarder(outbox, "mqtt://x", tls_ca=tmp_path / "ca.pem")
    with pytest.raises(ValueError, match="does not exist"):
        Forwarder(outbox, "mqtts://x", tls_ca=tmp_path / "ca.pem")
    with pytest.raises(ValueError, match="wildcards"):
        Forwarder(outbox, "mqtt://x", topic_prefix="fleet/#")


def test_topic_prefix() -> None:
    assert topic_with_prefix("", "v1/sensors/1/tre") == "v1/sensors/1/tre"
    assert topic_with_prefix("fleet", "v1/sensors/1/tre") == "fleet/v1/sensors/1/tre"
    assert topic_with_prefix("/fleet/", "v1/sensors/1/tre") == "fleet/v1/sensors/1/tre"


# -- delivery ----------------------------------------------------------------------------------------


async def test_every_row_arrives_in_order_and_is_marked_delivered(broker: Mosquitto) -> None:
    outbox = MemoryOutbox()
    for n in range(150):
        outbox.add(MODEMS[n % 3])
    forwarder = make_forwarder(outbox, broker.url, topic_prefix="fleet", window=7)  # a small window: many refills
    with Subscriber(broker, "fleet/#") as subscriber:
        async with trio.open_nursery() as nursery:
            await nursery.start(forwarder.run)
            await subscriber.wait_count(150)
            await wait_until(lambda: outbox.backlog() == 0)
            assert forwarder.connected
            nursery.cancel_scope.cancel()
    assert row_ids(subscriber) == list(range(1, 151))
    assert [m.topic for m in subscriber.messages[:3]] == [f"fleet/v1/sensors/{m}/tre" for m in MODEMS]
    assert sorted(outbox.delivered) == list(range(1, 151))
    assert forwarder.published == forwarder.acknowledged == 150
    assert forwarder.reconnects == 0 and forwarder.backlog == 0 and forwarder.pending == 0
    assert not forwarder.connected


async def test_rows_added_while_running_are_published(broker: Mosquitto) -> None:
    outbox = MemoryOutbox()
    forwarder = make_forwarder(outbox, broker.url)
    with Subscriber(broker) as subscriber:
        async with trio.open_nursery() as nursery:
            await nursery.start(forwarder.run)
            for _ in range(20):
                outbox.add(MODEMS[0])
                await trio.sleep(0.005)
            await subscriber.wait_count(20)
            nursery.cancel_scope.cancel()
    assert row_ids(subscriber) == list(range(1, 21))


async def test_retained_rows_are_retained(broker: Mosquitto) -> None:
    outbox = MemoryOutbox()
    attributes = {"modem": MODEMS[0], "vid": "서울33가1234", "id": "row1"}
    outbox.add(MODEMS[0], attributes, topic=f"v1/sensors/{MODEMS[0]}/attributes", retain=True)
    forwarder = make_forwarder(outbox, broker.url)
    async with trio.open_nursery() as nursery:
        await nursery.start(forwarder.run)
        await wait_until(lambda: outbox.backlog() == 0)
        nursery.cancel_scope.cancel()
    # a consumer that connects later still gets the vehicle's attributes, flagged retained
    with Subscriber(broker, "v1/sensors/+/attributes", client_id="late-consumer") as late:
        await late.wait_count(1)
    assert late.messages[0].retain
    assert json.loads(late.messages[0].payload) == attributes


async def test_rows_are_marked_delivered_only_after_their_puback(broker: Mosquitto) -> None:
    outbox = MemoryOutbox()
    forwarder = make_forwarder(outbox, broker.url, window=10)
    async with trio.open_nursery() as nursery:
        await nursery.start(forwarder.run)
        await wait_until(lambda: forwarder.connected)
        broker.pause()  # the TCP connection stays up; the broker reads and acknowledges nothing
        try:
            for _ in range(25):
                outbox.add(MODEMS[1])
            await wait_until(lambda: forwarder.published == 10)  # the window is full, all unacknowledged
            await trio.sleep(0.3)
            assert outbox.delivered == [] and forwarder.acknowledged == 0 and forwarder.pending == 10
        finally:
            broker.resume()
        await wait_until(lambda: outbox.backlog() == 0)
        nursery.cancel_scope.cancel()
    assert sorted(outbox.delivered) == list(range(1, 26))
    assert forwarder.acknowledged == 25


@pytest.mark.parametrize("outages", [1, 3])
async def test_broker_restart_mid_stream_loses_nothing_and_keeps_each_terminals_order(
        broker: Mosquitto, outages: int) -> None:
    outbox = MemoryOutbox()
    total = 900
    forwarder = make_forwarder(outbox, broker.url, window=20)

    async def feed() -> None:
        for n in range(total):
            outbox.add(MODEMS[n % 3], {"ts": n, "ty": 2, "pld": [{"n": n}], "id": f"row{n + 1}"})
            if n % 10 == 9:
                await trio.sleep(0.01)

    with Subscriber(broker) as subscriber:
        async with trio.open_nursery() as nursery:
            await nursery.start(forwarder.run)
            nursery.start_soon(feed)
            for outage in range(outages):
                await wait_until(lambda: forwarder.connected and forwarder.acknowledged >= 100 + 150 * outage)  # noqa: B023
                await trio.to_thread.run_sync(broker.stop)  # mid-stream: rows keep coming into the outbox
                await wait_until(lambda: not forwarder.connected)
                await trio.sleep(0.5)
                await trio.to_thread.run_sync(broker.start)  # the same port
            await wait_until(lambda: outbox.backlog() == 0 and len(outbox.delivered) == total, 60)
            await subscriber.wait_for(lambda s: set(row_ids(s)) >= set(range(1, total + 1)), 30)
            nursery.cancel_scope.cancel()

    received = row_ids(subscriber)
    assert set(received) == set(range(1, total + 1))
    assert forwarder.reconnects >= outages and broker.starts == outages + 1
    per_modem: dict[str, list[int]] = defaultdict(list)
    seen: set[int] = set()
    for row_id in received:
        if row_id not in seen:  # a duplicate is recognisable by its id; drop it as a consumer would
            seen.add(row_id)
            per_modem[MODEMS[(row_id - 1) % 3]].append(row_id)
    for modem, ids in per_modem.items():
        assert ids == sorted(ids), f"order broken for {modem}"
    # QoS 1 duplicates: only rows that were unacknowledged when a connection ended, at most a window each
    duplicates = len(received) - total
    assert duplicates <= forwarder.window * forwarder.reconnects
    assert forwarder.acknowledged == total


async def test_no_broker_means_retries_with_backoff_and_nothing_delivered() -> None:
    outbox = MemoryOutbox()
    outbox.add(MODEMS[0])
    forwarder = make_forwarder(outbox, f"mqtt://127.0.0.1:{free_port()}", backoff_initial_s=0.05,
                               backoff_max_s=0.2)
    async with trio.open_nursery() as nursery:
        await nursery.start(forwarder.run)
        await wait_until(lambda: forwarder.reconnects >= 3)
        nursery.cancel_scope.cancel()
    assert outbox.backlog() == 1 and outbox.delivered == []
    assert forwarder.published == 0 and not forwarder.connected


async def test_cancellation_leaves_no_paho_thread_running(broker: Mosquitto) -> None:
    outbox = MemoryOutbox()
    for _ in range(5):
        outbox.add(MODEMS[2])
    forwarder = make_forwarder(outbox, broker.url)
    async with trio.open_nursery() as nursery:
        await nursery.start(forwarder.run)
        await wait_until(lambda: outbox.backlog() == 0)
        assert forwarder_threads()  # paho's network thread, while connected
        nursery.cancel_scope.cancel()
    assert forwarder_threads() == []
    assert not forwarder.connected


class BrokenOutbox(MemoryOutbox):
    async def fetch(self, after_id: int, limit: int) -> list[OutboxRow]:
        await trio.lowlevel.checkpoint()
        raise RuntimeError("database is locked")


async def test_an_outbox_failure_stops_the_forwarder_loudly_and_cleanly(broker: Mosquitto) -> None:
    """Not a broker problem, so no silent retry: the error reaches whoever runs the forwarder."""
    forwarder = make_forwarder(BrokenOutbox(), broker.url)
    locked = pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="locked"), flatten_subgroups=True)
    with trio.fail_after(20), locked:
        async with trio.open_nursery() as nursery:
            await nursery.start(forwarder.run)
    assert forwarder_threads() == [] and not forwarder.connected


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_every_connection_closes_its_sockets_without_waiting_for_the_garbage_collector(
        broker: Mosquitto) -> None:
    outbox = MemoryOutbox()
    before = open_descriptors()
    forwarder = make_forwarder(outbox, broker.url)
    async with trio.open_nursery() as nursery:
        await nursery.start(forwarder.run)
        outbox.add(MODEMS[0])
        await wait_until(lambda: outbox.backlog() == 0)
        await trio.to_thread.run_sync(broker.restart)  # a second connection, and a lost one
        outbox.add(MODEMS[0])
        await wait_until(lambda: outbox.backlog() == 0)
        nursery.cancel_scope.cancel()
    assert forwarder.reconnects >= 1
    assert open_descriptors() == before  # paho's socket and its wake-up socket pair, for both connections


async def test_shutdown_is_prompt_even_when_the_broker_stopped_reading(broker: Mosquitto) -> None:
    """A paused broker and more unacknowledged data than the socket buffers hold: DISCONNECT cannot
    be written, and paho alone would wait for its keepalive (60 s here)."""
    outbox = MemoryOutbox()
    forwarder = make_forwarder(outbox, broker.url, window=400, keepalive_s=60)
    payload = {"pld": "x" * 60_000}
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(forwarder.run)
            await wait_until(lambda: forwarder.connected)
            broker.pause()
            for n in range(400):  # 24 MB
                outbox.add(MODEMS[0], payload | {"id": f"row{n + 1}"})
            await wait_until(lambda: forwarder.published == 400)
            await trio.sleep(0.5)
            cancelled_at = trio.current_time()
            nursery.cancel_scope.cancel()
        # a bound, not a measurement: paho on its own would need more than the 60 s keepalive
        assert trio.current_time() - cancelled_at < 30
    finally:
        broker.resume()
    assert forwarder_threads() == []
    assert outbox.delivered == []


async def test_acks_received_before_shutdown_are_saved(broker: Mosquitto) -> None:
    """Cancellation right after the PUBACKs: the final flush still marks them delivered."""
    outbox = MemoryOutbox()
    for _ in range(30):
        outbox.add(MODEMS[0])
    forwarder = make_forwarder(outbox, broker.url, window=30)
    async with trio.open_nursery() as nursery:
        await nursery.start(forwarder.run)
        await wait_until(lambda: forwarder.acknowledged == 30)
        nursery.cancel_scope.cancel()
    assert sorted(outbox.delivered) == list(range(1, 31))


# -- TLS and credentials -----------------------------------------------------------------------------


async def deliver_one(outbox: MemoryOutbox, forwarder: Forwarder, *, expect_delivery: bool) -> None:
    outbox.add(MODEMS[0])
    async with trio.open_nursery() as nursery:
        await nursery.start(forwarder.run)
        if expect_delivery:
            await wait_until(lambda: outbox.backlog() == 0)
        else:
            await wait_until(lambda: forwarder.reconnects >= 2)
        nursery.cancel_scope.cancel()


async def test_mqtts_verifies_the_broker_with_the_ca_file(tmp_path: Path) -> None:
    tls = await trio.to_thread.run_sync(make_test_ca, tmp_path / "ca")
    with Mosquitto(tmp_path / "broker", tls=tls) as tls_broker, Subscriber(tls_broker) as subscriber:
        assert tls_broker.url.startswith("mqtts://")
        outbox = MemoryOutbox()
        await deliver_one(outbox, make_forwarder(outbox, tls_broker.url, tls_ca=tls[0]), expect_delivery=True)
        await subscriber.wait_count(1)


async def test_mqtts_refuses_a_broker_its_ca_did_not_sign(tmp_path: Path) -> None:
    tls = await trio.to_thread.run_sync(make_test_ca, tmp_path / "ca")
    other_ca, _, _ = await trio.to_thread.run_sync(make_test_ca, tmp_path / "other")
    with Mosquitto(tmp_path / "broker", tls=tls) as tls_broker:
        outbox = MemoryOutbox()
        forwarder = make_forwarder(outbox, tls_broker.url, tls_ca=other_ca)
        await deliver_one(outbox, forwarder, expect_delivery=False)
    assert forwarder.published == 0 and outbox.delivered == []


async def test_user_and_password_come_from_the_url(tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "broker", users={"fleet@gw": "s3:cret"}) as auth_broker:
        outbox = MemoryOutbox()
        url = f"mqtt://fleet%40gw:s3%3Acret@127.0.0.1:{auth_broker.port}"
        await deliver_one(outbox, make_forwarder(outbox, url), expect_delivery=True)

        outbox = MemoryOutbox()
        refused = make_forwarder(outbox, f"mqtt://fleet%40gw:wrong@127.0.0.1:{auth_broker.port}")
        await deliver_one(outbox, refused, expect_delivery=False)
        assert refused.published == 0 and outbox.delivered == [] and not refused.connected


def test_without_the_broker_binary_ci_fails_and_elsewhere_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    import mosquitto

    monkeypatch.setattr(mosquitto, "BINARY_CANDIDATES", ())
    monkeypatch.setenv("PATH", "")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="mosquitto binary not found"):
        mosquitto.require_mosquitto()
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception):
        mosquitto.require_mosquitto()
