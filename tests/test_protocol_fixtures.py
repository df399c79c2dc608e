"""Every fixture three ways through the framer (whole, byte by byte, back to back), to its JSON and
back to its bytes; the malformed ones to their error; and the spec samples' values checked by hand."""

from __future__ import annotations

import json
import math
from datetime import datetime

import pytest
from conftest import (
    MALFORMED_SAMPLES,
    REALISTIC_SAMPLES,
    SAMPLES,
    VALID_SAMPLES,
    Sample,
    check_ranges,
    load_sample,
    verify_frame,
)

from dtgserver.protocol import (
    CLOSED,
    KST,
    NEED_DATA,
    BasicInfo,
    Connection,
    DtgBody,
    DtgRealtime,
    KeyOff,
    MdtBody,
    MdtRealtime,
    ObdBody,
    ObdRealtime,
    Packet,
    ProtocolError,
    Received,
    Response,
    Result,
    Role,
    SensorState,
    StatusLog,
    WireStr,
    decode,
    encode,
    from_json,
    to_json,
)

ids = str


def role_for(data: bytes) -> Role:
    # A server reads the terminal's packets; only a client (the terminal) reads 0x09 answers.
    return Role.CLIENT if data[:1] == b"\x09" else Role.SERVER


def receive_all(conn: Connection) -> list[Received]:
    events = []
    while isinstance(event := conn.next_event(), Received):
        events.append(event)
    return events


def verify_record(record: Packet, expected: Packet) -> None:
    """Same kind, same values field by field (a failure names the field)."""
    assert type(record) is type(expected)
    for name in record.__attrs_attrs__:  # type: ignore[attr-defined]
        assert getattr(record, name.name) == getattr(expected, name.name), name.name


def verify_sample(sample: Sample, record: Packet) -> None:
    """The record is the fixture's JSON, re-encodes to the fixture's bytes, and passes the range check."""
    assert to_json(record) == sample.expected
    assert json.loads(json.dumps(to_json(record), ensure_ascii=False)) == sample.expected
    verify_frame(encode(record), sample.data)
    verify_frame(encode(from_json(sample.expected)), sample.data)
    check_ranges(record, realistic=sample in REALISTIC_SAMPLES)


# -- valid samples, three ways -----------------------------------------------------------------------


@pytest.mark.parametrize("sample", VALID_SAMPLES, ids=ids)
def test_whole(sample: Sample) -> None:
    conn = Connection(role_for(sample.data))
    conn.receive_data(sample.data)
    event = conn.next_event()
    assert isinstance(event, Received)
    assert (event.raw, event.offset) == (sample.data, 0)
    verify_sample(sample, event.record)
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    assert conn.next_event() is CLOSED
    verify_sample(sample, decode(sample.data))


@pytest.mark.parametrize("sample", VALID_SAMPLES, ids=ids)
def test_byte_by_byte(sample: Sample) -> None:
    conn = Connection(role_for(sample.data))
    for i in range(len(sample.data) - 1):
        conn.receive_data(sample.data[i:i + 1])
        assert conn.next_event() is NEED_DATA, f"after byte {i}"
        assert conn.buffered == i + 1
    conn.receive_data(sample.data[-1:])
    event = conn.next_event()
    assert isinstance(event, Received)
    verify_sample(sample, event.record)
    assert conn.next_event() is NEED_DATA
    assert conn.buffered == 0


@pytest.mark.parametrize("sample", VALID_SAMPLES, ids=ids)
def test_back_to_back(sample: Sample) -> None:
    # Before and after another packet of the same direction, in one chunk and then split mid-packet.
    other = load_sample("response_spec_sample" if sample.data[0] == 0x09 else "key_off_spec_sample")
    stream = other.data + sample.data + other.data
    for cut in (len(stream), len(other.data) + 5):
        conn = Connection(role_for(sample.data))
        conn.receive_data(stream[:cut])
        first = receive_all(conn)
        conn.receive_data(stream[cut:])
        conn.receive_data(b"")
        events = first + receive_all(conn)
        assert conn.next_event() is CLOSED
        assert [e.offset for e in events] == [0, len(other.data), len(other.data) + len(sample.data)]
        assert [e.raw for e in events] == [other.data, sample.data, other.data]
        verify_sample(sample, events[1].record)
        assert events[0].record == events[2].record == decode(other.data)


