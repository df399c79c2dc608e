"""The wire layout of every packet of the Triphos DTG Upload Protocol v0.5, in spec order.

Each schema reads like its table in the spec (section numbers in the comments). Each field is a
`Field` adapter: unit, documented range and JSON form live with the field. The fast codecs in
`codec` are derived from these schemas, so this module is the one place the layout is written.
"""

from __future__ import annotations

from typing import Any

import construct
from construct import Int8ub, Int16sb, Int32sb, this

from .codec import StructCodec
from .fields import Code, Digits, Field, Flag, KstTime, LogText, Modem, ProtocolId, Scaled, Temperature, Text
from .records import (
    BasicInfo,
    DtgBody,
    DtgRealtime,
    KeyOff,
    MdtBody,
    MdtRealtime,
    ObdBody,
    ObdRealtime,
    Packet,
    Record,
    Response,
    StatusLog,
)

# -- code tables (spec §6, §7) -------------------------------------------------------------------
VEHICLE_TYPES = {
    "11": "city bus", "12": "rural bus", "13": "village bus", "14": "intercity bus", "15": "express bus",
    "16": "charter bus", "17": "special passenger vehicle", "21": "taxi", "22": "private taxi",
    "31": "general cargo truck", "32": "individual cargo truck", "41": "non-commercial vehicle",
}
DEVICE_STATUS = {
    0: "ok", 11: "GPS receiver fault", 12: "speed sensor fault", 13: "RPM sensor fault", 14: "brake sensor fault",
    21: "sensor input unit fault", 22: "sensor output unit fault", 31: "data output unit fault",
    32: "communication unit fault", 41: "distance calculation fault", 99: "power supply fault",
}
WORK_STATUS = {
    0: "work reporting unused", 1: "start", 2: "end", 3: "load", 4: "unload", 5: "depart", 6: "arrive",
    7: "wait", 8: "rest", 9: "day off", 10: "emergency", 11: "maintenance", 12: "vehicle swap",
}


class VehicleType(Text):
    """Two-character vehicle type code; codes outside the spec's table are warned about."""

    def check(self, value: Any) -> str | None:
        return super().check(value) or (None if value in VEHICLE_TYPES else f"{value!r} is not in the code table")


class Bodies(construct.Adapter):  # type: ignore[misc]
    """`body_count` bodies back to back, decoded in one pass by the codec derived from `body`."""

    length_field = "body_count"
    """The header field that says how many bodies follow (the framer reads it)."""

    def __init__(self, body: construct.Struct, record: type[Record]):
        self.codec = StructCodec(body, record)
        self.body = body
        self.count_size = self.codec.size  # bytes per count of `length_field`
        super().__init__(construct.Bytes(this[self.length_field] * self.count_size))

    def decode(self, raw: bytes) -> tuple[Any, ...]:
        return self.codec.decode_many(raw)

    def encode(self, bodies: Any) -> bytes:
        return self.codec.encode_many(bodies)

    def _decode(self, obj: Any, context: Any, path: Any) -> Any:
        return self.decode(obj)

    def _encode(self, obj: Any, context: Any, path: Any) -> Any:
        return self.encode(obj)


# -- shared pieces ----------------------------------------------------------------------------
def _km(doc: str, hi: int) -> Field:
    return Field(Int16sb if hi < 0x8000 else Int32sb, unit="km", lo=0, hi=hi, doc=doc)


def _lon() -> Scaled:
    return Scaled(Int32sb, 1_000_000, unit="°", lo=-180, hi=180, doc="GPS longitude")


def _lat() -> Scaled:
    return Scaled(Int32sb, 1_000_000, unit="°", lo=-90, hi=90, doc="GPS latitude")


def _battery() -> Scaled:
    return Scaled(Int16sb, 10, unit="V", lo=0, hi=99.9, doc="battery voltage")


