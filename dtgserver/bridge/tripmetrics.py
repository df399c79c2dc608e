"""A trip's measures from its 1 Hz body columns: distance in metres, idle, warm-up, time at 80–100
km/h, the battery while driving; and the battery system and parking time they lead to.

Everything is pure, and `measure` carries a small state (`TripMeter`) from one packet of a trip to
the next, so that any cut of a trip into packets gives the same figures as one pass.

Distance: the terminal records one body per second, so each body's speed stands for one second:
the trip's distance is the sum of its body speeds (km/h × 1 s = 1/3.6 m). The odometer (whole km)
cross-checks it: the true distance since the trip's first body lies within 1 km of the odometer's
difference, so the sum is kept inside that bound. Below it (bodies missing, a speed sensor
reading low) it is raised to the bound; above it (a speed reading high) it holds until the
odometer catches up, so the distance never goes backwards. A trip whose odometer has not moved
has no upper bound: a terminal that does not count kilometres must not cap every trip at 1 km.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from typing import Any

import attrs

KMH_S_PER_KM = 3600
"""km/h × s in one km: the unit the distance is summed in (exact integers; 3.6 per metre)."""

ECONOMY_SPEED_KMH = (80, 100)
"""`est`: the Trip's seconds at 80–100 km/h (bounds included)."""

_ECONOMY = range(ECONOMY_SPEED_KMH[0], ECONOMY_SPEED_KMH[1] + 1)

SYSTEM_VOLTAGE_SPLIT_V = 18.0
"""A running 12 V system reads about 13.5–14.8 V, a 24 V one about 27–29 V: above this it is 24 V."""

SYSTEM_VOLTAGE_MIN_V = 8.0
"""Below this no system is inferred (no battery reading, or a sensor fault)."""


@attrs.frozen
class TripMeter:
    """What `measure` keeps between packets of one trip; JSON-safe as a list (`to_list`)."""

    distance_kmh_s: int = 0  # the distance so far, in km/h × s (metres × 3.6)
    first_total_km: int | None = None
    max_total_km: int | None = None
    idle_s: int = 0  # bodies standing (speed 0) with the engine running (RPM above 0, where the body has RPM)
    economy_s: int = 0  # bodies at 80–100 km/h
    max_driving_v: float | None = None  # highest battery while moving (speed above 0)
    first_moving_ms: int | None = None  # time of the first body with speed above 0
    bodies: int = 0

    def to_list(self) -> list[Any]:
        return list(_METER_VALUES(self))

    @classmethod
    def from_list(cls, values: Sequence[Any]) -> TripMeter:
        return cls(*values)

    @property
    def distance_m(self) -> int:
        return _metres(self.distance_kmh_s)


_METER_VALUES = operator.attrgetter(*(f.name for f in attrs.fields(TripMeter)))


def _metres(kmh_s: int) -> int:
    return (kmh_s * 10 + 18) // 36  # kmh_s / 3.6, rounded half up, in integers


