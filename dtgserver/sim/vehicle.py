"""The driving model: a vehicle's identity and its trips around Seoul, one protocol body per second.

Everything the wire carries is kept in wire units (micro-degrees, ml, tenths of a volt), so a
record built from the model always encodes exactly and decodes back to the same values.
"""

from __future__ import annotations

import math
import random
from datetime import datetime, timedelta

import attrs

from ..protocol import KST, BasicInfo, DtgBody, MdtBody, ObdBody, SensorState

KINDS = ("dtg", "obd", "mdt")

# The area the vehicles drive in: Seoul inside the outer ring road, roughly.
SEOUL_LAT, SEOUL_LON = 37.5665, 126.9780
LAT_MIN, LAT_MAX = 37.46, 37.67
LON_MIN, LON_MAX = 126.83, 127.14
M_PER_DEG_LAT = 111_320.0

DAY_S = 86_400
NIGHT_START_HOUR = 22  # a trip ending after this parks the vehicle until the morning
MORNING_HOUR = 6

PLATE_REGIONS = ("서울", "경기", "인천")
PRIVATE_LETTERS = "가나다라마거너더러머버서어저고노도로모보소오조구누두루무부수우주"
COMMERCIAL_LETTERS = "바사아자"
VIN_CHARS = "ABCDEFGHJKLMNPRSTUVWXYZ0123456789"  # no I, O or Q in a VIN
WMI = ("KMH", "KNA", "KNM", "KPT", "KL1")  # Hyundai, Kia, Renault Korea, KG Mobility, GM Korea

# Vehicle type codes (spec §6) each kind of terminal is usually fitted to, with weights:
# DTGs are compulsory in commercial vehicles; OBD dongles sit in cars and taxis; MDTs anywhere.
VEHICLE_TYPES_BY_KIND = {
    "dtg": (("31", 40), ("32", 15), ("11", 10), ("14", 5), ("16", 5), ("21", 15), ("22", 10)),
    "obd": (("41", 60), ("21", 20), ("22", 20)),
    "mdt": (("31", 30), ("32", 20), ("41", 50)),
}

# Device status codes (spec §7) a fault episode shows, weighted: GPS trouble is the common one.
FAULT_CODES = ((11, 50), (12, 8), (13, 8), (14, 6), (21, 4), (22, 4), (31, 4), (32, 10), (41, 3), (99, 3))
FAULT_LOG = {
    11: "GPS 수신 불량", 12: "차속 센서 이상", 13: "RPM 센서 이상", 14: "브레이크 센서 이상",
    21: "센서 입력부 이상", 22: "센서 출력부 이상", 31: "데이터 출력부 이상", 32: "통신 장애",
    41: "거리 계산 오류", 99: "전원 공급 이상",
}
BOOT_LOGS = ("POWER ON, FW {fw}, GSM OK", "부팅 완료 FW {fw}", "SD card check OK", "모뎀 재접속 성공 RSSI -71dBm")


@attrs.frozen
class Build:
    """What a kind of vehicle can do: acceleration, gearing, fuel use, tank."""

    name: str
    accel_ms2: float
    decel_ms2: float
    top_speed_kmh: float
    idle_rpm: int
    rpm_per_kmh: tuple[float, ...]  # per gear, first gear first
    upshift_rpm: int
    idle_fuel_ml_s: float
    fuel_ml_per_m: float
    tank_l: int


EASE_OFF_MS2 = 0.8
"""Slowing to a lower cruising speed without braking hard: ~3 km/h a second, well below every
vehicle class's harsh-deceleration threshold (8 km/h/s and up)."""

CAR = Build("car", 2.6, 3.5, 125, 750, (110, 65, 45, 35, 28, 23), 2800, 0.22, 0.075, 55)
TAXI = Build("taxi", 2.2, 3.5, 120, 720, (105, 62, 43, 33, 27, 22), 2600, 0.25, 0.085, 65)
BUS = Build("bus", 1.1, 2.5, 100, 600, (150, 95, 62, 42, 30, 22), 2100, 0.55, 0.30, 300)
TRUCK = Build("truck", 1.2, 2.8, 105, 620, (160, 100, 70, 50, 38, 30, 24, 20), 2000, 0.45, 0.24, 200)

