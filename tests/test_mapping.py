"""The packet → Smart[Fleet] messages mapping, row by row of docs/mqtt.md, on records decoded from wire bytes."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dtgserver.bridge.messages import (
    MAX_PAYLOAD_BYTES,
    VALUE_BOUND,
    Message,
    element_bound,
    elements_builder,
    map_record,
    split,
)
from dtgserver.bridge.messages import (
    encode as encode_payload,
)
from dtgserver.bridge.profiles import KEY_SOURCES, PROFILES, SEED, SF2019
from dtgserver.bridge.trips import TripState, next_state
from dtgserver.bridge.trips import summarize as summarize_raw
from dtgserver.protocol import (
    KST,
    BadTime,
    BasicInfo,
    DtgBody,
    DtgRealtime,
    KeyOff,
    MdtBody,
    MdtRealtime,
    ObdBody,
    ObdRealtime,
    Packet,
    ProtocolError,
    Realtime,
    Response,
    SensorState,
    StatusLog,
    decode,
    encode,
)
from dtgserver.protocol.layout import realtime as realtime_layout
from dtgserver.protocol.layout import time_ms as to_ms
from dtgserver.testing import records

MODEM = "01099998888"
KEY_ON = datetime(2026, 11, 21, 8, 0, 0, tzinfo=KST)
KEY_ON_MS = 1_795_215_600_000  # 2026-11-20T23:00:00Z: KST is UTC+9
TID = KEY_ON_MS // 1000
TRE = f"v1/sensors/{MODEM}/tre"
DOCS = Path(__file__).parent.parent / "docs" / "mqtt.md"


P = TypeVar("P", bound=Packet)


def wire(record: P) -> P:
    """The record as the server sees it: encoded to bytes and decoded again."""
    again = decode(encode(record))
    assert isinstance(again, type(record))
    return again


def dtg_body(second: int, *, speed_kmh: int = 50, total_km: int = 120_000, status_code: int = 0,
             temps: tuple[Any, Any] = (4.5, SensorState.ABSENT), time: Any = None) -> DtgBody:
    return DtgBody(
        daily_distance_km=35, total_distance_km=total_km, time=time or KEY_ON + timedelta(seconds=second),
        speed_kmh=speed_kmh, rpm=1800, brake=second % 2 == 1, lon=127.027583, lat=37.497942, azimuth_deg=90,
        accel_x_ms2=1.5, accel_y_ms2=-0.3, status_code=status_code, daily_fuel_l=12.345,
        total_fuel_l=(45_678_900 + second) / 1000, fuel_level_pct=62.5, temp_a_c=temps[0], temp_b_c=temps[1],
        battery_v=24.6, fuel_efficiency_kmpl=4.2, work_status=5,
    )


def dtg(*bodies: DtgBody, key_on: Any = KEY_ON) -> DtgRealtime:
    return wire(DtgRealtime(MODEM, 1, key_on, bodies))


def obd(*seconds: int) -> ObdRealtime:
    return wire(ObdRealtime(MODEM, 1, KEY_ON, [ObdBody(
        daily_distance_km=8, total_distance_km=54_321, time=KEY_ON + timedelta(seconds=s), speed_kmh=30, rpm=1200,
        lon=126.978, lat=37.566, azimuth_deg=180, daily_fuel_l=1.5, total_fuel_l=9_876.5,
        temp_a_c=SensorState.OFF, temp_b_c=-3.5, battery_v=12.4, fuel_efficiency_kmpl=11.0) for s in seconds]))


def mdt(*seconds: int) -> MdtRealtime:
    return wire(MdtRealtime(MODEM, 1, KEY_ON, [MdtBody(
        daily_distance_km=3, total_distance_km=7_000, time=KEY_ON + timedelta(seconds=s), speed_kmh=20,
        lon=129.075, lat=35.18, azimuth_deg=270, temp_a_c=SensorState.ABSENT, temp_b_c=SensorState.ABSENT,
        battery_v=12.1) for s in seconds]))


def key_off(*, minutes: int = 60, battery_v: float = 24.1, key_off_time: Any = None) -> KeyOff:
    at = KEY_ON + timedelta(minutes=minutes)
    return wire(KeyOff(MODEM, at, 127.03, 37.5, key_off_time or at, battery_v))


def basic_info(firmware: str = "1.0.2") -> BasicInfo:
    return wire(BasicInfo(MODEM, "DTG-1000", "KMHFC41MP6A123456", "31", "서울33가1234", "1234567890",
                          "123456789012345678", firmware))


def store_id(record: Packet) -> str:
    """The packet id the store gives: sha256 of the raw packet, first 16 bytes, in hex."""
    return hashlib.sha256(encode(record)).digest()[:16].hex()


def run(records: Sequence[Packet], state: TripState | None = None, *, restart: bool = False, real_ids: bool = False,
        **options: Any) -> tuple[list[Message], TripState | None]:
    """Map packets in order (ids p0, p1, …); with `restart`, the state goes through JSON between packets."""
    messages: list[Message] = []
    for n, record in enumerate(records):
        if restart and state is not None:
            state = TripState.from_dict(json.loads(json.dumps(state.to_dict())))
        out, state = map_record(record, state, packet_id=store_id(record) if real_ids else f"p{n}", **options)
        messages += out
    return messages, state


def by_ty(messages: list[Message], ty: int) -> list[Message]:
    return [m for m in messages if m.payload.get("ty") == ty]


# -- realtime → aggregated microtrip -----------------------------------------------------------------


def test_dtg_realtime_is_one_aggregated_microtrip_with_every_dtg_key() -> None:
    record = dtg(dtg_body(0), dtg_body(1, speed_kmh=52, total_km=120_001))
    messages, state = map_record(record, None, packet_id="abc123")
    assert [(m.topic, m.retain) for m in messages] == [(TRE, False)]
    payload = messages[0].payload
    assert payload["ty"] == 2 and payload["id"] == "abc123:0"
    assert payload["ts"] == KEY_ON_MS + 1000  # the last body's time
    first, second = payload["pld"]
    assert first == {
        "tid": TID, "clt": KEY_ON_MS, "lat": 37.497942, "lon": 127.027583, "sp": 50, "rpm": 1800, "fc": 0,
        "cdit": 14, "vv": 24.6, "dtr": 35, "dctr": 120_000, "bsg": 0, "gan": 90, "acx": 1.5, "acy": -0.3,
        "tmp": "4.5,", "em": "00",
    }
    assert list(first) == list(SEED.microtrip_keys["dtg"])  # keys in the table's order
    assert second["clt"] == KEY_ON_MS + 1000 and second["bsg"] == 1 and second["sp"] == 52
    assert second["cdit"] == 28  # (50 + 52) km/h × 1 s, within a km of the odometer's one km
    assert second["fc"] == 1  # the trip's fuel: total fuel grows 1 mL a second (the day's counter says 12345)
    assert state is not None and state.tid == TID and state.kind == "dtg"


def test_microtrip_fc_is_the_trips_fuel_across_midnight_kst() -> None:
    """The day's fuel restarts at 00:00 KST; the microtrip's `fc` is the trip's own and goes on
    across midnight, in step with the Trip's `fc` (the last element's is the Trip's)."""
    key_on = datetime(2026, 11, 21, 23, 58, 0, tzinfo=KST)
    start_ml = 45_678_900  # the total counter at KEY ON; the day had used 87.654 L by then

    def body(second: int) -> DtgBody:
        at = key_on + timedelta(seconds=second)
        used_ml = 3 * second  # 3 mL a second
        daily_ml = 87_654 + used_ml if at.day == 21 else used_ml - 3 * 120  # restarts at 00:00:00 KST
        return attrs.evolve(dtg_body(second, time=at), daily_fuel_l=daily_ml / 1000,
                            total_fuel_l=(start_ml + used_ml) / 1000)

    packets = [dtg(*(body(p * 60 + s) for s in range(0, 60, 10)), key_on=key_on) for p in range(4)]
    end = wire(KeyOff(MODEM, key_on + timedelta(minutes=10), 127.03, 37.5, key_on + timedelta(seconds=230), 24.1))
    messages, _ = run([*packets, end])
    elements = [e for m in by_ty(messages, 2) if isinstance(m.payload["pld"], list) for e in m.payload["pld"]]
    seconds = [p * 60 + s for p in range(4) for s in range(0, 60, 10)]
    assert [e["fc"] for e in elements] == [3 * second for second in seconds]  # 0 … 690 mL, no drop at 00:00
    midnight = datetime(2026, 11, 22, tzinfo=KST)
    assert any(e["clt"] < midnight.timestamp() * 1000 <= f["clt"] for e, f in itertools.pairwise(elements))
    (trip,) = by_ty(messages, 1)
    assert trip.payload["pld"]["fc"] == elements[-1]["fc"] == 3 * 230


