"""Korea's dangerous-driving behaviours (위험운전행동) in a trip's 1 Hz bodies: criteria as data, and a
detector whose small state carries a trip's last seconds from one packet to the next.

KOTSA (한국교통안전공단) analyses every commercial vehicle's DTG records for 11 behaviours with
thresholds per vehicle class. Nine follow from consecutive bodies' speed and heading and are found
here: harsh start, left turn, right turn, U-turn, deceleration, acceleration and stop (the seven
Smart[Fleet] `em` bits) and harsh lane change and overtaking (counts only: `em` has no bit for
them). Speeding and long speeding need the road's limit, which no packet carries: they are not
computed, and no limit is invented. docs/driving.md has the tables with their sources, and every
reading of a criterion the sources leave open.

`detect` is pure: the bodies of one packet as columns and the trip's `DriveState` before them →
a behaviour mask per body and the state after them. Cutting a drive into packets anywhere gives
the same masks and counts as one pass over the whole drive; `finish` decides what only the trip's
end can decide (a turn still under way at the last body: counted, on no body).
"""

from __future__ import annotations

import functools
import itertools
import json
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

# -- behaviours and the `em` mask ------------------------------------------------------------------

BEHAVIOURS = ("start", "left_turn", "right_turn", "u_turn", "deceleration", "acceleration", "stop",
              "lane_change", "overtaking")
"""Every behaviour found, in the order of the counts in `DriveState.counts`."""

BIT = {"start": 0, "left_turn": 1, "right_turn": 2, "u_turn": 3, "deceleration": 4, "acceleration": 5, "stop": 6,
       "lane_change": 8, "overtaking": 9}
"""The behaviour's bit in a body's mask: bits 0–6 are the Smart[Fleet] microtrip `em` bits in the
spec's order (bit 7 is reserved there); lane change and overtaking, which `em` has no bit for, sit
above it."""

EM_BITS = 0x7F
KOREAN = {"start": "급출발", "left_turn": "급좌회전", "right_turn": "급우회전", "u_turn": "급유턴",
          "deceleration": "급감속", "acceleration": "급가속", "stop": "급정지", "lane_change": "급진로변경",
          "overtaking": "급앞지르기"}

_START, _LEFT, _RIGHT, _U_TURN, _DECEL, _ACCEL, _STOP, _LANE, _OVERTAKE = (1 << BIT[b] for b in BEHAVIOURS)
_COUNT_INDEX = {1 << BIT[b]: i for i, b in enumerate(BEHAVIOURS)}


def em_hex(mask: int) -> str:
    """The microtrip `em` value of a body's mask: its `em` bits as two hex digits ("28": U-turn and
    acceleration, the spec's own example)."""
    return f"{mask & EM_BITS:02X}"


# -- criteria --------------------------------------------------------------------------------------

VEHICLE_CLASSES = ("truck", "bus", "taxi")


@attrs.frozen
class Turn:
    """A turn or U-turn: at `min_speed_kmh` or faster, the heading turns `min_deg`–`max_deg` within `within_s`."""

    min_speed_kmh: int
    within_s: int
    min_deg: int
    max_deg: int


Bands = tuple[tuple[int | None, int], ...]
"""Thresholds by the speed before the change: (highest speed of the band in km/h, None for no
bound; threshold in km/h per s), bands in rising order."""