BUILD_BY_TYPE = {"11": BUS, "12": BUS, "13": BUS, "14": BUS, "15": BUS, "16": BUS, "17": BUS,
                 "21": TAXI, "22": TAXI, "31": TRUCK, "32": TRUCK, "41": CAR}

# Road classes: (share of segments, target speed range km/h, segment length range m).
ROADS = ((0.55, (35, 60), (120, 700)), (0.35, (55, 80), (400, 2000)), (0.10, (80, 110), (2000, 8000)))


@attrs.frozen
class Identity:
    """Who a terminal is: the values of its basic info packet, plus which kind of unit it is."""

    modem: str
    kind: str
    model: str
    vin: str
    vehicle_type: str
    registration_number: str
    business_number: str
    driver_code: str
    firmware_version: str

    def basic_info(self) -> BasicInfo:
        return BasicInfo(self.modem, self.model, self.vin, self.vehicle_type, self.registration_number,
                         self.business_number, self.driver_code, self.firmware_version)


def _weighted(rng: random.Random, choices: tuple[tuple[str, int], ...] | tuple[tuple[int, int], ...]) -> object:
    values = [c for c, _ in choices]
    return rng.choices(values, weights=[w for _, w in choices])[0]


def make_identity(index: int, kind: str, rng: random.Random, *, modem_base: int = 10_000_000) -> Identity:
    """A plausible identity for terminal `index`: modem 010xxxxxxxx, plate, VIN, driver code."""
    if kind not in KINDS:
        raise ValueError(f"terminal kind must be one of {', '.join(KINDS)}, got {kind!r}")
    vehicle_type = str(_weighted(rng, VEHICLE_TYPES_BY_KIND[kind]))
    letters = PRIVATE_LETTERS if vehicle_type == "41" else COMMERCIAL_LETTERS
    plate = f"{rng.choice(PLATE_REGIONS)}{rng.randrange(10, 100)}{rng.choice(letters)}{rng.randrange(1000, 10000)}"
    vin = rng.choice(WMI) + "".join(rng.choice(VIN_CHARS) for _ in range(14))
    model = {"dtg": "TRIPHOS TD-100", "obd": "TRIPHOS OB-20", "mdt": "TRIPHOS MDT-7"}[kind]
    return Identity(
        modem=f"010{(modem_base + index) % 100_000_000:08d}",
        kind=kind,
        model=model,
        vin=vin,
        vehicle_type=vehicle_type,
        registration_number=plate,
        business_number=f"{rng.randrange(100, 1000)}{rng.randrange(10, 100)}{rng.randrange(10000, 100000)}",
        driver_code=f"{rng.randrange(11, 29)}{rng.randrange(10**15, 10**16)}",
        firmware_version=rng.choice(("1.0.0.1", "1.0.2.0", "1.1.0.3")),
    )