def test_microtrip_fc_is_left_out_where_the_trips_first_fuel_is_not_known() -> None:
    """The backlog of an older trip (its state is gone), and a total counter below the trip's first (a reset)."""
    _, state = run([dtg(dtg_body(0))])
    assert state is not None
    newer = attrs.evolve(state, tid=TID + 3600, key_on_ms=KEY_ON_MS + 3_600_000)
    messages, _ = run([dtg(dtg_body(5))], newer)
    assert [("fc" in e, "cdit" in e) for e in messages[0].payload["pld"]] == [(False, False)]
    reset = attrs.evolve(dtg_body(2), total_fuel_l=1.0)
    messages, _ = run([dtg(dtg_body(0), dtg_body(1), reset)])
    assert [e.get("fc") for e in messages[0].payload["pld"]] == [0, 1, None]


def test_obd_realtime_microtrip_has_the_dtg_keys_minus_brake_and_acceleration() -> None:
    messages, _ = map_record(obd(0, 1), None, packet_id="x")
    (element, _second) = messages[0].payload["pld"]
    assert list(element) == ["tid", "clt", "lat", "lon", "sp", "rpm", "fc", "cdit", "vv", "dtr", "dctr", "gan",
                             "tmp", "em"]
    assert element["fc"] == 0 and element["vv"] == 12.4 and element["tmp"] == ",-3.5"  # A is off


def test_mdt_realtime_microtrip_keys() -> None:
    messages, _ = map_record(mdt(0), None, packet_id="x")
    (element,) = messages[0].payload["pld"]
    # both temperature sensors absent: no tmp key at all (never invent a value)
    assert element == {"tid": TID, "clt": KEY_ON_MS, "lat": 35.18, "lon": 129.075, "sp": 20, "cdit": 6,
                       "vv": 12.1, "dtr": 3, "dctr": 7000, "gan": 270, "em": "00"}


@pytest.mark.parametrize(("temps", "expected"), [
    ((4.5, -3.5), "4.5,-3.5"),
    ((20.0, SensorState.OFF), "20,"),
    ((SensorState.ABSENT, 0.0), ",0"),
    ((SensorState.OFF, SensorState.ABSENT), None),
])
def test_temperatures_keep_their_position_and_leave_out_absent_sensors(temps: Any, expected: str | None) -> None:
    messages, _ = map_record(dtg(dtg_body(0, temps=temps)), None, packet_id="x")
    assert messages[0].payload["pld"][0].get("tmp") == expected


def test_a_body_without_a_calendar_time_keeps_its_place_without_clt() -> None:
    bad = BadTime(bytes((26, 13, 1, 0, 0, 0, 0)))
    messages, state = map_record(dtg(dtg_body(0), dtg_body(1, time=bad)), None, packet_id="x")
    first, second = messages[0].payload["pld"]
    assert "clt" not in second and second["sp"] == 50
    assert messages[0].payload["ts"] == first["clt"]  # the last time there is
    assert state is not None and state.speed_count == 2


def test_times_are_utc_ms_from_kst_wall_clock() -> None:
    assert to_ms(datetime(2026, 1, 1, 9, 0, 0, 120000, tzinfo=KST)) == 1_767_225_600_120
    assert to_ms(BadTime(b"\x00" * 7)) is None


# -- KEY OFF → Trip once, parking microtrip every time ---------------------------------------------------


def test_first_key_off_after_a_trip_sends_the_trip_then_parking_every_time() -> None:
    messages, state = run([
        basic_info(),
        dtg(*(dtg_body(s, speed_kmh=s * 10, total_km=120_000 + s) for s in range(4))),  # speeds 0 10 20 30
        key_off(battery_v=24.1, key_off_time=KEY_ON + timedelta(seconds=3)),  # the bodies reach it: complete
        key_off(minutes=70, battery_v=24.0, key_off_time=KEY_ON + timedelta(seconds=3)),
    ])
    trips = by_ty(messages, 1)
    assert len(trips) == 1
    assert trips[0].payload["id"] == "p2:0" and trips[0].payload["ts"] == KEY_ON_MS + 3000
    # the speeds give 17 m, the odometer 3 km (a km a second): the distance is at least 2 km
    assert trips[0].payload["pld"] == {
        "tid": TID, "stt": KEY_ON_MS, "edt": KEY_ON_MS + 3000, "dis": 2000, "tdis": 120_003_000, "fc": 3,
        "stlat": 37.497942, "stlon": 127.027583, "edlat": 37.5, "edlon": 127.03, "hsts": 30, "mesp": 15,
        "idt": 1, "btv": 24.1, "gnv": 24.6, "wut": 1, "est": 0, "fwv": "1.0.2", "dtvt": 3,
        "xdd": {"start": 1, "left_turn": 0, "right_turn": 0, "u_turn": 0, "deceleration": 0, "acceleration": 1,
                "stop": 0, "lane_change": 0, "overtaking": 0},
    }
    parkings = [m for m in by_ty(messages, 2) if m.payload["pld"].__class__ is dict]
    assert [p.payload["pld"] for p in parkings] == [
        {"tid": TID, "clt": KEY_ON_MS + 3_600_000, "lat": 37.5, "lon": 127.03, "try": 2, "vlt": 24.1, "tim": 3597},
        {"tid": TID, "clt": KEY_ON_MS + 4_200_000, "lat": 37.5, "lon": 127.03, "try": 2, "vlt": 24.0, "tim": 4197},
    ]
    assert [p.payload["id"] for p in parkings] == ["p2:1", "p3:0"]
    assert state is not None and state.trip_sent
    assert [m.retain for m in messages] == [True] + [False] * (len(messages) - 1)  # the attributes only


def test_key_off_without_any_trip_is_parking_only_without_tid() -> None:
    messages, state = map_record(key_off(), None, packet_id="k")
    assert [m.payload["ty"] for m in messages] == [2]
    assert "tid" not in messages[0].payload["pld"] and messages[0].payload["pld"]["try"] == 2
    # kept for the trip whose data the terminal has not sent yet (an outage: it comes at the next KEY ON)
    assert state is not None and state.tid is None and state.key_off_ms == KEY_ON_MS + 3_600_000


def test_a_key_off_older_than_the_trip_is_backlog_not_the_trip_end() -> None:
    _, state = run([dtg(dtg_body(0))])
    messages, state = map_record(key_off(minutes=-30), state, packet_id="old")
    assert by_ty(messages, 1) == []
    assert "tid" not in messages[0].payload["pld"]
    assert state is not None and not state.trip_sent


def test_a_new_key_on_starts_a_new_trip_and_a_new_trip_message() -> None:
    later = KEY_ON + timedelta(hours=3)
    messages, _ = run([
        dtg(dtg_body(0)), key_off(),
        dtg(dtg_body(0, time=later, speed_kmh=80, total_km=120_050), key_on=later),
        key_off(minutes=240, key_off_time=later),
    ])
    trips = [m.payload["pld"] for m in by_ty(messages, 1)]
    assert [t["tid"] for t in trips] == [TID, TID + 3 * 3600]
    assert trips[1]["hsts"] == 80 and trips[1]["dis"] == 22 and trips[1]["dtvt"] == 1  # 80 km/h for 1 s


