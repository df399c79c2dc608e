"""A stored packet's bytes and its terminal's trip state → Smart[Fleet] messages, and their JSON.

`build` is a pure function (no I/O, no clock) of the packet exactly as stored, the state before
it (`trips`) and the options; `derive` calls it and `encode`s each payload, for live forwarding and
replay alike. A realtime packet's microtrip is built straight from its bytes: one `struct` pass
over the bodies (`protocol.layout`) feeds a function generated once per profile and kind, with
one expression per key, so 60 elements cost about what hand-written code costs (bench/bridge.py).
KEY OFF and basic info are small: they are decoded into their record.

Every message carries `"id": "<packet_id>:<n>"`, our extension of {ts, ty, pld}, so a consumer can
drop the duplicates QoS 1 allows. A body whose time is not a calendar time keeps its element (in
wire order) without `clt`. docs/mqtt.md has every ruling.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import orjson

from ..protocol import BasicInfo, KeyOff, Packet, received
from ..protocol import encode as encode_packet
from ..protocol.fields import Scaled, Temperature
from ..protocol.layout import REALTIME_BY_KIND, RealtimeLayout, day_ms, time_ms
from ..protocol.layout import realtime as realtime_layout
from ..protocol.schema import DEVICE_STATUS
from . import tripmetrics, trips
from .driving import EM_BITS, DrivingConfig, em_hex
from .profiles import Profile, get_profile
from .trips import DEFAULT_DRIVING, DEFAULT_TRIP_DEADLINE_MS, TripState

MAX_PAYLOAD_BYTES = 64 * 1024
"""Every encoded payload stays strictly below this (the platform's limit)."""

PARKING = 2  # BlackBox trip type `try`: 1 driving, 2 parking


@attrs.frozen
class Message:
    """One MQTT message: `topic` without the configured prefix, `payload` before JSON encoding."""

    topic: str
    payload: dict[str, Any]
    retain: bool = False


# -- JSON -----------------------------------------------------------------------------------------


class _Float(float):
    """A float whose JSON is Python's repr (`1e-06`), where orjson would write `1e-6`: Python
    writes an exponent below 1e-4 and from 1e16 on. Equal to the float it wraps."""

    __slots__ = ()


def exact(value: float) -> float:
    """`value`, wrapped so that `encode` writes it as `json.dumps` does (only where they differ)."""
    return _Float(value) if value and not 1e-4 <= abs(value) < 1e16 else value


def _default(value: Any) -> Any:
    if isinstance(value, _Float):
        return orjson.Fragment(float.__repr__(value).encode())
    raise TypeError(f"{type(value).__name__} is not JSON")


def encode(payload: Mapping[str, Any] | list[Any]) -> bytes:
    """The bytes published, live and in a replay: compact UTF-8 JSON, Korean text unescaped; byte
    for byte `json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)`.

    orjson (measured against msgspec and json in docs/performance.md). No payload holds NaN or an
    infinity: every float is a wire integer divided by its scale.
    """
    return orjson.dumps(payload, default=_default)


def telemetry_topic(modem: str, profile: Profile | None = None) -> str:
    return (profile or get_profile("seed")).telemetry_topic.format(modem=modem)


def attributes_topic(modem: str, profile: Profile | None = None) -> str:
    return (profile or get_profile("seed")).attributes_topic.format(modem=modem)


def _envelope(ts: int | None, ty: int, pld: Any) -> dict[str, Any]:
    out: dict[str, Any] = {} if ts is None else {"ts": ts}
    out["ty"] = ty
    out["pld"] = pld
    return out


def _pick(values: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The values of `keys`, in that order, leaving out the unknown (None)."""
    return {key: values[key] for key in keys if values[key] is not None}


# -- one packet -----------------------------------------------------------------------------------

Built = list[tuple[str, dict[str, Any], bool]]


def build(raw: bytes, state: TripState | None, *, packet_id: str, profile: str = "seed",
          battery_warning_v: float = tripmetrics.DEFAULT_BATTERY_WARNING_V, received_ms: int | None = None,
          max_payload_bytes: int = MAX_PAYLOAD_BYTES, driving: DrivingConfig = DEFAULT_DRIVING,
          trip_deadline_ms: int = DEFAULT_TRIP_DEADLINE_MS) -> tuple[list[Message], TripState | None]:
    """The messages of one framed packet in publish order, and the terminal's next trip state.

    `packet_id` is the store's stable id of the packet; `received_ms` (the store's receive time)
    is only used where the packet carries no time of its own: the `ts` of basic info.
    `battery_warning_v` (the threshold of a 12 V system; twice it on a 24 V one) 0 disables
    Battery Warning events. `driving` says which dangerous-driving criteria apply to which
    terminal. A trip's Trip goes out once its bodies reach its KEY OFF, or when the terminal's
    next trip begins, or with the first packet of the terminal received `trip_deadline_ms` after
    that KEY OFF (marked partial). A status log publishes nothing else (it is stored as a file); a
    packet kind without messages defined here is a ValueError.
    """
    table = get_profile(profile)
    frame = received(raw, max_body_count=_ANY_BODY_COUNT)  # one whole packet, its header valid
    layout = realtime_layout(raw)
    payloads: Built
    if layout is not None:
        payloads, state = _realtime(raw, layout, state, table, packet_id, max_payload_bytes, driving)
    else:  # the deadline is judged on the packets of a terminal waiting for its trip's last bodies
        record = frame.record
        overdue: Built = []
        if trips.overdue(state, received_ms, trip_deadline_ms):
            assert state is not None
            overdue.append(_trip_message(state, table, record.modem, driving, partial=True))
            state = trips.sent(state)
        if isinstance(record, KeyOff):
            payloads, state = _key_off(record, state, table, battery_warning_v, driving, received_ms)
        elif isinstance(record, BasicInfo):
            payloads, state = _basic_info(record, state, table, received_ms)
        elif record.KIND in SILENT_KINDS:
            payloads = []
        else:
            raise ValueError(f"no messages are defined for a packet of kind {record.KIND!r}")
        payloads = overdue + payloads
    out = []
    for n, (topic, payload, retain) in enumerate(payloads):
        payload["id"] = f"{packet_id}:{n}"
        out.append(Message(topic, payload, retain))
    return out, state


_ANY_BODY_COUNT = 0x7FFF  # a stored packet was framed with the server's limit, whatever it was

SILENT_KINDS = frozenset({"status_log"})
"""Packet kinds stored but never published (the status log is kept as a file per terminal)."""


def map_record(record: Packet, state: TripState | None, *, packet_id: str, profile: str = "seed",
               battery_warning_v: float = tripmetrics.DEFAULT_BATTERY_WARNING_V, received_ms: int | None = None,
               max_payload_bytes: int = MAX_PAYLOAD_BYTES, driving: DrivingConfig = DEFAULT_DRIVING,
               trip_deadline_ms: int = DEFAULT_TRIP_DEADLINE_MS) -> tuple[list[Message], TripState | None]:
    """`build` for a record: the messages of the packet it encodes to."""
    return build(encode_packet(record), state, packet_id=packet_id, profile=profile,
                 battery_warning_v=battery_warning_v, received_ms=received_ms, max_payload_bytes=max_payload_bytes,
                 driving=driving, trip_deadline_ms=trip_deadline_ms)


# -- realtime → microtrips (+ diagnostic events) ---------------------------------------------------


# Microtrip keys read straight from one body field: key -> (field, what of it).
#   "value": the wire integer as it is (a flag's byte too: 0/1, any other byte passed as it came)
#   "scaled": the field's value, wire / scale
BODY_FIELDS: Mapping[str, tuple[str, str]] = {
    "lat": ("lat", "scaled"),
    "lon": ("lon", "scaled"),
    "sp": ("speed_kmh", "value"),
    "rpm": ("rpm", "value"),
    "vv": ("battery_v", "scaled"),
    "dtr": ("daily_distance_km", "value"),
    "dctr": ("total_distance_km", "value"),
    "bsg": ("brake", "value"),
    "gan": ("azimuth_deg", "value"),
    "acx": ("accel_x_ms2", "scaled"),
    "acy": ("accel_y_ms2", "scaled"),
}
# Keys computed from more than one field, or from the trip: built by `_element_source` itself.
DERIVED_KEYS = ("tid", "clt", "cdit", "fc", "tmp")
# Keys set on each element after it is built, from the trip's detector and measures (`_realtime`).
TRIP_ELEMENT_KEYS = ("em",)

ElementsBuilder = Callable[[memoryview, int, int | None, int | None], list[dict[str, Any]]]


def _element_source(layout: RealtimeLayout, keys: tuple[str, ...], string_keys: frozenset[str]) -> str:
    """Python source of `elements(bodies, tid, first_total_km, first_total_fuel_ml)`: every body's
    microtrip element.

    One statement per key in the key list's order (the JSON's order), reading the body's wire
    values by their place in the struct tuple. A key without a value is left out, never
    invented: a body time that is no calendar time has no `clt`, a trip without a known first
    odometer (`first_total_km` None: `elements_builder` then builds the source without `cdit`)
    or a body behind it no `cdit`, likewise `fc` without the trip's first total fuel or behind
    it, a body whose sensors report no reading no `tmp`.
    """
    slots = layout.body_slots
    width = sum(slot.arity for slot in slots.values())
    wire = [f"w{i}" for i in range(width)]

    def at(name: str) -> str:
        return wire[slots[name].index]

    def scale(name: str) -> int:
        adapter = slots[name].adapter
        if not isinstance(adapter, Scaled):
            raise TypeError(f"{name} is not a scaled field")
        return adapter.scale

    def scaled(name: str) -> str:
        value = f"{at(name)} / {scale(name)}"
        # Python writes |x| < 1e-4 with an exponent: only a scale above 10**4 can get there
        small = scale(name) // 10**4
        return f"(_exact({value}) if -{small} < {at(name)} < {small} else {value})" if small > 1 else value

    def milli(name: str) -> str:  # round(wire / 1000 * 1000) is the wire integer itself (tests/test_messages.py)
        return at(name) if scale(name) == 1000 else f"round({at(name)} / {scale(name)} * 1000)"

    lines = ["def elements(bodies, tid, first_total_km, first_total_fuel_ml):",
             "    out = []",
             "    append = out.append",
             f"    for {', '.join(wire)} in _iter(bodies):"]
    body = []
    values: list[str] = []
    optional: list[str] = []
    deletes: list[str] = []
    for key in keys:
        if key == "tid":
            values.append("tid")
        elif key == "clt":
            y, mo, d, h, mi, s, cc = wire[slots["time"].index:slots["time"].index + 7]
            body += [f"midnight = _day_ms({y}, {mo}, {d})",
                     f"clt = None if midnight is None or {h} > 23 or {mi} > 59 or {s} > 59 or {cc} > 99 else"
                     f" midnight + (({h} * 60 + {mi}) * 60 + {s}) * 1000 + {cc} * 10"]
            values.append("clt")
            optional.append("clt")
        elif key == "cdit":
            km = at("total_distance_km")
            values.append(f"({km} - first_total_km) * 1000")
            deletes.append(f"if {km} < first_total_km:\n            del e['cdit']")
        elif key == "fc":  # the trip's fuel so far: the total counter, which a midnight does not reset
            ml = milli("total_fuel_l")
            values.append(f"{ml} - first_total_fuel_ml")
            deletes.append(f"if {ml} < first_total_fuel_ml:\n            del e['fc']")
        elif key == "tmp":
            a, b = at("temp_a_c"), at("temp_b_c")
            adapter = slots["temp_a_c"].adapter
            assert isinstance(adapter, Temperature) and adapter.scale == slots["temp_b_c"].adapter.scale
            missing = "_NO_READING"
            body.append(f"tmp = None if {a} in {missing} and {b} in {missing} else "
                        f"f\"{{'' if {a} in {missing} else format({a} / {adapter.scale}, 'g')}},"
                        f"{{'' if {b} in {missing} else format({b} / {adapter.scale}, 'g')}}\"")
            values.append("tmp")
            optional.append("tmp")
        else:
            name, what = BODY_FIELDS[key]
            if what == "value":
                expr = plain = at(name)
            elif what == "scaled":
                expr, plain = scaled(name), f"{at(name)} / {scale(name)}"
            else:
                raise ValueError(f"{key}: no way to read {what!r}")
            if key in string_keys:  # `%g` text: wire values have at most 5 digits, so it is exact
                expr = f"format({plain}, 'g')"
            values.append(expr)
    items = ", ".join(f"{key!r}: {value}" for key, value in zip(keys, values, strict=True))
    body.append(f"e = {{{items}}}")
    body += [f"if {name} is None:\n            del e[{name!r}]" for name in optional]
    body += deletes
    body.append("append(e)")
    lines += ["        " + line for line in body]
    lines.append("    return out")
    return "\n".join(lines)


@functools.lru_cache(maxsize=64)
def elements_builder(kind: str, keys: tuple[str, ...], string_keys: frozenset[str]) -> ElementsBuilder:
    """`elements(bodies, tid, first_total_km, first_total_fuel_ml)` for one realtime kind and key
    list: every body's microtrip element (`tid` an int; `first_total_km` None when the trip's first
    odometer is not known, and then no element has `cdit`; `first_total_fuel_ml` likewise for `fc`)."""
    optional = tuple(key for key in ("cdit", "fc") if key in keys)
    if not optional:
        return _compiled(kind, keys, string_keys)
    variants: dict[tuple[bool, bool], ElementsBuilder] = {}
    for no_cdit, no_fc in itertools.product((False, True), repeat=2):
        dropped = {"cdit"} if no_cdit else set()
        dropped |= {"fc"} if no_fc else set()
        variants[no_cdit, no_fc] = _compiled(kind, tuple(key for key in keys if key not in dropped), string_keys)

    def elements(bodies: memoryview, tid: int, first_total_km: int | None,
                 first_total_fuel_ml: int | None) -> list[dict[str, Any]]:
        return variants[first_total_km is None, first_total_fuel_ml is None](
            bodies, tid, first_total_km, first_total_fuel_ml)

    return elements


@functools.lru_cache(maxsize=64)
def _compiled(kind: str, keys: tuple[str, ...], string_keys: frozenset[str]) -> ElementsBuilder:
    layout = REALTIME_BY_KIND[kind]
    keys = tuple(key for key in keys if key not in TRIP_ELEMENT_KEYS)  # set by `_realtime` afterwards
    namespace: dict[str, Any] = {"_iter": layout.body.iter_unpack, "_day_ms": day_ms, "_exact": exact,
                                 "_NO_READING": frozenset(Temperature.SPECIAL)}
    source = _element_source(layout, keys, string_keys)
    exec(compile(source, f"<microtrip elements {kind}>", "exec"), namespace)  # made from our own tables
    builder: ElementsBuilder = namespace["elements"]
    return builder


_EM_HEX = tuple(em_hex(mask) for mask in range(EM_BITS + 1))
"""`em_hex` of every `em` mask: a body's `em` is a look-up."""