class Vehicle:
    """One vehicle's state, stepped one second at a time while the key is on.

    The path is road-like: straight segments on a street grid (a per-vehicle grid angle), with
    turns at the ends, slowing to turn speed or stopping at a red light; speed follows a target
    under acceleration limits; RPM follows speed through the gears; fuel follows distance, idling
    and acceleration; daily counters reset at midnight KST.
    """

    def __init__(self, identity: Identity, rng: random.Random, start_s: float):
        self.identity = identity
        self.rng = rng
        self.build = BUILD_BY_TYPE.get(identity.vehicle_type, CAR)
        b = self.build
        # position: somewhere in the city, heading along the vehicle's street grid
        self.lat = rng.uniform(LAT_MIN + 0.03, LAT_MAX - 0.03)
        self.lon = rng.uniform(LON_MIN + 0.04, LON_MAX - 0.04)
        self.grid_deg = rng.uniform(0, 90)
        self.heading_deg = (self.grid_deg + 90 * rng.randrange(4)) % 360
        self.turn_todo_deg = 0.0
        self.speed_ms = 0.0
        self.yaw_deg_s = 0.0
        # odometers, in metres and millilitres; the wire shows whole km and whole ml
        self.total_m = rng.uniform(20_000, 600_000) * 1000.0
        self.total_fuel_ml = self.total_m / 1000 / rng.uniform(4, 12) * 1000
        self.daily_m = 0.0
        self.daily_fuel_ml = 0.0
        self.fuel_in_tank_l = b.tank_l * rng.uniform(0.3, 0.95)
        self.day = datetime.fromtimestamp(start_s, KST).date()
        # the current road segment
        self.seg_remaining_m = 0.0
        self.seg_target_ms = 0.0
        self.seg_end_speed_ms = 0.0
        self.seg_next_turn_deg = 0.0
        self.seg_stop_s = 0
        self.wait_s = 0
        self.target_jitter = 1.0
        self._new_segment()
        # trip
        self.trip_remaining_s = 0
        self.trip_second = 0
        self.pullover_m: float | None = None
        self.fault_at_s = -1
        self.fault_code = 0
        self.fault_left_s = 0
        self.status_code = 0
        kinds = {"dtg": DtgBody, "obd": ObdBody, "mdt": MdtBody}
        self.body_type = kinds[identity.kind]
        self.refrigerated = identity.vehicle_type in ("31", "32") and rng.random() < 0.25
        self.cargo_temp_dc = rng.choice((-180, 30)) if self.refrigerated else 0
        self.battery_dv = 126

    # -- trips ------------------------------------------------------------------------------
    def start_trip(self, key_on_s: float) -> None:
        """KEY ON: plan a trip and, now and then, a device fault somewhere in it."""
        rng = self.rng
        long_haul = self.build in (TRUCK, BUS)
        self.trip_remaining_s = int(rng.uniform(20, 150 if long_haul else 70) * 60)
        self.trip_second = 0
        self.pullover_m = None
        self.fault_at_s = int(rng.uniform(0, self.trip_remaining_s)) if rng.random() < 0.12 else -1
        self.fault_code = int(str(_weighted(rng, FAULT_CODES)))
        self._roll_day(key_on_s)

    def parking_s(self, key_off_s: float) -> int:
        """How long the vehicle stays parked after a KEY OFF at `key_off_s`."""
        local = datetime.fromtimestamp(key_off_s, KST)
        if local.hour >= NIGHT_START_HOUR or local.hour < MORNING_HOUR:
            morning = local.replace(hour=MORNING_HOUR, minute=0, second=0, microsecond=0)
            if local.hour >= NIGHT_START_HOUR:
                morning += timedelta(days=1)
            return int((morning - local).total_seconds() + self.rng.uniform(0, 2 * 3600))
        return int(self.rng.uniform(5, 50) * 60)

    @property
    def trip_over(self) -> bool:
        """The trip's time is up and the vehicle has come to a stop."""
        return self.trip_remaining_s <= 0 and self.speed_ms == 0

    def park(self, parked_s: float) -> None:
        """Time passes with the key off: the battery sags, and a low tank gets filled."""
        self.battery_dv = round(self.parked_battery_v(parked_s) * 10)
        self.speed_ms = 0.0
        if self.fuel_in_tank_l < 0.15 * self.build.tank_l:
            self.fuel_in_tank_l = self.build.tank_l * self.rng.uniform(0.9, 1.0)

    def _roll_day(self, now_s: float) -> None:
        day = datetime.fromtimestamp(now_s, KST).date()
        if day != self.day:
            self.day, self.daily_m, self.daily_fuel_ml = day, 0.0, 0.0

    # -- the road ---------------------------------------------------------------------------
    def _new_segment(self) -> None:
        rng = self.rng
        _, (lo_kmh, hi_kmh), (lo_m, hi_m) = rng.choices(ROADS, weights=[share for share, _, _ in ROADS])[0]
        self.seg_target_ms = min(rng.uniform(lo_kmh, hi_kmh), self.build.top_speed_kmh) / 3.6
        self.seg_remaining_m = rng.uniform(lo_m, hi_m)
        self.seg_next_turn_deg = self._choose_turn()
        self.seg_stop_s = int(rng.uniform(10, 70)) if rng.random() < 0.3 else 0
        if self.seg_stop_s:
            self.seg_end_speed_ms = 0.0
        elif self.seg_next_turn_deg:
            self.seg_end_speed_ms = rng.uniform(15, 25) / 3.6
        else:
            self.seg_end_speed_ms = self.seg_target_ms

    def _choose_turn(self) -> float:
        """Straight on, or a turn at the next crossing; near the edge of the area, back toward the centre."""
        heading = (self.heading_deg + self.turn_todo_deg) % 360
        candidates = (0.0, 90.0, -90.0, 45.0, -45.0)
        near_edge = not (LAT_MIN + 0.02 < self.lat < LAT_MAX - 0.02 and LON_MIN + 0.02 < self.lon < LON_MAX - 0.02)
        if near_edge:
            to_centre = math.degrees(math.atan2((SEOUL_LON - self.lon) * math.cos(math.radians(self.lat)),
                                                SEOUL_LAT - self.lat)) % 360
            return min(candidates[:3], key=lambda turn: _angle_between(heading + turn, to_centre))
        return float(self.rng.choices(candidates, weights=(50, 20, 20, 5, 5))[0])

    # -- one second -------------------------------------------------------------------------
    def step(self, now_s: int) -> DtgBody | ObdBody | MdtBody:
        """Advance one second to `now_s` (whole seconds, KEY ON) and return that second's body."""
        b, rng = self.build, self.rng
        self._roll_day(now_s)
        self.trip_second += 1
        self.trip_remaining_s -= 1
        v0 = self.speed_ms
        if self.trip_second % 15 == 0:
            self.target_jitter = rng.uniform(0.88, 1.04)

        if self.wait_s > 0 or self.trip_second <= 3:  # at a red light, or warming up after KEY ON
            v1 = max(0.0, v0 - b.decel_ms2)  # came up to the line a little fast: brake hard
            if v1 == 0:
                self.wait_s -= 1
            distance_m = (v0 + v1) / 2
        else:
            if self.trip_remaining_s <= 0:  # time to park: pull over and stop
                if self.pullover_m is None:
                    self.pullover_m = min(self.seg_remaining_m, v0 * v0 / b.decel_ms2 + 15)
                end_speed, remaining = 0.0, self.pullover_m
            else:
                end_speed, remaining = self.seg_end_speed_ms, self.seg_remaining_m
            braking = 0.6 * b.decel_ms2
            cruise = self.seg_target_ms * self.target_jitter
            # the most it may go this second and still slow to end_speed by the end at `braking`,
            # judged from where this second takes it (judged from here, the curve is crossed between
            # two seconds and then met with the brakes' most)
            stopping = math.sqrt(end_speed * end_speed + 2 * braking * max(0.0, remaining - v0 - 3))
            desired = min(cruise, stopping)
            v1 = max(0.0, min(desired, v0 + b.accel_ms2 * rng.uniform(0.6, 1.0), b.top_speed_kmh / 3.6))
            # above the cruising speed (a slower road, or the driver easing off) but not yet braking
            # for what is ahead: let the speed fall off, as a driver does, not the brakes' most
            floor_ms2 = EASE_OFF_MS2 if stopping >= v0 else b.decel_ms2
            v1 = max(v1, v0 - floor_ms2)
            if end_speed == 0 and remaining < 6 and v0 <= b.decel_ms2:
                v1 = 0.0  # rolled up to the stop line
            distance_m = (v0 + v1) / 2
            self.seg_remaining_m -= distance_m
            if self.pullover_m is not None:
                self.pullover_m -= distance_m
            if self.seg_remaining_m <= 0 or (end_speed == 0 and v1 == 0 and self.trip_remaining_s > 0):
                self.turn_todo_deg += self.seg_next_turn_deg
                self.wait_s = self.seg_stop_s
                self._new_segment()

        # turning happens while moving, at most 30°/s, so the track curves through a crossing
        yaw = 0.0
        if self.turn_todo_deg and distance_m > 0:
            yaw = max(-30.0, min(30.0, self.turn_todo_deg))
            self.turn_todo_deg -= yaw
            self.heading_deg = (self.heading_deg + yaw) % 360
        if distance_m > 0:
            h = math.radians(self.heading_deg)
            self.lat += distance_m * math.cos(h) / M_PER_DEG_LAT
            self.lon += distance_m * math.sin(h) / (M_PER_DEG_LAT * math.cos(math.radians(self.lat)))
        self.speed_ms = v1
        accel = v1 - v0

        # counters
        self.daily_m += distance_m
        self.total_m += distance_m
        fuel_ml = b.idle_fuel_ml_s + b.fuel_ml_per_m * distance_m * (1 + 0.5 * max(0.0, accel))
        self.daily_fuel_ml += fuel_ml
        self.total_fuel_ml += fuel_ml
        self.fuel_in_tank_l = max(0.0, self.fuel_in_tank_l - fuel_ml / 1000)

        # a device fault now and then, for a minute or two
        if self.trip_second == self.fault_at_s:
            self.fault_left_s = int(rng.uniform(10, 120))
        if self.fault_left_s > 0:
            self.fault_left_s -= 1
            self.status_code = self.fault_code
        else:
            self.status_code = 0

        speed_kmh = round(v1 * 3.6)
        time = datetime.fromtimestamp(now_s, KST)
        daily_km, total_km = int(self.daily_m // 1000), int(self.total_m // 1000)
        lon, lat = round(self.lon * 1e6) / 1e6, round(self.lat * 1e6) / 1e6
        azimuth = round(self.heading_deg) % 360
        self.battery_dv = 138 + rng.randrange(4)
        battery_v = self.battery_dv / 10
        temp_a = (self.cargo_temp_dc + rng.randrange(-5, 6)) / 10 if self.refrigerated else SensorState.ABSENT
        if self.body_type is MdtBody:
            return MdtBody(daily_km, total_km, time, speed_kmh, lon, lat, azimuth, temp_a, SensorState.ABSENT,
                           battery_v)
        rpm = self._rpm(v1 * 3.6)
        daily_fuel_l = min(int(self.daily_fuel_ml), 999_999) / 1000
        total_fuel_l = int(self.total_fuel_ml) / 1000
        efficiency = 0.0
        if self.daily_fuel_ml > 100:
            efficiency = min(999, round(self.daily_m / self.daily_fuel_ml * 10)) / 10
        if self.body_type is ObdBody:
            return ObdBody(daily_km, total_km, time, speed_kmh, rpm, lon, lat, azimuth, daily_fuel_l, total_fuel_l,
                           temp_a, SensorState.ABSENT, battery_v, efficiency)
        accel_x = max(-1000, min(1000, round(accel * 10))) / 10
        accel_y = max(-1000, min(1000, round(v1 * math.radians(yaw) * 10))) / 10
        fuel_level = min(10_000, round(self.fuel_in_tank_l / b.tank_l * 10_000)) / 100
        if self.trip_second == 1:
            work_status = 5  # depart
        elif self.trip_remaining_s <= 0 and v1 == 0:
            work_status = 6  # arrive
        else:
            work_status = 0
        return DtgBody(daily_km, total_km, time, speed_kmh, rpm, accel < -0.3, lon, lat, azimuth, accel_x, accel_y,
                       self.status_code, daily_fuel_l, total_fuel_l, fuel_level, temp_a, SensorState.ABSENT,
                       battery_v, efficiency, work_status)

    def _rpm(self, speed_kmh: float) -> int:
        """Engine speed from road speed: the highest gear that keeps the engine above 1100 rpm."""
        b = self.build
        if speed_kmh < 1:
            return b.idle_rpm + self.rng.randrange(-20, 21)
        for ratio in reversed(b.rpm_per_kmh):
            rpm = speed_kmh * ratio
            if 1100 <= rpm <= b.upshift_rpm:
                return int(rpm)
        return int(max(b.idle_rpm, min(speed_kmh * b.rpm_per_kmh[0], b.upshift_rpm + 600)))

    @property
    def battery_v(self) -> float:
        return self.battery_dv / 10

    @staticmethod
    def parked_battery_v(parked_s: float) -> float:
        """A 12 V battery at rest: 12.7 V after the engine stops, 0.1 V less every 6 hours, to 12.2 V."""
        return max(122, 127 - int(parked_s // (6 * 3600))) / 10

    @property
    def position(self) -> tuple[float, float]:
        """(lon, lat) as the wire carries them."""
        return round(self.lon * 1e6) / 1e6, round(self.lat * 1e6) / 1e6


def _angle_between(a: float, b: float) -> float:
    d = abs(a - b) % 360
    return min(d, 360 - d)


def status_log_text(rng: random.Random, identity: Identity, fault_code: int = 0) -> str:
    """A status log line, Korean or ASCII, as the terminals write them."""
    if fault_code:
        return f"[{fault_code:02d}] {FAULT_LOG.get(fault_code, '장치 이상')} 감지"
    return rng.choice(BOOT_LOGS).format(fw=identity.firmware_version)
