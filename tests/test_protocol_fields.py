"""What each kind of field refuses and keeps at its edges: the status log's size limit, numbers that
are no numbers in a scaled field, non-integers in an integer field, and raw digit bytes, which only
the digit fields (modem, firmware version) read as digits."""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, timedelta
from typing import Any

import attrs
import pytest
from conftest import load_sample, verify_frame

from dtgserver.protocol import (
    BasicInfo,
    DtgRealtime,
    JsonError,
    KeyOff,
    SensorState,
    StatusLog,
    WireStr,
    decode,
    encode,
    from_json,
    to_json,
)
from dtgserver.testing import KEY_ON, basic_info, dtg, key_off, status_log

# -- the status log: L is a signed 16-bit size, so at most 32,767 bytes of text --------------------------


@pytest.mark.parametrize("text", ["a" * 32_767, "가" * 16_383 + "a"], ids=["ascii", "hangul"])
def test_a_status_log_of_32767_bytes_round_trips(text: str) -> None:
    record = status_log(text=text)
    raw = encode(record)
    assert len(raw) == 21 + 32_767 and record.log_size == 32_767
    assert decode(raw) == record
    assert to_json(decode(raw))["log_size"] == 32_767
    verify_frame(encode(from_json(json.loads(json.dumps(to_json(record), ensure_ascii=False)))), raw)


@pytest.mark.parametrize("text", ["a" * 32_768, "가" * 16_384], ids=["ascii", "hangul"])
def test_a_status_log_of_32768_bytes_is_refused_naming_its_size(text: str) -> None:
    # The limit counts EUC-KR bytes, not characters: 16,384 Hangul syllables are 32,768 bytes.
    message = "log of 32768 bytes is longer than the wire's 32767"
    with pytest.raises(ValueError, match=f"^log: {message}$"):
        encode(status_log(text=text))
    with pytest.raises(JsonError, match=f"^log: {message}$"):
        from_json(to_json(status_log(text="")) | {"log": text})


def test_a_kept_log_of_32768_bytes_is_refused_too() -> None:
    # A log kept verbatim (WireStr: bytes that are not canonical text) is written as it came; the
    # wire's size field still cannot say 32,768.
    log = WireStr("x", b"\xff" * 32_768)
    with pytest.raises(ValueError, match=r"^log_size: value does not fit its wire type$"):
        encode(StatusLog("01012345678", key_off().sent_time, log))


# -- scaled fields: a float × scale, exactly; NaN and ±inf have no wire value ----------------------------
NOT_NUMBERS = [math.nan, math.inf, -math.inf, 1e308, -1e308]
"""...and finite floats that overflow to ±inf once multiplied by the field's scale."""


@pytest.mark.parametrize("value", NOT_NUMBERS, ids=str)
@pytest.mark.parametrize("field", ["lat", "battery_v"])
def test_nan_and_infinity_in_a_scaled_field_are_value_errors_naming_it(value: float, field: str) -> None:
    # Never an OverflowError from deep inside the encoder: the documented error names the field.
    changes: dict[str, Any] = {field: value}
    record = attrs.evolve(key_off(), **changes)
    message = "^" + re.escape(f"{field}: {value!r} is not a number the wire can carry") + "$"
    with pytest.raises(ValueError, match=message):
        encode(record)
    with pytest.raises(JsonError, match=message):
        from_json(to_json(key_off()) | {field: value})


@pytest.mark.parametrize("value", NOT_NUMBERS, ids=str)
@pytest.mark.parametrize("field", ["daily_fuel_l", "temp_a_c", "accel_x_ms2"])
def test_nan_and_infinity_in_a_body_name_the_body_field(value: float, field: str) -> None:
    packet = dtg(bodies=3)
    bodies = list(packet.bodies)
    changes: dict[str, Any] = {field: value}
    bodies[1] = attrs.evolve(bodies[1], **changes)
    message = "^" + re.escape(f"bodies: {field}: {value!r} is not a number the wire can carry") + "$"
    with pytest.raises(ValueError, match=message):
        encode(attrs.evolve(packet, bodies=bodies))


