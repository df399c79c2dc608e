"""Property tests: round trips both ways for every packet kind, the JSON round trip, warnings for
out-of-range values, and the framer's contract (any bytes, any chunking: ProtocolError or packets)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import check_ranges, load_sample, verify_frame
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from dtgserver.protocol import (
    PACKET_TYPES,
    BadTime,
    BasicInfo,
    Connection,
    DtgRealtime,
    MdtRealtime,
    ObdRealtime,
    Packet,
    ProtocolError,
    Realtime,
    Received,
    Role,
    SensorState,
    StatusLog,
    WireStr,
    decode,
    encode,
    from_json,
    iter_packets,
    to_json,
)
from dtgserver.protocol.codec import schema_fields
from dtgserver.protocol.schema import Bodies
from dtgserver.testing import (
    FIXED_SIZES,
    REALTIME_BODY_SIZES,
    STATUS_LOG_IDS,
    chunkings,
    damaged_streams,
    frames,
    packets,
    records,
)

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ALL_IDS = sorted({*REALTIME_BODY_SIZES, *STATUS_LOG_IDS, *FIXED_SIZES})


def verify_json_round_trip(record: Packet) -> None:
    obj = to_json(record)
    assert from_json(obj) == record
    # Through real JSON text: what `decode | encode` does. Values equal is not enough (a WireStr
    # equals its text): the bytes must be the same too.
    again = from_json(json.loads(json.dumps(obj, ensure_ascii=False)))
    verify_frame(encode(again), encode(record))
    assert to_json(again) == obj


def feed(conn: Connection, chunks: list[bytes]) -> list[Received]:
    events: list[Received] = []
    for chunk in [*chunks, b""]:
        conn.receive_data(chunk)
        while isinstance(event := conn.next_event(), Received):
            events.append(event)
    return events


# -- record -> bytes -> record ---------------------------------------------------------------------------


@pytest.mark.parametrize("cls", PACKET_TYPES, ids=lambda c: c.KIND)
@SETTINGS
@given(data=st.data())
def test_record_bytes_record(cls: type[Packet], data: st.DataObject) -> None:
    record = data.draw(records(cls))
    raw = encode(record)
    decoded = decode(raw)
    assert decoded == record
    verify_frame(encode(decoded), raw)
    assert record.warnings == decoded.warnings == []  # valid values: nothing to warn about
    texts = [getattr(decoded, a.name) for a in decoded.__attrs_attrs__]  # type: ignore[attr-defined]
    assert not any(isinstance(t, WireStr) for t in texts)  # canonical text needs no verbatim bytes
    [event] = feed(Connection(Role.ANY), data.draw(chunkings(raw)))
    assert event.record == record and event.raw == raw


# -- bytes -> record -> bytes -----------------------------------------------------------------------------


@pytest.mark.parametrize("protocol_id", ALL_IDS, ids=lambda p: f"0x{p:02X}")
@SETTINGS
@given(data=st.data())
def test_bytes_record_bytes(protocol_id: int, data: st.DataObject) -> None:
    raw = data.draw(frames((protocol_id,)))
    record = decode(raw)  # arbitrary text and times decode too: as WireStr and BadTime
    verify_frame(encode(record), raw)
    check_ranges(record, realistic=False)  # every out-of-range value found here is in warnings
    verify_json_round_trip(record)


@SETTINGS
@given(st.lists(frames(), min_size=1, max_size=4), st.data())
def test_frames_back_to_back_in_any_chunking(stream: list[bytes], data: st.DataObject) -> None:
    joined = b"".join(stream)
    events = feed(Connection(Role.ANY), data.draw(chunkings(joined)))
    assert [e.raw for e in events] == stream
    offsets = [sum(map(len, stream[:i])) for i in range(len(stream))]
    assert [e.offset for e in events] == offsets
    assert [e.record for e in iter_packets(joined)] == [e.record for e in events]


@pytest.mark.parametrize("protocol_id", ALL_IDS, ids=lambda p: f"0x{p:02X}")
@SETTINGS
@given(data=st.data())
def test_the_framer_refuses_only_what_decode_refuses_and_its_record_is_decodes(protocol_id: int,
                                                                              data: st.DataObject) -> None:
    """A realtime packet's bodies are decoded only when `record` is read: every frame that passes
    the framer's header check must then decode, and to what `decode` gives, with the same header."""
    raw = data.draw(frames((protocol_id,)))
    if protocol_id != 0x09 and data.draw(st.booleans(), label="modem of letters"):  # can be refused
        raw = raw[:1] + b"0104x5678ab" + raw[12:]
    try:
        expected = decode(raw)
    except ProtocolError as e:
        with pytest.raises(ProtocolError) as framed:
            list(iter_packets(raw))
        assert str(framed.value) == str(e)
        return
    [event] = iter_packets(raw)
    assert (event.kind, event.protocol_id) == (expected.KIND, expected.protocol_id)
    assert event.modem == expected.modem and type(event.modem) is type(expected.modem)  # a WireStr stays one
    assert event.body_count == getattr(expected, "body_count", 0)
    assert event.record == expected and event.record is event.record  # decoded once