ColumnsBuilder = Callable[[Sequence[Sequence[Any]], int, int, int | None, list[Any], list[int], list[str]],
                          list[dict[str, Any]] | None]


def _columns_source(layout: RealtimeLayout, keys: tuple[str, ...], string_keys: frozenset[str]) -> str:
    """Python source of `elements(c, tid, first_total_km, first_total_fuel_ml, times, cdit, em)`: the
    microtrip elements of a packet
    from its columns (`RealtimeLayout.transposed`), its body times and the trip's `cdit` and `em`
    per body, or None when the packet is not the usual one this handles.

    The elements are those `_element_source`'s builder makes with `_realtime`'s `cdit` and `em`
    written into them (tests/test_messages.py compares the two), built column-wise: each scaled
    value is one list comprehension over its column, and each element one dict display over the
    zipped columns. The usual packet is one whose every body has a calendar time, none is behind
    the trip's first odometer or first total fuel, no coordinate is within 0.0001 of 0, and whose temperature
    sensors report no reading on any body or a reading on every body; any other goes through the
    builder body by body (None here), so an unusual value never takes a shortcut.
    """
    slots = layout.body_slots

    def scale(name: str) -> int:
        adapter = slots[name].adapter
        if not isinstance(adapter, Scaled):
            raise TypeError(f"{name} is not a scaled field")
        return adapter.scale

    lines = ["def elements(c, tid, first_total_km, first_total_fuel_ml, times, cdit, em):"]
    items: list[tuple[str, str, str]] = []  # (key, the column zipped, its name in the loop), tid apart
    for key in keys:
        if key in TRIP_ELEMENT_KEYS or key == "tid":
            continue
        if key == "clt":
            lines.append("    if None in times:\n        return None")
            items.append((key, "times", "clt"))
        elif key == "cdit":
            lines.append(f"    if min(c[{slots['total_distance_km'].index}]) < first_total_km:\n        return None")
            items.append((key, "cdit", "cd"))
        elif key == "fc":  # the trip's fuel so far, as `_element_source` has it; below the first: body by body
            ml = "v" if scale("total_fuel_l") == 1000 else f"round(v / {scale('total_fuel_l')} * 1000)"
            lines += [f"    fcs = [{ml} - first_total_fuel_ml for v in c[{slots['total_fuel_l'].index}]]",
                      "    if min(fcs) < 0:\n        return None"]
            items.append((key, "fcs", "f"))
        elif key == "tmp":
            a, b = slots["temp_a_c"].index, slots["temp_b_c"].index
            adapter = slots["temp_a_c"].adapter
            assert isinstance(adapter, Temperature) and adapter.scale == slots["temp_b_c"].adapter.scale
            missing = "_NO_READING"
            lines += [f"    ta, tb = c[{a}], c[{b}]",
                      f"    if {missing}.issuperset(ta) and {missing}.issuperset(tb):",
                      "        tmp = None",
                      "    else:",
                      f"        tmp = [None if a in {missing} and b in {missing} else "
                      f"f\"{{'' if a in {missing} else format(a / {adapter.scale}, 'g')}},"
                      f"{{'' if b in {missing} else format(b / {adapter.scale}, 'g')}}\" for a, b in zip(ta, tb)]",
                      "        if None in tmp:",
                      "            return None"]
            items.append((key, "tmp", "tp"))
        else:
            name, what = BODY_FIELDS[key]
            column = f"c[{slots[name].index}]"
            if what == "value":
                plain = expr = "v"
            elif what == "scaled":
                plain = expr = f"v / {scale(name)}"
                small = scale(name) // 10**4  # Python writes |x| < 1e-4 with an exponent (`exact`)
                if small > 1 and key not in string_keys:
                    lines.append(f"    if not (min({column}) >= {small} or max({column}) <= -{small}) and "
                                 f"any(v and -{small} < v < {small} for v in {column}):\n        return None")
            else:
                raise ValueError(f"{key}: no way to read {what!r}")
            if key in string_keys:
                expr = f"format({plain}, 'g')"
            variable = f"x{len(items)}"
            if expr != "v":
                lines.append(f"    {variable}s = [{expr} for v in {column}]")
                column = f"{variable}s"
            items.append((key, column, variable))
    if "em" in keys:
        items.append(("em", "em", "e"))

    def display(with_tmp: bool) -> str:
        chosen = [item for item in items if with_tmp or item[0] != "tmp"]
        pairs = ([("tid", "tid")] if "tid" in keys else []) + [(key, variable) for key, _, variable in chosen]
        # the keys in the profile's order (`em` last, as `_realtime` adds it), tid where it is listed
        order = [key for key in keys if key not in TRIP_ELEMENT_KEYS] + [k for k in keys if k in TRIP_ELEMENT_KEYS]
        by_key = dict(pairs)
        shown = ", ".join(f"{key!r}: {by_key[key]}" for key in order if key in by_key)
        return (f"[{{{shown}}} for {', '.join(variable for _, _, variable in chosen)}, "
                f"in zip({', '.join(column for _, column, _ in chosen)})]")

    if not any(key == "tmp" for key, _, _ in items):
        lines.append(f"    return {display(False)}")
    else:
        lines += [f"    if tmp is None:\n        return {display(False)}", f"    return {display(True)}"]
    return "\n".join(lines)


