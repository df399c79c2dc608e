"""Small factories of valid packets for server, store and bridge tests."""

from __future__ import annotations

from datetime import datetime, timedelta

from dtgserver.protocol import KST, BasicInfo, DtgBody, DtgRealtime, KeyOff, SensorState, StatusLog, encode

KEY_ON = datetime(2026, 11, 21, 8, 0, 0, tzinfo=KST)


def dtg_body(t: datetime, i: int = 0, *, speed_kmh: int = 40, status_code: int = 0) -> DtgBody:
    return DtgBody(
        daily_distance_km=12 + i // 60, total_distance_km=123_456 + i // 60, time=t, speed_kmh=speed_kmh,
        rpm=1500 + speed_kmh * 10, brake=False, lon=round(127.0 + i * 0.0001, 6), lat=round(37.5 + i * 0.0001, 6),
        azimuth_deg=45,
        accel_x_ms2=0.5, accel_y_ms2=-0.2, status_code=status_code, daily_fuel_l=round(3.5 + i / 1000, 3),
        total_fuel_l=45_678.9, fuel_level_pct=55.5, temp_a_c=4.5, temp_b_c=SensorState.ABSENT, battery_v=24.5,
        fuel_efficiency_kmpl=5.2, work_status=5,
    )


def dtg(modem: str = "01012345678", *, key_on: datetime = KEY_ON, minute: int = 0, bodies: int = 60,
        speed_kmh: int = 40) -> DtgRealtime:
    start = key_on + timedelta(minutes=minute)
    return DtgRealtime(modem, 1, key_on, [dtg_body(start + timedelta(seconds=s), minute * 60 + s, speed_kmh=speed_kmh)
                                          for s in range(bodies)])


def dtg_bytes(modem: str = "01012345678", **kwargs: object) -> bytes:
    return encode(dtg(modem, **kwargs))  # type: ignore[arg-type]


def key_off(modem: str = "01012345678", *, at: datetime = KEY_ON + timedelta(hours=1),
            battery_v: float = 24.1) -> KeyOff:
    return KeyOff(modem, at, 127.01, 37.51, at, battery_v)


def basic_info(modem: str = "01012345678") -> BasicInfo:
    return BasicInfo(modem, "DTG-1000", "KMHFC41MP6A123456", "11", "서울33가1234", "1234567890",
                     "123456789012345678", "1.0.2")


def status_log(modem: str = "01012345678", text: str = "GPS 수신 양호\nmodem ok") -> StatusLog:
    return StatusLog(modem, KEY_ON, text)