def test_every_packet_kind_has_a_spec_sample_and_a_realistic_sample() -> None:
    kinds = {s.name: s.expected["kind"] for s in VALID_SAMPLES}
    spec_kinds = {kind for name, kind in kinds.items() if "spec_sample" in name}
    assert spec_kinds == {"basic_info", "dtg", "key_off", "obd", "mdt", "status_log", "response"}
    realistic = {kind for name, kind in kinds.items() if "spec_sample" not in name}
    assert realistic >= {"basic_info", "dtg", "key_off", "obd", "mdt", "status_log"}
    assert load_sample("status_log_alias_0x99").expected["protocol_id"] == 0x99


# -- malformed samples ---------------------------------------------------------------------------------


def verify_error(error: ProtocolError, sample: Sample) -> None:
    assert error.offset == sample.error_offset
    assert error.result is Result.FORMAT_ERROR and int(error.result) == 1
    assert sample.error_message is not None and sample.error_message in error.message
    assert str(error) == f"at byte {sample.error_offset}: {error.message}"


def feed(sample: Sample, chunk_size: int) -> tuple[list[Received], ProtocolError]:
    conn = Connection(Role.ANY)
    events: list[Received] = []
    chunks = [sample.data[i:i + chunk_size] for i in range(0, len(sample.data), chunk_size)] + [b""]
    with pytest.raises(ProtocolError) as caught:
        for chunk in chunks:
            conn.receive_data(chunk)
            while isinstance(event := conn.next_event(), Received):
                events.append(event)
    # The stream has lost its framing: the same error from then on, whatever comes next.
    conn_error = caught.value
    with pytest.raises(ProtocolError) as again:
        conn.next_event()
    assert again.value.offset == conn_error.offset
    return events, conn_error


@pytest.mark.parametrize("sample", MALFORMED_SAMPLES, ids=ids)
@pytest.mark.parametrize("chunk_size", [1, 3, 10_000])
def test_malformed(sample: Sample, chunk_size: int) -> None:
    events, error = feed(sample, chunk_size)
    verify_error(error, sample)
    assert [to_json(e.record) for e in events] == (sample.expected or [])


@pytest.mark.parametrize("sample", [s for s in MALFORMED_SAMPLES if not s.expected], ids=ids)
def test_malformed_decode(sample: Sample) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode(sample.data)
    assert caught.value.offset == sample.error_offset
    assert caught.value.result == 1


def test_malformed_header_is_rejected_before_the_bodies_arrive() -> None:
    # The body count is refused as soon as its 2 bytes are in: nothing unbounded is buffered.
    sample = load_sample("mdt_body_count_above_max")
    conn = Connection(Role.SERVER)
    conn.receive_data(sample.data[:15])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(sample.data[15:16])
    with pytest.raises(ProtocolError):
        conn.next_event()


def test_fixture_files_come_in_pairs() -> None:
    for sample in SAMPLES:
        assert sample.expected is not None or sample.malformed, f"{sample.name}: no .json and no .error"


# -- the spec's samples, value by value, against the spec's tables --------------------------------------
# Expected values are computed by hand from the HEX column (docs/protocol.md, Rulings: the HEX wins).

SPEC_TIME = datetime(2012, 10, 25, 15, 30, 45, tzinfo=KST)  # 0C 0A 19 0F 1E 2D 00
SPEC_LON = 127.022592  # 07 92 36 00 = 127022592
SPEC_LAT = 34.382095  # 02 0C A1 0F = 34382095 (DEC column: 37527823, a typo in the sample)


def test_spec_sample_basic_info() -> None:
    record = decode(load_sample("basic_info_spec_sample").data)
    verify_record(record, BasicInfo(
        modem="01099998888", model="AAAAAAA", vin="KMHFC41MP6A123456", vehicle_type="21",
        registration_number="서울33가1234", business_number="XXXYYZZZZZ", driver_code="123456789212345672",
        firmware_version="1001",
    ))
    assert isinstance(record, BasicInfo)
    # Raw digit bytes 00 01 00 are not the canonical '0' '1' '0': kept, so they encode back.
    assert isinstance(record.modem, WireStr) and record.modem.wire == bytes.fromhex("0001003939393938383838")
    assert isinstance(record.firmware_version, WireStr)
    assert not isinstance(record.registration_number, WireStr)