@functools.lru_cache(maxsize=64)
def columns_builder(kind: str, keys: tuple[str, ...], string_keys: frozenset[str]) -> ColumnsBuilder:
    """`elements(columns, tid, first_total_km, first_total_fuel_ml, times, cdit, em)` for one realtime
    kind and key list:
    the usual packet's microtrip elements, or None for another (`_columns_source`)."""
    namespace: dict[str, Any] = {"_NO_READING": frozenset(Temperature.SPECIAL)}
    source = _columns_source(REALTIME_BY_KIND[kind], keys, string_keys)
    exec(compile(source, f"<microtrip columns {kind}>", "exec"), namespace)  # made from our own tables
    builder: ColumnsBuilder = namespace["elements"]
    return builder


def _realtime(raw: bytes, layout: RealtimeLayout, state: TripState | None, table: Profile, packet_id: str,
              max_payload_bytes: int, driving: DrivingConfig = DEFAULT_DRIVING) -> tuple[Built, TripState | None]:
    moved = trips.realtime_advance(raw, layout, state, driving)
    if moved is None:
        return [], state  # no time at all to name a trip by: kept in the store, not published
    tid = moved.tid
    topic = table.telemetry_topic.format(modem=layout.modem(raw))

    events: Built = []
    if not moved.stale and "status_code" in layout.body_slots:
        events = _device_status(raw, layout, state or TripState(), table, tid)

    kind = layout.kind
    keys = table.microtrip_keys[kind]
    # the trip's first odometer is known from the first body on: the same for every element
    first_total_km = None if moved.stale else moved.trip.first_total_km
    # the trip's first total fuel likewise: `fc` is the trip's fuel so far, as the Trip's own `fc`
    first_fuel_ml = None if moved.stale else moved.trip.first_total_fuel_ml
    elements = None
    if (moved.cdit is not None and first_total_km is not None
            and (first_fuel_ml is not None or "fc" not in keys)
            and moved.columns is not None and moved.times is not None and moved.times):
        masks = moved.masks
        if masks is None:  # a vehicle no criteria apply to: nothing judged, no `em`
            judged, em = tuple(key for key in keys if key != "em"), []
        else:
            judged = keys
            em = [_EM_HEX[mask & EM_BITS] for mask in masks] if any(masks) else [_EM_HEX[0]] * len(masks)
        elements = columns_builder(kind, judged, table.string_keys)(moved.columns, tid, first_total_km, first_fuel_ml,
                                                                    moved.times, moved.cdit, em)
    if elements is None:  # an unusual packet (`_columns_source`), or an older trip's backlog
        elements = elements_builder(kind, keys, table.string_keys)(layout.bodies(raw), tid, first_total_km,
                                                                   first_fuel_ml)
        if moved.cdit is not None:  # not for an older trip's backlog: its state is gone
            if "cdit" in keys:  # metres from the speed (tripmetrics), in the place the builder gave the key
                for element, metres in zip(elements, moved.cdit, strict=True):
                    element["cdit"] = metres
            if "em" in keys and moved.masks is not None:  # not for a vehicle no criteria apply to: nothing judged
                for element, mask in zip(elements, moved.masks, strict=True):
                    element["em"] = em_hex(mask)
    ty = table.microtrip_ty[kind]
    payloads: Built = []
    if moved.closed is not None:  # the trip before, complete: its Trip first
        payloads.append(_trip_message(moved.closed, table, layout.modem(raw), driving))
    for chunk in split(elements, ty, packet_id, max_payload_bytes, element_bound(keys)):
        last = next((e["clt"] for e in reversed(chunk) if "clt" in e), moved.key_on_ms)  # the last body time
        payloads.append((topic, _envelope(last, ty, chunk), False))
    payloads += events
    if moved.completes:  # the bodies reach the KEY OFF: the Trip after them
        payloads.append(_trip_message(moved.trip, table, layout.modem(raw), driving))
    return payloads, moved.state


