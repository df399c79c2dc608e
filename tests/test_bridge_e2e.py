"""Terminals → TCP → server → durable store → forwarder → a real Mosquitto → a real subscriber."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
from click.testing import CliRunner
from conftest import store_of
from mosquitto import Mosquitto, Subscriber, broker_fixture, free_port  # noqa: F401  (the broker fixture)
from serverproc import send
from test_export import fill

from dtgserver.bridge import map_record
from dtgserver.bridge.service import Bridge
from dtgserver.cli import main
from dtgserver.protocol import KST, MdtBody, MdtRealtime, ObdBody, ObdRealtime, SensorState, decode, encode
from dtgserver.server.app import DtgServer
from dtgserver.server.config import ServerConfig
from dtgserver.store import digest
from dtgserver.testing import KEY_ON, basic_info, dtg, key_off

pytestmark = pytest.mark.slow

OK, OVERLOADED = b"\x09\x00", b"\x09\x04"


@asynccontextmanager
async def server_with_broker(tmp_path: Path, broker: Mosquitto, **overrides: Any) -> AsyncIterator[DtgServer]:
    config = ServerConfig(**{"host": "127.0.0.1", "port": 0, "data_dir": tmp_path / "data", "mqtt_url": broker.url,
                             "client_id": "dtg-e2e", "grace_period": 2.0, **overrides})
    server = DtgServer(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        yield server
        server.stop()


def bridge_of(server: DtgServer) -> Bridge:
    """The bridge of a server started with --mqtt."""
    assert server.bridge is not None
    return server.bridge


def obd(modem: str) -> ObdRealtime:
    bodies = [ObdBody(5, 2000, KEY_ON + timedelta(seconds=s), 60 + s, 2100, 129.05 + s / 1e4, 35.15, 180,
                      1.25, 900.5, 3.5, SensorState.OFF, 13.8, 9.1) for s in range(30)]
    return ObdRealtime(modem, 1, KEY_ON, bodies)


def mdt(modem: str) -> MdtRealtime:
    bodies = [MdtBody(1, 77, KEY_ON + timedelta(seconds=s), 30, 126.7, 37.45 + s / 1e4, 0, -18.5,
                      SensorState.ABSENT, 12.6) for s in range(20)]
    return MdtRealtime(modem, 1, KEY_ON, bodies)


def expected_messages(packets: list[Any], received_ms: dict[bytes, int]) -> list[tuple[str, dict[str, Any], bool]]:
    """What the mapping says these packets publish, terminal by terminal, in order."""
    states: dict[str, Any] = {}
    out: list[tuple[str, dict[str, Any], bool]] = []
    for sent in packets:
        raw = encode(sent)
        record = decode(raw)  # what the server stored and mapped
        messages, states[record.modem] = map_record(record, states.get(record.modem), packet_id=digest(raw).hex(),
                                                    received_ms=received_ms.get(raw))
        out.extend((m.topic, m.payload, m.retain) for m in messages)
    return out


async def test_every_kind_reaches_the_subscriber_in_order(tmp_path: Path, broker: Mosquitto) -> None:
    bus, truck, van = "01011112222", "01033334444", "01055556666"
    sequence = [
        # the bus's KEY OFF at its last body: its Trip is complete then (docs/mqtt.md, "When the Trip goes out")
        basic_info(bus), dtg(bus, minute=0), dtg(bus, minute=1),
        key_off(bus, battery_v=11.2, key_off_time=KEY_ON + timedelta(seconds=119)),
        obd(truck), key_off(truck, at=KEY_ON + timedelta(minutes=5)),
        mdt(van),
    ]
    with Subscriber(broker, "v1/sensors/#") as subscriber:
        async with server_with_broker(tmp_path, broker) as server:
            assert server.port
            for record in sequence:
                assert await send(server.port, encode(record)) == OK
            # basic info's ts is the receive time: take it from the store to predict the payload
            stored = list(store_of(server).packets())
            received_ms = {p.raw: int(p.received_at * 1000) for p in stored}
            expected = expected_messages(sequence, received_ms)
            await subscriber.wait_count(len(expected))
            await trio.sleep(0.3)  # nothing more may arrive
    got = [(m.topic, json.loads(m.payload), m.retain) for m in subscriber.messages]
    assert len(got) == len(expected)
    for modem in (bus, truck, van):  # per terminal, exactly the mapped messages, in order
        assert [g[:2] for g in got if f"/{modem}/" in g[0]] == [e[:2] for e in expected if f"/{modem}/" in e[0]]

    by_type: dict[tuple[str, int | None], list[dict[str, Any]]] = defaultdict(list)
    for topic, payload, _ in got:
        by_type[(topic.split("/")[2], payload.get("ty"))].append(payload)
    tid = int(KEY_ON.timestamp())
    bus_microtrips = by_type[(bus, 2)]
    assert [e["tid"] for e in bus_microtrips[0]["pld"]] == [tid] * 60
    first = bus_microtrips[0]["pld"][0]
    assert first["clt"] == int(KEY_ON.astimezone(KST).timestamp() * 1000)
    assert (first["lat"], first["lon"], first["sp"]) == (37.5, 127.0, 40)
    assert first["tmp"] == "4.5,"  # sensor B absent: left out, A keeps its place
    trip = by_type[(bus, 1)]
    assert len(trip) == 1 and trip[0]["pld"]["tid"] == tid and trip[0]["pld"]["hsts"] == 40
    assert trip[0]["pld"]["fwv"] == "1.0.2"
    assert [p["pld"]["wbv"] for p in by_type[(bus, 23)]] == [11.2]  # below 11.5 V
    assert by_type[(truck, 23)] == []
    # basic info → retained attributes (the subscriber saw it live, so retain flag is off in delivery)
    attributes = [g for g in got if g[0] == f"v1/sensors/{bus}/attributes"]
    assert len(attributes) == 1 and attributes[0][1]["vid"] == "서울33가1234"
    ids = [payload["id"] for _, payload, _ in got]
    assert len(set(ids)) == len(ids)


async def test_broker_killed_under_load_loses_nothing_and_keeps_order(tmp_path: Path, broker: Mosquitto) -> None:
    modems = [f"0107777{n:04d}" for n in range(4)]
    answered: list[str] = []  # packet ids answered 0
    with Subscriber(broker, "v1/sensors/#") as subscriber:
        async with server_with_broker(tmp_path, broker) as server:
            port = server.port
            assert port

            async def terminal(modem: str) -> None:
                for minute in range(12):
                    raw = encode(dtg(modem, minute=minute, bodies=10))
                    assert await send(port, raw) == OK
                    answered.append(digest(raw).hex())
                    await trio.sleep(0.02)

            async with trio.open_nursery() as nursery:
                for modem in modems:
                    nursery.start_soon(terminal, modem)
                with trio.fail_after(20):
                    while len(answered) < 12:
                        await trio.sleep(0.01)
                broker.stop()  # killed mid-stream: terminals are still answered 0
                with trio.fail_after(20):
                    while len(answered) < 30:
                        await trio.sleep(0.01)
                assert server.bridge is not None and not server.bridge.forwarders[0].connected
                broker.start()  # same port
            await subscriber.wait_for(lambda s: {json.loads(m.payload)["id"].split(":")[0] for m in s.messages}
                                      >= set(answered), timeout_s=40)
            with trio.fail_after(20):
                while bridge_of(server).backlog():
                    await trio.sleep(0.05)
    payloads = [json.loads(m.payload) for m in subscriber.messages]
    # duplicates only as QoS 1 allows: an identical id carries an identical message
    by_id: dict[str, dict[str, Any]] = {}
    for p in payloads:
        assert by_id.setdefault(p["id"], p) == p
    # per terminal, first deliveries are in the order the terminal sent them, and all are there
    for modem in modems:
        firsts = list(dict.fromkeys(p["id"] for m, p in zip(subscriber.messages, payloads, strict=True)
                                    if m.topic == f"v1/sensors/{modem}/tre"))
        times = [by_id[i]["pld"][0]["clt"] for i in firsts]
        assert times == sorted(times) and len(times) == 12


async def test_backlog_high_water_answers_4_while_the_broker_is_down(tmp_path: Path, broker: Mosquitto) -> None:
    broker.stop()
    async with server_with_broker(tmp_path, broker, backlog_high_water=3) as server:
        assert server.port
        answers = [await send(server.port, encode(dtg(minute=m, bodies=5))) for m in range(5)]
        assert answers == [OK, OK, OK, OVERLOADED, OVERLOADED]  # 3 packets after the cursor fill it
        assert bridge_of(server).backlog() == 3
        broker.start()
        with trio.fail_after(30):
            while bridge_of(server).backlog():
                await trio.sleep(0.05)
        assert await send(server.port, encode(dtg(minute=3, bodies=5))) == OK
        assert [p.raw for p in store_of(server).packets()] == [encode(dtg(minute=m, bodies=5)) for m in range(4)]


async def test_replay_republishes_the_store(tmp_path: Path, broker: Mosquitto) -> None:
    sequence = [basic_info(), dtg(minute=0), dtg(minute=1), key_off(key_off_time=KEY_ON + timedelta(seconds=119))]
    async with server_with_broker(tmp_path, broker, mqtt_url=None) as server:  # store only
        assert server.port
        for record in sequence:
            assert await send(server.port, encode(record)) == OK
    with Subscriber(broker, "v1/sensors/#", client_id="replay-watcher") as subscriber:
        result = await trio.to_thread.run_sync(lambda: CliRunner().invoke(
            main, ["replay", "--data-dir", str(tmp_path / "data"), "--mqtt", broker.url]))
        assert result.exit_code == 0, result.output
        count = int(result.output.split()[1])
        await subscriber.wait_count(count)
    # the trip: 2 microtrips, the Trip, the parking microtrip, plus the attributes
    types = [json.loads(m.payload).get("ty") for m in subscriber.messages]
    assert types == [None, 2, 2, 1, 2]
    # --since after the last packet: nothing to publish, but a clean exit
    result = await trio.to_thread.run_sync(lambda: CliRunner().invoke(
        main, ["replay", "--data-dir", str(tmp_path / "data"), "--mqtt", broker.url,
               "--since", "2099-01-01T00:00:00+09:00"]))
    assert result.exit_code == 0 and result.output.startswith("replayed 0 ")


def test_replay_without_a_store_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["replay", "--data-dir", str(tmp_path), "--mqtt", "mqtt://127.0.0.1:1"])
    assert result.exit_code == 1 and "no store" in result.output


async def test_after_a_restart_the_undelivered_backlog_is_published_first(tmp_path: Path, broker: Mosquitto) -> None:
    broker.stop()
    backlog = [encode(dtg(minute=m, bodies=5)) for m in range(3)]
    async with server_with_broker(tmp_path, broker) as server:  # broker down: stored, not delivered
        assert server.port
        for raw in backlog:
            assert await send(server.port, raw) == OK
        assert bridge_of(server).backlog() == 3
    broker.start()
    with Subscriber(broker, "v1/sensors/#") as subscriber:
        async with server_with_broker(tmp_path, broker) as server:
            assert server.port
            await subscriber.wait_count(3)
            fresh = encode(dtg(minute=3, bodies=5))
            assert await send(server.port, fresh) == OK
            await subscriber.wait_count(4)
    ids = [json.loads(m.payload)["id"].split(":")[0] for m in subscriber.messages]
    assert ids == [digest(raw).hex() for raw in [*backlog, fresh]]


async def test_replay_to_an_unreachable_broker_gives_up_at_its_timeout(tmp_path: Path) -> None:
    """A cron job's replay ends: exit 1 after --timeout, naming the broker, instead of retrying forever."""
    await fill(tmp_path, [encode(dtg(minute=0)), encode(key_off())])
    nobody = f"mqtt://127.0.0.1:{free_port()}"
    with trio.fail_after(60):
        result = await trio.to_thread.run_sync(lambda: CliRunner().invoke(
            main, ["replay", "--data-dir", str(tmp_path), "--mqtt", nobody, "--timeout", "1"]))
    assert result.exit_code == 1, result.output
    assert result.stderr.endswith(f"dtgserver: error: replay not finished after 1 s (--timeout): the broker {nobody} "
                                  "has not acknowledged every message; is it reachable?\n")