def test_realtime_backlog_of_an_older_trip_is_published_but_leaves_the_state_alone() -> None:
    later = KEY_ON + timedelta(hours=3)
    _, state = run([dtg(dtg_body(0, time=later), key_on=later)])
    messages, after = map_record(dtg(dtg_body(5, speed_kmh=120)), state, packet_id="old")
    (element,) = messages[0].payload["pld"]
    assert element["tid"] == TID and "cdit" not in element
    assert after == state
    # its bodies without a calendar time: the microtrip's ts is that older trip's KEY ON
    bad = BadTime(bytes((26, 13, 1, 0, 0, 0, 0)))
    messages, after = map_record(dtg(dtg_body(6, time=bad)), state, packet_id="old")
    assert messages[0].payload["ts"] == KEY_ON_MS and messages[0].payload["pld"][0]["tid"] == TID and after == state


def test_a_terminal_clock_that_went_back_starts_new_trips_once_the_odometer_moves_on() -> None:
    earlier = KEY_ON - timedelta(days=1)  # the terminal's clock was a day ahead, then corrected
    _, state = run([dtg(dtg_body(0, total_km=120_010)), key_off()])
    assert state is not None and state.tid == TID
    messages, state = run([
        dtg(dtg_body(0, time=earlier, total_km=120_010), key_on=earlier),  # cannot tell yet: like backlog
        dtg(dtg_body(60, time=earlier + timedelta(minutes=1), total_km=120_011), key_on=earlier),
        key_off(minutes=-24 * 60 + 5, key_off_time=earlier + timedelta(minutes=1)),
    ], state)
    assert state is not None and state.tid == TID - 86_400
    # the trip before (its KEY OFF an hour after its one body) closes as the new one begins
    before, trip = [m.payload["pld"] for m in by_ty(messages, 1)]
    assert before["tid"] == TID and before["edt"] == KEY_ON_MS + 3_600_000
    assert trip["tid"] == TID - 86_400 and trip["stt"] == KEY_ON_MS - 86_400_000 and trip["dtvt"] == 1


def test_a_key_on_that_is_no_calendar_time_continues_the_open_trip() -> None:
    bad = BadTime(bytes((26, 13, 1, 0, 0, 0, 0)))
    _, state = run([dtg(dtg_body(0))])
    messages, state = map_record(dtg(dtg_body(1, total_km=120_002), key_on=bad), state, packet_id="x")
    # 100 km/h × 1 s by the speeds, but the odometer moved 2 km: at least 1 km
    assert messages[0].payload["pld"][0]["tid"] == TID and messages[0].payload["pld"][0]["cdit"] == 1000
    assert state is not None and state.speed_count == 2
    # bodies without a calendar time either: the microtrip's ts is the open trip's KEY ON
    messages, state = map_record(dtg(dtg_body(2, time=bad), key_on=bad), state, packet_id="y")
    assert messages[0].payload["ts"] == KEY_ON_MS and messages[0].payload["pld"][0]["tid"] == TID
    assert state is not None
    # no trip open (none, or its Trip sent): the first body's time stands in for KEY ON
    for before in (None, attrs.evolve(state, trip_sent=True)):
        messages, after = map_record(dtg(dtg_body(5, time=bad), dtg_body(6), key_on=bad), before, packet_id="z")
        assert [e["tid"] for e in messages[0].payload["pld"]] == [TID + 6] * 2
        assert b'"tid":%d,' % (TID + 6) in encode_payload(messages[0].payload)  # whole seconds, an integer
        assert after is not None and after.tid == TID + 6 and after.key_on_ms == KEY_ON_MS + 6000


# -- basic info → retained attributes --------------------------------------------------------------------


def test_basic_info_is_retained_attributes_and_remembers_the_firmware() -> None:
    messages, state = map_record(basic_info(), None, packet_id="b", received_ms=1_795_215_590_000)
    assert [(m.topic, m.retain) for m in messages] == [(f"v1/sensors/{MODEM}/attributes", True)]
    assert messages[0].payload == {
        "ts": 1_795_215_590_000, "modem": MODEM, "vid": "서울33가1234", "vin": "KMHFC41MP6A123456",
        "model": "DTG-1000", "vehicle_type": "31", "business_number": "1234567890",
        "driver_code": "123456789012345678", "fwv": "1.0.2", "id": "b:0",
    }
    assert "서울".encode() in encode_payload(messages[0].payload)  # UTF-8 text, not \\u escapes
    assert state == TripState(fwv="1.0.2", vehicle_type="31")
    messages, _ = map_record(basic_info(), None, packet_id="b")
    assert "ts" not in messages[0].payload  # the packet has no time; none is invented


# -- events ----------------------------------------------------------------------------------------------


HEALTH = f"v1/sensors/{MODEM}/attributes/health"


def test_device_status_changes_are_extension_events_and_retained_health_not_diagnostics() -> None:
    """The DTG's own faults (GPS receiver, speed sensor, power supply) are no vehicle trouble codes:
    no Diagnostic Information (`dtcc`); a Device Status event per change, a fault clearing
    included, and the retained health once per packet that changed it. Across packets and restarts."""
    codes = [[0, 11, 11, 0], [0, 12], [12, 12, 99], [99, 99]]
    records = [dtg(*(dtg_body(p * 10 + s, status_code=c) for s, c in enumerate(packet)))
               for p, packet in enumerate(codes)]
    messages, state = run(records, restart=True)
    assert by_ty(messages, 20) == [] and not any("dtcc" in str(m.payload) for m in messages)
    events = by_ty(messages, 900)
    assert [e.payload["pld"] for e in events] == [
        {"tid": TID, "dsc": "11", "dsn": "GPS receiver fault", "pdsc": "00"},
        {"tid": TID, "dsc": "00", "dsn": "ok", "pdsc": "11"},  # the fault clears
        {"tid": TID, "dsc": "12", "dsn": "speed sensor fault", "pdsc": "00"},  # 12 again in the next packet: no event
        {"tid": TID, "dsc": "99", "dsn": "power supply fault", "pdsc": "12"},
    ]
    assert [e.payload["ts"] for e in events] == [KEY_ON_MS + 1000, KEY_ON_MS + 3000, KEY_ON_MS + 11_000,
                                                 KEY_ON_MS + 22_000]
    assert all(e.topic == TRE and not e.retain for e in events)
    health = [m for m in messages if m.topic == HEALTH]
    assert all(m.retain for m in health)
    assert [m.payload for m in health] == [  # the last code of each packet that changed it, with when it began
        {"ts": KEY_ON_MS + 3000, "modem": MODEM, "dsc": "00", "dsn": "ok", "id": "p0:3"},
        {"ts": KEY_ON_MS + 11_000, "modem": MODEM, "dsc": "12", "dsn": "speed sensor fault", "id": "p1:2"},
        {"ts": KEY_ON_MS + 22_000, "modem": MODEM, "dsc": "99", "dsn": "power supply fault", "id": "p2:2"},
    ]
    # each packet: its microtrip, its events, its health; a packet without a change publishes neither
    assert [m.payload["id"] for m in messages] == ["p0:0", "p0:1", "p0:2", "p0:3", "p1:0", "p1:1", "p1:2",
                                                   "p2:0", "p2:1", "p2:2", "p3:0"]
    assert state is not None and state.status_code == 99


def test_a_status_code_outside_the_table_is_passed_with_that_said() -> None:
    messages, _ = run([dtg(dtg_body(0, status_code=5))])
    assert by_ty(messages, 900)[0].payload["pld"] == {
        "tid": TID, "dsc": "05", "dsn": "not in the protocol's table", "pdsc": "00"}


def test_the_backlog_of_an_older_trip_leaves_the_device_health_alone() -> None:
    """Older data does not say how the device is now."""
    _, state = run([dtg(dtg_body(0, status_code=11))])
    assert state is not None
    newer = attrs.evolve(state, tid=TID + 3600, key_on_ms=KEY_ON_MS + 3_600_000)
    messages, after = run([dtg(dtg_body(5, status_code=0))], newer)
    assert [m.topic for m in messages] == [TRE] and by_ty(messages, 900) == []
    assert after is not None and after.status_code == 11