def device_status_name(code: int) -> str:
    """What a DTG device status code means (the protocol's §7 table)."""
    return DEVICE_STATUS.get(code, "not in the protocol's table")


def _device_status(raw: bytes, layout: RealtimeLayout, before: TripState, table: Profile, tid: int) -> Built:
    """A DTG packet's device health: a Device Status event per change of the bodies' status code
    (the code before the terminal's first body being 0, ok), then, when it changed, the retained
    health naming the last code."""
    modem = layout.modem(raw)
    codes = layout.column(raw, "status_code")
    changes = trips.status_changes(before.status_code, codes)
    out: Built = []
    topic = table.telemetry_topic.format(modem=modem)
    for index, was, code in changes:
        values = {"tid": tid, "dsc": f"{code:02d}", "dsn": device_status_name(code), "pdsc": f"{was:02d}"}
        event = _pick(values, table.device_event_keys)
        out.append((topic, _envelope(layout.body_time_ms(raw, index), table.device_event_ty, event), False))
    if changes:
        index, _, code = changes[-1]
        health = {"ts": layout.body_time_ms(raw, index), "modem": modem, "dsc": f"{code:02d}",
                  "dsn": device_status_name(code)}
        out.append((table.device_health_topic.format(modem=modem), _pick(health, table.device_health_keys), True))
    return out