def test_a_scaled_field_takes_integers_and_floats_on_its_grid() -> None:
    assert decode(encode(attrs.evolve(key_off(), battery_v=24))).battery_v == 24.0  # type: ignore[attr-defined]
    assert decode(encode(attrs.evolve(key_off(), battery_v=24.1 + 0.2))).battery_v == 24.3  # type: ignore[attr-defined]
    wrong: list[tuple[Any, str]] = [(24.15, "24.15 is not a multiple of 1/10 V"), (True, "expected a number, got True"),
                                    ("24.1", "expected a number, got '24.1'")]
    for value, problem in wrong:
        with pytest.raises(ValueError, match=f"^battery_v: {problem}$"):
            encode(attrs.evolve(key_off(), battery_v=value))


def test_a_temperature_reading_that_spells_a_sensor_state_is_refused() -> None:
    body = dtg(bodies=1).bodies[0]
    for value, state in [(99.0, "absent"), (98.0, "off")]:
        with pytest.raises(ValueError, match=f"^bodies: temp_a_c: {value!r} °C means '{state}' on the wire; say so"):
            encode(attrs.evolve(dtg(bodies=1), bodies=[attrs.evolve(body, temp_a_c=value)]))
    with pytest.raises(ValueError, match=r"^bodies: temp_a_c: state 'ok' needs a reading$"):
        encode(attrs.evolve(dtg(bodies=1), bodies=[attrs.evolve(body, temp_a_c=SensorState.OK)]))
    nothing: Any = None  # not "no sensor": that is SensorState.ABSENT
    with pytest.raises(ValueError, match=r"^bodies: temp_a_c: expected a number, got None$"):
        encode(attrs.evolve(dtg(bodies=1), bodies=[attrs.evolve(body, temp_a_c=nothing)]))


# -- integer fields: an int, and neither a bool nor a float that happens to be whole ---------------------


@pytest.mark.parametrize("value", [True, False, 40.0, "40", None], ids=repr)
def test_an_integer_field_refuses_anything_but_an_int(value: Any) -> None:
    packet = dtg(bodies=2)
    bodies = [packet.bodies[0], attrs.evolve(packet.bodies[1], speed_kmh=value)]
    with pytest.raises(ValueError, match=f"^bodies: speed_kmh: expected an integer, got {value!r}$"):
        encode(attrs.evolve(packet, bodies=bodies))
    with pytest.raises(ValueError, match=f"^report_period_min: expected an integer, got {value!r}$"):
        encode(attrs.evolve(packet, report_period_min=value))
    obj = to_json(packet)
    obj["bodies"][1]["speed_kmh"] = value
    message = r"^bodies\[1\]\.speed_kmh: expected an integer, got " + re.escape(repr(value)) + "$"
    with pytest.raises(JsonError, match=message):
        from_json(obj)


def test_a_flag_is_a_bool_or_the_byte_it_came_as() -> None:
    body = dtg(bodies=1).bodies[0]
    for brake in (True, False, 7):
        packet = attrs.evolve(dtg(bodies=1), bodies=[attrs.evolve(body, brake=brake)])
        again = decode(encode(packet))
        assert again.bodies[0].brake is brake if isinstance(brake, bool) else again.bodies[0].brake == 7  # type: ignore[attr-defined]
    wrong: tuple[Any, ...] = ("1", 1.0, None)
    for brake in wrong:
        with pytest.raises(ValueError, match=f"^bodies: brake: expected an integer, got {brake!r}$"):
            encode(attrs.evolve(dtg(bodies=1), bodies=[attrs.evolve(body, brake=brake)]))


# -- raw digit bytes: read as digits in the digit fields only --------------------------------------------