@attrs.frozen(cache_hash=True)  # hashed on every packet (`_quiet_bounds`)
class Criteria:
    """Every number the detector uses for one vehicle class in one edition (speeds km/h, times s)."""

    edition: str
    vehicle_class: str
    start_max_kmh: int  # harsh start: from at most this speed ...
    start_rise_kmh: int  # ... the speed rises at least this much in 1 s
    accel_min_kmh: int  # harsh acceleration: from at least this speed ...
    accel_rise_kmh: Bands  # ... rises at least this much in 1 s
    decel_min_end_kmh: int  # harsh deceleration: ends at or above this speed ...
    decel_drop_kmh: Bands  # ... having fallen at least this much in 1 s
    stop_max_end_kmh: int  # harsh stop: ends at or below this speed ...
    stop_drop_kmh: int  # ... having fallen at least this much in 1 s
    turn: Turn  # harsh left or right turn
    u_turn: Turn
    lane_min_speed_kmh: int  # lane change and overtaking: at this speed or faster ...
    lane_change_deg_s: int  # ... the heading changes at least this much in 1 s ...
    overtaking_deg_s: int
    lane_window_s: int  # ... and over this window from that second on ...
    lane_net_deg_s: int  # ... the net heading change stays within ± this per second ...
    lane_speed_kmh_s: int  # ... and the speed within ± this per second: lane change;
    overtaking_rise_kmh_s: int  # or the speed rises at least this per second: overtaking
    heading_error_deg_s: int  # exclusion: a heading change this large in 1 s is a GPS error
    gps_fault_code: int  # exclusion: bodies with this DTG device status code (GPS receiver fault)
    speed_fault_code: int  # ours: bodies with this status code (speed sensor fault) for speed behaviours

    def accel_threshold(self, from_kmh: int) -> int:
        return _band(self.accel_rise_kmh, from_kmh)

    def decel_threshold(self, from_kmh: int) -> int:
        return _band(self.decel_drop_kmh, from_kmh)


def _band(bands: Bands, speed_kmh: int) -> int:
    for highest, threshold in bands:
        if highest is None or speed_kmh <= highest:
            return threshold
    raise ValueError(f"no band for {speed_kmh} km/h in {bands}")  # the tables end with an open band


@attrs.frozen
class Edition:
    name: str
    source: str
    criteria: Mapping[str, Criteria]  # by vehicle class


# Numbers both editions share: the chart's bounds of start/acceleration (from ≤ 5.0 / at ≥ 6.0 km/h),
# deceleration/stop (ends ≥ 6.0 / ≤ 5.0 km/h), lane change and overtaking (≥ 30 km/h, 5 s, net
# ±2°/s, speed ±2 km/h per s, overtaking ≥ 3 km/h per s) and its exclusions (≥ 60°/s, GPS fault).
_SHARED: dict[str, Any] = {
    "start_max_kmh": 5, "accel_min_kmh": 6, "decel_min_end_kmh": 6, "stop_max_end_kmh": 5,
    "lane_min_speed_kmh": 30, "lane_window_s": 5, "lane_net_deg_s": 2, "lane_speed_kmh_s": 2,
    "overtaking_rise_kmh_s": 3, "heading_error_deg_s": 60, "gps_fault_code": 11, "speed_fault_code": 12,
}


def _edition(name: str, source: str, rows: Mapping[str, tuple[Any, Any, Any]]) -> Edition:
    """An edition from rows of (truck, bus, taxi) values, laid out as the sources print them."""
    return Edition(name, source, {
        cls: Criteria(edition=name, vehicle_class=cls, **_SHARED, **{key: row[i] for key, row in rows.items()})
        for i, cls in enumerate(VEHICLE_CLASSES)})


CHART = _edition(
    "chart",
    "the chart 「11대 위험운전행동 (화물차·버스·택시 기준)」 attributed to MOLIT/KOTSA, as published in "
    "public repositories with its numbers encoded as data",
    {  #                      truck                  bus                    taxi
        "start_rise_kmh": (6, 8, 10),
        "accel_rise_kmh": (((None, 5),), ((None, 6),), ((None, 8),)),
        "decel_drop_kmh": (((None, 8),), ((None, 9),), ((None, 14),)),
        "stop_drop_kmh": (8, 9, 14),
        "turn": (Turn(20, 4, 60, 120), Turn(25, 4, 60, 120), Turn(30, 3, 60, 120)),
        "u_turn": (Turn(15, 8, 160, 180), Turn(20, 8, 160, 180), Turn(25, 6, 160, 180)),
        "lane_change_deg_s": (6, 8, 10),
        "overtaking_deg_s": (6, 8, 10),
    })