# -- JSON ---------------------------------------------------------------------------------------------------


@SETTINGS
@given(packets())
def test_json_round_trip(record: Packet) -> None:
    verify_json_round_trip(record)
    obj = to_json(record)
    assert obj["kind"] == record.KIND and obj["protocol_id"] == record.protocol_id
    assert "verbatim" not in obj and "warnings" not in obj


# -- the framer's contract: ProtocolError or packets, never anything else -------------------------------


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=400), damaged_streams()), st.data(), st.sampled_from(list(Role)),
       st.integers(1, 8))
@example(b"\x03" + b"0" * 11 + b"\x00\x01\x7f\xff", None, Role.SERVER, 3600)  # 32767 bodies
@example(b"\x63" + b"0" * 11 + bytes(7) + b"\x80\x00", None, Role.SERVER, 3600)  # log size -32768
def test_any_bytes_raise_only_protocol_error(data: bytes, draw: Any, role: Role, max_body_count: int) -> None:
    chunks = draw.draw(chunkings(data)) if draw is not None else [data]
    conn = Connection(role, max_body_count=max_body_count)
    events: list[Received] = []
    try:
        events = feed_collecting(conn, chunks, events)
    except ProtocolError as error:
        assert error.result == 1
        assert error.offset is not None and 0 <= error.offset <= len(data)
        # The buffer holds at most one frame's worth: what was fed since the last packet.
        assert conn.buffered <= len(data) - sum(len(e.raw) for e in events)
    consumed = b"".join(e.raw for e in events)
    assert data.startswith(consumed)
    for event in events:
        verify_frame(encode(event.record), event.raw)


def feed_collecting(conn: Connection, chunks: list[bytes], events: list[Received]) -> list[Received]:
    for chunk in [*chunks, b""]:
        conn.receive_data(chunk)
        while isinstance(event := conn.next_event(), Received):
            events.append(event)
    return events


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_decode_and_iter_packets_raise_only_protocol_error(data: bytes) -> None:
    for call in (decode, lambda d: list(iter_packets(d))):
        try:
            call(data)
        except ProtocolError as error:
            assert error.result == 1


# -- out of range: warned, kept, never a failed packet --------------------------------------------------


def field_offset(schema: Any, field: str) -> int:
    offset = 0
    for name, adapter in schema_fields(schema):
        if name == field:
            return offset
        offset += 0 if isinstance(adapter, Bodies) else adapter.size
    raise KeyError(field)


def be(value: int, size: int) -> bytes:
    return value.to_bytes(size, "big", signed=True)


# (body field, strategy of wire bytes outside the documented range, what the value then is)
OUT_OF_RANGE_BODY = {
    "lat": st.one_of(st.integers(90_000_001, 2**31 - 1), st.integers(-(2**31), -90_000_001)).map(lambda v: be(v, 4)),
    "lon": st.one_of(st.integers(180_000_001, 2**31 - 1), st.integers(-(2**31), -180_000_001)).map(lambda v: be(v, 4)),
    "azimuth_deg": st.one_of(st.integers(361, 32767), st.integers(-32768, -1)).map(lambda v: be(v, 2)),
    "battery_v": st.one_of(st.integers(1000, 32767), st.integers(-32768, -1)).map(lambda v: be(v, 2)),
    "speed_kmh": st.nothing(),  # a byte: 0-255 is the whole documented range
    "daily_distance_km": st.one_of(st.integers(10_000, 32767), st.integers(-32768, -1)).map(lambda v: be(v, 2)),
    # month 13-255 (time bytes YY MM DD hh mm ss cc)
    "time": st.tuples(st.integers(0, 255), st.integers(13, 255)).map(lambda t: bytes([t[0], t[1], 1, 0, 0, 0, 0])),
}
DTG_ONLY = {
    "brake": st.integers(2, 255).map(lambda v: bytes([v])),
    "work_status": st.integers(13, 255).map(lambda v: bytes([v])),
    "accel_x_ms2": st.one_of(st.integers(1001, 32767), st.integers(-32768, -1001)).map(lambda v: be(v, 2)),
    "fuel_level_pct": st.one_of(st.integers(10_001, 32767), st.integers(-32768, -1)).map(lambda v: be(v, 2)),
}