def test_spec_sample_dtg() -> None:
    record = decode(load_sample("dtg_spec_sample").data)
    verify_record(record, DtgRealtime("01099998888", 1, SPEC_TIME, [DtgBody(
        daily_distance_km=180,  # 00 B4 (DEC column says 123)
        total_distance_km=123456,  # 00 01 E2 40
        time=SPEC_TIME, speed_kmh=80, rpm=2500, brake=True, lon=SPEC_LON, lat=SPEC_LAT, azimuth_deg=90,
        accel_x_ms2=12.3, accel_y_ms2=12.3,  # 00 7B = 123, m/s² × 10
        status_code=0,
        daily_fuel_l=123.456,  # 00 01 E2 40 = 123456, L × 1000
        total_fuel_l=123456.789,  # 07 5B CD 15 = 123456789
        fuel_level_pct=0.0,
        temp_a_c=12.3, temp_b_c=-12.3,  # 00 7B, FF 85 = -123
        battery_v=2.5,  # 00 19 = 25, V × 10 (DEC column says 25.0 V)
        fuel_efficiency_kmpl=1.0,  # 00 0A = 10, km/L × 10 (DEC column says 10.0)
        work_status=0,
    )]))


def test_spec_sample_obd() -> None:
    record = decode(load_sample("obd_spec_sample").data)
    verify_record(record, ObdRealtime("01099998888", 1, SPEC_TIME, [ObdBody(
        daily_distance_km=180, total_distance_km=123456, time=SPEC_TIME, speed_kmh=80, rpm=2500,
        lon=SPEC_LON, lat=SPEC_LAT, azimuth_deg=90,
        daily_fuel_l=123.456, total_fuel_l=123456.789,  # cc on the wire: 123456 cc = 123.456 L
        temp_a_c=12.3, temp_b_c=-12.3, battery_v=2.5, fuel_efficiency_kmpl=1.0,
    )]))


def test_spec_sample_mdt() -> None:
    record = decode(load_sample("mdt_spec_sample").data)
    verify_record(record, MdtRealtime("01099998888", 1, SPEC_TIME, [MdtBody(
        daily_distance_km=180, total_distance_km=123456, time=SPEC_TIME, speed_kmh=80,
        lon=SPEC_LON, lat=SPEC_LAT, azimuth_deg=90, temp_a_c=12.3, temp_b_c=-12.3, battery_v=2.5,
    )]))


def test_spec_sample_key_off() -> None:
    record = decode(load_sample("key_off_spec_sample").data)
    verify_record(record, KeyOff("01099998888", SPEC_TIME, SPEC_LON, SPEC_LAT, SPEC_TIME, 2.5))


def test_spec_sample_status_log_and_its_alias() -> None:
    record = decode(load_sample("status_log_spec_sample").data)
    assert isinstance(record, StatusLog)
    verify_record(record, StatusLog("01099998888", SPEC_TIME,
                                    "2012-10-25 15:30:40 BOOT fw=1001 gps=ok modem=ok dtg=ok\r\n   "))
    assert record.log_size == 60 and record.protocol_id == 0x63
    alias = decode(load_sample("status_log_alias_0x99").data)
    verify_record(alias, StatusLog("01099998888", SPEC_TIME, "GPS FIX OK\r\n", protocol_id=0x99))
    assert alias.protocol_id == 0x99 and encode(alias)[0] == 0x99


def test_spec_sample_response() -> None:
    record = decode(load_sample("response_spec_sample").data)
    verify_record(record, Response(Result.FORMAT_ERROR))
    assert to_json(record)["modem"] is None


# -- the realistic samples: values checked against the drive they describe ----------------------------