KOTSA_2022 = _edition(
    "2022",
    "「위험운전행동 판별 기준(22년)」, appendix of the MOLIT/KOTSA press release 「급가속 등 위험운전 행동이 "
    "교통사고 가능성 높인다」 (2022-05-19), as encoded by independent public implementations",
    {
        "start_rise_kmh": (6, 8, 10),
        # starting speed 6–10 / 11–20 / above 20 km/h
        "accel_rise_kmh": (((10, 7), (20, 6), (None, 5)), ((10, 8), (20, 7), (None, 6)),
                           ((10, 12), (20, 10), (None, 8))),
        # starting speed up to 30 / up to 50 / above 50 km/h
        "decel_drop_kmh": (((30, 8), (50, 8), (None, 8)), ((30, 9), (50, 10), (None, 12)),
                           ((30, 14), (50, 15), (None, 15))),
        "stop_drop_kmh": (8, 9, 14),
        "turn": (Turn(20, 3, 60, 160), Turn(25, 3, 60, 160), Turn(30, 2, 60, 160)),
        "u_turn": (Turn(15, 6, 160, 180), Turn(20, 6, 160, 180), Turn(25, 4, 160, 180)),
        "lane_change_deg_s": (6, 8, 10),
        "overtaking_deg_s": (6, 8, 10),
    })

EDITIONS: Mapping[str, Edition] = {e.name: e for e in (KOTSA_2022, CHART)}
DEFAULT_EDITION = "2022"


def criteria(edition: str, vehicle_class: str) -> Criteria:
    """The criteria of one class in one edition; ValueError naming the known ones otherwise."""
    if edition not in EDITIONS:
        raise ValueError(f"unknown driving criteria edition {edition!r}; known: {', '.join(EDITIONS)}")
    if vehicle_class not in VEHICLE_CLASSES:
        raise ValueError(f"unknown vehicle class {vehicle_class!r}; known: {', '.join(VEHICLE_CLASSES)}")
    return EDITIONS[edition].criteria[vehicle_class]


# -- which class a vehicle is ------------------------------------------------------------------------

CLASS_OF_TYPE: Mapping[str, str] = {
    **{f"1{n}": "bus" for n in range(1, 8)},  # 11 city bus … 17 special passenger vehicle
    "21": "taxi", "22": "taxi",  # general and individual taxi
    "31": "truck", "32": "truck",  # general and individual freight
}
"""The basic info's vehicle type code (Triphos DTG Upload Protocol v0.5, §6) → vehicle class.
41 (non-commercial) and unknown codes take `DrivingConfig.default_class`."""


@attrs.frozen
class DrivingConfig:
    """Which criteria apply to which terminal.

    `default_class` is the class of a vehicle of type 41 (non-commercial), of an unknown type, or
    of a terminal whose basic info was never seen; None finds no behaviours for them. `classes`
    overrides the class per modem (a terminal whose basic info is wrong or missing).
    """

    edition: str = DEFAULT_EDITION
    default_class: str | None = "taxi"
    classes: Mapping[str, str] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        criteria(self.edition, self.default_class or VEHICLE_CLASSES[0])  # ValueError for unknown names
        for modem, cls in self.classes.items():
            if cls not in VEHICLE_CLASSES:
                raise ValueError(f"modem {modem}: unknown vehicle class {cls!r}; known: {', '.join(VEHICLE_CLASSES)}")

    def vehicle_class(self, modem: str, vehicle_type: str | None) -> str | None:
        """The class whose criteria apply to `modem`'s vehicle of basic-info type `vehicle_type`."""
        override = self.classes.get(modem)
        if override is not None:
            return override
        return CLASS_OF_TYPE.get(vehicle_type or "", self.default_class)

    def criteria_for(self, modem: str, vehicle_type: str | None) -> Criteria | None:
        cls = self.vehicle_class(modem, vehicle_type)
        return None if cls is None else criteria(self.edition, cls)