def _trip_message(trip: TripState, table: Profile, modem: str, driving: DrivingConfig,
                  partial: bool = False) -> tuple[str, dict[str, Any], bool]:
    values = trips.trip_values(trip, modem=modem, driving=driving, partial=partial)
    for key in ("stlat", "stlon", "edlat", "edlon"):
        if values[key] is not None:
            values[key] = exact(values[key])
    topic = table.telemetry_topic.format(modem=modem)
    return topic, _envelope(values["edt"], table.trip_ty[trip.kind], _pick(values, table.trip_keys)), False


# -- payload size ---------------------------------------------------------------------------------


def _size(value: Any) -> int:
    # json.dumps' default separators (", ", ": ") are the widest encoding anyone stores: a chunk
    # sized with them stays under the limit in the compact encoding too
    return len(json.dumps(value, ensure_ascii=False).encode("utf-8"))


VALUE_BOUND = 32
"""Characters an element's value takes in JSON at most: a float's repr is at most 24, a wire
integer (even × 1000, or in ms) at most 20, a `%g` text with its quotes at most 14, the
temperatures' "A,B" at most 27."""


@functools.lru_cache(maxsize=64)
def element_bound(keys: tuple[str, ...]) -> int:
    """Bytes one element with these keys takes in JSON at most: `{`, each `"key": value, `, `}`."""
    return 2 + sum(len(json.dumps(key)) + 4 + VALUE_BOUND for key in keys)