def test_low_battery_at_key_off_is_a_battery_warning() -> None:
    _, state = run([dtg(dtg_body(0))])  # driving at 24.6 V: a 24 V system, warned below 2 × 11.5 V
    assert state is not None and state.system_v == 24
    messages, _ = map_record(key_off(battery_v=22.9, key_off_time=KEY_ON), state, packet_id="k")
    assert [m.payload["ty"] for m in messages] == [1, 2, 23]
    assert messages[2].payload["pld"] == {"tid": TID, "wbv": 22.9}
    assert by_ty(map_record(key_off(battery_v=23.0), state, packet_id="k")[0], 23) == []  # at the threshold
    assert by_ty(map_record(key_off(battery_v=11.4), state, packet_id="k", battery_warning_v=0)[0], 23) == []
    assert by_ty(map_record(key_off(battery_v=23.9), state, packet_id="k", battery_warning_v=12)[0], 23) != []
    twelve = attrs.evolve(state, system_v=12)
    assert by_ty(map_record(key_off(battery_v=11.4), twelve, packet_id="k")[0], 23) != []
    assert by_ty(map_record(key_off(battery_v=11.5), twelve, packet_id="k")[0], 23) == []
    # the system the terminal's driving showed, not the reading's guess: a 24 V battery down to 12 V
    assert by_ty(map_record(key_off(battery_v=12.0), state, packet_id="k")[0], 23) != []
    # any threshold above 0 warns, 0 never does (not even below 0 V, a reading out of its range)
    assert by_ty(map_record(key_off(battery_v=0.5), twelve, packet_id="k", battery_warning_v=1)[0], 23) != []
    assert by_ty(map_record(key_off(battery_v=-0.1), twelve, packet_id="k", battery_warning_v=0)[0], 23) == []
    assert not any(m.retain for m in messages)  # a Trip, a parking microtrip, a battery warning


def test_status_logs_are_not_published() -> None:
    state = TripState(fwv="1")
    assert map_record(wire(StatusLog(MODEM, KEY_ON, "GPS ok")), state, packet_id="s") == ([], state)


# -- the sf2019 profile -------------------------------------------------------------------------------------


def test_sf2019_numbers_types_globally_and_uses_its_dtg_keys() -> None:
    options: dict[str, Any] = {"profile": "sf2019"}
    messages, _ = run([dtg(dtg_body(0, status_code=11)), key_off(battery_v=11.0, key_off_time=KEY_ON)], **options)
    assert [m.payload.get("ty") for m in messages] == [10, 900, None, 9, 10, 104]
    assert messages[2].topic == HEALTH and messages[2].retain  # the same health in both profiles
    element = messages[0].payload["pld"][0]
    assert list(element) == list(SF2019.microtrip_keys["dtg"])
    assert element["acx"] == "1.5" and element["acy"] == "-0.3"  # text in this profile
    assert [m.payload["ty"] for m in map_record(obd(0), None, packet_id="o", **options)[0]] == [4]
    assert [m.payload["ty"] for m in map_record(mdt(0), None, packet_id="m", **options)[0]] == [2]
    assert [m.payload["ty"] for m in run([mdt(0), key_off(key_off_time=KEY_ON)], **options)[0]] == [2, 1, 2]


def test_unknown_profile_is_refused() -> None:
    with pytest.raises(ValueError, match="sf2019"):
        map_record(dtg(dtg_body(0)), None, packet_id="x", profile="sf2020")


def test_every_key_of_every_profile_has_a_documented_source() -> None:
    for profile in PROFILES.values():
        for keys in profile.microtrip_keys.values():
            assert set(keys) <= set(KEY_SOURCES)
        for keys in (profile.trip_keys, profile.parking_keys, profile.device_event_keys, profile.device_health_keys,
                     profile.battery_warning_keys, profile.attribute_keys):
            assert set(keys) <= set(KEY_SOURCES), keys


def test_a_profile_is_data_its_topics_and_key_lists_included() -> None:
    """A profile that names other keys, in another order, and other topics gets exactly those."""
    custom = attrs.evolve(SEED, name="custom", trip_keys=("dis", "tid"), parking_keys=("try",),
                          attribute_keys=("vin", "modem"), telemetry_topic="fleet/{modem}/t",
                          attributes_topic="fleet/{modem}/a")
    PROFILES[custom.name] = custom  # type: ignore[index]
    try:
        end = key_off(key_off_time=KEY_ON + timedelta(seconds=1))
        messages, _ = run([basic_info(), dtg(dtg_body(0), dtg_body(1, total_km=120_001)), end], profile="custom")
    finally:
        del PROFILES[custom.name]  # type: ignore[attr-defined]
    assert [(m.topic, list(m.payload["pld"]) if isinstance(m.payload.get("pld"), dict) else None)
            for m in messages] == [
        (f"fleet/{MODEM}/a", None), (f"fleet/{MODEM}/t", None), (f"fleet/{MODEM}/t", ["dis", "tid"]),
        (f"fleet/{MODEM}/t", ["try"])]
    assert messages[0].payload == {"vin": "KMHFC41MP6A123456", "modem": MODEM, "id": "p0:0"}


def test_a_packet_kind_without_messages_is_an_error_not_silence(monkeypatch: pytest.MonkeyPatch) -> None:
    import dtgserver.bridge.messages as module

    with pytest.raises(ProtocolError, match="0x09"):  # the server's own answer is never a stored packet
        map_record(Response(0), None, packet_id="r")
    monkeypatch.setattr(module, "SILENT_KINDS", frozenset())  # as if the status log were a kind added without messages
    with pytest.raises(ValueError, match="status_log"):
        map_record(wire(StatusLog(MODEM, KEY_ON, "GPS ok")), None, packet_id="s")


def test_a_packet_kind_without_trip_state_is_an_error_not_silence(monkeypatch: pytest.MonkeyPatch) -> None:
    """A consumer that keeps trip states only (`next_state`) refuses a kind it has no rule for,
    naming it, as `build` does: never a state left alone in silence."""
    import dtgserver.bridge.trips as module

    log = encode(StatusLog(MODEM, KEY_ON, "GPS ok"))
    assert next_state(log, None) is None  # the status log: stored as a file, no trip state
    monkeypatch.setattr(module, "StatusLog", Response)  # as if the status log were a kind added without rules
    with pytest.raises(ValueError, match=r"^no trip state is defined for a packet of kind 'status_log'$"):
        next_state(log, None)


# -- payload size ----------------------------------------------------------------------------------------