@pytest.mark.parametrize(("args", "message"), [
    (["--timeout", "nan"], "Invalid value for '--timeout': 'nan' is not a finite number"),
    (["--timeout", "-1"], "Invalid value for '--timeout'"),
    (["--mqtt", "http://x"], "Invalid value for '--mqtt': broker URL must start with mqtt://"),
    (["--topic-prefix", "a/#"], "Invalid value for '--topic-prefix'"),
    (["--modem", "abc"], "Invalid value for '--modem': 'abc' is no modem number"),
])
def test_replay_options_are_checked_before_it_starts(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["replay", "--data-dir", str(tmp_path), "--mqtt", "mqtt://127.0.0.1:1", *args])
    assert result.exit_code == 2 and message in result.stderr


async def test_mqtt_enabled_on_a_data_dir_with_history(tmp_path: Path, broker: Mosquitto) -> None:
    """Served without MQTT, then with it: the history is not published, and the trip under way
    when MQTT came on ends with the Trip of the whole trip (its states rebuilt from the history)."""
    history = [basic_info(), dtg(minute=0), dtg(minute=1)]  # a trip under way
    later = [dtg(minute=2), key_off(key_off_time=KEY_ON + timedelta(seconds=179))]  # at the last body: complete
    async with server_with_broker(tmp_path, broker, mqtt_url=None) as server:
        assert server.port
        for record in history:
            assert await send(server.port, encode(record)) == OK
    assert not (tmp_path / "data" / "bridge-0.db").exists()  # no bridge without --mqtt
    with Subscriber(broker, "v1/sensors/#") as subscriber:
        async with server_with_broker(tmp_path, broker) as server:
            assert server.port and server.bridge is not None
            with trio.fail_after(20):
                await server.bridge.consumers[0].ready.wait()
            for record in later:
                assert await send(server.port, encode(record)) == OK
            stored = list(store_of(server).packets())
            expected = expected_messages([*history, *later], {p.raw: int(p.received_at * 1000) for p in stored})
            await subscriber.wait_count(3)
            await trio.sleep(0.3)  # nothing more may arrive
    got = [(m.topic, json.loads(m.payload), m.retain) for m in subscriber.messages]
    assert got == expected[-3:]  # minute 2's microtrip, the Trip, the parking microtrip
    trip = got[1][1]
    assert trip["ty"] == 1 and trip["pld"]["dtvt"] == 180  # all three minutes, not only the last


