"""bridge.messages and bridge.trips beyond docs/mqtt.md's rows: the bytes path agrees with the
records at the wire's limits, the JSON is exactly the documented encoding, the trip keeps its start."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import attrs
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from test_mapping import KEY_ON, KEY_ON_MS, MODEM, TID, dtg, dtg_body, key_off, run, wire

from dtgserver.bridge.messages import MAX_PAYLOAD_BYTES, encode, exact, map_record
from dtgserver.bridge.profiles import PROFILES
from dtgserver.protocol import BadTime, DtgRealtime, KeyOff, MdtRealtime, ObdRealtime, Realtime, SensorState
from dtgserver.protocol import encode as encode_packet
from dtgserver.protocol.layout import time_ms
from dtgserver.testing import drives, records


def compact(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


# -- times at the calendar's limits: the elements' own conversion agrees with the decoder ------------------


@pytest.mark.parametrize("time", [
    bytes((26, 11, 21, 23, 59, 59, 99)), bytes((26, 11, 21, 24, 0, 0, 0)), bytes((26, 11, 21, 8, 60, 0, 0)),
    bytes((26, 11, 21, 8, 0, 60, 0)), bytes((26, 11, 21, 8, 0, 0, 100)), bytes((24, 2, 29, 0, 0, 0, 0)),
    bytes((25, 2, 29, 0, 0, 0, 0)), bytes((26, 12, 31, 23, 59, 59, 0)), bytes((26, 13, 1, 0, 0, 0, 0)),
])
def test_clt_is_the_decoded_body_time_at_the_limits(time: bytes) -> None:
    from dtgserver.protocol.fields import KstTime

    decoded = KstTime().decode(time)
    messages, _ = map_record(dtg(dtg_body(0), dtg_body(1, time=decoded)), None, packet_id="x")
    element = messages[0].payload["pld"][1]
    assert element.get("clt") == time_ms(decoded)
    assert ("clt" in element) == (not isinstance(decoded, BadTime))


# -- JSON ------------------------------------------------------------------------------------------------


def test_payload_bytes_are_compact_with_integer_tids() -> None:
    messages, _ = run([dtg(dtg_body(0, status_code=11)), key_off(battery_v=11.0)])
    encoded = [encode(m.payload) for m in messages]
    assert encoded[0].startswith(b'{"ts":%d,"ty":2,"pld":[{"tid":%d,"clt":%d,"lat":37.497942,' % (
        KEY_ON_MS, TID, KEY_ON_MS))
    for message, raw in zip(messages, encoded, strict=True):
        assert raw == compact(message.payload)
        pld = message.payload.get("pld", message.payload)  # the retained health has no envelope
        for element in pld if isinstance(pld, list) else [pld]:
            if "tid" not in element:
                continue
            assert type(element["tid"]) is int  # a float tid would be written 1795215600.0
    assert b'"tid":%d,' % TID in encoded[1] and b'"tid":%d,' % TID in encoded[3]


@settings(max_examples=300, deadline=None)
@given(st.integers(-(2**31), 2**31 - 1), st.sampled_from([1, 10, 100, 1000, 1_000_000]))
def test_encode_writes_every_wire_float_as_json_dumps_does(wire_value: int, scale: int) -> None:
    """orjson writes 1e-6 where Python writes 1e-06: `exact` keeps Python's form where they differ."""
    value = exact(wire_value / scale)
    assert value == wire_value / scale
    assert encode({"v": value, "l": [value]}) == compact({"v": wire_value / scale, "l": [wire_value / scale]})



@pytest.mark.parametrize("value", [0.0, -0.0, 1e-4, 9.9e-5, -1e-4, 1.5, 1e15, 9999999999999998.0, 1e16, -1e16, 1e17,
                                   5e-324, 1.7976931348623157e308])
