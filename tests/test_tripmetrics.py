"""Trip measures from body columns: metres from the speed within the odometer's bound, idle,
warm-up, 80–100 km/h, the battery system, parking time; the same however a trip is cut."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from dtgserver.bridge.tripmetrics import (
    TripMeter,
    battery_warning_threshold_v,
    measure,
    parking_s,
    system_voltage,
    warm_up_s,
)

T0 = 1_795_215_600_000


def trip(speeds: list[int], km: list[int] | int = 1000, *, battery: float = 27.8, rpm: list[int] | None = None,
         start_ms: int = T0) -> dict[str, Any]:
    n = len(speeds)
    return {"time_ms": [start_ms + 1000 * i for i in range(n)], "speed_kmh": speeds,
            "total_km": [km] * n if isinstance(km, int) else km, "battery_v": [battery] * n, "rpm": rpm}


def test_distance_is_the_speed_summed_second_by_second() -> None:
    cdit, meter = measure(None, **trip([36] * 100))  # 10 m every second
    assert cdit[:3] == [10, 20, 30] and cdit[-1] == 1000 and meter.distance_m == 1000
    # a short trip is metres, not the odometer's whole km (which did not move)
    _, meter = measure(None, **trip([50] * 60))
    assert meter.distance_m == 833


def test_the_odometer_bounds_the_distance() -> None:
    # bodies missing: the speeds give 500 m, the odometer 3 km: at least 2 km
    cdit, meter = measure(None, **trip([36] * 50, [1000] * 49 + [1003]))
    assert cdit[-2] == 490 and cdit[-1] == 2000 and meter.distance_m == 2000
    # a speed reading high: 10 km by the speed, 5 km on the odometer: at most 6 km, never backwards
    km = [1000 + i * 5 // 999 for i in range(1000)]
    cdit, meter = measure(None, **trip([36] * 1000, km))
    assert meter.distance_m <= 6000 and max(cdit) == cdit[-1]
    assert all(b >= a for a, b in itertools.pairwise(cdit))
    # an odometer that never moves bounds nothing from above
    _, meter = measure(None, **trip([90] * 600))
    assert meter.distance_m == 15000


def test_idle_economy_and_battery() -> None:
    speeds = [0, 0, 0, 10, 80, 100, 101, 79, 0]
    rpm = [0, 700, 700, 900, 2000, 2200, 2200, 1900, 700]
    columns = trip(speeds, rpm=rpm)
    columns["battery_v"] = [24.1, 27.0, 27.5, 28.4, 28.1, 27.9, 27.9, 27.9, 29.5]
    _, meter = measure(None, **columns)
    assert meter.idle_s == 3  # standing with the engine running; the first body's engine was off
    assert meter.economy_s == 2
    assert meter.max_driving_v == 28.4  # 29.5 was standing
    assert meter.first_moving_ms == T0 + 3000
    columns["rpm"] = None  # an MDT: no RPM, every standing body is idle (its key is on)
    assert measure(None, **columns)[1].idle_s == 4


def test_warm_up() -> None:
    assert warm_up_s(T0, T0 + 181_000, T0 + 900_000) == 181
    assert warm_up_s(T0, None, T0 + 300_000) == 300  # never moved: warmed up all along
    assert warm_up_s(None, T0, T0) is None
    assert warm_up_s(T0, T0 - 1000, T0) is None


def test_system_voltage_and_battery_warning() -> None:
    assert system_voltage(14.2) == 12 and system_voltage(28.1) == 24
    assert system_voltage(None) is None and system_voltage(0.0) is None
    assert battery_warning_threshold_v(12, 11.5, 11.0) == 11.5
    assert battery_warning_threshold_v(24, 11.5, 22.0) == 23.0
    assert battery_warning_threshold_v(None, 11.5, 22.0) == 23.0  # only a 24 V system reads 22 V
    assert battery_warning_threshold_v(None, 11.5, 11.0) == 11.5


def test_parking_time() -> None:
    assert parking_s(T0 + 600_990, T0) == 600
    assert parking_s(T0, None) is None and parking_s(T0, T0 + 1000) is None


def test_meter_survives_json_and_an_empty_packet() -> None:
    import json

    _, meter = measure(None, **trip([0, 20, 30], rpm=[800, 900, 1000]))
    assert TripMeter.from_list(json.loads(json.dumps(meter.to_list()))) == meter
    assert measure(meter, **trip([])) == ([], meter)


@st.composite
def trips(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, 300))
    speeds = draw(st.lists(st.integers(0, 130), min_size=n, max_size=n))
    km, odometer = [], draw(st.integers(0, 9_000_000))
    for _ in range(n):
        odometer += draw(st.sampled_from([0] * 40 + [1, 2]))
        km.append(odometer)
    columns = trip(speeds, km, rpm=draw(st.one_of(st.none(), st.lists(st.integers(0, 3000), min_size=n,
                                                                          max_size=n))))
    columns["battery_v"] = draw(st.lists(st.sampled_from([12.4, 14.1, 24.8, 28.2]), min_size=n, max_size=n))
    return columns


@given(trips(), st.lists(st.integers(1, 80), max_size=8))
@settings(max_examples=150, deadline=None)
def test_the_same_however_the_trip_is_cut(columns: dict[str, Any], cuts: list[int]) -> None:
    whole_cdit, whole = measure(None, **columns)
    n, bounds, at = len(columns["speed_kmh"]), [0], 0
    for size in cuts:
        at = min(n, at + size)
        bounds.append(at)
    bounds.append(n)
    cdit: list[int] = []
    meter = None
    for a, b in itertools.pairwise(bounds):
        part: dict[str, Any] = {k: None if v is None else v[a:b] for k, v in columns.items()}
        part_cdit, meter = measure(meter, **part)
        cdit += part_cdit
    assert cdit == whole_cdit and meter == whole
    assert all(b >= a for a, b in itertools.pairwise(cdit))
    moved = max(columns["total_km"]) - columns["total_km"][0]
    if moved:  # within a km of the odometer, but where the distance holds for it to catch up
        assert whole.distance_m >= (moved - 1) * 1000
        assert whole.distance_m <= max((moved + 1) * 1000, _summed_before_first_move(columns))


def _summed_before_first_move(columns: dict[str, Any]) -> int:
    """The distance the speeds gave before the odometer first moved (no upper bound until then)."""
    first = columns["total_km"][0]
    total = 0
    for speed, km in zip(columns["speed_kmh"], columns["total_km"], strict=True):
        if km > first:
            break
        total += speed
    return (total * 10 + 18) // 36


def reference_measure(meter: TripMeter | None, *, time_ms: list[int | None], speed_kmh: list[int],
                      total_km: list[int], battery_v: list[float], rpm: list[int] | None = None,
                      ) -> tuple[list[int], TripMeter]:
    """`measure` written the plain way, one body at a time: what the fast one must equal."""
    m = meter or TripMeter()
    if not speed_kmh:
        return [], m
    first = m.first_total_km if m.first_total_km is not None else total_km[0]
    top = m.max_total_km if m.max_total_km is not None else first
    d, idle, economy, driving_v, first_moving = m.distance_kmh_s, m.idle_s, m.economy_s, m.max_driving_v, \
        m.first_moving_ms
    cdit = []
    for i, speed in enumerate(speed_kmh):
        top = max(top, total_km[i])
        if top > first:  # bounded by the odometer: never above its upper bound by adding, never backwards
            d = max(d, min(d + speed, (top - first + 1) * 3600))
        else:
            d += speed
        d = max(d, (top - first - 1) * 3600)
        cdit.append((d * 10 + 18) // 36)
        if speed == 0 and (rpm is None or rpm[i] > 0):
            idle += 1
        if 80 <= speed <= 100:
            economy += 1
        if speed > 0:
            driving_v = battery_v[i] if driving_v is None else max(driving_v, battery_v[i])
            if first_moving is None and time_ms[i] is not None:
                first_moving = time_ms[i]
    return cdit, TripMeter(d, first, top, idle, economy, driving_v, first_moving, m.bodies + len(speed_kmh))


@given(trips(), st.lists(st.integers(1, 80), max_size=8))
@settings(max_examples=150, deadline=None)
def test_measure_is_the_plain_per_body_reference(columns: dict[str, Any], cuts: list[int]) -> None:
    n, bounds, at = len(columns["speed_kmh"]), [0], 0
    for size in cuts:
        at = min(n, at + size)
        bounds.append(at)
    bounds.append(n)
    meter = expected = None
    for a, b in itertools.pairwise(bounds):
        part: dict[str, Any] = {k: None if v is None else v[a:b] for k, v in columns.items()}
        fast_cdit, meter = measure(meter, **part)
        slow_cdit, expected = reference_measure(expected, **part)
        assert (fast_cdit, meter) == (slow_cdit, expected)