async def test_live_and_replay_publish_identical_payloads(tmp_path: Path, broker: Mosquitto) -> None:
    sequence = [basic_info(), dtg(minute=0), dtg(minute=1),
                key_off(battery_v=11.0, key_off_time=KEY_ON + timedelta(seconds=119)), obd("01033334444"),
                key_off("01033334444", key_off_time=KEY_ON + timedelta(seconds=29))]  # both trips complete
    with Subscriber(broker, "v1/sensors/#") as live:
        async with server_with_broker(tmp_path, broker) as server:
            assert server.port
            for record in sequence:
                assert await send(server.port, encode(record)) == OK
            await live.wait_count(9)
            await trio.sleep(0.3)
    with Subscriber(broker, "v1/sensors/#", client_id="replay-watcher") as replayed:
        result = await trio.to_thread.run_sync(lambda: CliRunner().invoke(
            main, ["replay", "--data-dir", str(tmp_path / "data"), "--mqtt", broker.url]))
        assert result.exit_code == 0, result.output
        count = int(result.output.split()[1])
        # the attributes are retained: the replay watcher also gets the live copy first; not counted
        await replayed.wait_for(lambda s: sum(1 for m in s.messages if not m.retain) >= count)
    assert len(live.messages) == 9 == count
    replay = [m for m in replayed.messages if not m.retain]
    assert [(m.topic, m.payload) for m in replay] == [(m.topic, m.payload) for m in live.messages]