def test_exact_is_json_dumps_at_either_end_of_orjsons_plain_range(value: float) -> None:
    """`exact` on any float, not only a wire value: where orjson and json.dumps part (below 1e-4,
    from 1e16 on) and on both sides of each end."""
    assert encode([exact(value)]) == compact([value])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(records(DtgRealtime), records(ObdRealtime), records(MdtRealtime), records(KeyOff)),
                min_size=1, max_size=4), st.sampled_from(sorted(PROFILES)))
def test_every_payload_is_exactly_compact_json(packets: list[Any], profile: str) -> None:
    state = None
    for n, packet in enumerate(packets):
        messages, state = map_record(packet, state, packet_id=f"{n:032x}", profile=profile)
        for message in messages:
            assert encode(message.payload) == compact(message.payload)


def test_a_coordinate_near_zero_is_written_as_python_writes_it() -> None:
    messages, _ = map_record(dtg(attrs.evolve(dtg_body(0), lat=0.000012, lon=-0.000001)), None, packet_id="x")
    assert b'"lat":1.2e-05,"lon":-1e-06,' in encode(messages[0].payload)


# -- the 64 KiB bound ----------------------------------------------------------------------------------------


def test_the_payload_limit_is_64_kib() -> None:
    """Pinned from both sides: every message of a one-hour packet is below 65 536 bytes, and the
    split only happens because one more element would not have fitted."""
    assert MAX_PAYLOAD_BYTES == 65_536
    bodies = [dtg_body(s, total_km=120_000 + s // 60) for s in range(3600)]
    messages, _ = map_record(dtg(*bodies), None, packet_id="f" * 32)
    sizes = [len(encode(m.payload)) for m in messages]
    assert max(sizes) < 65_536
    assert sum(len(m.payload["pld"]) for m in messages) == 3600
    widest = [len(json.dumps(m.payload, ensure_ascii=False).encode()) for m in messages[:-1]]
    assert min(widest) > 65_536 - 700  # as full as the widest spacing allows: one element is ~600 bytes


# -- trip state across packets -------------------------------------------------------------------------------


def test_the_trip_keeps_its_first_position_and_odometer_across_packets() -> None:
    def at(second: int, lat: float, lon: float, km: int) -> Any:
        return attrs.evolve(dtg_body(second, total_km=km), lat=lat, lon=lon)

    packets = [dtg(at(0, 37.1, 127.1, 100), at(1, 37.2, 127.2, 100)),
               dtg(at(60, 37.3, 127.3, 101), at(61, 37.4, 127.4, 102)),
               dtg(at(120, 37.5, 127.5, 103), at(121, 37.6, 127.6, 104)),
               key_off(minutes=5, key_off_time=KEY_ON + timedelta(seconds=121))]
    messages, state = run(packets, restart=True)
    (trip,) = [m.payload["pld"] for m in messages if m.payload.get("ty") == 1]
    # the end is where the KEY OFF packet says the vehicle stood
    assert (trip["stlat"], trip["stlon"], trip["edlat"], trip["edlon"]) == (37.1, 127.1, 37.5, 127.03)
    assert trip["dis"] == 3000 and trip["stt"] == KEY_ON_MS
    cdits = [e["cdit"] for m in messages if isinstance(m.payload["pld"], list) for e in m.payload["pld"]]
    # metres from the speeds, within a km of the odometer since the trip's first body (not the packet's)
    assert cdits == [14, 28, 42, 1000, 2000, 3000]
    assert state is not None and (state.first_lat, state.first_total_km) == (37.1, 100)


def test_a_key_off_at_exactly_the_key_on_time_closes_the_trip() -> None:
    messages, state = run([dtg(dtg_body(0)), wire(type(key_off())(  # KEY OFF time == KEY ON time
        "01099998888", KEY_ON + timedelta(minutes=1), 127.03, 37.5, KEY_ON, 24.1))])
    assert [m.payload["ty"] for m in messages] == [2, 1, 2]
    assert state is not None and state.trip_sent
    early, _ = run([dtg(dtg_body(0)), wire(type(key_off())(
        "01099998888", KEY_ON + timedelta(minutes=1), 127.03, 37.5, KEY_ON - timedelta(milliseconds=10), 24.1))])
    assert [m.payload["ty"] for m in early] == [2, 2]  # 1/100 s before the trip began: backlog, not its end


def test_the_record_and_its_bytes_give_the_same_messages() -> None:
    packet = dtg(dtg_body(0), dtg_body(1))
    assert map_record(packet, None, packet_id="x") == map_record(wire(packet), None, packet_id="x")
    assert encode_packet(wire(packet)) == encode_packet(packet)


# -- the microtrip from the bytes is the microtrip the decoded records give ------------------------------------


def _oracle_element(body: Any, keys: tuple[str, ...], string_keys: frozenset[str], tid: int,
                    first_total_km: int | None, first_fuel_ml: int | None) -> dict[str, Any]:
    """One element as the record path builds it: every key from the decoded body's fields."""
    from dtgserver.protocol import SensorState

    def text(value: Any) -> str:
        return f"{value:g}"

    Field = tuple[str, Callable[[Any], Any]]  # the body's attribute, and how its value is written
    fields: dict[str, Field] = {
        "lat": ("lat", float), "lon": ("lon", float), "sp": ("speed_kmh", int), "rpm": ("rpm", int),
        "vv": ("battery_v", float),
        "dtr": ("daily_distance_km", int), "dctr": ("total_distance_km", int), "bsg": ("brake", int),
        "gan": ("azimuth_deg", int), "acx": ("accel_x_ms2", float), "acy": ("accel_y_ms2", float)}
    out: dict[str, Any] = {}
    for key in keys:
        if key == "tid":
            out[key] = tid
        elif key == "clt":
            if time_ms(body.time) is not None:
                out[key] = time_ms(body.time)
        elif key == "cdit":
            if first_total_km is not None and body.total_distance_km >= first_total_km:
                out[key] = (body.total_distance_km - first_total_km) * 1000
        elif key == "fc":  # the trip's fuel: from its first body's total fuel, in mL
            if first_fuel_ml is not None and round(body.total_fuel_l * 1000) >= first_fuel_ml:
                out[key] = round(body.total_fuel_l * 1000) - first_fuel_ml
        elif key == "tmp":
            a, b = body.temp_a_c, body.temp_b_c
            if not (isinstance(a, SensorState) and isinstance(b, SensorState)):
                out[key] = (f"{'' if isinstance(a, SensorState) else text(a)},"
                            f"{'' if isinstance(b, SensorState) else text(b)}")
        else:
            name, convert = fields[key]
            value = convert(getattr(body, name))
            out[key] = text(value) if key in string_keys else value
    return out


@settings(max_examples=300, deadline=None)
@given(st.one_of(records(DtgRealtime, max_bodies=5), records(ObdRealtime, max_bodies=5),
                 records(MdtRealtime, max_bodies=5)),
       st.sampled_from(sorted(PROFILES)), st.none() | st.integers(-(2**31), 2**31 - 1),
       st.none() | st.integers(-(2**31), 2**31 - 1), st.data())
def test_elements_from_the_bytes_are_the_elements_of_the_decoded_bodies(record: Any, profile: str,
                                                                         first_total_km: int | None,
                                                                         first_fuel_ml: int | None,
                                                                         data: st.DataObject) -> None:
    from dtgserver.bridge.messages import TRIP_ELEMENT_KEYS, elements_builder
    from dtgserver.protocol import decode
    from dtgserver.protocol.layout import realtime

    raw = encode_packet(record)
    if data.draw(st.booleans()):  # any bytes in the bodies: bad times, odd flags, every wire value
        raw = raw[:23] + data.draw(st.binary(min_size=len(raw) - 23, max_size=len(raw) - 23))
    decoded = decode(raw)
    layout = realtime(raw)
    assert layout is not None
    table = PROFILES[profile]
    keys = tuple(key for key in table.microtrip_keys[layout.kind] if key not in TRIP_ELEMENT_KEYS)  # set afterwards
    built = elements_builder(layout.kind, keys, table.string_keys)(layout.bodies(raw), 1_795_215_600, first_total_km,
                                                                   first_fuel_ml)
    expected = [_oracle_element(body, keys, table.string_keys, 1_795_215_600, first_total_km, first_fuel_ml)
                for body in decoded.bodies]  # type: ignore[attr-defined]
    assert built == expected
    for element, oracle in zip(built, expected, strict=True):
        assert list(element) == list(oracle)  # the same keys in the same (JSON) order
        assert [type(v) for v in element.values()] == [type(v) for v in oracle.values()] or \
            all(isinstance(v, type(o)) for v, o in zip(element.values(), oracle.values(), strict=True))


def _first_km(moved: Any) -> int:
    """The trip's first odometer, known once a packet of it had bodies."""
    first: int | None = moved.trip.first_total_km
    assert first is not None
    return first


def _element_by_element(raw: bytes, moved: Any, table: Any) -> list[dict[str, Any]]:
    """The microtrip elements as the builder makes them body by body, with the trip's `cdit` and
    `em` written in afterwards: what `columns_builder` must equal where it answers."""
    from dtgserver.bridge.driving import em_hex
    from dtgserver.bridge.messages import elements_builder
    from dtgserver.protocol.layout import realtime

    layout = realtime(raw)
    assert layout is not None
    keys = table.microtrip_keys[layout.kind]
    elements = elements_builder(layout.kind, keys, table.string_keys)(layout.bodies(raw), moved.tid,
                                                                      moved.trip.first_total_km,
                                                                      moved.trip.first_total_fuel_ml)
    if "cdit" in keys:
        for element, metres in zip(elements, moved.cdit, strict=True):
            element["cdit"] = metres
    if "em" in keys:
        for element, mask in zip(elements, moved.masks, strict=True):
            element["em"] = em_hex(mask)
    return elements


@settings(max_examples=300, deadline=None)
@given(st.one_of(drives(max_packets=3, max_bodies=8).map(lambda ps: [p for p in ps if isinstance(p, Realtime)]),
                 st.lists(st.one_of(records(DtgRealtime, max_bodies=5), records(ObdRealtime, max_bodies=5),
                                    records(MdtRealtime, max_bodies=5)), min_size=1, max_size=3)),
       st.sampled_from(sorted(PROFILES)), st.data())
def test_elements_from_the_columns_are_the_elements_built_body_by_body(packets: list[Any], profile: str,
                                                                        data: st.DataObject) -> None:
    """The usual packet's elements are built column-wise (`columns_builder`); every packet it
    takes must give the same elements, keys in the same order, the same JSON bytes, as the builder
    that goes body by body; a packet it declines (None) goes that way."""
    from dtgserver.bridge import trips
    from dtgserver.bridge.driving import em_hex
    from dtgserver.bridge.messages import columns_builder
    from dtgserver.protocol.layout import realtime

    table = PROFILES[profile]
    state = None
    for packet in packets:
        raw = encode_packet(packet)
        if data.draw(st.integers(0, 3)) == 0:  # any bytes in the bodies: bad times, odd flags, every wire value
            raw = raw[:23] + data.draw(st.binary(min_size=len(raw) - 23, max_size=len(raw) - 23))
        layout = realtime(raw)
        assert layout is not None
        moved = trips.realtime_advance(raw, layout, state)
        if moved is None or moved.stale or not moved.times:
            continue
        assert moved.columns is not None and moved.cdit is not None and moved.masks is not None
        state = moved.state
        keys = table.microtrip_keys[layout.kind]
        built = columns_builder(layout.kind, keys, table.string_keys)(
            moved.columns, moved.tid, _first_km(moved), moved.trip.first_total_fuel_ml, moved.times, moved.cdit,
            [em_hex(mask) for mask in moved.masks])
        if built is None:
            continue
        event("built from the columns")
        expected = _element_by_element(raw, moved, table)
        assert built == expected
        assert [list(element) for element in built] == [list(element) for element in expected]
        assert encode(built) == encode(expected)


def _simulated_minutes(*, seed: int, minutes: int) -> Iterator[tuple[bytes, Any]]:
    """Consecutive one-minute DTG packets of a simulated drive, each with where it took the trip
    (`realtime_advance`, the state carried from the minute before)."""
    import random
    from datetime import UTC, datetime

    from dtgserver.bridge import trips
    from dtgserver.protocol.layout import realtime
    from dtgserver.sim.load import drive_templates

    start = int(datetime(2026, 11, 21, 8, 0, tzinfo=UTC).timestamp()) // 60 * 60
    state = None
    for minute, template in enumerate(drive_templates("dtg", random.Random(seed), start, minutes)):
        raw = template.render(b"01099998888", bytes((26, 11, 21, 17, 0, 0, 0)), bytes((26, 11, 21, 17, minute)))
        layout = realtime(raw)
        assert layout is not None
        moved = trips.realtime_advance(raw, layout, state)
        assert moved is not None and moved.columns is not None and moved.times is not None
        assert moved.cdit is not None and moved.masks is not None
        yield raw, moved
        state = moved.state


def test_the_usual_drive_is_built_from_the_columns() -> None:
    """The shortcut is taken where it matters: a minute of a simulated drive (bench/bridge.py's
    packet) goes through `columns_builder`, and gives the body-by-body elements."""

    from dtgserver.bridge.messages import _EM_HEX, columns_builder

    for raw, moved in _simulated_minutes(seed=7, minutes=3):
        table = PROFILES["seed"]
        built = columns_builder("dtg", table.microtrip_keys["dtg"], table.string_keys)(
            moved.columns, moved.tid, _first_km(moved), moved.trip.first_total_fuel_ml, moved.times, moved.cdit,
            [_EM_HEX[mask & 0x7F] for mask in moved.masks])
        assert built is not None and encode(built) == encode(_element_by_element(raw, moved, table))


@pytest.mark.parametrize(("keys", "string_keys"), [
    (("clt", "lat", "lon", "sp", "em"), frozenset()),  # no tid, no tmp: a profile that leaves them out
    (("tid", "sp", "vv", "lat", "cdit", "fc", "tmp"), frozenset({"vv"})),  # a value as text, no em
])
def test_a_profile_of_other_keys_is_built_from_the_columns_as_body_by_body(keys: tuple[str, ...],
                                                                           string_keys: frozenset[str]) -> None:
    """A profile is data: one whose microtrip leaves out `tid`, `tmp` or `em`, or sends values as
    text, gets from the column-wise builder what the body-by-body one gives (the seed and sf2019
    profiles have all of them, so only such a profile reaches those paths)."""
    import types

    from dtgserver.bridge.messages import _EM_HEX, columns_builder

    table = types.SimpleNamespace(microtrip_keys={"dtg": keys}, string_keys=string_keys)
    for raw, moved in _simulated_minutes(seed=11, minutes=2):
        built = columns_builder("dtg", keys, string_keys)(
            moved.columns, moved.tid, _first_km(moved), moved.trip.first_total_fuel_ml, moved.times, moved.cdit,
            [_EM_HEX[mask & 0x7F] for mask in moved.masks])
        expected = _element_by_element(raw, moved, table)
        assert built is not None and [list(e) for e in built] == [list(e) for e in expected]
        assert all(list(e) == [key for key in keys if key in e] for e in built)
        assert {key for e in built for key in e} == set(keys) - {"tmp"}  # no temperature sensor on this truck
        assert encode(built) == encode(expected)


@pytest.mark.parametrize("lat", [0.0, 0.00005, -0.00005, 0.0001, -0.0001, 37.5])
@pytest.mark.parametrize("temps", [(4.5, SensorState.ABSENT), (SensorState.ABSENT, SensorState.OFF)])
def test_the_columns_give_the_body_by_body_bytes_near_zero_and_with_mixed_sensors(lat: float, temps: Any) -> None:
    """Coordinates within 0.0001 of 0 (written as `json.dumps` writes them), a temperature reading
    on some bodies only, a body behind the trip's first odometer: declined or the same bytes."""
    from dtgserver.bridge import trips
    from dtgserver.bridge.messages import _EM_HEX, columns_builder
    from dtgserver.protocol.layout import realtime

    bodies = [attrs.evolve(dtg_body(s, temps=temps if s else (SensorState.ABSENT, SensorState.ABSENT),
                                    total_km=120_000 - (s == 2)), lat=lat if s == 1 else 37.5) for s in range(4)]
    for chosen in (bodies, bodies[:2], [bodies[1]], bodies[:1] + bodies[3:]):
        raw = encode_packet(dtg(*chosen))
        layout = realtime(raw)
        assert layout is not None
        moved = trips.realtime_advance(raw, layout, None)
        assert moved is not None and moved.columns is not None and moved.times is not None
        assert moved.cdit is not None and moved.masks is not None
        table = PROFILES["seed"]
        built = columns_builder("dtg", table.microtrip_keys["dtg"], table.string_keys)(
            moved.columns, moved.tid, _first_km(moved), moved.trip.first_total_fuel_ml, moved.times, moved.cdit,
            [_EM_HEX[mask & 0x7F] for mask in moved.masks])
        if built is not None:
            assert encode(built) == encode(_element_by_element(raw, moved, table))


def test_a_value_that_is_no_json_is_refused_naming_its_type() -> None:
    with pytest.raises(TypeError) as refused:
        encode({"x": {1}})
    assert str(refused.value.__cause__) == "set is not JSON"


@pytest.mark.parametrize("kind", ["dtg", "obd", "mdt"])
@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_the_usual_packet_never_goes_body_by_body(kind: str, profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A simulated drive of every kind, in every profile, is built from the columns only: the body by
    body builder (for unusual packets and an older trip's backlog) is not even asked."""
    import random
    from datetime import UTC, datetime

    from dtgserver.bridge import messages
    from dtgserver.sim.load import drive_templates

    def body_by_body(*args: Any) -> Any:
        raise AssertionError(f"built body by body: {args}")

    monkeypatch.setattr(messages, "elements_builder", body_by_body)
    rng = random.Random(3)
    start = int(datetime(2026, 11, 21, 8, 0, tzinfo=UTC).timestamp()) // 60 * 60
    state = None
    for minute, template in enumerate(drive_templates(kind, rng, start, 2)):
        raw = template.render(b"01099998888", bytes((26, 11, 21, 17, 0, 0, 0)), bytes((26, 11, 21, 17, minute)))
        out, state = messages.build(raw, state, packet_id=f"m{minute}", profile=profile)
        assert len(out[0].payload["pld"]) == 60


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_an_unusual_packet_built_body_by_body_has_the_usual_keys_in_order_and_cdit_from_the_speed(profile: str) -> None:
    # a body without a calendar time: the packet goes body by body (`elements_builder`), yet its
    # elements have the profile's keys in the profile's order, `cdit` the trip's metres from the speed
    from dtgserver.bridge.trips import realtime_advance
    from dtgserver.protocol.layout import realtime

    bad = BadTime(bytes((26, 13, 1, 0, 0, 0, 0)))
    bodies = [attrs.evolve(dtg_body(s, speed_kmh=36, total_km=120_000 + s), lon=round(127.0 + s * 1e-4, 6))
              for s in range(4)]
    bodies[2] = attrs.evolve(bodies[2], time=bad)
    raw = encode_packet(dtg(*bodies))
    layout = realtime(raw)
    assert layout is not None
    moved = realtime_advance(raw, layout, None)
    assert moved is not None and moved.cdit is not None
    messages, _ = map_record(dtg(*bodies), None, packet_id="u", profile=profile)
    elements = messages[0].payload["pld"]
    keys = PROFILES[profile].microtrip_keys["dtg"]
    assert [list(e) for e in elements] == [[k for k in keys if k != "clt" or n != 2] for n in range(4)]
    if "cdit" in keys:
        assert [e["cdit"] for e in elements] == moved.cdit and moved.cdit[-1] > 0
    if "em" in keys:  # the detector's marks, as on the usual packet: a hex string per body
        from dtgserver.bridge.driving import em_hex

        assert moved.masks is not None and [e["em"] for e in elements] == [em_hex(m) for m in moved.masks]


def test_every_entry_point_warns_of_the_battery_at_the_same_voltage_by_default() -> None:
    """`build` (what a library user calls), `map_record`, `serve` and `bridge` without the option
    warn at the same battery voltage."""
    import inspect

    from dtgserver.bridge.consumer import BridgeOptions
    from dtgserver.bridge.messages import build
    from dtgserver.cli import main
    from dtgserver.server.config import ServerConfig

    warning_ty = PROFILES["seed"].battery_warning_ty

    def warned(messages: list[Any]) -> bool:
        return any(m.payload["ty"] == warning_ty for m in messages)

    seen = set()
    for volts in (11.3, 11.4, 11.6, 12.0, 12.4):
        record = key_off(battery_v=volts)
        by_record = warned(map_record(record, None, packet_id="p")[0])
        assert warned(build(encode_packet(record), None, packet_id="p")[0]) is by_record, volts
        seen.add(by_record)
    assert seen == {True, False}  # the voltages straddle the default
    default = inspect.signature(build).parameters["battery_warning_v"].default
    assert ServerConfig().battery_warning_v == default == attrs.fields(BridgeOptions).battery_warning_v.default
    for command in ("serve", "bridge", "replay"):
        (option,) = [p for p in main.commands[command].params if p.name == "battery_warning_v"]
        assert option.default == default, command


def test_a_packet_of_more_bodies_than_the_framers_default_is_derived() -> None:
    """The server may be run with a higher --max-body-count than the framer's default: a packet it
    stored with more bodies is read back and published whole (in chunks under 64 KiB)."""
    from dtgserver.bridge.messages import build
    from dtgserver.protocol.framing import DEFAULT_MAX_BODY_COUNT

    count = DEFAULT_MAX_BODY_COUNT + 1
    raw = encode_packet(DtgRealtime(MODEM, 1, KEY_ON, [dtg_body(second) for second in range(count)]))
    messages, _ = build(raw, None, packet_id="p")
    elements = [e for m in messages if m.payload["ty"] == 2 for e in m.payload["pld"]]
    assert len(messages) > 1 and len(elements) == count
    assert elements[-1]["clt"] == KEY_ON_MS + (count - 1) * 1000


@settings(max_examples=60, deadline=None)
@given(st.one_of(records(DtgRealtime, max_bodies=4), records(ObdRealtime, max_bodies=4),
                 records(MdtRealtime, max_bodies=4)), st.sampled_from(sorted(PROFILES)), st.randoms())
def test_a_profile_may_list_its_microtrip_keys_in_any_order(packet: Realtime, profile: str, rng: Any) -> None:
    """A profile is data: the order of its microtrip keys is the JSON's order, and nothing else
    (no key's value depends on which keys come before it)."""
    from dtgserver.bridge.messages import elements_builder
    from dtgserver.protocol.layout import realtime

    raw = encode_packet(packet)
    layout = realtime(raw)
    assert layout is not None
    keys = PROFILES[profile].microtrip_keys[layout.kind]
    shuffled = tuple(rng.sample(keys, len(keys)))
    string_keys = PROFILES[profile].string_keys
    args = (layout.bodies(raw), 1_795_215_600, 0, 0)
    usual = elements_builder(layout.kind, keys, string_keys)(*args)
    reordered = elements_builder(layout.kind, shuffled, string_keys)(*args)
    assert reordered == usual
    assert [list(element) for element in reordered] == [[k for k in shuffled if k in element] for element in usual]


def _widest(chunk: list[dict[str, Any]], ty: int, packet_id: str) -> int:
    """Bytes of a chunk's payload in its widest form: json.dumps' separators, the widest `ts` and
    message number (what must stay below the platform's limit)."""
    payload = {"ts": 10**13, "ty": ty, "pld": chunk, "id": f"{packet_id}:99999"}
    return len(json.dumps(payload, ensure_ascii=False).encode())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(["a", "bb", "키"]), st.one_of(st.integers(), st.text(max_size=40)),
                                max_size=3), max_size=12),
       st.sampled_from([1, 2, 3, 4]),
       st.one_of(st.text(max_size=8), st.text("0123456789abcdef", max_size=32), st.text("가키0a", max_size=8)),
       st.integers(90, 400), st.booleans())
def test_a_split_packs_each_message_as_full_as_the_limit_allows(elements: list[dict[str, Any]], ty: int,
                                                                packet_id: str, limit: int, bounded: bool) -> None:
    """The chunks are the elements in order, each below the limit in its widest form (whatever the
    packet id holds: escapes, Korean), and as full as it can be: one element more would reach the
    limit. No elements, no message. (An element too wide on its own goes alone.)"""
    from dtgserver.bridge.messages import element_bound, split

    bound = element_bound(("a", "bb", "키")) if bounded and all(
        len(json.dumps(value, ensure_ascii=False).encode()) <= 32 for e in elements for value in e.values()) else None
    chunks = split(elements, ty, packet_id, limit, bound)
    assert [e for chunk in chunks for e in chunk] == elements and all(chunks)
    for n, chunk in enumerate(chunks):
        assert len(chunk) == 1 or _widest(chunk, ty, packet_id) < limit
        if n + 1 < len(chunks):
            assert _widest([*chunk, chunks[n + 1][0]], ty, packet_id) >= limit


@pytest.mark.parametrize("per_chunk", [1, 2, 3, 7])
def test_a_split_with_no_slack_at_all(per_chunk: int) -> None:
    """The smallest limit that lets `per_chunk` elements into a message (their widest form plus
    one byte) and the largest (the widest form of one element more): every message holds
    `per_chunk` elements, none reaches the limit. Nothing is counted that is not written (the
    ", " before a chunk's first element), nothing written goes uncounted."""
    from dtgserver.bridge.messages import split

    elements = [{"a": n % 10} for n in range(4 * per_chunk + 1)]
    for limit in (_widest(elements[:per_chunk], 2, "p") + 1, _widest(elements[:per_chunk + 1], 2, "p")):
        chunks = split(elements, 2, "p", limit)
        assert [len(chunk) for chunk in chunks] == [per_chunk] * 4 + [1], limit
        assert all(_widest(chunk, 2, "p") < limit for chunk in chunks)


def test_a_message_whose_time_is_no_calendar_time_has_no_ts() -> None:
    """A KEY OFF sent at no calendar time: its parking microtrip goes out without `ts` (none is
    invented), not with `"ts": null`."""
    bad = BadTime(bytes((26, 13, 1, 0, 0, 0, 0)))
    record = attrs.evolve(key_off(minutes=1), sent_time=bad)
    (parking,), _ = map_record(wire(record), None, packet_id="k")
    assert parking.payload["ty"] == 2 and "ts" not in parking.payload
    assert "clt" not in parking.payload["pld"] and b'"ts"' not in encode(parking.payload)