def _realtime_header(protocol_id: int) -> list[Any]:
    """§7-§9 HEADER: shared by DTG, OBD and MDT realtime (23 bytes)."""
    return [
        "protocol_id" / ProtocolId(protocol_id),
        "modem" / Modem(),
        "report_period_min" / Field(Int16sb, unit="min", lo=1, doc="report period"),
        "body_count" / Field(Int16sb, lo=1, doc="number of bodies that follow"),
        "key_on_time" / KstTime("KEY ON time"),
    ]


# §6 basic info (0x01), 101 bytes, sent at the first KEY ON of each day ------------------------
BASIC_INFO = construct.Struct(
    "protocol_id" / ProtocolId(0x01),
    "modem" / Modem(),
    "model" / Text(20, doc="DTG model name"),
    "vin" / Text(17, doc="vehicle identification number"),
    "vehicle_type" / VehicleType(2, doc="vehicle type code"),
    "registration_number" / Text(12, doc="registration plate, EUC-KR"),
    "business_number" / Text(10, doc="business registration number"),
    "driver_code" / Text(18, doc="driver's licence-based code"),
    "firmware_version" / Digits(10, doc="DTG firmware version"),
)

# §7 DTG realtime (0x03) body, 51 bytes ----------------------------------------------------------
DTG_BODY = construct.Struct(
    "daily_distance_km" / _km("distance driven since 00:00", 9999),
    "total_distance_km" / _km("distance driven since registration", 9_999_999),
    "time" / KstTime("time of this body"),
    "speed_kmh" / Field(Int8ub, unit="km/h", lo=0, hi=255, doc="vehicle speed"),
    "rpm" / Field(Int16sb, unit="rpm", lo=0, hi=9999, doc="engine RPM"),
    "brake" / Flag(Int8ub, doc="brake signal 0 off / 1 on"),
    "lon" / _lon(),
    "lat" / _lat(),
    "azimuth_deg" / Field(Int16sb, unit="°", lo=0, hi=360, doc="GPS azimuth"),
    "accel_x_ms2" / Scaled(Int16sb, 10, unit="m/s²", lo=-100, hi=100, doc="acceleration X"),
    "accel_y_ms2" / Scaled(Int16sb, 10, unit="m/s²", lo=-100, hi=100, doc="acceleration Y"),
    "status_code" / Code(Int8ub, DEVICE_STATUS, doc="device and communication status code"),
    "daily_fuel_l" / Scaled(Int32sb, 1000, unit="L", lo=0, hi=999.999, doc="fuel used since 00:00"),
    "total_fuel_l" / Scaled(Int32sb, 1000, unit="L", lo=0, hi=999_999.999, doc="fuel used since registration"),
    "fuel_level_pct" / Scaled(Int16sb, 100, unit="%", lo=0, hi=100, doc="fuel remaining"),
    "temp_a_c" / Temperature("temperature A"),
    "temp_b_c" / Temperature("temperature B"),
    "battery_v" / _battery(),
    "fuel_efficiency_kmpl" / Scaled(Int16sb, 10, unit="km/L", lo=0, hi=99.9, doc="fuel efficiency, 0 = none"),
    "work_status" / Code(Int8ub, WORK_STATUS, doc="work status"),
)
DTG_REALTIME = construct.Struct(*_realtime_header(0x03), "bodies" / Bodies(DTG_BODY, DtgBody))

# §10 KEY OFF (0x04), 36 bytes, sent every KEY OFF period ---------------------------------------
KEY_OFF = construct.Struct(
    "protocol_id" / ProtocolId(0x04),
    "modem" / Modem(),
    "sent_time" / KstTime("send time"),
    "lon" / _lon(),
    "lat" / _lat(),
    "key_off_time" / KstTime("KEY OFF time"),
    "battery_v" / _battery(),
)

