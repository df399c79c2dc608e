"""`dtgserver report`: distance, driving time and the dangerous-driving behaviours per 100 km, per
vehicle or per driver, from the stored packets; the figure KOTSA publishes per driver.

Each trip (a terminal's realtime packets with one KEY ON time) runs through the same detector and
meter as the bridge, with the criteria of the vehicle's class from the basic info last received
before the trip began; its driver is that basic info's driver code. Bodies count where their own
time lies in the period asked for, so a backlog sent days later still counts on the day driven.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any, Protocol

import attrs

from ..protocol import BasicInfo, DtgBody, ObdBody, ProtocolError, Realtime, decode
from .driving import BEHAVIOURS, BIT, Criteria, DriveState, DrivingConfig, detect, finish
from .tripmetrics import TripMeter, measure

UNKNOWN_DRIVER = "(unknown)"
SHORT = {"start": "start", "acceleration": "accel", "deceleration": "decel", "stop": "stop",
         "left_turn": "left", "right_turn": "right", "u_turn": "u-turn", "lane_change": "lane",
         "overtaking": "overtake"}
ORDER = ("start", "acceleration", "deceleration", "stop", "left_turn", "right_turn", "u_turn", "lane_change",
         "overtaking")  # the order KOTSA's own tables list them in


def _ms(value: object) -> int | None:
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    return None


@attrs.define
class _Trip:
    modem: str
    driver: str
    plate: str
    vehicle_class: str | None
    rules: Criteria | None
    drive: DriveState | None = None
    meter: TripMeter | None = None
    last_cdit: int = 0
    last_ms: int | None = None
    counted: bool = False  # a body of it lies in the period


@attrs.define
class Row:
    """One line of the report: a vehicle (its modem) or a driver (the basic info's driver code)."""

    key: str
    plates: set[str] = attrs.field(factory=set)
    classes: set[str] = attrs.field(factory=set)
    others: set[str] = attrs.field(factory=set)  # a vehicle's drivers, a driver's vehicles (modems)
    trips: int = 0
    distance_m: int = 0
    driving_s: int = 0
    counts: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(BEHAVIOURS, 0))

    def per_100km(self) -> dict[str, float | None]:
        km = self.distance_m / 1000
        return {b: round(self.counts[b] * 100 / km, 2) if km else None for b in ORDER}

    def to_json(self, by: str) -> dict[str, Any]:
        out: dict[str, Any] = {by: self.key}
        out["modems" if by == "driver" else "drivers"] = sorted(self.others)
        out |= {"plates": sorted(self.plates), "classes": sorted(self.classes), "trips": self.trips,
                "distance_km": round(self.distance_m / 1000, 3), "driving_s": self.driving_s,
                "counts": {b: self.counts[b] for b in ORDER}, "per_100km": self.per_100km()}
        return out


class StoredBytes(Protocol):
    """What the report reads of a stored packet (the store's `StoredPacket`, a log's `LoggedPacket`)."""

    @property
    def raw(self) -> bytes: ...