@functools.lru_cache(maxsize=64)
def _overhead(ty: int) -> int:
    """Bytes of the envelope of an empty array with the widest `ts`, without the id's value."""
    return _size(_envelope(10**13, ty, []) | {"id": ""}) - 2


def split(elements: list[dict[str, Any]], ty: int, packet_id: str, limit: int,
          element_bound: int | None = None) -> list[list[dict[str, Any]]]:
    """Elements in consecutive chunks whose encoded envelope stays below `limit` bytes.

    `element_bound`: no element encodes to more bytes than this; when even that many per
    element fit, nothing is encoded to find out (a minute's 60 elements are far below the limit).
    """
    # the envelope around the array, with the widest ts and message number it can get
    # a store's id is hex: its JSON is itself in quotes (no escapes), without a json.dumps per packet
    plain = packet_id.isascii() and packet_id.isalnum()
    overhead = _overhead(ty) + (len(packet_id) + 8 if plain else _size(f"{packet_id}:99999"))
    if element_bound is not None and overhead + len(elements) * (element_bound + 2) < limit:
        return [elements] if elements else []
    # The usual case, one dumps: the whole array's size is overhead + element sizes + the ", "
    # between them, exactly what the loop below adds up, and below the limit no split happens.
    if overhead - 2 + _size(elements) < limit:
        return [elements] if elements else []
    chunks: list[list[dict[str, Any]]] = []
    chunk: list[dict[str, Any]] = []
    size = overhead
    for element in elements:
        element_size = _size(element) + (2 if chunk else 0)  # the ", " before it
        if chunk and size + element_size >= limit:
            chunks.append(chunk)
            chunk, size, element_size = [], overhead, element_size - 2
        chunk.append(element)
        size += element_size
    if chunk:
        chunks.append(chunk)
    return chunks