# §8 OBD realtime (0x06) body, 42 bytes; fuel in cc, i.e. L × 1000 -------------------------------
OBD_BODY = construct.Struct(
    "daily_distance_km" / _km("distance driven since 00:00", 9999),
    "total_distance_km" / _km("distance driven since registration", 9_999_999),
    "time" / KstTime("time of this body"),
    "speed_kmh" / Field(Int8ub, unit="km/h", lo=0, hi=255, doc="vehicle speed"),
    "rpm" / Field(Int16sb, unit="rpm", lo=0, hi=9999, doc="engine RPM"),
    "lon" / _lon(),
    "lat" / _lat(),
    "azimuth_deg" / Field(Int16sb, unit="°", lo=0, hi=360, doc="GPS azimuth"),
    "daily_fuel_l" / Scaled(Int32sb, 1000, unit="L", lo=0, hi=999.999, doc="fuel used since 00:00 (cc on the wire)"),
    "total_fuel_l" / Scaled(Int32sb, 1000, unit="L", lo=0, hi=999_999.999, doc="fuel used since registration (cc)"),
    "temp_a_c" / Temperature("temperature A"),
    "temp_b_c" / Temperature("temperature B"),
    "battery_v" / _battery(),
    "fuel_efficiency_kmpl" / Scaled(Int16sb, 10, unit="km/L", lo=0, hi=99.9, doc="fuel efficiency, 0 = none"),
)
OBD_REALTIME = construct.Struct(*_realtime_header(0x06), "bodies" / Bodies(OBD_BODY, ObdBody))

# §9 MDT-only realtime (0x07) body, 30 bytes ---------------------------------------------------
MDT_BODY = construct.Struct(
    "daily_distance_km" / _km("distance driven since 00:00", 9999),
    "total_distance_km" / _km("distance driven since registration", 9_999_999),
    "time" / KstTime("time of this body"),
    "speed_kmh" / Field(Int8ub, unit="km/h", lo=0, hi=255, doc="vehicle speed"),
    "lon" / _lon(),
    "lat" / _lat(),
    "azimuth_deg" / Field(Int16sb, unit="°", lo=0, hi=360, doc="GPS azimuth"),
    "temp_a_c" / Temperature("temperature A"),
    "temp_b_c" / Temperature("temperature B"),
    "battery_v" / _battery(),
)
MDT_REALTIME = construct.Struct(*_realtime_header(0x07), "bodies" / Bodies(MDT_BODY, MdtBody))

# §11 status log (0x63; the ID table calls it 0x99, accepted too), 21 + L bytes --------------------
STATUS_LOG = construct.Struct(
    "protocol_id" / ProtocolId(0x63, 0x99),
    "modem" / Modem(),
    "sent_time" / KstTime("send time"),
    "log_size" / Field(Int16sb, unit="B", lo=0, doc="log size"),
    "log" / LogText("log_size"),
)

# §12 server response (0x09), 2 bytes --------------------------------------------------------------
RESPONSE = construct.Struct(
    "protocol_id" / ProtocolId(0x09),
    "result" / Code(Int8ub, {0: "success", 1: "format error", 2: "unknown or cancelled subscriber",
                              3: "server under maintenance", 4: "server overloaded"}, doc="result"),
)

SCHEMAS: dict[type[Packet], construct.Struct] = {
    BasicInfo: BASIC_INFO,
    DtgRealtime: DTG_REALTIME,
    KeyOff: KEY_OFF,
    ObdRealtime: OBD_REALTIME,
    MdtRealtime: MDT_REALTIME,
    StatusLog: STATUS_LOG,
    Response: RESPONSE,
}
_bound: list[tuple[type[Record], construct.Struct]] = [*SCHEMAS.items(), (DtgBody, DTG_BODY), (ObdBody, OBD_BODY),
                                                        (MdtBody, MDT_BODY)]
for _record, _schema in _bound:
    _record.SCHEMA = _schema

CODECS: dict[type[Packet], StructCodec] = {record: StructCodec(schema, record) for record, schema in SCHEMAS.items()}
