"""The public JSON format (docs/protocol.md): keys per kind, times, temperature states, `verbatim`,
`warnings`, and the errors `from_json` gives for JSON that describes no packet."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from typing import Any

import attrs
import pytest
from conftest import REALISTIC_SAMPLES, Sample, load_sample
from hypothesis import given, settings
from hypothesis import strategies as st

from dtgserver.protocol import (
    KST,
    BadTime,
    JsonError,
    KeyOff,
    Packet,
    SensorState,
    StatusLog,
    WireStr,
    decode,
    dumps,
    encode,
    format_table,
    format_time,
    from_json,
    to_json,
)
from dtgserver.testing import dtg, key_off, packets, status_log

BODY_KEYS = {
    "dtg": ["daily_distance_km", "total_distance_km", "time", "speed_kmh", "rpm", "brake", "lon", "lat",
            "azimuth_deg", "accel_x_ms2", "accel_y_ms2", "status_code", "daily_fuel_l", "total_fuel_l",
            "fuel_level_pct", "temp_a_c", "temp_a_state", "temp_b_c", "temp_b_state", "battery_v",
            "fuel_efficiency_kmpl", "work_status"],
    "obd": ["daily_distance_km", "total_distance_km", "time", "speed_kmh", "rpm", "lon", "lat", "azimuth_deg",
            "daily_fuel_l", "total_fuel_l", "temp_a_c", "temp_a_state", "temp_b_c", "temp_b_state", "battery_v",
            "fuel_efficiency_kmpl"],
    "mdt": ["daily_distance_km", "total_distance_km", "time", "speed_kmh", "lon", "lat", "azimuth_deg",
            "temp_a_c", "temp_a_state", "temp_b_c", "temp_b_state", "battery_v"],
}
HEADER = ["kind", "protocol_id", "modem"]
PACKET_KEYS = {
    "basic_info": [*HEADER, "model", "vin", "vehicle_type", "registration_number", "business_number",
                   "driver_code", "firmware_version"],
    "dtg": [*HEADER, "report_period_min", "body_count", "key_on_time", "bodies"],
    "key_off": [*HEADER, "sent_time", "lon", "lat", "key_off_time", "battery_v"],
    "status_log": [*HEADER, "sent_time", "log_size", "log"],
    "response": [*HEADER, "result"],
}
PACKET_KEYS["obd"] = PACKET_KEYS["mdt"] = PACKET_KEYS["dtg"]


@pytest.mark.parametrize("name", ["basic_info_seoul_bus", "dtg_seoul_bus_60", "key_off_pyeongtaek",
                                  "obd_busan_highway_20", "mdt_incheon_reefer_15", "status_log_korean",
                                  "response_spec_sample"])
def test_keys_in_wire_order(name: str) -> None:
    obj = to_json(decode(load_sample(name).data))
    assert list(obj) == PACKET_KEYS[obj["kind"]]
    for body in obj.get("bodies", []):
        assert list(body) == BODY_KEYS[obj["kind"]]


def test_types() -> None:
    obj = to_json(decode(load_sample("dtg_seoul_bus_60").data))
    body = obj["bodies"][0]
    assert isinstance(obj["modem"], str) and isinstance(obj["protocol_id"], int)
    assert isinstance(body["brake"], bool)
    assert all(isinstance(body[k], float) for k in ("lon", "lat", "accel_x_ms2", "battery_v", "daily_fuel_l"))
    assert all(type(body[k]) is int for k in ("speed_kmh", "rpm", "azimuth_deg", "status_code", "work_status"))


def test_times_are_iso_8601_with_offset_and_hundredths_only_when_non_zero() -> None:
    assert format_time(datetime(2012, 10, 25, 15, 30, 45, tzinfo=KST)) == "2012-10-25T15:30:45+09:00"
    assert format_time(datetime(2012, 10, 25, 15, 30, 45, 500000, tzinfo=KST)) == "2012-10-25T15:30:45.5+09:00"
    assert format_time(datetime(2012, 10, 25, 15, 30, 45, 70000, tzinfo=KST)) == "2012-10-25T15:30:45.07+09:00"
    # A time given in another offset is the same instant, sent as KST.
    record = KeyOff("0101", datetime.fromisoformat("2012-10-25T06:30:45+00:00"), 127.0, 37.5,
                    datetime(2012, 10, 25, 15, 30, tzinfo=KST), 12.0)
    assert encode(record)[12:19] == bytes([12, 10, 25, 15, 30, 45, 0])
    assert to_json(decode(encode(record)))["sent_time"] == "2012-10-25T15:30:45+09:00"


def test_temperature_states() -> None:
    body = to_json(decode(load_sample("dtg_out_of_range").data))["bodies"][0]
    assert (body["temp_a_c"], body["temp_a_state"], body["temp_b_c"], body["temp_b_state"]) == \
        (None, "absent", None, "off")
    obj = to_json(decode(load_sample("mdt_incheon_reefer_15").data))
    obj["bodies"][0].pop("temp_a_state")  # a reading alone means "ok"
    obj["bodies"][0]["temp_b_state"] = "absent"  # and a state alone needs no reading
    record = from_json(obj)
    assert record.bodies[0].temp_a_c == -18.4  # type: ignore[attr-defined]
    assert record.bodies[0].temp_b_c is SensorState.ABSENT  # type: ignore[attr-defined]


def test_verbatim_keeps_non_canonical_wire_text() -> None:
    obj = to_json(decode(load_sample("basic_info_spec_sample").data))
    assert obj["modem"] == "01099998888" and obj["firmware_version"] == "1001"
    assert obj["verbatim"] == {"modem": "0001003939393938383838", "firmware_version": "23232323232301000001"}
    record = from_json(obj)
    assert isinstance(record.modem, WireStr)
    without = {k: v for k, v in obj.items() if k != "verbatim"}  # canonical ASCII digits then
    assert encode(from_json(without))[1:12] == b"01099998888"


def test_verbatim_must_agree_with_the_value() -> None:
    obj = to_json(decode(load_sample("basic_info_spec_sample").data))
    obj["modem"] = "01099998887"
    with pytest.raises(JsonError, match="modem: verbatim 0001003939393938383838 does not decode to '01099998887'"):
        from_json(obj)


def test_bad_times_round_trip_through_verbatim() -> None:
    sample = load_sample("dtg_out_of_range")
    record = decode(sample.data)
    assert isinstance(record.key_on_time, BadTime)  # type: ignore[attr-defined]
    assert sample.expected["key_on_time"] is None
    assert encode(from_json(sample.expected)) == sample.data


def test_response_has_no_modem() -> None:
    obj = to_json(decode(b"\x09\x04"))
    assert obj == {"kind": "response", "protocol_id": 9, "modem": None, "result": 4}


def test_status_log_alias_and_default_id() -> None:
    base: dict[str, Any] = {"kind": "status_log", "modem": "0101", "sent_time": "2024-03-14T08:30:05+09:00",
                            "log": "GPS 수신 정상"}
    assert encode(from_json(base))[0] == 0x63
    assert encode(from_json({**base, "protocol_id": 0x99}))[0] == 0x99
    record = from_json(base)
    assert isinstance(record, StatusLog) and record.log_size == len("GPS 수신 정상".encode("euc-kr")) == 13


def bad(obj: dict[str, Any], match: str) -> None:
    with pytest.raises(JsonError, match=match):
        from_json(obj)


def spec_key_off() -> dict[str, Any]:
    return json.loads(json.dumps(load_sample("key_off_pyeongtaek").expected))  # type: ignore[no-any-return]


def test_json_errors_name_the_key() -> None:
    bad([], "^expected a JSON object, got list$")  # type: ignore[arg-type]
    bad({"kind": "gps"}, "^kind must be one of basic_info, dtg, key_off, obd, mdt, status_log, response, got .gps.$")
    bad({**spec_key_off(), "lat": "north"}, "lat: expected a number")
    bad({**spec_key_off(), "lat": 37.1234567}, "lat: 37.1234567 is not a multiple of 1/1000000")
    bad({**spec_key_off(), "sent_time": "yesterday"}, "sent_time: expected an ISO 8601 time")
    bad({**spec_key_off(), "sent_time": "2024-05-20T23:40:00.123+09:00"}, "finer than the wire's 1/100 s")
    bad({**spec_key_off(), "modem": "0101-2345"}, "modem: modem must be 1 to 11 digits")
    bad({**spec_key_off(), "protocol_id": 3}, "protocol_id: 3 is not key_off's 4")
    bad({k: v for k, v in spec_key_off().items() if k != "battery_v"}, "battery_v: missing")
    bad({**spec_key_off(), "battery_v": 1e9}, r"battery_v: 1000000000.0 does not fit its wire type \(h\)")
    bad({**spec_key_off(), "lon": 2148.0}, "lon: 2148.0 does not fit")
    dtg = to_json(decode(load_sample("dtg_spec_sample").data))
    bad({**dtg, "bodies": []}, "bodies: expected a non-empty list of bodies")
    bad({**dtg, "body_count": 2}, "body_count: 2 does not match the data")
    body = {**dtg["bodies"][0], "temp_a_state": "warm"}
    bad({**dtg, "bodies": [body]}, r"bodies\[0\].temp_a_c: temp_a_state must be ok, absent or off")
    info = to_json(decode(load_sample("basic_info_seoul_bus").data))
    bad({**info, "registration_number": "서울74사12345"}, "registration_number: .* is not EUC-KR text of at most 12")
    bad({**info, "model": "똠"}, "model: '똠' is not EUC-KR text")  # outside KS X 1001: no EUC-KR bytes


@pytest.mark.parametrize("name", ["dtg_seoul_bus_60", "basic_info_gyeonggi_truck", "status_log_alias_0x99"])
def test_json_text_round_trip(name: str) -> None:
    sample = load_sample(name)
    record: Packet = from_json(json.loads(json.dumps(sample.expected, ensure_ascii=False)))
    assert encode(record) == sample.data


def test_values_beyond_the_wire_type_name_their_body() -> None:
    dtg = to_json(decode(load_sample("dtg_seoul_bus_60").data))
    dtg["bodies"][7]["rpm"] = 99999  # a short on the wire
    with pytest.raises(JsonError, match=r"^bodies\[7\]\.rpm: 99999 does not fit its wire type"):
        from_json(dtg)


ISO_KST = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d?[1-9])?\+09:00")
TIME_KEYS = ("time", "key_on_time", "sent_time", "key_off_time")


def time_strings(obj: dict[str, Any]) -> list[str]:
    parts = [obj, *obj.get("bodies", [])]
    return [part[k] for part in parts for k in TIME_KEYS if part.get(k) is not None]


@pytest.mark.parametrize("sample", REALISTIC_SAMPLES, ids=str)
def test_every_time_is_iso_8601_kst(sample: Sample) -> None:
    times = time_strings(to_json(decode(sample.data)))
    assert times or sample.expected["kind"] in ("basic_info", "response")
    for text in times:
        assert ISO_KST.fullmatch(text), text  # offset always; 1 or 2 fraction digits, never trailing 0


@settings(max_examples=50, deadline=None)
@given(packets())
def test_generated_times_are_iso_8601_kst(record: Packet) -> None:
    for text in time_strings(to_json(record)):
        assert ISO_KST.fullmatch(text), text
        assert datetime.fromisoformat(text).utcoffset() == timedelta(hours=9)


def test_verbatim_the_decoder_refuses_is_a_json_error() -> None:
    obj = to_json(decode(load_sample("key_off_pyeongtaek").data))
    obj["verbatim"] = {"modem": b"../../etc/p".hex()}
    bad(obj, r"modem: verbatim modem number b'../../etc/p' is not digits")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(packets(), st.data())
def test_any_json_value_in_any_key_is_a_json_error_or_a_sendable_packet(record: Packet, data: st.DataObject) -> None:
    obj = to_json(record)
    target = obj
    if "bodies" in obj and data.draw(st.booleans()):
        target = obj["bodies"][data.draw(st.integers(0, len(obj["bodies"]) - 1))]
    keys = [*sorted(target), "verbatim"]
    key = data.draw(st.sampled_from(keys))
    if data.draw(st.booleans()) and key != "kind":
        target.pop(key, None)
    else:
        target[key] = data.draw(JSON_VALUES | st.dictionaries(st.sampled_from(keys), st.text("0123456789abcdef#",
                                                                                                  max_size=24)))
    try:
        changed = from_json(obj)
    except JsonError:
        return
    encode(changed)  # from_json promises a packet that can be sent


@pytest.mark.parametrize(("key", "verbatim", "problem"), [
    ("modem", "zz", "verbatim 'zz' is not hex"),
    ("modem", "3031", "verbatim '3031' is not 11 bytes"),
    ("key_off_time", "1a0b", "verbatim '1a0b' is not 7 bytes"),
    ("key_off_time", "1a0b1509000000", "verbatim 1a0b1509000000 is a valid time; give it as key_off_time"),
], ids=["not hex", "short text", "short time", "valid time"])
def test_verbatim_that_is_not_the_fields_bytes_is_a_json_error_saying_why(key: str, verbatim: str,
                                                                          problem: str) -> None:
    obj = to_json(decode(load_sample("key_off_pyeongtaek").data))
    obj["verbatim"] = {key: verbatim}
    bad(obj, f"^{re.escape(key)}: {re.escape(problem)}$")


def test_the_explained_table_shows_each_fields_bytes_value_and_unit() -> None:
    # What `dtgserver decode --format table` prints: a unit only where the field has one.
    record = status_log(text="ok")
    assert format_table(record, encode(record)).splitlines() == [
        "status_log (0x63), 23 bytes",
        "offset  raw                       field                             value",
        "     0  63                        protocol_id                       99",
        '     1  30 31 30 31 32 33 34 ...  modem                             "01012345678"',
        '    12  1a 0b 15 08 00 00 00      sent_time                         "2026-11-21T08:00:00+09:00"',
        "    19  00 02                     log_size                          2 B",
        '    21  6f 6b                     log                               "ok"',
    ]


def test_the_table_gives_a_temperature_its_state_and_unit() -> None:
    record = dtg(bodies=1)
    lines = [line for line in format_table(record, encode(record)).splitlines() if "_c " in line]
    assert lines == [
        "    65  00 2d                     bodies[0].temp_a_c                4.5 (temp_a_state=ok) °C",
        "    67  03 de                     bodies[0].temp_b_c                null (temp_b_state=absent) °C",
    ]


def test_a_body_without_its_temperature_says_which_state_is_missing() -> None:
    obj = to_json(dtg(bodies=1))
    del obj["bodies"][0]["temp_a_c"], obj["bodies"][0]["temp_a_state"]
    bad(obj, r"^bodies\[0\]\.temp_a_c: temp_a_state must be ok, absent or off, got None$")


def test_a_body_or_verbatim_of_the_wrong_json_type_is_named() -> None:
    dtg_obj = to_json(dtg(bodies=2))
    bad({**dtg_obj, "bodies": [dtg_obj["bodies"][0], 7]}, r"^bodies\[1\]\.: expected a JSON object$")
    bad({**spec_key_off(), "verbatim": "0101"}, "^verbatim: expected an object of hex strings$")
    body = {**dtg_obj["bodies"][1], "verbatim": ["00"]}
    bad({**dtg_obj, "bodies": [dtg_obj["bodies"][0], body]}, r"^bodies\[1\]\.verbatim: expected an object of hex")
    del body["verbatim"], body["rpm"]
    bad({**dtg_obj, "bodies": [dtg_obj["bodies"][0], body]}, r"^bodies\[1\]\.rpm: missing$")


def test_dumps_is_the_json_object_as_utf_8_text() -> None:
    record = status_log(text="GPS 수신 양호")
    text = dumps(record)
    assert '"log": "GPS 수신 양호"' in text and json.loads(text) == to_json(record)
    assert json.loads(dumps(key_off())) == to_json(key_off())


def test_the_table_walks_every_body_and_names_or_warns_about_codes() -> None:
    record = dtg(bodies=2)
    odd = attrs.evolve(record.bodies[1], status_code=5, work_status=3)
    record = attrs.evolve(record, bodies=[record.bodies[0], odd])
    lines = format_table(record, encode(record)).splitlines()
    assert lines[0] == "dtg (0x03), 125 bytes" and len(lines) == 2 + 5 + 2 * 20
    assert [line for line in lines if "status" in line or ".time " in line] == [
        '    29  1a 0b 15 08 00 00 00      bodies[0].time                    "2026-11-21T08:00:00+09:00"',
        "    54  00                        bodies[0].status_code             0 (ok)",
        "    73  05                        bodies[0].work_status             5 (depart)",
        '    80  1a 0b 15 08 00 01 00      bodies[1].time                    "2026-11-21T08:00:01+09:00"',
        "   105  05                        bodies[1].status_code             5 (warning: 5 is not in the code table)",
        "   124  03                        bodies[1].work_status             3 (load)",
    ]


def test_the_table_shows_text_as_text_and_the_value_of_non_canonical_bytes() -> None:
    record = status_log(text="GPS 수신 양호")
    assert format_table(record, encode(record)).splitlines()[-1] == \
        '    21  47 50 53 20 bc f6 bd ...  log                               "GPS 수신 양호"'
    raw = load_sample("basic_info_spec_sample").data  # its modem and firmware version are no ASCII digits
    lines = format_table(decode(raw), raw).splitlines()
    assert lines[3] == '     1  00 01 00 39 39 39 39 ...  modem                             "01099998888"'
    assert lines[-1] == '    91  23 23 23 23 23 23 01 ...  firmware_version                  "1001"'