def test_raw_digit_bytes_are_digits_only_in_the_digit_fields() -> None:
    # The spec's samples write the modem's and the firmware version's digits as values 0x00-0x09.
    # Any other text field keeps such bytes as the control characters they are.
    info = basic_info()
    raw = bytearray(encode(info))
    model, firmware = encode(basic_info()).index(b"DTG-1000"), len(raw) - len(b"1.0.2")
    raw[model:model + 8] = b"\x01\x02\x00-\x09\x00\x00\x05"
    raw[firmware:] = b"\x01.\x00.\x02"
    record = decode(bytes(raw))
    assert isinstance(record, BasicInfo)
    assert record.model == "\x01\x02\x00-\t\x00\x00\x05" and not isinstance(record.model, WireStr)
    assert record.firmware_version == "1.0.2" and isinstance(record.firmware_version, WireStr)
    obj = to_json(record)
    assert (obj["model"], obj["firmware_version"]) == (record.model, "1.0.2")
    assert obj["verbatim"] == {"firmware_version": "2323232323012e002e02"}
    verify_frame(encode(from_json(json.loads(json.dumps(obj)))), bytes(raw))


def test_a_spec_sample_modem_of_raw_digits_is_the_modem() -> None:
    sample = load_sample("basic_info_spec_sample")
    record = decode(sample.data)
    assert record.modem == "01099998888" and isinstance(record.modem, WireStr)
    assert to_json(record)["verbatim"]["modem"] == "0001003939393938383838"


# -- range warnings: the documented range and the unit, only when the field has one ----------------------


def test_a_range_warning_names_the_range_and_the_unit_the_field_has() -> None:
    packet = dtg(bodies=1)
    assert attrs.evolve(packet, report_period_min=0).warnings == ["report_period_min: 0 outside 1.. min"]
    assert attrs.evolve(packet, bodies=[]).warnings == ["body_count: 0 outside 1.."]  # a count has no unit
    assert attrs.evolve(key_off(), battery_v=100.0).warnings == ["battery_v: 100.0 outside 0..99.9 V"]


def test_a_value_of_the_wrong_type_gets_no_range_warning_and_no_exception() -> None:
    # Built by hand (warnings are computed from the values): the encoder is what refuses such a
    # value, naming the field; the warnings of a record never raise.
    packet = dtg(bodies=1)
    wrong: dict[str, Any] = {"speed_kmh": "fast", "rpm": True, "battery_v": None}
    body = attrs.evolve(packet.bodies[0], **wrong)
    assert attrs.evolve(packet, bodies=[body]).warnings == []


def test_a_status_log_is_sent_with_its_own_id_or_its_alias_only() -> None:
    for pid in (0x63, 0x99):
        assert encode(attrs.evolve(status_log(), protocol_id=pid))[0] == pid
    for pid in (0x64, 0x03):
        with pytest.raises(ValueError, match=f"^protocol_id: protocol ID {pid} is not one of \\(99, 153\\)$"):
            encode(attrs.evolve(status_log(), protocol_id=pid))


# -- times: a datetime of the wire's years, KST when it names no zone -------------------------------------


def test_a_time_is_sent_in_the_wire_years_and_a_naive_one_is_kst() -> None:
    sent = KEY_ON + timedelta(hours=1)  # key_off()'s time
    naive = sent.replace(tzinfo=None)
    assert encode(attrs.evolve(key_off(), sent_time=naive)) == encode(key_off())  # a time of no zone is KST
    utc = sent.astimezone(UTC)
    assert encode(attrs.evolve(key_off(), sent_time=utc)) == encode(key_off())  # the same instant
    last = decode(encode(attrs.evolve(key_off(), sent_time=sent.replace(year=2255))))
    assert isinstance(last, KeyOff) and last.sent_time == sent.replace(year=2255)
    for year in (2256, 1999):
        with pytest.raises(ValueError, match=f"^sent_time: year {year} is outside the wire's 2000..2255$"):
            encode(attrs.evolve(key_off(), sent_time=sent.replace(year=year)))
    wrong: Any = "2026-11-21T09:00:00+09:00"
    with pytest.raises(ValueError, match=f"^sent_time: expected a datetime, got {re.escape(repr(wrong))}$"):
        encode(attrs.evolve(key_off(), sent_time=wrong))
    for value in (5, None, "yesterday"):
        with pytest.raises(JsonError, match=f"^sent_time: expected an ISO 8601 time, got {re.escape(repr(value))}$"):
            from_json(to_json(key_off()) | {"sent_time": value})