# -- KEY OFF → Trip (once), parking microtrip (always), battery warning ---------------------------


def _key_off(record: KeyOff, state: TripState | None, table: Profile, battery_warning_v: float,
             driving: DrivingConfig = DEFAULT_DRIVING, received_ms: int | None = None,
             ) -> tuple[Built, TripState | None]:
    topic = table.telemetry_topic.format(modem=record.modem)
    key_off_ms = time_ms(record.key_off_time)
    sent_ms = time_ms(record.sent_time)
    outcome = trips.key_off(state, key_off_ms, lat=record.lat, lon=record.lon, battery_v=record.battery_v,
                            received_ms=received_ms)
    trip = outcome.trip
    messages: Built = []
    if outcome.closes:
        assert trip is not None
        messages.append(_trip_message(trip, table, record.modem, driving))

    tid = trip.tid if trip is not None else None
    parking = {"tid": tid, "clt": sent_ms, "lat": exact(record.lat), "lon": exact(record.lon), "try": PARKING,
               "vlt": record.battery_v, "tim": tripmetrics.parking_s(sent_ms, key_off_ms)}
    kind = trip.kind if trip is not None else ""
    messages.append((topic, _envelope(sent_ms, table.parking_ty[kind], _pick(parking, table.parking_keys)), False))

    system_v = state.system_v if state is not None else None
    if battery_warning_v > 0 and record.battery_v < tripmetrics.battery_warning_threshold_v(
            system_v, battery_warning_v, record.battery_v):
        warning = {"tid": tid, "wbv": record.battery_v}
        messages.append((topic, _envelope(sent_ms, table.battery_warning_ty,
                                          _pick(warning, table.battery_warning_keys)), False))
    return messages, outcome.state


# -- basic info → retained attributes ------------------------------------------------------------


def _basic_info(record: BasicInfo, state: TripState | None, table: Profile,
                received_ms: int | None) -> tuple[Built, TripState]:
    fwv = str(record.firmware_version)
    attributes: dict[str, Any] = {
        "ts": received_ms,
        "modem": record.modem,
        "vid": str(record.registration_number),
        "vin": str(record.vin),
        "model": str(record.model),
        "vehicle_type": str(record.vehicle_type),
        "business_number": str(record.business_number),
        "driver_code": str(record.driver_code),
        "fwv": fwv,
    }
    topic = table.attributes_topic.format(modem=record.modem)
    return [(topic, _pick(attributes, table.attribute_keys), True)], trips.with_firmware(
        state, fwv, str(record.vehicle_type))