@pytest.mark.parametrize("cls", [DtgRealtime, ObdRealtime, MdtRealtime], ids=lambda c: c.KIND)
@SETTINGS
@given(data=st.data())
def test_out_of_range_body_values_warn_and_keep(cls: type[Any], data: st.DataObject) -> None:
    record = data.draw(records(cls, max_bodies=2))
    raw = bytearray(encode(record))
    fields = {name for name, _ in schema_fields(cls.BODY.SCHEMA)}
    cases = {**OUT_OF_RANGE_BODY, **(DTG_ONLY if cls is DtgRealtime else {})}
    field = data.draw(st.sampled_from(sorted(f for f in cases if f in fields and f != "speed_kmh")))
    index = data.draw(st.integers(0, len(record.bodies) - 1))
    wire = data.draw(cases[field])
    at = 23 + index * cls.BODY.SCHEMA.sizeof() + field_offset(cls.BODY.SCHEMA, field)
    raw[at:at + len(wire)] = wire
    decoded = decode(bytes(raw))  # never fails the packet
    assert any(w.startswith(f"bodies[{index}].{field}: ") for w in decoded.warnings), decoded.warnings
    assert len(decoded.warnings) == 1
    verify_frame(encode(decoded), bytes(raw))  # and keeps the value exactly as sent
    check_ranges(decoded, realistic=False)
    obj = to_json(decoded)
    assert obj["warnings"] == decoded.warnings
    verify_frame(encode(from_json(json.loads(json.dumps(obj)))), bytes(raw))


@pytest.mark.parametrize(("wire", "state"), [(990, SensorState.ABSENT), (980, SensorState.OFF)])
@SETTINGS
@given(data=st.data())
def test_temperature_codes_are_states_not_readings(wire: int, state: SensorState, data: st.DataObject) -> None:
    cls = data.draw(st.sampled_from([DtgRealtime, ObdRealtime, MdtRealtime]))
    record = data.draw(records(cls, max_bodies=1))
    field = data.draw(st.sampled_from(["temp_a_c", "temp_b_c"]))
    raw = bytearray(encode(record))
    at = 23 + field_offset(cls.BODY.SCHEMA, field)
    raw[at:at + 2] = be(wire, 2)
    decoded = decode(bytes(raw))
    assert isinstance(decoded, Realtime)
    assert getattr(decoded.bodies[0], field) is state
    assert decoded.warnings == []
    body = to_json(decoded)["bodies"][0]
    state_key = field.removesuffix("_c") + "_state"
    assert (body[field], body[state_key]) == (None, state.value)


def test_header_time_and_code_tables_warn() -> None:
    # month 13 in the header's KEY ON time; the body is the spec sample's (all in range)
    body = load_sample("dtg_spec_sample").data[23:]
    record = decode(bytes.fromhex("03" + "30" * 11 + "0001" + "0001" + "180d0109000000") + body)
    assert record.warnings == ["key_on_time: 2024-13-01 09:00:00.00 is not a calendar time"]
    assert isinstance(record, DtgRealtime) and record.key_on_time == BadTime(bytes.fromhex("180d0109000000"))
    # cc 100: hundredths above 99 are no time either
    key_off = decode(bytes.fromhex("04" + "30" * 11 + "18051417280064" + "00" * 8 + "18051417280000" + "0000"))
    assert [w.split(":")[0] for w in key_off.warnings] == ["sent_time"]
    assert to_json(key_off)["verbatim"] == {"sent_time": "18051417280064"}
    info = BasicInfo("0101", "M", "V", "99", "서울33가1234", "1", "2", "3")
    assert info.warnings == ["vehicle_type: '99' is not in the code table"]
    assert decode(encode(info)).warnings == info.warnings
    # a vehicle type that is no text at all says so, not that it is missing from the table
    raw = bytearray(encode(info))
    raw[49:51] = b"\xff\xff"
    assert decode(bytes(raw)).warnings == ["vehicle_type: bytes ffff are not CP949 text"]


@SETTINGS
@given(st.binary(min_size=1, max_size=40))
def test_any_log_bytes_are_kept(log: bytes) -> None:
    raw = bytes([0x63]) + b"01012345678" + bytes([24, 3, 14, 8, 30, 5, 0]) + len(log).to_bytes(2, "big") + log
    record = decode(raw)
    assert isinstance(record, StatusLog)
    assert record.log_size == len(log)
    verify_frame(encode(record), raw)
    assume(isinstance(record.log, WireStr))
    assert to_json(record)["verbatim"]["log"] == log.hex()


NOT_DIGITS = st.integers(0, 255).filter(lambda b: b > 0x09 and not 0x30 <= b <= 0x39 and b != 0x23)


@SETTINGS
@given(frames(tuple(p for p in ALL_IDS if p != 0x09)), st.data())
def test_a_modem_with_anything_but_digits_is_a_format_error(raw: bytes, data: st.DataObject) -> None:
    at = data.draw(st.integers(1, 11))
    bad_modem = raw[:at] + bytes([data.draw(NOT_DIGITS)]) + raw[at + 1:]
    with pytest.raises(ProtocolError, match="is not digits") as caught:
        decode(bad_modem)
    assert (caught.value.offset, caught.value.result) == (1, 1)
