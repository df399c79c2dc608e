"""A Trip once its trip is complete (Triphos DTG Upload Protocol v0.5, §4.5: the last partial
report period and any outage backlog arrive after the KEY OFF, at the next KEY ON): when the
bodies reach the KEY OFF, when the next trip begins, or at the deadline (partial); exactly one
Trip per `tid`, the same after a restart between any two packets."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import attrs
from test_mapping import KEY_ON, KEY_ON_MS, MODEM, TID, basic_info, dtg, dtg_body, key_off, run

from dtgserver.bridge.driving import BEHAVIOURS, DrivingConfig
from dtgserver.bridge.messages import map_record
from dtgserver.protocol import DtgBody, KeyOff

MINUTE_MS = 60_000


def body(second: int, speed: int = 36) -> DtgBody:
    return attrs.evolve(dtg_body(second, speed_kmh=speed, total_km=120_000 + second // 100),
                        lon=round(127.0 + second * 1e-4, 6))


def minute(m: int, seconds: int = 60, *, key_on: Any = KEY_ON, start: int = 0) -> Any:
    """The bodies of minute `m` of a trip (the first `seconds` of it)."""
    return dtg(*(body(start + m * 60 + s) for s in range(seconds)), key_on=key_on)


def parked(at_minute: float, key_off_second: int, battery_v: float = 24.4) -> KeyOff:
    """A KEY OFF packet sent at `at_minute` of the trip, naming the KEY OFF at `key_off_second`."""
    return attrs.evolve(key_off(minutes=0, battery_v=battery_v), sent_time=KEY_ON + timedelta(minutes=at_minute),
                        key_off_time=KEY_ON + timedelta(seconds=key_off_second))


def trips(messages: list[Any]) -> list[Any]:
    return [m for m in messages if m.payload.get("ty") == 1]


def microtrip_tids(messages: list[Any]) -> list[int]:
    return [e["tid"] for m in messages if m.payload.get("ty") == 2 and isinstance(m.payload["pld"], list)
            for e in m.payload["pld"]]


def received(records: list[Any], minutes: list[float]) -> tuple[list[Any], Any]:
    """Map the packets as received at these minutes after KEY ON (the store's receive times)."""
    messages: list[Any] = []
    state = None
    for n, (record, at) in enumerate(zip(records, minutes, strict=True)):
        out, state = map_record(record, state, packet_id=f"p{n}", received_ms=KEY_ON_MS + round(at * MINUTE_MS),
                                trip_deadline_ms=60 * MINUTE_MS)
        messages += out
    return messages, state


def test_the_last_partial_minute_after_the_key_off() -> None:
    # minute 0 sent while driving; the KEY OFF at 1:30 is sent at once; the last 30 s at the next KEY ON
    records = [basic_info(), minute(0), parked(1.5, 89), minute(1, 30), parked(11.5, 89)]
    messages, state = received(records, [0, 1, 1.5, 40, 41])
    (trip,) = trips(messages)
    assert messages.index(trip) > max(i for i, m in enumerate(messages) if m.payload.get("ty") == 2
                                      and isinstance(m.payload["pld"], list))  # after its last microtrip
    pld = trip.payload["pld"]
    assert pld["edt"] == KEY_ON_MS + 89_000 and trip.payload["ts"] == pld["edt"]
    assert pld["dis"] == 900 and pld["dtvt"] == 90  # 90 s at 36 km/h, the late 30 s included
    assert (pld["edlat"], pld["edlon"]) == (37.5, 127.03)  # where the KEY OFF packet says it parked
    assert pld["btv"] == 24.4 and "xpartial" not in pld
    assert trip.payload["id"] == "p3:1"  # the packet of the late bodies: its microtrip, then the Trip
    assert state.trip_sent
    # the same with the state through JSON between every two packets
    again, _ = run(records, restart=True, received_ms=KEY_ON_MS)
    assert next(m.payload for m in trips(again))["pld"] == pld


def test_a_three_hour_outage_backlog() -> None:
    # 180 minutes of driving, none of it sent until after the KEY OFF (no coverage), oldest first
    backlog = [minute(m) for m in range(180)]
    records = [parked(180, 180 * 60 - 1), *backlog]
    messages, _ = received(records, [180] + [300 + m / 10 for m in range(180)])
    (trip,) = trips(messages)
    assert messages[-1] is trip  # after the last of the backlog's microtrips
    assert trip.payload["pld"]["dis"] == 108_000 and trip.payload["pld"]["dtvt"] == 180 * 60
    assert "xpartial" not in trip.payload["pld"]
    # the trip ends where, and with the battery that, the KEY OFF received before its data says,
    # not at its last body: the KEY OFF is taken up whole by the trip that arrives after it
    moved = attrs.evolve(records[0], lat=37.61, lon=127.21, battery_v=23.9)
    (trip,) = trips(received([moved, *backlog], [180] + [300 + m / 10 for m in range(180)])[0])
    pld = trip.payload["pld"]
    assert (pld["edlat"], pld["edlon"], pld["btv"]) == (37.61, 127.21, 23.9), pld
    assert pld["edt"] == KEY_ON_MS + (180 * 60 - 1) * 1000


def test_an_outage_trip_whose_rest_never_comes_goes_out_at_the_deadline_from_its_key_off() -> None:
    # the KEY OFF first (received at minute 180), then only two minutes of the backlog: the deadline
    # (an hour here) runs from that KEY OFF's receipt, taken up by the trip with its end and battery
    off = attrs.evolve(parked(180, 180 * 60 - 1), lat=37.61, lon=127.21, battery_v=23.9)
    messages, state = received([off, minute(0), minute(1), basic_info()], [180, 200, 200.1, 240.5])
    (trip,) = trips(messages)
    assert trip.payload["id"] == "p3:0"  # the first packet received an hour after the KEY OFF
    pld = trip.payload["pld"]
    assert pld["xpartial"] is True and pld["dtvt"] == 120
    assert (pld["edt"], pld["edlat"], pld["edlon"], pld["btv"]) == (KEY_ON_MS + (180 * 60 - 1) * 1000, 37.61,
                                                                    127.21, 23.9)
    assert state.trip_sent


def test_a_trip_whose_rest_never_comes_goes_out_at_the_deadline_marked_partial() -> None:
    records = [minute(0), parked(1.5, 89), parked(11.5, 89), parked(61.4, 89), parked(61.6, 89), minute(1, 30)]
    messages, state = received(records, [1, 1.5, 11.5, 61.4, 61.6, 600])
    (trip,) = trips(messages)
    assert trip.payload["id"] == "p4:0"  # the first packet received an hour after the KEY OFF packet
    pld = trip.payload["pld"]
    assert pld["xpartial"] is True and pld["edt"] == KEY_ON_MS + 89_000 and pld["dtvt"] == 60
    # the rest, when it does come, is published but the trip keeps its one Trip
    assert microtrip_tids(messages)[-30:] == [TID] * 30 and state.trip_sent


def test_the_next_trip_completes_the_one_before() -> None:
    later = KEY_ON + timedelta(hours=2)
    records = [minute(0), parked(1.5, 89), minute(0, key_on=later, start=7200), parked(122, 7259)]
    messages, _ = received(records, [1, 1.5, 121, 122])
    first, second = trips(messages)
    assert first.payload["pld"]["tid"] == TID and first.payload["id"] == "p2:0"  # before the new trip's data
    assert "xpartial" not in first.payload["pld"] and first.payload["pld"]["edt"] == KEY_ON_MS + 89_000
    assert second.payload["pld"]["tid"] == TID + 7200 and second.payload["id"] == "p3:0"


def test_a_trip_without_a_key_off_is_closed_by_the_next_one_at_its_last_body() -> None:
    later = KEY_ON + timedelta(hours=2)
    messages, _ = run([minute(0), minute(0, key_on=later, start=7200)])
    (trip,) = trips(messages)
    assert trip.payload["pld"]["edt"] == KEY_ON_MS + 59_000 and "btv" not in trip.payload["pld"]


def test_exactly_one_trip_per_tid_whatever_comes_after() -> None:
    records = [minute(0), parked(1, 59), parked(11, 59), minute(1, 10), parked(21, 59), basic_info()]
    messages, _ = received(records, [1, 1, 11, 30, 31, 32])
    assert [t.payload["pld"]["tid"] for t in trips(messages)] == [TID]
    assert trips(messages)[0].payload["id"] == "p1:0"  # complete at the first KEY OFF: minute 0 reaches it


def at_ms(records: list[Any], received_ms: list[int]) -> list[Any]:
    """The Trip messages of the packets received at these times (ms since KEY ON; deadline an hour)."""
    messages: list[Any] = []
    state = None
    for n, (record, at) in enumerate(zip(records, received_ms, strict=True)):
        out, state = map_record(record, state, packet_id=f"p{n}", received_ms=KEY_ON_MS + at,
                                trip_deadline_ms=60 * MINUTE_MS)
        messages += out
    return trips(messages)


def test_the_bodies_reach_the_key_off_when_the_next_body_would_come_after_it() -> None:
    # a body a second: the last body at 59 s reaches a KEY OFF before 60 s; at 60 s a body may still come
    for key_off_ms, complete in ((59_000, True), (59_990, True), (60_000, False), (61_000, False)):
        end = attrs.evolve(parked(1, 0), key_off_time=KEY_ON + timedelta(milliseconds=key_off_ms))
        done = at_ms([minute(0), end], [60_000, 60_500])
        assert [t.payload["id"] for t in done] == (["p1:0"] if complete else []), key_off_ms


def test_the_deadline_runs_from_the_first_receipt_of_the_key_off() -> None:
    hour = 60 * MINUTE_MS
    for last_at, partial in ((90_000 + hour, True), (90_000 + hour - 1, False)):
        done = at_ms([minute(0), parked(1.5, 89), basic_info()], [60_000, 90_000, last_at])
        assert [t.payload["pld"].get("xpartial") for t in done] == ([True] if partial else []), last_at
    # a KEY OFF received again later (no trip data yet: an outage) does not move the deadline
    done = at_ms([parked(1.5, 89), parked(1.5, 89), minute(0), basic_info()], [90_000, 1_800_000, 1_900_000,
                                                                                90_000 + hour])
    assert [t.payload["pld"].get("xpartial") for t in done] == [True]
    assert done[0].payload["id"] == "p3:0" and done[0].payload["pld"]["edt"] == KEY_ON_MS + 89_000


def test_a_trip_standing_still_and_the_default_deadline_of_a_day() -> None:
    # the engine on, the vehicle never moving: no speed at all; the rest never comes, and by
    # default the Trip goes out partial with the first packet received 24 hours after the KEY OFF
    day = 24 * 60 * MINUTE_MS
    standing = dtg(*(attrs.evolve(body(s, speed=0), total_distance_km=120_000) for s in range(30)))
    for after, partial in ((day - 1, False), (day, True)):
        messages: list[Any] = []
        state = None
        for n, (record, at) in enumerate(zip([standing, parked(1, 89), basic_info()], [30_000, 60_000, 60_000 + after],
                                             strict=True)):
            out, state = map_record(record, state, packet_id=f"p{n}", received_ms=KEY_ON_MS + at)
            messages += out
        assert [t.payload["pld"]["xpartial"] for t in trips(messages)] == ([True] if partial else [])
        if partial:
            pld = trips(messages)[0].payload["pld"]
            assert (pld["hsts"], pld["mesp"], pld["dtvt"], pld["dis"]) == (0, 0, 0, 0)
            assert pld["wut"] == 29  # never moved: warming up to its last body
    # the status stayed 0 (ok) from the start: no Device Status event, no device health
    assert all(m.payload.get("ty") in (1, 2, None) and not m.topic.endswith("/health") for m in messages)


def test_a_trip_closed_later_is_judged_by_its_terminals_class() -> None:
    """A vehicle class configured for the modem alone (no basic info names a type) applies to the
    Trip however it closes: at the KEY OFF, when its late bodies come, when the next trip begins,
    at the deadline."""
    by_modem = DrivingConfig(default_class=None, classes={MODEM: "bus"})
    later = KEY_ON + timedelta(hours=2)
    cases = {  # the packets, and the minute after KEY ON each is received
        "at the key off": ([minute(0), parked(1.1, 59)], [1, 1.1]),
        "when its last bodies come": ([minute(0), parked(1.5, 89), minute(1, 30)], [1, 1.5, 40]),
        "when the next trip begins": ([minute(0), parked(1.5, 89), minute(0, key_on=later, start=7200)], [1, 1.5, 121]),
        "at the deadline": ([minute(0), parked(1.5, 89), parked(61.6, 89)], [1, 1.5, 61.6]),
    }
    for case, (records, minutes) in cases.items():
        state = None
        closed: list[Any] = []
        for n, (record, at) in enumerate(zip(records, minutes, strict=True)):
            out, state = map_record(record, state, packet_id=f"p{n}", trip_deadline_ms=60 * MINUTE_MS,
                                    received_ms=KEY_ON_MS + round(at * MINUTE_MS), driving=by_modem)
            closed += [m.payload["pld"] for m in trips(out) if m.payload["pld"]["tid"] == TID]
        assert len(closed) == 1, case
        assert closed[0]["xdd"] == dict.fromkeys(BEHAVIOURS, 0), case
        assert ("xpartial" in closed[0]) is (case == "at the deadline"), case