def test_a_long_packet_is_split_in_order_under_64_kib() -> None:
    bodies = [dtg_body(s, total_km=120_000 + s // 60) for s in range(3600)]  # one hour, the framer's maximum
    record = dtg(*bodies)
    messages, _ = map_record(record, None, packet_id="f" * 64)
    assert len(messages) > 5
    for message in messages:
        assert len(encode_payload(message.payload)) < MAX_PAYLOAD_BYTES
        assert len(json.dumps(message.payload, ensure_ascii=False).encode()) < MAX_PAYLOAD_BYTES
        assert message.payload["ts"] == message.payload["pld"][-1]["clt"]
    elements = [e for m in messages for e in m.payload["pld"]]
    assert [e["clt"] for e in elements] == [to_ms(b.time) for b in bodies]
    assert [m.payload["id"] for m in messages] == [f"{'f' * 64}:{n}" for n in range(len(messages))]
    # each chunk is as full as it may be: the next element would not have fitted
    for message, following in itertools.pairwise(messages):
        grown = dict(message.payload, pld=message.payload["pld"] + following.payload["pld"][:1])
        assert len(json.dumps(grown, ensure_ascii=False).encode()) >= MAX_PAYLOAD_BYTES - 32


@settings(max_examples=150, deadline=None)
@given(record=st.one_of(records(DtgRealtime, max_bodies=6), records(ObdRealtime, max_bodies=6),
                        records(MdtRealtime, max_bodies=6)),
       profile=st.sampled_from(sorted(PROFILES)), first_total_km=st.none() | st.integers(0, 2**32 - 1),
       first_fuel_ml=st.none() | st.integers(-(2**31), 2**31 - 1))
def test_no_element_encodes_longer_than_its_bound(record: Any, profile: str, first_total_km: int | None,
                                                  first_fuel_ml: int | None) -> None:
    """The bound lets a minute's microtrip skip the encoding that measures it: it must hold for any
    wire value (the strategies' values span each field's whole wire range)."""
    table = PROFILES[profile]
    keys = table.microtrip_keys[record.KIND]
    raw = encode(record)
    layout = realtime_layout(raw)
    assert layout is not None
    tid = to_ms(record.key_on_time)
    assert tid is not None  # the strategy's times are all calendar times
    elements = elements_builder(record.KIND, keys, table.string_keys)(layout.bodies(raw), tid, first_total_km,
                                                                      first_fuel_ml)
    for element in elements:
        assert len(json.dumps(element, ensure_ascii=False).encode()) <= element_bound(keys)
        for value in element.values():
            assert len(json.dumps(value, ensure_ascii=False).encode()) <= VALUE_BOUND
    for limit in (600, 2000, MAX_PAYLOAD_BYTES):  # and the shortcut never changes how a packet is split
        assert split(elements, 2, "p" * 64, limit, element_bound(keys)) == split(elements, 2, "p" * 64, limit)


def test_a_minutes_microtrip_is_not_encoded_to_measure_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import dtgserver.bridge.messages as module

    sized: list[Any] = []
    real = module._size

    def measured(value: Any) -> int:
        sized.append(value)
        return real(value)

    monkeypatch.setattr(module, "_size", measured)
    for profile in PROFILES:
        for packet in (dtg(*(dtg_body(s) for s in range(60))), obd(*range(60)), mdt(*range(60))):
            sized.clear()
            messages, _ = map_record(packet, None, packet_id="f" * 32, profile=profile)
            assert len(messages) == 1 and len(messages[0].payload["pld"]) == 60
            # the envelope's overhead at most: never the elements, nor the array of them
            assert not any(isinstance(v, list) or (isinstance(v, dict) and "pld" not in v) for v in sized)


def test_a_small_limit_splits_into_single_elements() -> None:
    messages, _ = map_record(dtg(dtg_body(0), dtg_body(1), dtg_body(2)), None, packet_id="x", max_payload_bytes=500)
    assert [len(m.payload["pld"]) for m in messages] == [1, 1, 1]


# -- trip synthesis across packets and restarts -----------------------------------------------------------------


def trip_packets() -> list[Packet]:
    speeds = [[0, 0, 15, 30], [45, 60, 72, 80], [64, 40, 12, 0]]
    return [
        basic_info("2.1.0"),
        *(dtg(*(dtg_body(p * 60 + s, speed_kmh=v, total_km=120_000 + p * 2 + (s // 2)) for s, v in enumerate(packet)))
          for p, packet in enumerate(speeds)),
        key_off(minutes=5, key_off_time=KEY_ON + timedelta(seconds=123)),  # at the last body: complete
    ]


def test_a_trip_is_synthesised_from_several_packets_and_survives_restarts_in_between() -> None:
    straight, state = run(trip_packets())
    restarted, restarted_state = run(trip_packets(), restart=True)
    assert restarted == straight and restarted_state == state
    (trip,) = [m.payload["pld"] for m in by_ty(straight, 1)]
    assert trip == {
        "tid": TID, "stt": KEY_ON_MS, "edt": KEY_ON_MS + 123_000, "dis": 4000, "tdis": 120_005_000, "fc": 123,
        "stlat": 37.497942, "stlon": 127.027583, "edlat": 37.5, "edlon": 127.03, "hsts": 80,
        "mesp": round(418 / 12), "idt": 3, "btv": 24.1, "gnv": 24.6, "wut": 2, "est": 1, "fwv": "2.1.0", "dtvt": 9,
        "xdd": {"start": 1, "left_turn": 0, "right_turn": 0, "u_turn": 0, "deceleration": 1, "acceleration": 2,
                "stop": 1, "lane_change": 0, "overtaking": 0},
    }
    # Metres from the speeds, four bodies a minute apart: the odometer (2 km a minute here) keeps the
    # sum within a km of itself, so each minute starts at its lower bound.
    cdits = [e["cdit"] for m in by_ty(straight, 2) if isinstance(m.payload["pld"], list) for e in m.payload["pld"]]
    assert cdits == [0, 0, 4, 13, 1000, 1017, 2000, 2022, 3000, 3011, 4000, 4000]


def test_the_same_packets_give_the_same_messages() -> None:
    assert run(trip_packets()) == run(trip_packets())


def test_trip_state_round_trips_through_json_and_ignores_unknown_keys() -> None:
    _, state = run(trip_packets())
    assert state is not None
    data = json.loads(json.dumps(state.to_dict()))
    assert TripState.from_dict(data) == state
    assert TripState.from_dict(data | {"added_in_a_later_version": 1}) == state


def test_trip_state_stored_form_is_an_array_and_older_forms_still_load() -> None:
    _, state = run(trip_packets())
    assert state is not None and state.fwv is not None  # every kind of field set, text included
    stored = state.to_json()
    values = json.loads(stored)
    assert isinstance(values, list) and values == [state.to_dict()[name] for name in state.to_dict()]
    assert TripState.from_json(stored) == state
    assert TripState.from_json(json.dumps(state.to_dict())) == state  # the object form stored before
    assert TripState.from_json("null") is None
    assert TripState.from_json(json.dumps([*values, 1, "later"])) == state  # a newer version's array
    fewer = TripState.from_json(json.dumps(values[:-11]))  # an older version's array: defaults after it
    assert fewer == attrs.evolve(state, status_code=0, fwv=None, drive=None, meter=None, vehicle_type=None,
                                 system_v=None, key_off_ms=None, key_off_lat=None, key_off_lon=None, key_off_v=None,
                                 key_off_received_ms=None)


# -- docs/mqtt.md's examples are this mapping's output ---------------------------------------------------------


def example_messages() -> dict[str, dict[str, Any]]:
    """The examples of docs/mqtt.md, by name, mapped from decoded records."""
    messages, _ = run([
        basic_info(),
        dtg(dtg_body(0, speed_kmh=48), dtg_body(1, speed_kmh=50, status_code=11)),
        key_off(minutes=47, battery_v=11.2, key_off_time=KEY_ON + timedelta(seconds=1)),
    ], received_ms=KEY_ON_MS - 60_000, real_ids=True)
    named = dict(zip(["attributes", "dtg_microtrip", "device_status", "device_health", "trip", "parking",
                      "battery_warning"],
                     messages, strict=True))
    named["obd_microtrip"] = run([obd(0)], real_ids=True)[0][0]
    named["mdt_microtrip"] = run([mdt(0)], real_ids=True)[0][0]
    named["sf2019_dtg_microtrip"] = run([dtg(dtg_body(0))], real_ids=True, profile="sf2019")[0][0]
    return {name: message.payload for name, message in named.items()}


def test_docs_examples_are_the_mappings_output() -> None:
    text = DOCS.read_text(encoding="utf-8")
    documented = {name: json.loads(block) for name, block in
                  re.findall(r"<!-- example: (\w+) -->\s*```json\n(.*?)```", text, re.S)}
    assert documented == example_messages()


# -- any packet the framer accepts maps without error ------------------------------------------------------------

MODEM_BYTES = MODEM.encode()


@st.composite
def wire_packets(draw: st.DrawFn) -> bytes:
    """A frame with a valid header and arbitrary field bytes: bad times, odd flags, any numbers."""
    kind = draw(st.sampled_from(["dtg", "obd", "mdt", "key_off", "basic_info"]))
    if kind == "key_off":
        return b"\x04" + MODEM_BYTES + draw(st.binary(min_size=24, max_size=24))
    if kind == "basic_info":
        return b"\x01" + MODEM_BYTES + draw(st.binary(min_size=89, max_size=89))
    protocol_id, body_size = {"dtg": (0x03, 51), "obd": (0x06, 42), "mdt": (0x07, 30)}[kind]
    count = draw(st.integers(1, 4))
    key_on = draw(st.one_of(st.binary(min_size=7, max_size=7),
                            st.just(encode(dtg(dtg_body(0)))[16:23])))  # a real KEY ON half the time
    return (bytes([protocol_id]) + MODEM_BYTES + b"\x00\x01" + count.to_bytes(2, "big") + key_on
            + draw(st.binary(min_size=count * body_size, max_size=count * body_size)))


@settings(max_examples=300, deadline=None)
@given(st.lists(wire_packets(), min_size=1, max_size=6), st.sampled_from(sorted(PROFILES)))
def test_any_decodable_packet_sequence_maps_to_valid_messages(frames: list[bytes], profile: str) -> None:
    state: TripState | None = None
    for n, frame in enumerate(frames):
        try:
            record = decode(frame)
        except ProtocolError:
            continue
        messages, state = map_record(record, state, packet_id=f"{n:032x}", profile=profile, max_payload_bytes=2048)
        ids = [m.payload["id"] for m in messages]
        assert len(set(ids)) == len(ids)
        for message in messages:
            assert len(encode_payload(message.payload)) < 2048
            assert message.topic.startswith(f"v1/sensors/{MODEM}/")
        if state is not None:
            assert TripState.from_dict(json.loads(json.dumps(state.to_dict()))) == state


# -- the trip state from bytes alone is the state the messages are built with ----------------------------


def realistic_or_wire_packets() -> st.SearchStrategy[bytes]:
    """Frames the framer accepts: arbitrary field bytes, or valid records of every kind (real times)."""
    kinds = (DtgRealtime, ObdRealtime, MdtRealtime, KeyOff, BasicInfo)
    return st.one_of(wire_packets(), *(records(cls).map(encode) for cls in kinds))


def summarize(bodies: Any) -> Any:
    """The summary as the records give it: the oracle of the one read from the bytes."""
    from dtgserver.bridge.trips import BodySummary

    def ml(litres: float) -> int:
        return round(litres * 1000)

    first, last = bodies[0], bodies[-1]
    speeds = [body.speed_kmh for body in bodies]
    times = [ms for ms in map(to_ms, (body.time for body in bodies)) if ms is not None]
    fuels = [ml(body.total_fuel_l) for body in bodies if hasattr(body, "total_fuel_l")]
    codes = [body.status_code for body in bodies if isinstance(body, DtgBody)]
    return BodySummary(
        bodies=len(bodies), first_ms=times[0] if times else None, last_ms=times[-1] if times else None,
        first_total_km=first.total_distance_km, last_total_km=last.total_distance_km,
        max_total_km=max(body.total_distance_km for body in bodies),
        first_lat=first.lat, first_lon=first.lon, last_lat=last.lat, last_lon=last.lon,
        max_speed_kmh=max(speeds), speed_sum_kmh=sum(speeds), driving_s=len(speeds) - speeds.count(0),
        first_total_fuel_ml=fuels[0] if fuels else None, last_total_fuel_ml=fuels[-1] if fuels else None,
        last_status_code=codes[-1] if codes else None,
    )


@settings(max_examples=300, deadline=None)
@given(wire_packets())
def test_the_bodies_summary_read_from_bytes_is_the_one_read_from_records(frame: bytes) -> None:
    record = decode(frame)
    if isinstance(record, Realtime):
        layout = realtime_layout(frame)
        assert layout is not None
        assert summarize_raw(frame, layout) == summarize(record.bodies)
        assert_summary_from_columns(frame, record)


def assert_summary_from_columns(frame: bytes, record: Realtime) -> None:
    """The summary and the body times `realtime_advance` reads from the packet's columns are the records' too."""
    from dtgserver.bridge.trips import _summary, body_times_ms

    layout = realtime_layout(frame)
    assert layout is not None
    times = body_times_ms(frame, layout)
    assert times == [to_ms(body.time) for body in record.bodies]
    assert _summary(frame, layout, layout.transposed(frame), times) == summarize(record.bodies)


@settings(max_examples=300, deadline=None)
@given(st.lists(realistic_or_wire_packets(), min_size=1, max_size=8))
def test_next_state_from_bytes_is_the_state_map_record_gives(frames: list[bytes]) -> None:
    with_messages: TripState | None = None
    from_bytes: TripState | None = None
    for n, frame in enumerate(frames):
        record = decode(frame)
        with_messages = map_record(record, with_messages, packet_id=f"{n:032x}")[1]
        from_bytes = next_state(frame, from_bytes)
        assert from_bytes == with_messages


def test_the_state_from_bytes_follows_a_real_trip() -> None:
    """Not only equal on random bytes: on a drive, the accounting the Trip message needs is there."""
    packets = [dtg(*(dtg_body(60 * minute + s, speed_kmh=s % 7 * 10, total_km=120_000 + minute) for s in range(60)))
               for minute in range(3)]
    state: TripState | None = None
    for packet in packets:
        state = next_state(encode(packet), state)
    assert state is not None and state.tid == KEY_ON_MS // 1000
    assert (state.speed_count, state.first_total_km, state.last_total_km) == (180, 120_000, 120_002)
    assert state.max_speed_kmh == 60 and state.driving_s == 180 - 3 * 9  # s % 7 == 0: 9 of every 60 s
    assert state.last_ms == to_ms(packets[-1].bodies[-1].time)


# -- what the trip and its messages keep exactly (each of these once survived a mutation) ---------------


def test_a_key_off_at_exactly_the_key_on_time_ends_the_trip() -> None:
    # A trip may be zero seconds long (the key turned on and off within the same 1/100 s):
    # only a KEY OFF from *before* KEY ON is the terminal's backlog.
    messages, state = run([dtg(dtg_body(0, speed_kmh=0)), key_off(minutes=0)])
    (trip,) = [m.payload["pld"] for m in by_ty(messages, 1)]
    assert trip["stt"] == trip["edt"] == KEY_ON_MS
    assert state is not None and state.trip_sent


def test_the_trip_starts_where_its_first_packet_does_however_many_follow() -> None:
    # Each packet's bodies at a place of their own: the Trip starts at the first body of the first
    # packet and ends at the last body of the last one, fuel and the state's odometer likewise.
    packets = []
    for p in range(4):
        bodies = [attrs.evolve(dtg_body(p * 60 + s, total_km=120_000 + p * 3 + s),
                               lat=round(37.4 + p * 0.01 + s * 0.001, 6), lon=round(127.0 + p * 0.01 + s * 0.001, 6))
                  for s in range(3)]
        packets.append(dtg(*bodies))
    end = key_off(minutes=10, key_off_time=KEY_ON + timedelta(seconds=182))  # at the last body
    messages, state = run([*packets, end], restart=True)
    (trip,) = [m.payload["pld"] for m in by_ty(messages, 1)]
    assert (trip["stlat"], trip["stlon"]) == (37.4, 127.0)
    assert (trip["edlat"], trip["edlon"]) == (37.5, 127.03)  # where the KEY OFF packet says it stood
    assert state is not None
    assert (state.last_lat, state.last_lon) == (37.432, 127.032)  # the last body of the last packet
    assert trip["fc"] == 3 * 60 + 2  # total fuel grows 1 mL a second: body 0 to body 182
    assert (state.first_lat, state.first_total_km, state.last_total_km) == (37.4, 120_000, 120_011)


def test_tid_is_whole_seconds_in_every_payload() -> None:
    # tid is an integer in JSON ("tid":1795215600), never a float ("tid":1795215600.0 or .99 for
    # a KEY ON 0.99 s into the second: the same trip id, the seconds cut, not rounded).
    later_in_the_second = KEY_ON + timedelta(milliseconds=990)
    messages, _ = run([dtg(dtg_body(0), dtg_body(1)), key_off(key_off_time=KEY_ON + timedelta(seconds=1)),
                       dtg(dtg_body(7), key_on=later_in_the_second)])
    payloads = [encode_payload(m.payload) for m in messages]
    assert all(b'"tid":%d' % TID in p for p in payloads if b'"tid"' in p)
    assert sum(p.count(b'"tid":%d,' % TID) for p in payloads) == 5  # 2 + 1 elements, the Trip, the parking
    assert all(type(m.payload["pld"]["tid"]) is int for m in by_ty(messages, 1))


def test_a_payload_is_split_at_the_platforms_64_kib_exactly() -> None:
    # The platform refuses a payload of 64 KiB or more. A chunk is held below that in the widest
    # form it can take: json.dumps' ", " and ": ", the widest ts and message number. The packet id
    # is in every payload, so lengthening it one character at a time finds the byte where a packet
    # stops going whole: there, the widest form must be 65,535 bytes, and 65,536 one character on.
    # (The limit is written out, so MAX_PAYLOAD_BYTES cannot move in either direction unnoticed.)
    first, _ = map_record(dtg(*(dtg_body(s) for s in range(600))), None, packet_id="p")
    record = dtg(*(dtg_body(s) for s in range(len(first[0].payload["pld"]))))  # as many as fit with id "p"

    def messages(id_length: int) -> list[Message]:
        return map_record(record, None, packet_id="p" * id_length)[0]

    whole, halved = 1, 20_000  # whole with a 1-character id, split with a 20,000-character one
    assert len(messages(whole)) == 1 and len(messages(halved)) == 2
    while halved - whole > 1:
        middle = (whole + halved) // 2
        whole, halved = (middle, halved) if len(messages(middle)) == 1 else (whole, middle)

    def widest(message: Message, id_length: int) -> int:
        payload = dict(message.payload, ts=10**13, id="p" * id_length + ":99999")
        return len(json.dumps(payload, ensure_ascii=False).encode())

    (sent,) = messages(whole)
    assert widest(sent, whole) == 65_535
    assert widest(sent, halved) == 65_536  # the same elements with one id character more: split
    assert all(len(encode_payload(m.payload)) < 65_536 for m in [sent, *messages(halved)])


def test_compact_json_is_what_is_published() -> None:
    (message,), _ = map_record(dtg(dtg_body(0)), None, packet_id="c")
    payload = encode_payload(message.payload)
    assert payload == json.dumps(message.payload, ensure_ascii=False, separators=(",", ":")).encode()
    assert b", " not in payload and b": " not in payload


def test_the_topics_are_the_profiles_seed_unless_named() -> None:
    from dtgserver.bridge.messages import attributes_topic, telemetry_topic

    assert telemetry_topic(MODEM) == TRE and attributes_topic(MODEM) == f"v1/sensors/{MODEM}/attributes"
    custom = attrs.evolve(SEED, telemetry_topic="t/{modem}/up", attributes_topic="a/{modem}")
    assert (telemetry_topic(MODEM, custom), attributes_topic(MODEM, custom)) == (f"t/{MODEM}/up", f"a/{MODEM}")


def test_a_packet_without_bodies_summarizes_to_nothing_and_no_state_stays_none() -> None:
    # the framer refuses a body count of 0; read straight from such bytes, the summary is empty
    from dtgserver.bridge.trips import BodySummary, sent

    raw = encode(dtg(dtg_body(0)))
    empty = raw[:14] + b"\x00\x00" + raw[16:23]
    layout = realtime_layout(empty)
    assert layout is not None and summarize_raw(empty, layout) == BodySummary()
    assert tuple(BodySummary()) == (0, None, None, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0, 0, 0, None, None, None)
    # an older trip's, against a trip whose odometer reads 0 km: it cannot show the vehicle drove on
    newer = TripState(tid=TID + 3600, key_on_ms=KEY_ON_MS + 3_600_000, first_total_km=0, last_total_km=0)
    assert next_state(empty, newer) == newer
    # its state: a trip begun at its KEY ON, nothing accounted
    state = next_state(empty, None)
    assert state is not None
    assert (state.tid, state.speed_count, state.first_total_km, state.last_ms) == (TID, 0, None, None)
    assert sent(None) is None
    assert sent(TripState(tid=TID)) == TripState(tid=TID, trip_sent=True)


def test_the_bodies_summary_of_a_real_packet() -> None:
    # random bytes hardly ever make a calendar time: the summary's times on a real drive
    bodies = [dtg_body(s, speed_kmh=(0, 40, 55, 0)[s], total_km=120_000 + s) for s in range(4)]
    record = dtg(*bodies)
    raw = encode(record)
    layout = realtime_layout(raw)
    assert layout is not None
    summary = summarize_raw(raw, layout)
    assert summary == summarize(record.bodies)
    assert_summary_from_columns(raw, record)
    for kind in (obd(0, 1, 2), mdt(0, 1)):  # no status; no status nor fuel
        assert_summary_from_columns(encode(kind), kind)
    assert (summary.first_ms, summary.last_ms) == (KEY_ON_MS, KEY_ON_MS + 3000)
    assert (summary.max_speed_kmh, summary.speed_sum_kmh, summary.driving_s) == (55, 95, 2)
    assert summary.max_total_km == 120_003


def test_a_trip_state_stored_before_the_measures_gives_the_odometers_distance() -> None:
    # A state stored by a version without the trip's measures (no `meter`): the Trip's `dis` is
    # then the odometer's, in metres, and like `fc` left out where the counter went back.
    from dtgserver.bridge.driving import DrivingConfig
    from dtgserver.bridge.trips import trip_values

    state = TripState(tid=TID, kind="dtg", key_on_ms=KEY_ON_MS, first_total_km=120_000, last_total_km=120_003,
                      first_lat=37.4, first_lon=127.0, last_lat=37.5, last_lon=127.1, last_ms=KEY_ON_MS + 3000,
                      max_speed_kmh=30, speed_sum_kmh=61, speed_count=4, driving_s=3,
                      first_total_fuel_ml=45_678_900, last_total_fuel_ml=45_678_903, fwv="1.0.2")
    assert trip_values(state, driving=DrivingConfig(default_class=None)) == {
        "tid": TID, "stt": KEY_ON_MS, "edt": KEY_ON_MS + 3000, "dis": 3000, "stlat": 37.4, "stlon": 127.0,
        "edlat": 37.5, "edlon": 127.1, "hsts": 30, "mesp": 15, "dtvt": 3, "fc": 3, "fwv": "1.0.2",
        "tdis": 120_003_000, "btv": None, "xpartial": None, "idt": None, "gnv": None, "wut": None, "est": None,
        "xdd": None}
    assert trip_values(state, partial=True)["xpartial"] is True
    for first, last, dis in ((120_000, 120_000, 0), (120_000, 119_999, None), (None, 120_000, None),
                             (120_000, None, None)):
        assert trip_values(attrs.evolve(state, first_total_km=first, last_total_km=last))["dis"] == dis
    for first_ml, last_ml, fc in ((5, 5, 0), (5, 4, None), (None, 5, None)):
        assert trip_values(attrs.evolve(state, first_total_fuel_ml=first_ml, last_total_fuel_ml=last_ml))["fc"] == fc
    # a trip of which no body is known (its KEY ON only): nothing but its times is made up
    nothing = trip_values(TripState(tid=TID, key_on_ms=KEY_ON_MS), driving=DrivingConfig(default_class=None))
    assert {key: value for key, value in nothing.items() if value is not None} == {"tid": TID, "stt": KEY_ON_MS}
    # the behaviours are counted by the vehicle type's class (a truck), from none judged yet
    truck = trip_values(attrs.evolve(state, vehicle_type="31"), driving=DrivingConfig(default_class=None))
    assert truck["xdd"] == dict.fromkeys(("start", "left_turn", "right_turn", "u_turn", "deceleration",
                                          "acceleration", "stop", "lane_change", "overtaking"), 0)


def test_a_key_off_without_a_calendar_time_closes_an_open_trip_at_once_but_not_a_named_end() -> None:
    bad = BadTime(bytes((26, 13, 1, 0, 0, 0, 0)))
    minute = dtg(*(dtg_body(s) for s in range(3)))
    messages, state = run([minute, key_off(battery_v=24.2, key_off_time=bad)])
    (trip,) = [m.payload["pld"] for m in by_ty(messages, 1)]
    assert trip["edt"] == KEY_ON_MS + 2000 and trip["btv"] == 24.2  # at its last body, with that battery
    assert state is not None and state.trip_sent
    # an end named already (after the bodies so far): a KEY OFF that cannot tell leaves it waiting
    named = key_off(battery_v=24.3, key_off_time=KEY_ON + timedelta(seconds=30))
    messages, state = run([minute, named, key_off(battery_v=24.2, key_off_time=bad)])
    assert by_ty(messages, 1) == [] and state is not None and not state.trip_sent
    assert (state.key_off_ms, state.key_off_v) == (KEY_ON_MS + 30_000, 24.3)


def test_a_key_off_with_no_trip_known_is_kept_for_the_trip_to_come() -> None:
    from dtgserver.bridge.trips import KeyOffOutcome
    from dtgserver.bridge.trips import key_off as trip_key_off

    known = TripState(fwv="1.0.2", vehicle_type="31")  # a basic info, no trip yet
    ends: dict[str, Any] = {"key_off_ms": KEY_ON_MS, "key_off_lat": 37.5, "key_off_lon": 127.0, "key_off_v": 24.0,
            "key_off_received_ms": KEY_ON_MS + 5}
    outcome = trip_key_off(known, KEY_ON_MS, lat=37.5, lon=127.0, battery_v=24.0, received_ms=KEY_ON_MS + 5)
    assert outcome == KeyOffOutcome(None, False, attrs.evolve(known, **ends))
    # an older one than the KEY OFF kept changes nothing; one of a trip sent already names that trip
    assert trip_key_off(outcome.state, KEY_ON_MS - 1000) == KeyOffOutcome(None, False, outcome.state)
    sent = TripState(tid=TID, key_on_ms=KEY_ON_MS, trip_sent=True)
    assert trip_key_off(sent, None) == KeyOffOutcome(sent, False, sent)
    # one from before the trip began: the terminal's backlog, no trip's end
    trip = TripState(tid=TID, key_on_ms=KEY_ON_MS)
    assert trip_key_off(trip, KEY_ON_MS - 10) == KeyOffOutcome(None, False, trip)


def test_what_is_terminal_wide_outlives_the_trip() -> None:
    # the device status, the firmware, the vehicle type and its system voltage are the terminal's, not the trip's
    later = KEY_ON + timedelta(hours=2)
    first = dtg(*(dtg_body(s, status_code=11) for s in range(3)))  # driving at 24.6 V: a 24 V system
    standing = attrs.evolve(dtg_body(7200, speed_kmh=0, status_code=11), rpm=0)  # no reading while driving
    messages, state = run([basic_info(), first, dtg(standing, key_on=later),
                           key_off(minutes=121, battery_v=17.0, key_off_time=later)])
    assert [m.payload["pld"]["pdsc"] for m in by_ty(messages, 900)] == ["00"]  # 11 from the start, once
    assert state is not None and state.tid == TID + 7200 and state.status_code == 11
    assert (state.fwv, state.vehicle_type, state.system_v) == ("1.0.2", "31", 24)
    assert by_ty(messages, 23) != []  # 17 V on a 24 V system: low (on a 12 V one it would not be)
    assert [m.payload["pld"]["fwv"] for m in by_ty(messages, 1)] == ["1.0.2", "1.0.2"]
    # a trip of bodies that carry no device status (OBD) keeps the terminal's
    _, state = run([first, wire(attrs.evolve(obd(7200), key_on_time=later))])
    assert state is not None and state.tid == TID + 7200 and state.status_code == 11


def test_a_key_off_at_the_key_on_of_the_trip_to_come_is_its_end() -> None:
    # an outage: the KEY OFF first, then the trip's data; a KEY OFF at its very KEY ON time is its end
    messages, state = run([key_off(minutes=0, key_off_time=KEY_ON), dtg(dtg_body(0, speed_kmh=0))])
    (trip,) = [m.payload["pld"] for m in by_ty(messages, 1)]
    assert trip["stt"] == trip["edt"] == KEY_ON_MS and state is not None and state.trip_sent


def test_bodies_without_a_calendar_time_keep_the_trips_last_time_and_a_packet_without_any_time_is_kept_back() -> None:
    bad = BadTime(bytes((26, 13, 1, 0, 0, 0, 0)))
    later = KEY_ON + timedelta(hours=2)
    messages, _ = run([dtg(dtg_body(0), dtg_body(2)), dtg(dtg_body(3, time=bad)), dtg(dtg_body(7200), key_on=later)])
    (trip,) = [m.payload["pld"] for m in by_ty(messages, 1)]
    assert trip["edt"] == KEY_ON_MS + 2000 and trip["dtvt"] == 3  # the timeless body counted, not timed
    # neither a KEY ON nor any body with a calendar time, and no open trip: nothing to name a trip by
    nameless = dtg(dtg_body(0, time=bad), key_on=bad)
    assert map_record(nameless, None, packet_id="n") == ([], None)
    sent = TripState(tid=TID, key_on_ms=KEY_ON_MS, trip_sent=True)
    assert map_record(nameless, sent, packet_id="n") == ([], sent)


def _advanced(*bodies: DtgBody) -> Any:
    from dtgserver.bridge import trips

    raw = encode(dtg(*bodies))
    layout = realtime_layout(raw)
    assert layout is not None
    moved = trips.realtime_advance(raw, layout, None)
    assert moved is not None and moved.masks is not None
    return moved


def test_a_dtg_speed_sensor_fault_is_no_harsh_deceleration_through_the_packet_path() -> None:
    """The DTG bodies' device status reaches the detector from the packet's bytes: a drop of 20 km/h
    in a second is a harsh deceleration, but not while the body says the speed sensor is at fault
    (status 12; the GPS fault, 11, likewise for the heading behaviours)."""
    from dtgserver.bridge.driving import BIT

    def drive(status: int) -> list[int]:
        speeds = [60] * 5 + [40] * 5
        return list(_advanced(*(attrs.evolve(dtg_body(s, speed_kmh=v), status_code=status if s >= 4 else 0)
                                for s, v in enumerate(speeds))).masks)

    assert any(mask >> BIT["deceleration"] & 1 for mask in drive(0))
    assert not any(drive(12))


def test_idle_counts_standing_bodies_with_the_engine_running_through_the_packet_path() -> None:
    """The DTG bodies' RPM reaches the trip's measures from the packet's bytes: of ten standing
    seconds, the four with the engine off (RPM 0) are no idling."""
    from dtgserver.bridge.tripmetrics import TripMeter

    moved = _advanced(*(attrs.evolve(dtg_body(s, speed_kmh=0), rpm=0 if s < 4 else 800) for s in range(10)))
    assert moved.trip.meter is not None and TripMeter.from_list(moved.trip.meter).idle_s == 6


@pytest.mark.parametrize("times", [
    ["2026-11-21 23:59:58", "2026-11-21 23:59:59", "2026-11-22 00:00:00", "2026-11-22 00:00:01"],  # midnight
    ["2026-11-21 10:00:00", "2026-12-21 10:00:01"],  # another month, the same day of it
    ["2026-11-21 10:00:00", "2027-11-21 10:00:01"],  # another year, the same day of it
    ["2026-12-31 23:59:59", "2027-01-01 00:00:00"],  # new year
])
def test_body_times_across_a_day_month_or_year_are_each_bodys_own(times: list[str]) -> None:
    """The usual packet's times are computed from one midnight; a packet whose bodies are not all of
    one calendar day (a drive through midnight KST) gets each body's own time."""
    from datetime import datetime

    from dtgserver.bridge.trips import body_times_ms

    stamps = [datetime.fromisoformat(t).replace(tzinfo=KST) for t in times]
    raw = encode(dtg(*(dtg_body(0, time=t) for t in stamps)))
    layout = realtime_layout(raw)
    assert layout is not None
    assert body_times_ms(raw, layout) == [int(t.timestamp() * 1000) for t in stamps]