async def test_a_late_subscriber_gets_each_terminals_device_health_retained(tmp_path: Path, broker: Mosquitto) -> None:
    """The DTG's status code on a real broker: Device Status events as they happen, the health
    retained (paho's retain flag), so a consumer that subscribes afterwards gets each terminal's
    current health; and a replay publishes the very same messages."""
    from dtgserver.protocol import DtgRealtime
    from dtgserver.testing import dtg_body

    bus, truck = "01011112222", "01033334444"

    def drive(modem: str, minute: int, codes: list[int]) -> DtgRealtime:
        start = KEY_ON + timedelta(minutes=minute)
        return DtgRealtime(modem, 1, KEY_ON, [dtg_body(start + timedelta(seconds=s), minute * 60 + s, status_code=c)
                                              for s, c in enumerate(codes)])

    sequence = [drive(bus, 0, [0, 11, 11]), drive(truck, 0, [0, 0]), drive(bus, 1, [11, 0, 99])]
    with Subscriber(broker, "v1/sensors/#") as live:
        async with server_with_broker(tmp_path, broker) as server:
            assert server.port
            for record in sequence:
                assert await send(server.port, encode(record)) == OK
            expected = expected_messages(sequence, {})
            await live.wait_count(len(expected))
            await trio.sleep(0.3)
    # delivered live, a retained message comes without the flag (MQTT 3.1.1 §3.3.1.3): the late subscriber sees it
    assert [(m.topic, json.loads(m.payload)) for m in live.messages] == [e[:2] for e in expected]
    assert [e[0] for e in expected if e[2]] == [f"v1/sensors/{bus}/attributes/health"] * 2
    events = [json.loads(m.payload)["pld"] for m in live.messages if json.loads(m.payload).get("ty") == 900]
    assert [(e["pdsc"], e["dsc"]) for e in events] == [("00", "11"), ("11", "00"), ("00", "99")]

    with Subscriber(broker, "v1/sensors/+/attributes/#", client_id="late-consumer") as late:
        await late.wait_count(1)
        await trio.sleep(0.3)  # the truck, always ok, has none: nothing more may arrive
    assert [(m.topic, m.retain) for m in late.messages] == [(f"v1/sensors/{bus}/attributes/health", True)]
    health = json.loads(late.messages[0].payload)
    assert (health["modem"], health["dsc"], health["dsn"]) == (bus, "99", "power supply fault")

    with Subscriber(broker, "v1/sensors/#", client_id="replay-watcher") as replayed:
        result = await trio.to_thread.run_sync(lambda: CliRunner().invoke(
            main, ["replay", "--data-dir", str(tmp_path / "data"), "--mqtt", broker.url]))
        assert result.exit_code == 0, result.output
        await replayed.wait_for(lambda s: sum(1 for m in s.messages if not m.retain) >= len(expected))
    replay = [m for m in replayed.messages if not m.retain]  # after the retained copy the live bridge left
    assert [(m.topic, m.payload) for m in replay] == [(m.topic, m.payload) for m in live.messages]


