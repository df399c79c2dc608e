"""The decoded form of every packet and body kind: frozen attrs records in the domain's words.

Field order follows the wire. Values the wire can hold but the documented range does not allow
are kept as they came and named in `warnings` (computed from the values, so a record built by
hand is checked the same way as a decoded one).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from .fields import BadTime, SensorState, WireStr

if TYPE_CHECKING:
    import construct

Time = datetime | BadTime
Temperature = float | SensorState


class Record:
    """What every record and body has: its schema (bound in schema.py) and range warnings."""

    __slots__ = ()
    SCHEMA: ClassVar[construct.Struct]

    @property
    def warnings(self) -> list[str]:
        from .codec import check

        return check(self)


class Packet(Record):
    __slots__ = ()
    KIND: ClassVar[str]
    PROTOCOL_ID: ClassVar[int]
    if TYPE_CHECKING:
        modem: str  # every packet but the server's own Response names its terminal

    @property
    def protocol_id(self) -> int:
        return self.PROTOCOL_ID


# -- bodies ------------------------------------------------------------------------------------


@attrs.frozen
class DtgBody(Record):
    """One second of a digital tachograph's record (51 bytes)."""

    daily_distance_km: int
    total_distance_km: int
    time: Time
    speed_kmh: int
    rpm: int
    brake: bool | int
    lon: float
    lat: float
    azimuth_deg: int
    accel_x_ms2: float
    accel_y_ms2: float
    status_code: int
    daily_fuel_l: float
    total_fuel_l: float
    fuel_level_pct: float
    temp_a_c: Temperature
    temp_b_c: Temperature
    battery_v: float
    fuel_efficiency_kmpl: float
    work_status: int


@attrs.frozen
class ObdBody(Record):
    """One second from an OBD unit (42 bytes)."""

    daily_distance_km: int
    total_distance_km: int
    time: Time
    speed_kmh: int
    rpm: int
    lon: float
    lat: float
    azimuth_deg: int
    daily_fuel_l: float
    total_fuel_l: float
    temp_a_c: Temperature
    temp_b_c: Temperature
    battery_v: float
    fuel_efficiency_kmpl: float


@attrs.frozen
class MdtBody(Record):
    """One second from a stand-alone MDT (30 bytes)."""

    daily_distance_km: int
    total_distance_km: int
    time: Time
    speed_kmh: int
    lon: float
    lat: float
    azimuth_deg: int
    temp_a_c: Temperature
    temp_b_c: Temperature
    battery_v: float


Body = DtgBody | ObdBody | MdtBody

# -- packets -----------------------------------------------------------------------------------


@attrs.frozen
class BasicInfo(Packet):
    """0x01: the vehicle and driver, sent at the first KEY ON of each day (101 bytes)."""

    KIND: ClassVar[str] = "basic_info"
    PROTOCOL_ID: ClassVar[int] = 0x01

    modem: str
    model: str
    vin: str
    vehicle_type: str
    registration_number: str
    business_number: str
    driver_code: str
    firmware_version: str


class Realtime(Packet):
    """The header the three realtime kinds share (23 bytes), then `body_count` bodies."""

    __slots__ = ()
    BODY: ClassVar[type[Record]]
    modem: str
    report_period_min: int
    key_on_time: Time
    bodies: tuple[Any, ...]

    @property
    def body_count(self) -> int:
        return len(self.bodies)


def _bodies(value: Any) -> tuple[Any, ...]:
    return tuple(value)


@attrs.frozen
class DtgRealtime(Realtime):
    """0x03: DTG realtime, 23 + N×51 bytes."""

    KIND: ClassVar[str] = "dtg"
    PROTOCOL_ID: ClassVar[int] = 0x03
    BODY: ClassVar[type[Record]] = DtgBody

    modem: str
    report_period_min: int
    key_on_time: Time
    bodies: tuple[DtgBody, ...] = attrs.field(converter=_bodies)


@attrs.frozen
class ObdRealtime(Realtime):
    """0x06: OBD realtime, 23 + N×42 bytes."""

    KIND: ClassVar[str] = "obd"
    PROTOCOL_ID: ClassVar[int] = 0x06
    BODY: ClassVar[type[Record]] = ObdBody

    modem: str
    report_period_min: int
    key_on_time: Time
    bodies: tuple[ObdBody, ...] = attrs.field(converter=_bodies)


@attrs.frozen
class MdtRealtime(Realtime):
    """0x07: MDT-only realtime, 23 + N×30 bytes."""

    KIND: ClassVar[str] = "mdt"
    PROTOCOL_ID: ClassVar[int] = 0x07
    BODY: ClassVar[type[Record]] = MdtBody

    modem: str
    report_period_min: int
    key_on_time: Time
    bodies: tuple[MdtBody, ...] = attrs.field(converter=_bodies)


@attrs.frozen
class KeyOff(Packet):
    """0x04: sent every KEY OFF period while the key is off (36 bytes)."""

    KIND: ClassVar[str] = "key_off"
    PROTOCOL_ID: ClassVar[int] = 0x04

    modem: str
    sent_time: Time
    lon: float
    lat: float
    key_off_time: Time
    battery_v: float


@attrs.frozen
class StatusLog(Packet):
    """0x63 (or its alias 0x99): the terminal's status log, 21 + L bytes."""

    KIND: ClassVar[str] = "status_log"
    PROTOCOL_ID: ClassVar[int] = 0x63

    modem: str
    sent_time: Time
    log: str
    protocol_id: int = attrs.field(default=0x63, kw_only=True)

    @property
    def log_size(self) -> int:
        return len(self.log.wire if isinstance(self.log, WireStr) else self.log.encode("euc-kr"))


@attrs.frozen
class Response(Packet):
    """0x09: the server's answer (2 bytes)."""

    KIND: ClassVar[str] = "response"
    PROTOCOL_ID: ClassVar[int] = 0x09

    result: int

    @property
    def modem(self) -> None:  # type: ignore[override]  # the server's answer names no terminal
        return None


PACKET_TYPES: tuple[type[Packet], ...] = (BasicInfo, DtgRealtime, KeyOff, ObdRealtime, MdtRealtime, StatusLog, Response)
BY_KIND: dict[str, type[Packet]] = {cls.KIND: cls for cls in PACKET_TYPES}