def measure(meter: TripMeter | None, *, time_ms: Sequence[int | None], speed_kmh: Sequence[int],
            total_km: Sequence[int], battery_v: Sequence[float], rpm: Sequence[int] | None = None,
            ) -> tuple[list[int], TripMeter]:
    """The metres driven since the trip's first body at each body (`cdit`), and the meter after them."""
    m = meter or TripMeter()
    n = len(speed_kmh)
    if not n:
        return [], m
    first_km = m.first_total_km if m.first_total_km is not None else total_km[0]
    max_km = max(total_km) if m.max_total_km is None else max(m.max_total_km, max(total_km))

    start = m.distance_kmh_s
    sums = list(itertools.accumulate(speed_kmh, initial=start))[1:]
    # The sum only rises, and so do the bounds (but for the upper one, which is first none, then
    # 2 km, rising): a sum inside the highest lower bound of the packet and its lowest upper bound
    # is inside every body's, and needs no clamping body by body.
    before_km = m.max_total_km if m.max_total_km is not None else first_km
    lowest_upper = _upper(max(before_km, total_km[0], first_km + 1), first_km) if max_km > first_km else None
    if _lower(max_km, first_km) <= sums[0] and (lowest_upper is None or sums[-1] <= lowest_upper):
        distances = sums
    else:
        # body by body: d = max(d + speed if upper is None else max(d, min(d + speed, upper)), lower),
        # `_upper` and `_lower` of the highest odometer so far written out (no call per body)
        distances = []
        append = distances.append
        d, top = start, before_km
        for speed, km in zip(speed_kmh, total_km, strict=True):
            if km > top:
                top = km
            moved = d + speed
            if top > first_km:  # the odometer has moved: an upper bound
                upper = (top - first_km + 1) * KMH_S_PER_KM
                if moved > upper:
                    moved = upper if upper > d else d
                elif moved < d:
                    moved = d
            lower = (top - first_km - 1) * KMH_S_PER_KM
            d = moved if moved > lower else lower
            append(d)

    driving_v = max(itertools.compress(battery_v, speed_kmh), default=None)  # a speed above 0 selects
    if driving_v is not None and m.max_driving_v is not None:
        driving_v = max(driving_v, m.max_driving_v)
    elif driving_v is None:
        driving_v = m.max_driving_v
    first_moving = m.first_moving_ms
    if first_moving is None:
        first_moving = next(itertools.compress(time_ms, (v and t is not None for v, t in zip(
            speed_kmh, time_ms, strict=True))), None)
    standing = speed_kmh.count(0)
    if rpm is None or not standing:
        idle = standing
    else:  # RPM is never negative: standing with RPM above 0
        idle = sum(map(bool, itertools.compress(rpm, map(operator.not_, speed_kmh))))
    economy = sum(map(_ECONOMY.__contains__, speed_kmh)) if max(speed_kmh) >= _ECONOMY.start else 0
    after = TripMeter(distances[-1], first_km, max_km, m.idle_s + idle, m.economy_s + economy, driving_v,
                      first_moving, m.bodies + n)
    return [(d * 10 + 18) // 36 for d in distances], after  # `_metres` of each, without a call per body


def _lower(max_km: int, first_km: int) -> int:
    return (max_km - first_km - 1) * KMH_S_PER_KM


def _upper(max_km: int, first_km: int) -> int | None:
    return None if max_km <= first_km else (max_km - first_km + 1) * KMH_S_PER_KM


def warm_up_s(key_on_ms: int | None, first_moving_ms: int | None, last_ms: int | None) -> int | None:
    """`wut`: seconds from KEY ON to the first body that moved; a trip that never moved warmed up
    all along (to its last body). None without a KEY ON time, or a clock going backwards."""
    end = first_moving_ms if first_moving_ms is not None else last_ms
    if key_on_ms is None or end is None or end < key_on_ms:
        return None
    return round((end - key_on_ms) / 1000)


def system_voltage(driving_v: float | None) -> int | None:
    """12 or 24: the vehicle's electrical system from its battery reading with the engine running
    (most DTG vehicles, buses and trucks, are 24 V); None when there is no usable reading."""
    if driving_v is None or driving_v < SYSTEM_VOLTAGE_MIN_V:
        return None
    return 24 if driving_v > SYSTEM_VOLTAGE_SPLIT_V else 12


DEFAULT_BATTERY_WARNING_V = 11.5
"""The Battery Warning threshold of a 12 V system unless configured (`--battery-warning-v`): a
resting lead-acid battery at about 11.5 V is nearly flat."""


def battery_warning_threshold_v(system_v: int | None, warning_12v: float, reading_v: float) -> float:
    """The Battery Warning threshold for a vehicle: `warning_12v` on a 12 V system, twice it on a
    24 V one (two 12 V batteries in series). A vehicle whose system is not known yet is judged by
    the reading itself: above 18 V it can only be a 24 V system."""
    if system_v is None:
        system_v = 24 if reading_v > SYSTEM_VOLTAGE_SPLIT_V else 12
    return warning_12v * (system_v // 12)


def parking_s(sent_ms: int | None, key_off_ms: int | None) -> int | None:
    """Parking microtrip `tim`: seconds since the KEY OFF at the KEY OFF packet's send time."""
    if sent_ms is None or key_off_ms is None or sent_ms < key_off_ms:
        return None
    return (sent_ms - key_off_ms) // 1000