def parse_classes(text: str) -> dict[str, str]:
    """'01012345678=bus,01099998888=truck' → {modem: class}; ValueError naming the bad item."""
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        modem, sep, cls = item.partition("=")
        if not sep or not modem.strip() or cls.strip() not in VEHICLE_CLASSES:
            raise ValueError(f"{item!r}: expected MODEM=CLASS with CLASS one of {', '.join(VEHICLE_CLASSES)}")
        out[modem.strip()] = cls.strip()
    return out


# -- the detector ----------------------------------------------------------------------------------

_STEP_MIN_MS, _STEP_MAX_MS = 500, 1500
"""Two bodies are one second apart (a 'step') when their times differ by 0.5–1.5 s: the terminal
records every second; more is a gap, across which no change 'in 1 s' can be judged."""


@attrs.frozen
class DriveState:
    """What the detector keeps between packets of one trip. JSON-safe as a list (`to_list`).

    `counts`: behaviours found so far, in BEHAVIOURS order. The rest is the trip's last seconds:
    the previous body, the speed behaviours of the previous step (a harsh change lasting several
    seconds is one event), the turning run under way (its direction, its newest steps as
    (degrees, lower speed of the step), and the most it turned within each window so far), and
    the lane-change windows under way (steps so far, net degrees, speed before the first step,
    degrees of the first step).
    """

    counts: tuple[int, ...] = (0,) * len(BEHAVIOURS)
    seen: bool = False  # a body of the trip was seen: the last_* fields hold it
    last_ms: int | None = None
    last_speed: int = 0
    last_heading: int = 0
    last_lat: float = 0.0
    last_lon: float = 0.0
    last_heading_ok: bool = False
    last_speed_ok: bool = False
    speed_kinds: int = 0
    run_sign: int = 0
    run: tuple[tuple[int, int], ...] = ()
    run_best_turn: int = 0
    run_best_u_turn: int = 0
    lane: tuple[tuple[int, int, int, int], ...] = ()

    def to_list(self) -> list[Any]:
        """The values in declaration order, as JSON gives them back (lists, not tuples), so that a
        state read back from JSON equals the one written."""
        return [list(self.counts), self.seen, self.last_ms, self.last_speed, self.last_heading, self.last_lat,
                self.last_lon, self.last_heading_ok, self.last_speed_ok, self.speed_kinds, self.run_sign,
                [list(step) for step in self.run], self.run_best_turn, self.run_best_u_turn,
                [list(window) for window in self.lane]]

    @classmethod
    def from_list(cls, values: Sequence[Any]) -> DriveState:
        """What `to_list` gave, also after a JSON round trip (lists for tuples)."""
        (counts, seen, last_ms, last_speed, last_heading, last_lat, last_lon, last_heading_ok, last_speed_ok,
         speed_kinds, run_sign, run, best_turn, best_u_turn, lane) = values
        return cls(tuple(counts), seen, last_ms, last_speed, last_heading, last_lat, last_lon, last_heading_ok,
                   last_speed_ok, speed_kinds, run_sign, tuple((d, s) for d, s in run), best_turn, best_u_turn,
                   tuple((w[0], w[1], w[2], w[3]) for w in lane))

    def to_json(self) -> str:
        return json.dumps(self.to_list(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> DriveState:
        return cls.from_list(json.loads(text))

    def count(self, behaviour: str) -> int:
        return self.counts[BEHAVIOURS.index(behaviour)]

    def counts_by_name(self) -> dict[str, int]:
        return dict(zip(BEHAVIOURS, self.counts, strict=True))




def heading_change(before_deg: int, after_deg: int) -> int:
    """The signed turn from one azimuth to the next in degrees, −180 to 179: positive is clockwise
    (a right turn: azimuth 0 is north, 90 east), and 350° → 10° is +20, not −340."""
    return (after_deg - before_deg + 180) % 360 - 180


def detect(state: DriveState | None, rules: Criteria, *, time_ms: Sequence[int | None], speed_kmh: Sequence[int],
           azimuth_deg: Sequence[int], lat: Sequence[float], lon: Sequence[float],
           status_code: Sequence[int] | None = None) -> tuple[list[int], DriveState]:
    """The behaviours of one packet's bodies (columns in wire order, one value per body) and the state after them.

    Returns one mask per body (`BIT`): the behaviours recognised at that body. That is the body
    where the change ends for speed behaviours; the first body after a turn or U-turn (only then
    is it known how far it went); the last body of the 5 s window for lane change and overtaking.
    `status_code` is the DTG body's device status (OBD and MDT bodies have none).
    """
    s = state or DriveState()
    if not speed_kmh:
        return [], s
    quiet = _quiet(s, rules, time_ms, speed_kmh, azimuth_deg, lat, lon, status_code)
    if quiet is not None:
        return [0] * len(speed_kmh), quiet
    return _detect(s, rules, time_ms, speed_kmh, azimuth_deg, lat, lon, status_code)


def _detect(s: DriveState, rules: Criteria, time_ms: Sequence[int | None], speed_kmh: Sequence[int],
            azimuth_deg: Sequence[int], lat: Sequence[float], lon: Sequence[float],
            status_code: Sequence[int] | None) -> tuple[list[int], DriveState]:
    """`detect`, one body at a time: the definition of every behaviour."""
    counts = list(s.counts)
    masks = [0] * len(speed_kmh)
    turn, u_turn = rules.turn, rules.u_turn
    run_min_kmh = min(turn.min_speed_kmh, u_turn.min_speed_kmh)
    run_keep = max(turn.within_s, u_turn.within_s)
    window = rules.lane_window_s
    lane_net = rules.lane_net_deg_s * window
    lane_rise = rules.lane_speed_kmh_s * window
    overtaking_rise = rules.overtaking_rise_kmh_s * window
    lane_deg = min(rules.lane_change_deg_s, rules.overtaking_deg_s)
    lane_min_kmh = rules.lane_min_speed_kmh
    heading_error = rules.heading_error_deg_s
    start_max, start_rise, accel_min = rules.start_max_kmh, rules.start_rise_kmh, rules.accel_min_kmh
    stop_max, stop_drop, decel_min = rules.stop_max_end_kmh, rules.stop_drop_kmh, rules.decel_min_end_kmh
    gps_fault, speed_fault = rules.gps_fault_code, rules.speed_fault_code

    seen = s.seen
    last_ms, last_speed, last_heading = s.last_ms, s.last_speed, s.last_heading
    last_lat, last_lon = s.last_lat, s.last_lon
    last_heading_ok, last_speed_ok = s.last_heading_ok, s.last_speed_ok
    speed_kinds = s.speed_kinds
    run_sign, best_turn, best_u = s.run_sign, s.run_best_turn, s.run_best_u_turn
    run_deg, run_slower = [d for d, _ in s.run], [v for _, v in s.run]
    turn_s, turn_kmh, u_turn_s, u_turn_kmh = turn.within_s, turn.min_speed_kmh, u_turn.within_s, u_turn.min_speed_kmh
    least_rise, least_drop, _, _ = _least_changes(rules)
    lane = list(s.lane)

    codes = status_code if status_code is not None else (0,) * len(speed_kmh)
    for i, (t, v, h, la, lo, code) in enumerate(zip(time_ms, speed_kmh, azimuth_deg, lat, lon, codes, strict=True)):
        found = 0
        speed_ok = code != speed_fault
        # the chart's exclusions: a GPS receiver fault, and a position that stands still while
        # the vehicle moves (a tunnel): the heading is not the vehicle's
        heading_ok = code != gps_fault and (not seen or v == 0 or la != last_lat or lo != last_lon)
        if seen and t is not None and last_ms is not None and _STEP_MIN_MS <= t - last_ms <= _STEP_MAX_MS:
            # speed: start, acceleration, deceleration, stop
            kinds = 0
            change = v - last_speed
            if (change >= least_rise or change <= -least_drop) and speed_ok and last_speed_ok:
                if change > 0:
                    if last_speed <= start_max:
                        if change >= start_rise:
                            kinds = _START
                    elif last_speed >= accel_min and change >= rules.accel_threshold(last_speed):
                        kinds = _ACCEL
                elif change < 0:
                    if v <= stop_max:
                        if -change >= stop_drop:
                            kinds = _STOP
                    elif v >= decel_min and -change >= rules.decel_threshold(last_speed):
                        kinds = _DECEL
                if not kinds & speed_kinds:  # a harsh change lasting several seconds is one
                    found = kinds
            speed_kinds = kinds

            # heading: turns and U-turns (a run of turning steps), lane change and overtaking
            dh = (h - last_heading + 180) % 360 - 180
            slower = v if v < last_speed else last_speed
            heading_step = heading_ok and last_heading_ok and -heading_error < dh < heading_error
            sign = (dh > 0) - (dh < 0) if heading_step and slower >= run_min_kmh else 0
            if sign != run_sign or not sign:
                if run_sign:
                    found |= _run_behaviour(rules, run_sign, best_turn, best_u)
                run_sign, run_deg, run_slower, best_turn, best_u = sign, [], [], 0, 0
            if sign:
                run_deg.append(dh if dh > 0 else -dh)
                run_slower.append(slower)
                if len(run_deg) > run_keep:
                    del run_deg[0], run_slower[0]
                if min(run_slower[-turn_s:]) >= turn_kmh:
                    turned = sum(run_deg[-turn_s:])
                    if turned > best_turn:
                        best_turn = turned
                if min(run_slower[-u_turn_s:]) >= u_turn_kmh:
                    turned = sum(run_deg[-u_turn_s:])
                    if turned > best_u:
                        best_u = turned

            # a lane window runs from a step turning at least lane_deg, for `window` steps
            lane_step = heading_step and slower >= lane_min_kmh
            ended = False
            if lane:
                if not lane_step:
                    lane = []  # a window holds usable steps only
                else:
                    pending = []
                    for steps, net, from_kmh, trigger in lane:
                        net += dh
                        if steps + 1 < window:
                            pending.append((steps + 1, net, from_kmh, trigger))
                        elif -lane_net <= net <= lane_net:
                            rise = v - from_kmh
                            if -lane_rise <= rise <= lane_rise and trigger >= rules.lane_change_deg_s:
                                found |= _LANE
                                ended = True
                            elif rise >= overtaking_rise and trigger >= rules.overtaking_deg_s:
                                found |= _OVERTAKE
                                ended = True
                    lane = [] if ended else pending  # the next one starts after this one's window
            if lane_step and not ended and (dh >= lane_deg or dh <= -lane_deg):
                lane.append((1, dh, last_speed, dh if dh > 0 else -dh))
        elif seen:  # a gap, or a body without a calendar time: nothing spans it
            speed_kinds = 0
            if run_sign:
                found = _run_behaviour(rules, run_sign, best_turn, best_u)
            run_sign, run_deg, run_slower, best_turn, best_u = 0, [], [], 0, 0
            lane = []
        if found:
            masks[i] = found
            for bit, index in _COUNT_INDEX.items():
                if found & bit:
                    counts[index] += 1
        seen = True
        last_ms, last_speed, last_heading, last_lat, last_lon = t, v, h, la, lo
        last_heading_ok, last_speed_ok = heading_ok, speed_ok

    return masks, DriveState(tuple(counts), seen, last_ms, last_speed, last_heading, last_lat, last_lon,
                             last_heading_ok, last_speed_ok, speed_kinds, run_sign,
                             tuple(zip(run_deg, run_slower, strict=True)), best_turn, best_u, tuple(lane))


@functools.cache
def _least_changes(rules: Criteria) -> tuple[int, int, int, int]:
    """The smallest rise and drop of speed and heading change in 1 s that make any behaviour, and
    the steps a turning run keeps."""
    rise = min([rules.start_rise_kmh] + [t for _, t in rules.accel_rise_kmh])
    drop = min([rules.stop_drop_kmh] + [t for _, t in rules.decel_drop_kmh])
    heading = min(rules.lane_change_deg_s, rules.overtaking_deg_s)
    return rise, drop, heading, max(rules.turn.within_s, rules.u_turn.within_s)


@functools.cache
def _quiet_bounds(rules: Criteria) -> tuple[int, int, int, int, int] | None:
    """(smallest rise, smallest drop, smallest heading change) that could make a behaviour, the
    most degrees a carried turning run may hold, and the lowest speed at which a heading change
    counts at all (turns, U-turns, lane windows): a packet whose steps all stay below them finds
    nothing. None when the heading bound cannot guarantee that no window of small steps makes a turn."""
    rise, drop, heading, keep = _least_changes(rules)
    least_turn = min(rules.turn.min_deg, rules.u_turn.min_deg)
    carried = least_turn - 1 - keep * (heading - 1)  # a run of small steps turns at most keep × (heading − 1)
    if carried < 0:
        return None
    slowest = min(rules.turn.min_speed_kmh, rules.u_turn.min_speed_kmh, rules.lane_min_speed_kmh)
    return rise, drop, heading, carried, slowest


def _quiet(s: DriveState, rules: Criteria, time_ms: Sequence[int | None], speed_kmh: Sequence[int],
           azimuth_deg: Sequence[int], lat: Sequence[float], lon: Sequence[float],
           status_code: Sequence[int] | None) -> DriveState | None:
    """The state after a packet in which nothing can be found, computed from its last seconds
    alone; None when the packet is not such a one (then `_detect` goes through it body by body).

    Quiet is: no device fault, every speed change and heading change between neighbouring bodies
    below the smallest that makes any behaviour, and a carried state that holds no lane window
    and no turn that could still complete. Nothing is found in such a packet, whatever its gaps
    and positions, and no lane window starts in it, so only its last seconds shape the state:
    the turning run that reaches its last body. That is computed here by the same rules as
    `_detect` (tests/test_driving.py compares the two on random drives).
    """
    bounds = _quiet_bounds(rules)
    if bounds is None or s.lane:  # a lane window under way
        return None
    rise, drop, heading, carried, slowest_heading_kmh = bounds
    if s.run_sign and (s.run_best_turn >= rules.turn.min_deg or s.run_best_u_turn >= rules.u_turn.min_deg
                       or sum(d for d, _ in s.run) > carried):
        return None
    if status_code is not None and (rules.gps_fault_code in status_code or rules.speed_fault_code in status_code):
        return None
    if s.seen and not (s.last_heading_ok and s.last_speed_ok):
        return None
    # every change between neighbours is at most the range of the values
    speeds = [s.last_speed, *speed_kmh] if s.seen else list(speed_kmh)
    if max(speeds) - min(speeds) >= min(rise, drop):
        changes = list(map(operator.sub, speeds[1:], speeds))
        if max(changes) >= rise or min(changes) <= -drop:
            return None
    headings = [s.last_heading, *azimuth_deg] if s.seen else list(azimuth_deg)
    if max(headings) - min(headings) >= heading:  # or a turn across north: 359° → 1° is +2°
        # a step slower than every heading behaviour's speed is neither a turning step nor a lane
        # step, however far it turns (a vehicle manoeuvring at walking pace): only the others count
        slowest = slowest_heading_kmh
        differences = list(map(operator.sub, headings[1:], headings))
        # only the steps whose raw difference is that large can turn that far (across north, less)
        for k in itertools.compress(range(len(differences)), map(heading.__le__, map(abs, differences))):
            if not -heading < (differences[k] + 180) % 360 - 180 < heading and (
                    speeds[k] >= slowest and speeds[k + 1] >= slowest):
                return None

    # bodies as in `_detect`, with the state's last body as body -1 when there is one
    first = -1 if s.seen else 0
    steps: dict[int, tuple[int, int, int, bool] | None] = {}
    usable: dict[int, bool] = {-1: s.last_heading_ok}

    def heading_ok(k: int) -> bool:  # no fault codes here: only a position standing still
        ok = usable.get(k)
        if ok is None:
            if k == 0 and not s.seen:
                ok = True
            else:
                ok = (speed_kmh[k] == 0 or lat[k] != (lat[k - 1] if k else s.last_lat)
                      or lon[k] != (lon[k - 1] if k else s.last_lon))
            usable[k] = ok
        return ok

    def step(k: int) -> tuple[int, int, int, bool] | None:
        """The step from body k-1 to body k: (heading change, speed before, speed after, heading usable)."""
        if k in steps:
            return steps[k]
        out = None
        if k > first:
            t0, t1 = (time_ms[k - 1] if k else s.last_ms), time_ms[k]
            if t0 is not None and t1 is not None and _STEP_MIN_MS <= t1 - t0 <= _STEP_MAX_MS:
                v0, h0 = (speed_kmh[k - 1], azimuth_deg[k - 1]) if k else (s.last_speed, s.last_heading)
                out = ((azimuth_deg[k] - h0 + 180) % 360 - 180, v0, speed_kmh[k],
                       heading_ok(k - 1) and heading_ok(k))
        steps[k] = out
        return out

    turn, u_turn = rules.turn, rules.u_turn
    run_min_kmh = min(turn.min_speed_kmh, u_turn.min_speed_kmh)
    n = len(speed_kmh)

    def run_sign_of(k: int) -> int:
        st = step(k)
        if st is None or not st[3] or min(st[1], st[2]) < run_min_kmh:
            return 0
        return (st[0] > 0) - (st[0] < 0)

    sign = run_sign_of(n - 1)
    start = n - 1
    while sign and start - 1 > first and run_sign_of(start - 1) == sign:
        start -= 1
    run: list[tuple[int, int]] = []
    best_turn = best_u = 0
    if sign:
        if start == 0 and s.seen and s.run_sign == sign:  # the packet continues the carried run
            run, best_turn, best_u = list(s.run), s.run_best_turn, s.run_best_u_turn
        keep = max(turn.within_s, u_turn.within_s)
        for k in range(start, n):
            dh, v0, v1, _ = step(k)  # type: ignore[misc]  # a step of the run
            run.append((abs(dh), min(v0, v1)))
            if len(run) > keep:
                del run[0]
            best_turn = max(best_turn, _turned(run, turn))
            best_u = max(best_u, _turned(run, u_turn))

    return DriveState(s.counts, True, time_ms[-1], speed_kmh[-1], azimuth_deg[-1], lat[-1], lon[-1],
                      heading_ok(n - 1), True, 0,
                      sign, tuple(run), best_turn, best_u, ())


def _turned(run: list[tuple[int, int]], turn: Turn) -> int:
    """Degrees the run turned within `turn.within_s`, up to its newest step; 0 when one of those
    steps was slower than the turn's speed."""
    steps = run[-turn.within_s:]
    if any(slower < turn.min_speed_kmh for _, slower in steps):
        return 0
    return sum(degrees for degrees, _ in steps)


def _run_behaviour(rules: Criteria, sign: int, best_turn: int, best_u_turn: int) -> int:
    """The bit of a finished turning run: a U-turn if within its window it turned as far as one, else a
    left or right turn if within the turn's window it turned as far as one, else nothing."""
    if not sign:
        return 0
    if rules.u_turn.min_deg <= best_u_turn <= rules.u_turn.max_deg:
        return _U_TURN
    if rules.turn.min_deg <= best_turn <= rules.turn.max_deg:
        return _RIGHT if sign > 0 else _LEFT
    return 0


def finish(state: DriveState, rules: Criteria) -> DriveState:
    """The state once the trip has ended: a turn still under way at its last body is decided
    (counted; marked on no body, that body's microtrip being out already)."""
    bit = _run_behaviour(rules, state.run_sign, state.run_best_turn, state.run_best_u_turn)
    counts = list(state.counts)
    if bit:
        counts[_COUNT_INDEX[bit]] += 1
    return attrs.evolve(state, counts=tuple(counts), run_sign=0, run=(), run_best_turn=0, run_best_u_turn=0)