async def test_replay_applies_the_driving_options_it_is_given(tmp_path: Path, broker: Mosquitto) -> None:
    """A terminal without basic info gets the default class's criteria live (`em`, the Trip's
    `xdd`); a replay told `--default-class none` finds no behaviours for it, and says so by
    leaving both out."""
    sequence = [dtg(minute=0), key_off(key_off_time=KEY_ON + timedelta(seconds=59))]  # complete at its KEY OFF
    with Subscriber(broker, "v1/sensors/#") as live:
        async with server_with_broker(tmp_path, broker) as server:
            assert server.port
            for record in sequence:
                assert await send(server.port, encode(record)) == OK
            await live.wait_count(3)  # microtrip, Trip, parking
    with Subscriber(broker, "v1/sensors/#", client_id="replay-watcher") as replayed:
        result = await trio.to_thread.run_sync(lambda: CliRunner().invoke(main, [
            "replay", "--data-dir", str(tmp_path / "data"), "--mqtt", broker.url, "--default-class", "none"]))
        assert result.exit_code == 0, result.output
        await replayed.wait_count(3)

    def microtrip_and_trip(messages: list[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        payloads = [json.loads(m.payload) for m in messages]
        return payloads[0]["pld"][0], payloads[1]["pld"]

    element, trip = microtrip_and_trip(live.messages)
    assert element["em"] == "00" and trip["xdd"]["start"] == 0  # judged (taxi), nothing found
    element, trip = microtrip_and_trip(replayed.messages)
    assert "em" not in element and "xdd" not in trip  # not judged at all
    assert "cdit" in element and trip["dtvt"] == 60  # the rest as live
