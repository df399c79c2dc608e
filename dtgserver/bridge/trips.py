"""Trip state: what one terminal's messages need from its earlier packets, advanced packet by packet.

Pure functions of the packet's bytes (read through `protocol.layout`, never decoded into a record
per body) and the state before it; no I/O, no clock. `messages` builds the Smart[Fleet] messages
from what this module decides: which trip (`tid`) a realtime packet belongs to, whether it is the
terminal's backlog of an older trip, the trip's running figures, and which KEY OFF closes it.

Rulings (docs/mqtt.md has them all):
- `tid` is the KEY ON time in Unix seconds. When KEY ON is not a calendar time, the packet
  continues the open trip of the terminal, or else the first body time stands in for KEY ON.
- A realtime packet of an older trip than the one in the state (the terminal's backlog) leaves
  the state alone; unless its odometer is beyond the state's trip: then the clock went back and
  it starts a trip.
- A KEY OFF from before the state's trip began is the terminal's backlog, not this trip's end.
"""

from __future__ import annotations

import functools
import json
import operator
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import attrs

from ..protocol import BasicInfo, KeyOff, StatusLog, decode
from ..protocol.layout import RealtimeLayout, day_ms, time_ms, wire_time_ms
from ..protocol.layout import realtime as realtime_layout
from . import driving as drive
from . import tripmetrics
from .driving import DriveState, DrivingConfig
from .tripmetrics import TripMeter

DEFAULT_DRIVING = DrivingConfig()