@pytest.mark.parametrize(("text", "problem"), [(5, "expected text, got 5"), ("똠", "'똠' is not EUC-KR text")],
                         ids=["not text", "no EUC-KR"])
def test_a_log_that_is_no_euc_kr_text_is_refused_saying_why(text: Any, problem: str) -> None:
    with pytest.raises(ValueError, match=f"^log: {re.escape(problem)}$"):
        encode(status_log(text=text))


def test_float_noise_is_no_precision_but_a_billionth_off_the_grid_is() -> None:
    # The tolerance is relative: 123,456.9 L computed as 123456.90000000001 is that many litres.
    noisy = 123_456.7 + 0.1 + 0.1
    assert noisy != 123_456.9
    packet = dtg(bodies=1)
    sent = decode(encode(attrs.evolve(packet, bodies=[attrs.evolve(packet.bodies[0], total_fuel_l=noisy)])))
    assert isinstance(sent, DtgRealtime) and sent.bodies[0].total_fuel_l == 123_456.9
    # Near zero a billionth is the bound: 0.5 + 1.5e-9 m/s² is no multiple of 0.1, 0.5 + 0.5e-9 is noise.
    assert decode(encode(attrs.evolve(key_off(), battery_v=0.5 + 0.5e-9))).battery_v == 0.5  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=r"^battery_v: 0\.5000000015 is not a multiple of 1/10 V$"):
        encode(attrs.evolve(key_off(), battery_v=0.5 + 1.5e-9))


def test_text_that_is_no_cp949_is_kept_with_a_warning() -> None:
    raw = bytearray(encode(basic_info()))
    model = raw.index(b"DTG-1000")
    raw[model:model + 8] = b"DTG-\xff\xfe00"
    record = decode(bytes(raw))
    assert isinstance(record, BasicInfo)
    assert record.model == "DTG-\ufffd\ufffd00" and isinstance(record.model, WireStr)
    assert record.warnings == [f"model: bytes {record.model.wire.hex()} are not CP949 text"]
    assert encode(record) == bytes(raw)


def test_a_text_field_given_no_text_is_refused_saying_so() -> None:
    number: Any = 5
    with pytest.raises(ValueError, match=r"^model: expected text, got 5$"):
        encode(attrs.evolve(basic_info(), model=number))
    with pytest.raises(JsonError, match=r"^model: expected text, got 5$"):
        from_json(to_json(basic_info()) | {"model": 5})


def test_text_that_is_no_cp949_loses_only_its_padding() -> None:
    raw = bytearray(encode(basic_info()))
    raw[12:32] = b"#" * 17 + b"X\xffX"  # the model, 20 bytes: an X either side of no CP949
    record = decode(bytes(raw))
    assert isinstance(record, BasicInfo) and isinstance(record.model, WireStr)
    assert record.model == "X\ufffdX" and to_json(record)["model"] == "X\ufffdX"
    assert encode(record) == bytes(raw)


def test_a_wire_strings_repr_rebuilds_it() -> None:
    """What a log line or a failing test shows of non-canonical text: its value and its bytes, as
    Python that rebuilds it."""
    from dtgserver.protocol.fields import WireStr

    text = WireStr("서울", "서울".encode("euc-kr") + b"\x00#")
    again = eval(repr(text), {"WireStr": WireStr})  # our own repr, of our own text
    assert again == "서울" and again.wire == text.wire and isinstance(again, WireStr)