def report(packets: Iterable[StoredBytes], config: DrivingConfig, *, by: str = "vehicle",
           since: float | None = None, until: float | None = None) -> list[Row]:
    """The rows, sorted by key. `packets` in each terminal's receive order (`read_stored` gives that);
    `since`/`until` (Unix seconds) bound the bodies' own times."""
    if by not in ("vehicle", "driver"):
        raise ValueError(f"by must be vehicle or driver, got {by!r}")
    since_ms = None if since is None else since * 1000
    until_ms = None if until is None else until * 1000
    basic: dict[str, BasicInfo] = {}
    trips: dict[tuple[str, int], _Trip] = {}
    last_trip: dict[str, int] = {}
    rows: dict[str, Row] = {}

    def row_of(trip: _Trip) -> Row:
        key = trip.modem if by == "vehicle" else trip.driver
        row = rows.get(key)
        if row is None:
            row = rows[key] = Row(key)
        row.others.add(trip.driver if by == "vehicle" else trip.modem)
        if trip.plate:
            row.plates.add(trip.plate)
        row.classes.add(trip.vehicle_class or "-")
        if not trip.counted:
            trip.counted = True
            row.trips += 1
        return row

    for packet in packets:
        try:
            record = decode(packet.raw)
        except ProtocolError:  # the store holds framed packets only; a damaged row is skipped
            continue
        if isinstance(record, BasicInfo):
            basic[record.modem] = record
            continue
        if not isinstance(record, Realtime) or not record.bodies:
            continue
        bodies = record.bodies
        times = [_ms(body.time) for body in bodies]
        key_on = _ms(record.key_on_time)
        if key_on is None:
            key_on = last_trip.get(record.modem)
        if key_on is None:
            key_on = next((t for t in times if t is not None), None)
        if key_on is None:
            continue  # no time at all: no trip, no period to count it in
        last_trip[record.modem] = key_on
        trip = trips.get((record.modem, key_on))
        if trip is None:
            info = basic.get(record.modem)
            vehicle_type = str(info.vehicle_type) if info is not None else None
            trip = trips[(record.modem, key_on)] = _Trip(
                record.modem, (str(info.driver_code) if info is not None else "") or UNKNOWN_DRIVER,
                str(info.registration_number) if info is not None else "",
                config.vehicle_class(record.modem, vehicle_type), config.criteria_for(record.modem, vehicle_type))

        speeds = [body.speed_kmh for body in bodies]
        masks = [0] * len(bodies)
        if trip.rules is not None:
            masks, trip.drive = detect(
                trip.drive, trip.rules, time_ms=times, speed_kmh=speeds,
                azimuth_deg=[body.azimuth_deg for body in bodies], lat=[body.lat for body in bodies],
                lon=[body.lon for body in bodies],
                status_code=[body.status_code for body in bodies] if isinstance(bodies[0], DtgBody) else None)
        cdit, trip.meter = measure(
            trip.meter, time_ms=times, speed_kmh=speeds, total_km=[body.total_distance_km for body in bodies],
            battery_v=[body.battery_v for body in bodies],
            rpm=[body.rpm for body in bodies] if isinstance(bodies[0], DtgBody | ObdBody) else None)
        for t, speed, mask, metres in zip(times, speeds, masks, cdit, strict=True):
            if t is not None and (since_ms is None or t >= since_ms) and (until_ms is None or t < until_ms):
                row = row_of(trip)
                row.distance_m += metres - trip.last_cdit
                row.driving_s += speed > 0
                if mask:
                    for behaviour in BEHAVIOURS:
                        if mask & 1 << BIT[behaviour]:
                            row.counts[behaviour] += 1
                trip.last_ms = t
            trip.last_cdit = metres

    for trip in trips.values():  # the trips have ended: a turn under way at the last body counts
        if trip.rules is None or trip.drive is None or not trip.counted:
            continue
        ended = finish(trip.drive, trip.rules)
        row = row_of(trip)
        for behaviour, before, after in zip(BEHAVIOURS, trip.drive.counts, ended.counts, strict=True):
            row.counts[behaviour] += after - before
    return [rows[key] for key in sorted(rows)]


# -- output --------------------------------------------------------------------------------------------


def as_json(rows: list[Row], by: str, config: DrivingConfig) -> str:
    return json.dumps({"edition": config.edition, "by": by, "rows": [row.to_json(by) for row in rows]},
                      ensure_ascii=False, indent=2)


def as_csv(rows: list[Row], by: str) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([by, "plates", "classes", "trips", "distance_km", "driving_s",
                     *(f"{b}_per_100km" for b in ORDER), *(f"{b}_count" for b in ORDER)])
    for row in rows:
        rates = row.per_100km()
        writer.writerow([row.key, " ".join(sorted(row.plates)), " ".join(sorted(row.classes)), row.trips,
                         f"{row.distance_m / 1000:.3f}", row.driving_s,
                         *("" if rates[b] is None else f"{rates[b]:.2f}" for b in ORDER),
                         *(row.counts[b] for b in ORDER)])
    return out.getvalue()


def as_table(rows: list[Row], by: str, config: DrivingConfig) -> Iterator[str]:
    head = [by, "plate", "class", "trips", "km", "driving", *(SHORT[b] for b in ORDER)]
    lines = []
    for row in rows:
        rates = row.per_100km()
        hours, rest = divmod(row.driving_s, 3600)
        lines.append([row.key, ",".join(sorted(row.plates)) or "-", ",".join(sorted(row.classes)), str(row.trips),
                      f"{row.distance_m / 1000:.1f}", f"{hours}:{rest // 60:02d}",
                      *("-" if rates[b] is None else f"{rates[b]:.1f}" for b in ORDER)])
    widths = [max(_width(cell) for cell in column) for column in zip(head, *lines, strict=False)]
    for line in [head, *lines]:
        yield "  ".join(_pad(cell, width, left=i < 3) for i, (cell, width) in enumerate(zip(line, widths,
                                                                                         strict=True))).rstrip()
    yield (f"behaviours per 100 km, KOTSA criteria edition {config.edition}; speeding is not computed "
           "(no packet carries the road's limit)")


def _width(text: str) -> int:
    # Hangul on a plate takes two columns on a terminal
    return sum(2 if "\uac00" <= ch <= "\ud7a3" else 1 for ch in text)


def _pad(text: str, width: int, *, left: bool) -> str:
    space = " " * (width - _width(text))
    return text + space if left else space + text