def test_seoul_bus_minute() -> None:
    record = decode(load_sample("dtg_seoul_bus_60").data)
    assert isinstance(record, DtgRealtime)
    assert record.body_count == 60 and len(load_sample("dtg_seoul_bus_60").data) == 23 + 60 * 51
    assert record.key_on_time == datetime(2024, 3, 14, 5, 40, 12, 370000, tzinfo=KST)  # ... 0C 25
    first, last = record.bodies[0], record.bodies[-1]
    # Body 0 by hand: 07 92 49 A5 = 127027621, 02 3C 2C 56 = 37497942 (Gangnam station),
    # 01 5C = 348°, 00 00 53 88 = 21384 mL, 18 CE = 6350 = 63.50 %, 03 DE = 990 (no sensor), 01 13 = 27.5 V.
    assert (first.lon, first.lat, first.azimuth_deg) == (127.027621, 37.497942, 348)
    assert (first.speed_kmh, first.rpm, first.brake) == (0, 650, True)
    assert (first.daily_fuel_l, first.total_fuel_l, first.fuel_level_pct) == (21.384, 512345.678, 63.5)
    assert first.temp_a_c is first.temp_b_c is SensorState.ABSENT
    assert (first.battery_v, first.fuel_efficiency_kmpl, first.work_status) == (27.5, 2.3, 5)
    assert [b.time for b in record.bodies] == [datetime(2024, 3, 14, 8, 12, s, tzinfo=KST) for s in range(60)]
    speeds = [b.speed_kmh for b in record.bodies]
    assert speeds[:5] == [0] * 5 and speeds[16:] == [50] * 44  # stopped, then 1.2 m/s² up to 50 km/h
    assert speeds == sorted(speeds)
    assert all(b.brake for b in record.bodies[:4]) and not any(b.brake for b in record.bodies[4:])
    # Northbound (azimuth 348°): latitude grows, longitude shrinks. In 59 s: 12 s from 0 to
    # 50 km/h (about 83 m) then 43 s at 13.9 m/s (about 597 m): about 680 m.
    assert last.lat > first.lat and last.lon < first.lon
    north_m = (last.lat - first.lat) * 111_320
    east_m = (last.lon - first.lon) * 111_320 * math.cos(math.radians(first.lat))
    assert 660 < math.hypot(north_m, east_m) < 700
    assert math.degrees(math.atan2(east_m, north_m)) % 360 == pytest.approx(348, abs=0.5)
    assert (first.daily_distance_km, last.daily_distance_km) == (37, 38)
    assert last.total_fuel_l - first.total_fuel_l == pytest.approx(last.daily_fuel_l - first.daily_fuel_l)


def test_reefer_temperatures_and_highway_obd() -> None:
    mdt = decode(load_sample("mdt_incheon_reefer_15").data)
    assert isinstance(mdt, MdtRealtime)
    assert {b.temp_b_c for b in mdt.bodies} == {SensorState.OFF}  # 03 D4 = 980: sensor off
    assert all(-18.5 < b.temp_a_c < -18.0 for b in mdt.bodies)  # type: ignore[operator]
    body_json = to_json(mdt)["bodies"][0]
    assert (body_json["temp_a_state"], body_json["temp_b_c"], body_json["temp_b_state"]) == ("ok", None, "off")
    obd = decode(load_sample("obd_busan_highway_20").data)
    assert isinstance(obd, ObdRealtime)
    assert all(97 <= b.speed_kmh <= 103 for b in obd.bodies)
    assert to_json(obd)["bodies"][0]["temp_a_state"] == "absent"


def test_korean_text() -> None:
    truck = decode(load_sample("basic_info_gyeonggi_truck").data)
    assert isinstance(truck, BasicInfo)
    assert (truck.registration_number, truck.model) == ("경기12바3456", "한국DTG-T1")
    assert encode(truck)[51:63] == "경기12바3456".encode("euc-kr") == bytes.fromhex("B0E6B1E2 3132 B9D9 33343536")
    log = decode(load_sample("status_log_korean").data)
    assert isinstance(log, StatusLog)
    assert "GPS 수신 불량" in log.log and log.log_size == len(log.log.encode("euc-kr")) == 70


def test_fractions_of_a_second_in_json() -> None:
    key_off = to_json(decode(load_sample("key_off_pyeongtaek").data))
    assert key_off["sent_time"] == "2024-05-20T23:40:00.25+09:00"  # cc = 0x19 = 25
    assert key_off["key_off_time"] == "2024-05-20T23:30:00+09:00"  # cc = 0: no fraction


def test_out_of_range_sample_warns_and_keeps_everything() -> None:
    sample = load_sample("dtg_out_of_range")
    record = decode(sample.data)
    warned = {w.split(":")[0] for w in record.warnings}
    assert warned == {"key_on_time", "bodies[0].time", "bodies[0].brake", "bodies[0].lat", "bodies[0].azimuth_deg"}
    assert isinstance(record, DtgRealtime)
    body = record.bodies[0]
    assert (body.brake, body.lat, body.azimuth_deg) == (2, 95.0, 400)
    assert (body.temp_a_c, body.temp_b_c) == (SensorState.ABSENT, SensorState.OFF)
    assert sample.expected["verbatim"] == {"key_on_time": "180d0109000000"}
    verify_frame(encode(from_json(sample.expected)), sample.data)
