"""The construct schemas, run interpretively (`SCHEMA.parse`/`build`), agree with the fast codec derived
from them: the schema is the one source of truth, so the fast path may not drift from it."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, ClassVar

import attrs
import construct
import pytest
from conftest import VALID_SAMPLES, Sample, verify_frame
from hypothesis import given, settings

from dtgserver.protocol import KST, Packet, Realtime, decode, encode
from dtgserver.protocol.codec import StructCodec, schema_fields
from dtgserver.protocol.schema import (
    BASIC_INFO,
    DTG_BODY,
    DTG_REALTIME,
    KEY_OFF,
    MDT_BODY,
    MDT_REALTIME,
    OBD_BODY,
    OBD_REALTIME,
    RESPONSE,
    SCHEMAS,
    STATUS_LOG,
    Bodies,
)
from dtgserver.testing import dtg, packets


def common(schema: construct.Construct, data: bytes, obj: dict[str, Any], size: int) -> None:
    """construct's own test contract in one line: parse, build and size agree."""
    parsed = schema.parse(data)
    assert {k: v for k, v in parsed.items() if not k.startswith("_")} == obj
    verify_frame(schema.build(obj), data)
    assert len(data) == size
    try:
        assert schema.sizeof() == size
    except construct.SizeofError:
        assert set(obj) & {"bodies", "log"}, "only the bodies and the log have a size from the header"


def as_obj(record: Any) -> dict[str, Any]:
    """The construct Container a record corresponds to: its fields plus the derived wire ones."""
    return {name: getattr(record, name) for name, _ in schema_fields(type(record).SCHEMA)}


def verify_schema_agrees(record: Packet, data: bytes) -> None:
    schema = SCHEMAS[type(record)]
    common(schema, data, as_obj(record), len(data))
    if isinstance(record, Realtime):
        # The Bodies adapter decodes through the fast path; check each body interpretively too.
        size = type(record.bodies[0]).SCHEMA.sizeof()
        for i, body in enumerate(record.bodies):
            chunk = data[23 + i * size:23 + (i + 1) * size]
            common(type(body).SCHEMA, chunk, as_obj(body), size)


@pytest.mark.parametrize("sample", VALID_SAMPLES, ids=str)
def test_fixtures_through_the_interpreted_schema(sample: Sample) -> None:
    verify_schema_agrees(decode(sample.data), sample.data)


@settings(max_examples=60, deadline=None)
@given(packets())
def test_generated_records_through_the_interpreted_schema(record: Packet) -> None:
    verify_schema_agrees(record, encode(record))


# Offsets as printed in the spec's Index columns (§6-§12).
SPEC_OFFSETS = {
    BASIC_INFO: {"protocol_id": 0, "modem": 1, "model": 12, "vin": 32, "vehicle_type": 49, "registration_number": 51,
                 "business_number": 63, "driver_code": 73, "firmware_version": 91},
    DTG_REALTIME: {"protocol_id": 0, "modem": 1, "report_period_min": 12, "body_count": 14, "key_on_time": 16,
                   "bodies": 23},
    DTG_BODY: {"daily_distance_km": 0, "total_distance_km": 2, "time": 6, "speed_kmh": 13, "rpm": 14, "brake": 16,
               "lon": 17, "lat": 21, "azimuth_deg": 25, "accel_x_ms2": 27, "accel_y_ms2": 29, "status_code": 31,
               "daily_fuel_l": 32, "total_fuel_l": 36, "fuel_level_pct": 40, "temp_a_c": 42, "temp_b_c": 44,
               "battery_v": 46, "fuel_efficiency_kmpl": 48, "work_status": 50},
    OBD_BODY: {"daily_distance_km": 0, "total_distance_km": 2, "time": 6, "speed_kmh": 13, "rpm": 14, "lon": 16,
               "lat": 20, "azimuth_deg": 24, "daily_fuel_l": 26, "total_fuel_l": 30, "temp_a_c": 34, "temp_b_c": 36,
               "battery_v": 38, "fuel_efficiency_kmpl": 40},
    MDT_BODY: {"daily_distance_km": 0, "total_distance_km": 2, "time": 6, "speed_kmh": 13, "lon": 14, "lat": 18,
               "azimuth_deg": 22, "temp_a_c": 24, "temp_b_c": 26, "battery_v": 28},
    KEY_OFF: {"protocol_id": 0, "modem": 1, "sent_time": 12, "lon": 19, "lat": 23, "key_off_time": 27, "battery_v": 34},
    STATUS_LOG: {"protocol_id": 0, "modem": 1, "sent_time": 12, "log_size": 19, "log": 21},
    RESPONSE: {"protocol_id": 0, "result": 1},
}
SPEC_SIZES = {BASIC_INFO: 101, DTG_BODY: 51, OBD_BODY: 42, MDT_BODY: 30, KEY_OFF: 36, RESPONSE: 2}