@attrs.frozen
class TripState:
    """What one terminal's messages need from earlier packets; JSON-safe through to_dict/from_dict.

    Terminal-wide: `status_code` (last DTG device status, for the device health and its events on
    change; 0, ok, until a body says otherwise) and `fwv`.
    Per trip (reset when a newer `tid` arrives): everything else.

    Stored (`to_json`) as a JSON array of the values in the order declared here, which is why a
    new field may only ever be added at the end, with a default.
    """

    tid: int | None = None
    kind: str = ""  # the realtime kind the trip is made of: dtg, obd, mdt
    key_on_ms: int | None = None
    first_total_km: int | None = None
    last_total_km: int | None = None
    first_lat: float | None = None
    first_lon: float | None = None
    last_lat: float | None = None
    last_lon: float | None = None
    last_ms: int | None = None
    max_speed_kmh: int = 0
    speed_sum_kmh: int = 0
    speed_count: int = 0
    driving_s: int = 0
    first_total_fuel_ml: int | None = None
    last_total_fuel_ml: int | None = None
    trip_sent: bool = False
    status_code: int = 0
    fwv: str | None = None
    # the trip's dangerous-driving detector and measures (driving.py, tripmetrics.py), as JSON lists
    drive: list[Any] | None = attrs.field(default=None, hash=False)
    meter: list[Any] | None = attrs.field(default=None, hash=False)
    vehicle_type: str | None = None  # terminal-wide: the last basic info's vehicle type code
    system_v: int | None = None  # terminal-wide: 12 or 24 (V), from the battery while driving
    # the trip's end, once a KEY OFF packet named it (its Trip waits for the bodies up to it)
    key_off_ms: int | None = None
    key_off_lat: float | None = None
    key_off_lon: float | None = None
    key_off_v: float | None = None  # the battery after the engine stopped: the Trip's btv
    key_off_received_ms: int | None = None  # when that KEY OFF was received: the deadline runs from here

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _STATE_NAMES}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TripState:
        """The state `to_dict` wrote; unknown keys (from a newer version) are ignored."""
        return cls(**{k: v for k, v in data.items() if k in _STATE_NAMES})

    def to_json(self) -> str:
        """The stored form: an array is about half the cost of an object."""
        return json.dumps(_STATE_VALUES(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> TripState | None:
        """What `to_json` wrote, or the object form older versions stored; "null" is no state.

        An array from a newer version with more fields is cut to the fields known here; one from
        an older version with fewer gets the defaults of the rest."""
        data = json.loads(text)
        if data is None:
            return None
        if isinstance(data, list):
            return cls(*data[:len(_STATE_NAMES)])
        return cls.from_dict(data)

    def new_trip(self, tid: int, key_on_ms: int | None, kind: str) -> TripState:
        """A trip starting at `key_on_ms`; it takes up a KEY OFF received before any of its data (an
        outage: the terminal sends its data at the next KEY ON) when that KEY OFF is not before it."""
        waiting = (self.tid is None or self.trip_sent) and self.key_off_ms is not None and (
            key_on_ms is not None and key_on_ms <= self.key_off_ms)
        trip = TripState(tid=tid, kind=kind, key_on_ms=key_on_ms, status_code=self.status_code, fwv=self.fwv,
                         vehicle_type=self.vehicle_type, system_v=self.system_v)
        if not waiting:
            return trip
        return attrs.evolve(trip, key_off_ms=self.key_off_ms, key_off_lat=self.key_off_lat,
                            key_off_lon=self.key_off_lon, key_off_v=self.key_off_v,
                            key_off_received_ms=self.key_off_received_ms)


_STATE_NAMES = tuple(f.name for f in attrs.fields(TripState))
_STATE_VALUES = operator.attrgetter(*_STATE_NAMES)
_DRIVE, _METER, _SYSTEM_V = (_STATE_NAMES.index(name) for name in ("drive", "meter", "system_v"))


def _ml(litres: float) -> int:
    return round(litres * 1000)


# -- a realtime packet's bodies ---------------------------------------------------------------------


class BodySummary(NamedTuple):
    """What the trip state takes from a realtime packet's bodies (`summarize`)."""

    bodies: int = 0
    first_ms: int | None = None  # of the first body whose time is a calendar time
    last_ms: int | None = None  # of the last such body
    first_total_km: int = 0
    last_total_km: int = 0
    max_total_km: int = 0
    first_lat: float = 0.0
    first_lon: float = 0.0
    last_lat: float = 0.0
    last_lon: float = 0.0
    max_speed_kmh: int = 0
    speed_sum_kmh: int = 0
    driving_s: int = 0  # bodies with a speed above 0
    first_total_fuel_ml: int | None = None  # DTG and OBD bodies only
    last_total_fuel_ml: int | None = None
    last_status_code: int | None = None  # DTG bodies only


_ENDS = ("total_distance_km", "lon", "lat", "total_fuel_l", "status_code")  # read from the first and last body


def summarize(raw: bytes, layout: RealtimeLayout) -> BodySummary:
    """The summary of a realtime packet's bodies, from its bytes: columns where every body counts
    (the speeds, the odometers), the first and the last body's values for the rest."""
    count = layout.body_count(raw)
    if count <= 0:
        return BodySummary()
    first_ms, last_ms = layout.times_ms(raw)
    head, tail = layout.decoded(raw, 0, _ENDS), layout.decoded(raw, count - 1, _ENDS)
    speeds = layout.column(raw, "speed_kmh")
    fuel = "total_fuel_l" in head
    return BodySummary(
        count, first_ms, last_ms, head["total_distance_km"], tail["total_distance_km"],
        layout.column_max(raw, "total_distance_km"),
        head["lat"], head["lon"], tail["lat"], tail["lon"], max(speeds), sum(speeds), count - speeds.count(0),
        _ml(head["total_fuel_l"]) if fuel else None, _ml(tail["total_fuel_l"]) if fuel else None,
        tail.get("status_code"),
    )


def _summary(raw: bytes, layout: RealtimeLayout, columns: Sequence[Sequence[Any]],
             times: list[int | None]) -> BodySummary:
    """`summarize`, from the packet's columns and body times (what it reads from the bytes again
    otherwise): tests/test_mapping.py checks both against the decoded bodies."""
    count = len(times)
    if count <= 0:
        return BodySummary()
    places = _places(layout)
    first_ms = next((t for t in times if t is not None), None)
    last_ms = None if first_ms is None else next(t for t in reversed(times) if t is not None)
    head, tail = layout.decoded(raw, 0, _ENDS), layout.decoded(raw, count - 1, _ENDS)
    speeds = columns[places["speed_kmh"]]
    fuel = "total_fuel_l" in head
    return BodySummary(
        count, first_ms, last_ms, head["total_distance_km"], tail["total_distance_km"],
        max(columns[places["total_distance_km"]]),
        head["lat"], head["lon"], tail["lat"], tail["lon"], max(speeds), sum(speeds), count - speeds.count(0),
        _ml(head["total_fuel_l"]) if fuel else None, _ml(tail["total_fuel_l"]) if fuel else None,
        tail.get("status_code"),
    )


class Advance(NamedTuple):
    """Where a realtime packet belongs: its trip, and the state after it."""

    tid: int
    key_on_ms: int | None
    stale: bool  # the terminal's backlog of an older trip: published, but the state is left alone
    trip: TripState  # the trip the packet belongs to, with the packet accounted (unless stale)
    state: TripState | None  # the terminal's next state
    masks: list[int] | None = None  # per body, the dangerous-driving behaviours marked on it (not stale;
    # None too when no criteria apply to the vehicle)
    cdit: list[int] | None = None  # per body, metres since the trip's first body (not stale)
    closed: TripState | None = None  # the terminal's previous trip, complete now: its Trip goes first
    completes: bool = False  # the packet's bodies reach the trip's KEY OFF: its Trip goes after them
    # the bodies' wire values (`RealtimeLayout.transposed`) and UTC ms (None where no calendar
    # time), for the messages; None for an older trip's backlog, which is built body by body
    columns: Sequence[Sequence[Any]] | None = None
    times: list[int | None] | None = None


def advance(kind: str, key_on_ms: int | None, summary: BodySummary, state: TripState | None) -> Advance | None:
    """Where a realtime packet of `kind` with this KEY ON time and bodies belongs; None when it
    has no time at all to name a trip by (stored, but nothing is published)."""
    current = state or TripState()
    if key_on_ms is not None:
        tid = key_on_ms // 1000
    elif current.tid is not None and not current.trip_sent:
        tid, key_on_ms = current.tid, current.key_on_ms  # continues the terminal's open trip
    else:
        key_on_ms = summary.first_ms
        if key_on_ms is None:
            return None
        tid = key_on_ms // 1000

    # An older tid is the terminal's backlog of an earlier trip, unless the odometer shows the
    # vehicle has driven on since the state's trip: then the terminal's clock went back, and
    # waiting for it to catch up would hold every trip of the terminal until then.
    stale = current.tid is not None and tid < current.tid and not (
        current.last_total_km is not None
        and (summary.max_total_km if summary.bodies else -1) > current.last_total_km)
    if stale:
        return Advance(tid, key_on_ms, True, current, state)
    closed = None
    if tid != current.tid:
        # A newer trip: the terminal sends its data oldest first (§4.5), so the trip before is complete.
        if current.tid is not None and not current.trip_sent:
            closed = current
        current = current.new_trip(tid, key_on_ms, kind)
    current = account(current, summary)
    completes = not current.trip_sent and complete(current)
    if completes:
        current = attrs.evolve(current, trip_sent=True)
    return Advance(tid, key_on_ms, False, current, current, closed=closed, completes=completes)


BODY_PERIOD_MS = 1000
"""The terminal records a body a second: a trip's bodies reach its KEY OFF when the next one would
come after it."""

DEFAULT_TRIP_DEADLINE_MS = 24 * 3600 * 1000
"""How long after its KEY OFF was received a trip whose last bodies have not come is published as it is."""


def complete(trip: TripState) -> bool:
    """Whether the trip's bodies reach the KEY OFF time a KEY OFF packet named."""
    return (trip.key_off_ms is not None and trip.last_ms is not None
            and trip.last_ms + BODY_PERIOD_MS > trip.key_off_ms)


def overdue(state: TripState | None, received_ms: int | None, deadline_ms: int) -> bool:
    """Whether the terminal's trip waits for its last bodies longer than the deadline: judged by
    the receive time of the terminal's later packets, never by a clock, so a replay decides alike."""
    return (state is not None and state.tid is not None and not state.trip_sent
            and state.key_off_received_ms is not None and received_ms is not None
            and received_ms - state.key_off_received_ms >= deadline_ms)


def body_times_ms(raw: bytes, layout: RealtimeLayout) -> list[int | None]:
    """UTC ms of each body of a realtime packet (None: not a calendar time)."""
    return _times(layout.columns(raw, ("time",))["time"])


def _times(time_columns: Sequence[Sequence[int]]) -> list[int | None]:
    yy, month, day, hour, minute, second, cc = time_columns
    n = len(yy)
    if not n:
        return []
    midnight = day_ms(yy[0], month[0], day[0])
    if (midnight is not None and yy.count(yy[0]) == n and month.count(month[0]) == n and day.count(day[0]) == n
            and max(hour) <= 23 and max(minute) <= 59 and max(second) <= 59 and max(cc) <= 99):
        # one calendar day, every field in range (the usual packet): arithmetic, no check per body
        return [midnight + ((h * 60 + m) * 60 + s) * 1000 + c * 10
                for h, m, s, c in zip(hour, minute, second, cc, strict=True)]
    return [wire_time_ms(*t) for t in zip(yy, month, day, hour, minute, second, cc, strict=True)]



@functools.cache
def _places(layout: RealtimeLayout) -> dict[str, int]:
    """Where each field's (first) wire value sits in `layout.transposed`."""
    return {name: slot.index for name, slot in layout.body_slots.items()}


def _battery_scale(layout: RealtimeLayout) -> int:
    return getattr(layout.body_slots["battery_v"].adapter, "scale", 1)


def drive_and_measure(trip: TripState, raw: bytes, layout: RealtimeLayout, modem: str,
                      driving: DrivingConfig) -> tuple[list[int] | None, list[int], TripState]:
    """The packet's bodies through the trip's dangerous-driving detector and measures: the
    behaviours marked on each body (None when no criteria apply to the vehicle: nothing is
    judged), the metres since the trip's first body at each, and the trip after."""
    columns = layout.transposed(raw)
    at = _places(layout)["time"]
    return _drive_and_measure(trip, layout, columns, _times(columns[at:at + 7]), modem, driving)


def _drive_and_measure(trip: TripState, layout: RealtimeLayout, columns: Sequence[Sequence[Any]],
                       times: list[int | None], modem: str,
                       driving: DrivingConfig) -> tuple[list[int] | None, list[int], TripState]:
    """`drive_and_measure` on the packet's columns (`RealtimeLayout.transposed`) and body times."""
    places = _places(layout)
    speeds = columns[places["speed_kmh"]]
    rules = driving.criteria_for(modem, trip.vehicle_type)
    masks = None
    drive_list = trip.drive
    status = places.get("status_code")
    status_codes = None if status is None else columns[status]
    if rules is not None:
        masks, drive_state = drive.detect(
            None if trip.drive is None else DriveState.from_list(trip.drive), rules, time_ms=times, speed_kmh=speeds,
            azimuth_deg=columns[places["azimuth_deg"]], lat=columns[places["lat"]], lon=columns[places["lon"]],
            status_code=status_codes)
        drive_list = drive_state.to_list()
    scale = _battery_scale(layout)
    rpm = places.get("rpm")
    cdit, meter = tripmetrics.measure(
        None if trip.meter is None else TripMeter.from_list(trip.meter), time_ms=times, speed_kmh=speeds,
        total_km=columns[places["total_distance_km"]], battery_v=[v / scale for v in columns[places["battery_v"]]],
        rpm=None if rpm is None else columns[rpm])
    system_v = tripmetrics.system_voltage(meter.max_driving_v)
    values = list(_STATE_VALUES(trip))
    values[_DRIVE], values[_METER] = drive_list, meter.to_list()
    if system_v is not None:
        values[_SYSTEM_V] = system_v
    return masks, cdit, TripState(*values)


def account(state: TripState, summary: BodySummary) -> TripState:
    """The trip state after one more packet of bodies of the current trip."""
    if not summary.bodies:
        return state
    first_fuel, last_fuel = state.first_total_fuel_ml, state.last_total_fuel_ml
    if summary.first_total_fuel_ml is not None:
        first_fuel = summary.first_total_fuel_ml if first_fuel is None else first_fuel
        last_fuel = summary.last_total_fuel_ml
    return TripState(
        tid=state.tid, kind=state.kind, key_on_ms=state.key_on_ms,
        first_total_km=summary.first_total_km if state.first_total_km is None else state.first_total_km,
        last_total_km=summary.last_total_km,
        first_lat=summary.first_lat if state.first_lat is None else state.first_lat,
        first_lon=summary.first_lon if state.first_lon is None else state.first_lon,
        last_lat=summary.last_lat, last_lon=summary.last_lon,
        last_ms=summary.last_ms if summary.last_ms is not None else state.last_ms,
        max_speed_kmh=max(state.max_speed_kmh, summary.max_speed_kmh),
        speed_sum_kmh=state.speed_sum_kmh + summary.speed_sum_kmh,
        speed_count=state.speed_count + summary.bodies,
        driving_s=state.driving_s + summary.driving_s,
        first_total_fuel_ml=first_fuel, last_total_fuel_ml=last_fuel, trip_sent=state.trip_sent,
        status_code=state.status_code if summary.last_status_code is None else summary.last_status_code,
        fwv=state.fwv, drive=state.drive, meter=state.meter, vehicle_type=state.vehicle_type, system_v=state.system_v,
        key_off_ms=state.key_off_ms, key_off_lat=state.key_off_lat, key_off_lon=state.key_off_lon,
        key_off_v=state.key_off_v, key_off_received_ms=state.key_off_received_ms,
    )


def realtime_advance(raw: bytes, layout: RealtimeLayout, state: TripState | None,
                     driving: DrivingConfig = DEFAULT_DRIVING) -> Advance | None:
    """`advance` for one framed realtime packet of `layout`'s kind, with its bodies through the
    trip's detector and measures. The packet's bytes are read once, as columns (`columns` and
    `times` of the result, for the messages)."""
    columns = layout.transposed(raw)
    places = _places(layout)
    at = places["time"]
    times = _times(columns[at:at + 7])
    moved = advance(layout.kind, layout.key_on_ms(raw), _summary(raw, layout, columns, times), state)
    if moved is None:
        return None
    if moved.stale:  # an older trip's backlog: published as it comes, no detector, no measures
        return moved
    masks, cdit, trip = _drive_and_measure(moved.trip, layout, columns, times, layout.modem(raw), driving)
    # a new Advance, not `_replace` (a NamedTuple's _replace costs a map over every field by name)
    return Advance(moved.tid, moved.key_on_ms, False, trip, trip, masks, cdit, moved.closed, moved.completes,
                   columns, times)


def status_changes(status_code: int, codes: Sequence[int]) -> list[tuple[int, int, int]]:
    """(body index, code before, code) of each body whose device status differs from the one
    before (a fault appearing, changing or clearing to 0), the one before the first body being
    `status_code`."""
    if codes.count(status_code) == len(codes):  # the usual packet: no change at all
        return []
    changes = []
    for index, code in enumerate(codes):
        if code != status_code:
            changes.append((index, status_code, code))
        status_code = code
    return changes


# -- KEY OFF and basic info -------------------------------------------------------------------------


class KeyOffOutcome(NamedTuple):
    trip: TripState | None  # the trip the KEY OFF belongs to, after it (None: no trip is known)
    closes: bool  # the trip is complete at this KEY OFF: its Trip message is due now
    state: TripState | None  # the terminal's next state


def key_off(state: TripState | None, key_off_ms: int | None, *, lat: float | None = None, lon: float | None = None,
            battery_v: float | None = None, received_ms: int | None = None) -> KeyOffOutcome:
    """What a KEY OFF at `key_off_ms` does to the terminal's trip. The first one after a trip names
    its end; the Trip is due once the trip's bodies reach that time (now, or when the last of them
    arrive: §4.5, a terminal sends its unsent data at the next KEY ON). A KEY OFF whose time is no
    calendar time cannot tell: it closes the trip at once, at its last body. One from before the
    trip began is the terminal's backlog, not its end."""
    ends: dict[str, Any] = {"key_off_ms": key_off_ms, "key_off_lat": lat, "key_off_lon": lon,
                            "key_off_v": battery_v, "key_off_received_ms": received_ms}
    if state is not None and state.tid is not None and (
            key_off_ms is not None and state.key_on_ms is not None and key_off_ms < state.key_on_ms):
        return KeyOffOutcome(None, False, state)
    if state is None or state.tid is None or state.trip_sent:
        # No trip waits for it: the end of a trip whose data the terminal has not sent yet (an
        # outage; §4.5: realtime data only while the key is on). Kept for that trip to take up.
        later = key_off_ms is not None and (state is None or state.key_off_ms is None or key_off_ms > state.key_off_ms)
        pending = attrs.evolve(state or TripState(), **ends) if later else state
        return KeyOffOutcome(state if state is not None and state.tid is not None else None, False, pending)
    trip = state
    if trip.key_off_ms is None and key_off_ms is not None:
        trip = attrs.evolve(trip, **ends)
    closes = complete(trip) or (key_off_ms is None and trip.key_off_ms is None)
    if closes:
        trip = attrs.evolve(trip, trip_sent=True, key_off_v=battery_v if trip.key_off_v is None else trip.key_off_v)
    return KeyOffOutcome(trip, closes, trip)


def trip_values(trip: TripState, *, modem: str = "", driving: DrivingConfig = DEFAULT_DRIVING,
                partial: bool = False) -> dict[str, Any]:
    """Every value the Trip message can carry, None where unknown (the profile picks the keys).
    `partial`: published at the deadline, without the bodies up to the KEY OFF."""
    end_ms = trip.key_off_ms if trip.key_off_ms is not None else trip.last_ms
    def difference(last: int | None, first: int | None, scale: int) -> int | None:
        if last is None or first is None or last < first:
            return None
        return (last - first) * scale

    return {
        "tid": trip.tid,
        "stt": trip.key_on_ms,
        "edt": end_ms,
        "dis": difference(trip.last_total_km, trip.first_total_km, 1000),
        "stlat": trip.first_lat,
        "stlon": trip.first_lon,
        "edlat": trip.key_off_lat if trip.key_off_lat is not None else trip.last_lat,
        "edlon": trip.key_off_lon if trip.key_off_lon is not None else trip.last_lon,
        "hsts": trip.max_speed_kmh if trip.speed_count else None,
        "mesp": round(trip.speed_sum_kmh / trip.speed_count) if trip.speed_count else None,
        "dtvt": trip.driving_s if trip.speed_count else None,
        "fc": difference(trip.last_total_fuel_ml, trip.first_total_fuel_ml, 1),
        "fwv": trip.fwv or None,
        "tdis": trip.last_total_km * 1000 if trip.last_total_km is not None else None,
        "btv": trip.key_off_v,
        "xpartial": True if partial else None,
    } | _measures(trip, modem, driving)


def _measures(trip: TripState, modem: str, driving: DrivingConfig) -> dict[str, Any]:
    """The Trip's values from the trip's detector and measures."""
    out: dict[str, Any] = dict.fromkeys(("idt", "gnv", "wut", "est", "xdd"))
    if trip.meter is not None:
        meter = TripMeter.from_list(trip.meter)
        out |= {"dis": meter.distance_m, "idt": meter.idle_s, "gnv": meter.max_driving_v,
                "wut": tripmetrics.warm_up_s(trip.key_on_ms, meter.first_moving_ms, trip.last_ms),
                "est": meter.economy_s}
    rules = driving.criteria_for(modem, trip.vehicle_type)
    if rules is not None:
        state = DriveState() if trip.drive is None else DriveState.from_list(trip.drive)
        out["xdd"] = drive.finish(state, rules).counts_by_name()
    return out


def sent(state: TripState | None) -> TripState | None:
    """The state once the trip's Trip is published."""
    return None if state is None else attrs.evolve(state, trip_sent=True)


def with_firmware(state: TripState | None, fwv: str, vehicle_type: str | None = None) -> TripState:
    """The terminal's state after a basic info naming its firmware version (and vehicle type)."""
    current = state or TripState()
    return attrs.evolve(current, fwv=fwv, vehicle_type=vehicle_type or current.vehicle_type)


# -- without messages ---------------------------------------------------------------------------------


def next_state(raw: bytes, state: TripState | None, driving: DrivingConfig = DEFAULT_DRIVING,
               received_ms: int | None = None, trip_deadline_ms: int = DEFAULT_TRIP_DEADLINE_MS) -> TripState | None:
    """The terminal's state after one framed packet, without building its messages: what a
    consumer that only keeps trip state computes per packet. The state `messages.build` returns
    with the messages (tests/test_mapping.py::test_next_state_from_bytes_is_the_state_map_record_gives)."""
    layout = realtime_layout(raw)
    if layout is not None:
        moved = realtime_advance(raw, layout, state, driving)
        return state if moved is None else moved.state
    if overdue(state, received_ms, trip_deadline_ms):
        state = sent(state)
    record = decode(raw)
    if isinstance(record, KeyOff):
        return key_off(state, time_ms(record.key_off_time), lat=record.lat, lon=record.lon,
                       battery_v=record.battery_v, received_ms=received_ms).state
    if isinstance(record, BasicInfo):
        return with_firmware(state, str(record.firmware_version), str(record.vehicle_type))
    if isinstance(record, StatusLog):
        return state
    raise ValueError(f"no trip state is defined for a packet of kind {record.KIND!r}")
