"""The trip's measures and dangerous-driving behaviours in the messages: `em` on each microtrip
element (events straddling packets included), `cdit`/`dis` in metres from the speed, the Trip's
mandatory keys and behaviour counts, parking `tim`, the battery warning of a 24 V vehicle."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import attrs
from test_mapping import KEY_ON, KEY_ON_MS, MODEM, basic_info, dtg, dtg_body, key_off, mdt, obd, run

from dtgserver.bridge.driving import DrivingConfig
from dtgserver.bridge.messages import map_record
from dtgserver.bridge.trips import TripState
from dtgserver.protocol import BasicInfo, DtgBody


def truck_info() -> BasicInfo:
    return attrs.evolve(basic_info(), vehicle_type="31")


def moving(second: int, speed: int, *, km: int = 120_000, battery: float = 27.8) -> DtgBody:
    """A body of a vehicle driving east whose position moves every second (no tunnel)."""
    return attrs.evolve(dtg_body(second, speed_kmh=speed, total_km=km), lon=round(127.0 + second * 1e-4, 6),
                        battery_v=battery)


def elements(messages: list[Any]) -> list[dict[str, Any]]:
    return [e for m in messages if m.payload.get("ty") == 2 and isinstance(m.payload["pld"], list)
            for e in m.payload["pld"]]


def test_em_marks_the_body_of_an_acceleration_that_straddles_two_packets() -> None:
    first = dtg(*(moving(s, 20) for s in range(60)))
    second = dtg(*(moving(60 + s, 30) for s in range(60)))  # +10 km/h across the cut
    messages, state = run([truck_info(), first, second])
    ems = [e["em"] for e in elements(messages)]
    assert ems[60] == "20"  # bit 5: harsh acceleration, on the first body of the second packet
    assert ems.count("00") == 119
    assert state is not None and state.drive is not None
    # the same through a restart between the packets (the state through JSON)
    again, _ = run([truck_info(), first, second], restart=True)
    assert [e["em"] for e in elements(again)] == ems


def test_cdit_and_dis_are_metres_from_the_speed() -> None:
    first = dtg(*(moving(s, 36) for s in range(60)))  # 10 m a second
    messages, _ = run([truck_info(), first, key_off(minutes=1, key_off_time=KEY_ON + timedelta(seconds=59))])
    cdit = [e["cdit"] for e in elements(messages)]
    assert cdit[:3] == [10, 20, 30] and cdit[-1] == 600
    (trip,) = [m.payload["pld"] for m in messages if m.payload.get("ty") == 1]
    assert trip["dis"] == 600  # the odometer did not move: it once said 0 m


def test_the_trips_mandatory_keys_and_behaviour_counts() -> None:
    speeds = [0] * 30 + [20, 40, 60, 80, 90, 95, 100] + [100] * 20 + [60, 40, 0]
    bodies = [moving(s, v, km=120_000 + s // 40, battery=28.4 if v else 24.9) for s, v in enumerate(speeds)]
    end = key_off(minutes=1, battery_v=24.3, key_off_time=KEY_ON + timedelta(seconds=59))
    messages, _ = run([truck_info(), dtg(*bodies), end])
    (trip,) = [m.payload["pld"] for m in messages if m.payload.get("ty") == 1]
    assert list(trip) == ["tid", "stt", "edt", "dis", "tdis", "fc", "stlat", "stlon", "edlat", "edlon", "hsts",
                          "mesp", "idt", "btv", "gnv", "wut", "est", "fwv", "dtvt", "xdd"]
    assert trip["tdis"] == 120_001_000
    assert trip["idt"] == 31  # standing with the engine running (RPM 1800)
    assert trip["btv"] == 24.3 and trip["gnv"] == 28.4
    assert trip["wut"] == 30  # KEY ON to the first moving body
    assert trip["est"] == 24  # 80, 90, 95 and 21 seconds at 100 km/h
    assert trip["xdd"]["start"] == 1 and trip["xdd"]["acceleration"] == 1
    assert trip["xdd"]["deceleration"] == 1 and trip["xdd"]["stop"] == 1
    assert set(trip["xdd"]) == {"start", "left_turn", "right_turn", "u_turn", "deceleration", "acceleration",
                                "stop", "lane_change", "overtaking"}


def test_no_class_no_behaviours() -> None:
    driving = DrivingConfig(default_class=None)
    bodies = [moving(s, v) for s, v in enumerate([0, 20, 40])]
    info = attrs.evolve(basic_info(), vehicle_type="41")
    end = key_off(minutes=1, key_off_time=KEY_ON + timedelta(seconds=2))
    messages, _ = run([info, dtg(*bodies), end], driving=driving)
    assert [e.get("em") for e in elements(messages)] == [None] * 3  # not judged: no `em`, rather than "00"
    (trip,) = [m.payload["pld"] for m in messages if m.payload.get("ty") == 1]
    assert "xdd" not in trip
    # the same bodies on a bus: a harsh start and acceleration
    messages, _ = run([info, dtg(*bodies), end], driving=DrivingConfig(default_class=None, classes={MODEM: "bus"}))
    assert [e["em"] for e in elements(messages)] == ["00", "01", "20"]
    (trip,) = [m.payload["pld"] for m in messages if m.payload.get("ty") == 1]  # counted by the modem's class
    assert trip["xdd"]["start"] == 1 and trip["xdd"]["acceleration"] == 1


def test_parking_time() -> None:
    late = attrs.evolve(key_off(minutes=30), key_off_time=KEY_ON + timedelta(minutes=10))
    messages, _ = run([dtg(moving(0, 20)), late])
    (parking,) = [m.payload["pld"] for m in messages if m.payload.get("ty") == 2 and isinstance(m.payload["pld"], dict)]
    assert parking["tim"] == 1200 and list(parking)[-1] == "tim"


def test_the_battery_warning_follows_the_system_voltage() -> None:
    def warned(driving_v: float, off_v: float) -> bool:
        messages, _ = run([dtg(moving(0, 30, battery=driving_v), moving(1, 30, battery=driving_v)),
                           key_off(minutes=1, battery_v=off_v)])
        return any(m.payload.get("ty") == 23 for m in messages)

    assert warned(27.9, 22.9) and not warned(27.9, 23.0)  # 24 V: 2 × 11.5 V
    assert warned(14.1, 11.4) and not warned(14.1, 12.2)  # 12 V
    state = TripState(system_v=24)
    messages, _ = map_record(key_off(battery_v=22.0), state, packet_id="p")
    assert [m.payload["ty"] for m in messages] == [2, 23]


def test_em_in_the_profiles_where_the_spec_has_it() -> None:
    for profile, record, expected in (("seed", obd(0, 1), True), ("seed", mdt(0, 1), True),
                                      ("sf2019", obd(0, 1), True), ("sf2019", mdt(0, 1), False),
                                      ("sf2019", dtg(moving(0, 20)), False)):
        messages, _ = map_record(record, None, packet_id="p", profile=profile)
        assert all(("em" in e) == expected for e in messages[0].payload["pld"]), (profile, record.KIND)


def test_the_state_without_messages_is_the_state_with_them() -> None:
    from dtgserver.bridge.trips import next_state
    from dtgserver.protocol import encode

    records = [truck_info(), dtg(*(moving(s, 20 + s % 7 * 3) for s in range(60))), key_off(minutes=1)]
    state = built = None
    for record in records:
        state = next_state(encode(record), state)
        _, built = map_record(record, built, packet_id="p")
    assert state == built and state is not None and state.meter is not None and state.vehicle_type == "31"
    assert KEY_ON_MS // 1000 == state.tid


def test_the_packets_detector_and_measures_from_its_bytes_are_those_of_its_advance() -> None:
    # `drive_and_measure` and `body_times_ms` read a packet's bytes themselves: what they give is
    # what `realtime_advance` (the messages' one pass over the columns) gives for the same packet
    from dtgserver.bridge.trips import (
        DEFAULT_DRIVING,
        advance,
        body_times_ms,
        drive_and_measure,
        realtime_advance,
        summarize,
        with_firmware,
    )
    from dtgserver.protocol import encode
    from dtgserver.protocol.layout import realtime as realtime_layout
    from dtgserver.protocol.layout import time_ms

    speeds = [0, 0, 20, 40, 60, 60, 30, 0] + [10] * 6
    bodies = [moving(s, v, km=120_000 + s // 5, battery=27.6 if v else 25.0) for s, v in enumerate(speeds)]
    state: TripState | None = with_firmware(None, "1.0", "31")  # a truck: the criteria apply
    seen_masks = []
    for packet in (dtg(*bodies[:8]), dtg(*bodies[8:])):
        raw = encode(packet)
        layout = realtime_layout(raw)
        assert layout is not None
        moved = realtime_advance(raw, layout, state)
        assert moved is not None and not moved.stale
        before = advance(layout.kind, layout.key_on_ms(raw), summarize(raw, layout), state)
        assert before is not None
        masks, cdit, trip = drive_and_measure(before.trip, raw, layout, MODEM, DEFAULT_DRIVING)
        assert (masks, cdit, trip) == (moved.masks, moved.cdit, moved.trip)
        assert body_times_ms(raw, layout) == moved.times == [time_ms(b.time) for b in packet.bodies]
        assert masks is not None
        seen_masks += masks
        state = moved.state
    assert any(seen_masks) and trip.system_v == 24 and trip.meter is not None and trip.drive is not None
    assert cdit[-1] > cdit[0] > 0
    # the criteria by the terminal's modem: a bus by its number, judged; another modem, not
    bus = DrivingConfig(default_class=None, classes={MODEM: "bus"})
    raw = encode(dtg(*bodies[:8]))
    layout = realtime_layout(raw)
    assert layout is not None
    assert drive_and_measure(TripState(), raw, layout, MODEM, bus)[0] is not None
    assert drive_and_measure(TripState(), raw, layout, "01000000000", bus)[0] is None


def test_the_state_without_messages_takes_the_same_options() -> None:
    # next_state with a driving config, receive times and a deadline: the state `map_record` gives
    from dtgserver.bridge.trips import next_state
    from dtgserver.protocol import encode

    nobody = DrivingConfig(default_class=None)  # no criteria apply: nothing is judged
    end = key_off(minutes=1, key_off_time=KEY_ON + timedelta(seconds=90))
    records = [dtg(*(moving(s, s % 9 * 12) for s in range(60))), end, basic_info(), basic_info()]
    received = [KEY_ON_MS + ms for ms in (60_000, 90_000, 90_000 + 3_599_999, 90_000 + 3_600_000)]
    state = built = None
    for n, (record, at) in enumerate(zip(records, received, strict=True)):
        options: dict[str, Any] = {"driving": nobody, "received_ms": at, "trip_deadline_ms": 3_600_000}
        state = next_state(encode(record), state, **options)
        messages, built = map_record(record, built, packet_id="p", **options)
        assert state == built
        assert state is not None and state.trip_sent == (n == 3)  # at the deadline, the Trip went out partial
    assert state is not None and state.drive is None and state.tid == KEY_ON_MS // 1000
    assert [m.payload["pld"]["xpartial"] for m in messages if m.payload.get("ty") == 1] == [True]
    judged = next_state(encode(records[0]), None)
    assert judged is not None and judged.drive is not None  # by the default criteria


def test_a_turn_under_way_at_the_trips_last_body_is_counted_in_its_trip() -> None:
    headings = [90, 90, 90, 90, 120, 150]  # 60° right in the last 2 s, at 40 km/h (a taxi: 60° within 2 s)
    bodies = [attrs.evolve(moving(s, 40), azimuth_deg=h) for s, h in enumerate(headings)]
    end = key_off(minutes=1, key_off_time=KEY_ON + timedelta(seconds=5))
    messages, _ = run([dtg(*bodies), end])
    (trip,) = [m.payload["pld"] for m in messages if m.payload.get("ty") == 1]
    assert trip["xdd"]["right_turn"] == 1


def test_the_behaviours_found_outlive_a_stretch_of_the_trip_without_a_class() -> None:
    """A basic info in mid-trip that names a type no class is configured for stops the judging (no
    `em` on those bodies), but what was found before it is not forgotten: once a class applies
    again, the Trip counts it."""
    driving = DrivingConfig(default_class=None)
    first = dtg(*(moving(s, 20) for s in range(30)), *(moving(s, 30) for s in range(30, 60)))  # +10 km/h
    middle = dtg(*(moving(60 + s, 30) for s in range(60)))
    last = dtg(*(moving(120 + s, 30) for s in range(60)))
    unclassed = attrs.evolve(basic_info(), vehicle_type="41")
    end = key_off(minutes=3, key_off_time=KEY_ON + timedelta(seconds=179))
    messages, _ = run([truck_info(), first, unclassed, middle, truck_info(), last, end], driving=driving)
    ems = [e.get("em") for e in elements(messages)]
    assert ems[:60] == ["00"] * 30 + ["20"] + ["00"] * 29  # harsh acceleration at the step
    assert ems[60:120] == [None] * 60 and ems[120:] == ["00"] * 60
    (trip,) = [m.payload["pld"] for m in messages if m.payload.get("ty") == 1]
    assert trip["xdd"]["acceleration"] == 1 and sum(trip["xdd"].values()) == 1