@pytest.mark.parametrize("schema", list(SPEC_OFFSETS), ids=lambda s: next(n for n, v in globals().items() if v is s))
def test_field_offsets_follow_the_spec_tables(schema: construct.Struct) -> None:
    offsets, offset = {}, 0
    for name, adapter in schema_fields(schema):
        offsets[name] = offset
        if not isinstance(adapter, Bodies) and name != "log":
            offset += adapter.size
    assert offsets == SPEC_OFFSETS[schema]
    if schema in SPEC_SIZES:
        assert schema.sizeof() == offset == SPEC_SIZES[schema]


def test_variable_sizes() -> None:
    def tail(schema: construct.Struct, **header: int) -> int:
        return int(schema.subcons[-1].sizeof(**header))

    assert tail(DTG_REALTIME, body_count=60) == 60 * 51
    assert tail(OBD_REALTIME, body_count=2) == 2 * 42
    assert tail(MDT_REALTIME, body_count=3) == 3 * 30
    assert tail(STATUS_LOG, log_size=60) == 60


# -- the codec derived from a schema, for a record class that does or does not follow it ---------------


@attrs.frozen
class Swapped:  # KEY OFF's fields, latitude before longitude
    modem: str
    sent_time: datetime
    lat: float
    lon: float
    key_off_time: datetime
    battery_v: float


@attrs.frozen
class Extra:  # KEY OFF's fields and one the wire does not have
    modem: str
    sent_time: datetime
    lon: float
    lat: float
    key_off_time: datetime
    battery_v: float
    driver: str


@attrs.frozen
class Short:  # KEY OFF without its battery voltage
    protocol_id: ClassVar[int] = 0x04
    modem: str
    sent_time: datetime
    lon: float
    lat: float
    key_off_time: datetime


KEY_OFF_NAMES = "['protocol_id', 'modem', 'sent_time', 'lon', 'lat', 'key_off_time', 'battery_v']"


def test_a_record_class_that_does_not_follow_its_schema_is_refused_saying_how() -> None:
    with pytest.raises(TypeError, match="^" + re.escape(
            f"Swapped fields ['modem', 'sent_time', 'lat', 'lon', 'key_off_time', 'battery_v'] do not follow its"
            f" schema {KEY_OFF_NAMES}") + "$"):
        StructCodec(KEY_OFF, Swapped)
    with pytest.raises(TypeError, match=r"^Extra fields \[.*'driver'\] do not follow its schema"):
        StructCodec(KEY_OFF, Extra)


def test_a_record_without_a_wire_field_cannot_be_encoded_and_says_which() -> None:
    codec = StructCodec(KEY_OFF, Short)
    t = datetime(2026, 1, 1, tzinfo=KST)
    with pytest.raises(ValueError, match=r"^battery_v: missing$"):
        codec.encode(Short("0101", t, 127.0, 37.0, t))


def test_bodies_encode_from_any_iterable_and_a_failure_names_the_field() -> None:
    record = dtg(bodies=3)
    adapter = dict(schema_fields(DTG_REALTIME))["bodies"]
    assert adapter.encode(iter(record.bodies)) == adapter.encode(list(record.bodies)) == encode(record)[23:]
    wrong = attrs.evolve(record.bodies[1], rpm=99999)
    with pytest.raises(ValueError, match=r"^rpm: value does not fit its wire type$"):
        adapter.encode(body for body in (record.bodies[0], wrong))
