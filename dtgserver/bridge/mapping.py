"""Records → Smart[Fleet] messages: a pure function of (packet, trip state), no I/O, no clock.

The store calls `map_record` inside the transaction that commits the packet, and writes the
messages to its outbox and the new `TripState` beside the data, so a restart loses no trip and a
replay of the same packets gives the same messages (same ids).

Rulings (docs/mqtt.md has the full table):
- `tid` is the KEY ON time in Unix seconds. When KEY ON is not a calendar time, the packet
  continues the open trip of the terminal, or else the first body time stands in for KEY ON.
- A realtime packet of an older trip than the one in the state (the terminal's backlog) is
  published with its own `tid` but leaves the state alone (no `cdit`, no Diagnostic events);
  unless its odometer is beyond the state's trip: then the clock went back and it starts a trip.
- A body whose time is not a calendar time keeps its element (in wire order) without `clt`.
- Every message carries `"id": "<packet_id>:<n>"`, our extension of {ts, ty, pld}, so a consumer
  can drop the duplicates QoS 1 allows.
"""

from __future__ import annotations

import functools
import json
import operator
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import attrs

from ..protocol.fields import SensorState
from ..protocol.layout import realtime as realtime_layout
from ..protocol.records import BasicInfo, DtgBody, KeyOff, Packet, Realtime
from .profiles import PARKING_KEYS, TRIP_KEYS, Profile, get_profile

MAX_PAYLOAD_BYTES = 64 * 1024
"""Every encoded payload stays strictly below this (the platform's limit)."""

PARKING = 2  # BlackBox trip type `try`: 1 driving, 2 parking
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


@attrs.frozen
class Message:
    """One MQTT message: `topic` without the configured prefix, `payload` before JSON encoding."""

    topic: str
    payload: dict[str, Any]
    retain: bool = False

    def encoded(self) -> bytes:
        return encode_payload(self.payload)


def encode_payload(payload: Mapping[str, Any] | list[Any]) -> bytes:
    """The bytes published: compact UTF-8 JSON (Korean plates stay readable)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def telemetry_topic(modem: str) -> str:
    return f"v1/sensors/{modem}/tre"


def attributes_topic(modem: str) -> str:
    return f"v1/sensors/{modem}/attributes"


@attrs.frozen
class TripState:
    """What one terminal's messages need from earlier packets; JSON-safe through to_dict/from_dict.

    Terminal-wide: `status_code` (last DTG device status, for events on change) and `fwv`.
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

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _STATE_NAMES}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TripState:
        """The state `to_dict` wrote; unknown keys (from a newer version) are ignored."""
        return cls(**{k: v for k, v in data.items() if k in _STATE_NAMES})

    def to_json(self) -> str:
        """The stored form, written once per packet: an array is about half the cost of an object."""
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
        return TripState(tid=tid, kind=kind, key_on_ms=key_on_ms, status_code=self.status_code, fwv=self.fwv)


_STATE_NAMES = tuple(f.name for f in attrs.fields(TripState))
_STATE_VALUES = operator.attrgetter(*_STATE_NAMES)


def to_ms(value: object) -> int | None:
    """UTC ms epoch of a KST wire time; None for a BadTime (no calendar time)."""
    if isinstance(value, datetime):
        return (value - _EPOCH) // _MS
    return None


def map_record(record: Packet, state: TripState | None, *, packet_id: str, profile: str = "seed",
               battery_warning_v: float = 11.5, received_ms: int | None = None,
               max_payload_bytes: int = MAX_PAYLOAD_BYTES, messages: bool = True,
               ) -> tuple[list[Message], TripState | None]:
    """The messages for one stored packet, in publish order, and the terminal's next trip state.

    `packet_id` is the store's stable id of the packet; `received_ms` (the store's receive time)
    is only used where the packet carries no time of its own: the `ts` of basic info.
    `battery_warning_v` 0 disables Battery Warning events. `messages=False`: the same next
    state, without building a realtime packet's microtrips (a server storing without MQTT).
    """
    table = get_profile(profile)
    payloads: list[tuple[str, dict[str, Any], bool]]
    if isinstance(record, Realtime):
        payloads, state = _realtime(record, state, table, packet_id, max_payload_bytes, messages)
    elif isinstance(record, KeyOff):
        payloads, state = _key_off(record, state, table, battery_warning_v)
    elif isinstance(record, BasicInfo):
        payloads, state = _basic_info(record, state, received_ms)
    else:  # status log (stored as a file), response: nothing to publish
        return [], state
    out = []
    for n, (topic, payload, retain) in enumerate(payloads):
        payload["id"] = f"{packet_id}:{n}"
        out.append(Message(topic, payload, retain))
    return out, state


# -- realtime → microtrips (+ diagnostic events) ---------------------------------------------------


def _ml(litres: float) -> int:
    return round(litres * 1000)


def _text(value: float) -> str:
    # wire values have 0.1 resolution and at most 5 digits, so %g is exact and reads naturally
    return f"{value:g}"


def _temperatures(body: Any) -> str | None:
    """Temperatures A and B as "A,B" in °C (`_text`'s format, inlined: 60 calls per packet); a
    sensor that reports no reading (a SensorState) leaves its place empty, and with neither
    reading there is no value."""
    a, b = body.temp_a_c, body.temp_b_c
    a_missing, b_missing = isinstance(a, SensorState), isinstance(b, SensorState)
    if a_missing and b_missing:
        return None
    return f"{'' if a_missing else f'{a:g}'},{'' if b_missing else f'{b:g}'}"


# Microtrip keys read straight from one body field: key -> (field, conversion).
BODY_FIELDS: Mapping[str, tuple[str, Callable[[Any], Any]]] = {
    "lat": ("lat", float),
    "lon": ("lon", float),
    "sp": ("speed_kmh", int),
    "rpm": ("rpm", int),
    "fc": ("daily_fuel_l", _ml),
    "vv": ("battery_v", float),
    "dtr": ("daily_distance_km", int),
    "dctr": ("total_distance_km", int),
    "bsg": ("brake", int),
    "gan": ("azimuth_deg", int),
    "acx": ("accel_x_ms2", float),
    "acy": ("accel_y_ms2", float),
}


_CONVERSIONS: Mapping[Callable[[Any], Any], str] = {float: "float", int: "int", _ml: "_ml"}


@functools.lru_cache(maxsize=64)
def _element_builder(keys: tuple[str, ...], string_keys: frozenset[str],
                     ) -> Callable[[Any, int, int | None], dict[str, Any]]:
    """A function `(body, tid, first_total_km) -> element` for one microtrip key list, generated
    once: one statement per key, in the list's order (the JSON's order), so that building 60
    elements per packet costs no per-key dispatch. A key without a value is left out (never
    invented): a body time that is no calendar time has no `clt`, a trip without a known first
    odometer (or a body behind it) no `cdit`, a body whose sensors report no reading no `tmp`.
    """
    namespace: dict[str, Any] = {"_text": _text, "_temperatures": _temperatures, "_ml": _ml,
                                 "datetime": datetime, "_EPOCH": _EPOCH, "_MS": _MS}
    lines = ["def element(body, tid, first_total_km):", "    out = {}"]

    def put(key: str, expr: str, indent: str = "    ") -> None:
        lines.append(f"{indent}out[{key!r}] = {f'_text({expr})' if key in string_keys else expr}")

    for key in keys:
        if key == "tid":
            lines.append("    if tid is not None:")
            put(key, "tid", " " * 8)
        elif key == "clt":
            lines.append("    t = body.time")
            lines.append("    if isinstance(t, datetime):")
            put(key, "(t - _EPOCH) // _MS", " " * 8)
        elif key == "cdit":
            lines.append("    if first_total_km is not None:")
            lines.append("        driven_m = (body.total_distance_km - first_total_km) * 1000")
            lines.append("        if driven_m >= 0:")
            put(key, "driven_m", " " * 12)
        elif key == "tmp":  # already text
            lines.append("    tmp = _temperatures(body)")
            lines.append("    if tmp is not None:")
            lines.append(f"        out[{key!r}] = tmp")
        else:
            name, convert = BODY_FIELDS[key]
            function = _CONVERSIONS.get(convert)
            if function is None:  # a conversion without a name of its own: passed in
                function = f"convert_{key}"
                namespace[function] = convert
            put(key, f"{function}(body.{name})")
    lines.append("    return out")
    exec("\n".join(lines), namespace)  # the code is made from our own key table, not from input
    builder: Callable[[Any, int, int | None], dict[str, Any]] = namespace["element"]
    return builder


def _realtime(record: Realtime, state: TripState | None, table: Profile, packet_id: str,
              max_payload_bytes: int, messages: bool = True,
              ) -> tuple[list[tuple[str, dict[str, Any], bool]], TripState | None]:
    bodies = record.bodies
    trip = _advance(record.KIND, to_ms(record.key_on_time), summarize(bodies), state)
    if trip is None:
        return [], state  # no time at all to name a trip by: kept in the store, not published
    tid, key_on_ms, stale, current = trip
    next_state = state if stale else current
    if not messages:
        return [], next_state

    topic = telemetry_topic(record.modem)
    events: list[tuple[str, dict[str, Any], bool]] = []
    if not stale:
        for body, code in _status_changes((state or TripState()).status_code, bodies):
            event = {"tid": tid, "dtcc": f"{code:02d}", "dtck": 0, "dtcs": 1}
            events.append((topic, _envelope(to_ms(body.time), table.diagnostic_ty, event), False))

    keys = table.microtrip_keys[record.KIND]
    # the trip's first odometer is known from the first body on: the same for every element
    first_total_km = None if stale else current.first_total_km
    element = _element_builder(keys, table.string_keys)
    elements = [element(body, tid, first_total_km) for body in bodies]
    ty = table.microtrip_ty[record.KIND]
    chunks = _split(elements, ty, packet_id, max_payload_bytes, _element_bound(keys))
    payloads = []
    for chunk in chunks:
        times = [e["clt"] for e in chunk if "clt" in e]
        payloads.append((topic, _envelope(times[-1] if times else key_on_ms, ty, chunk), False))
    return payloads + events, next_state


def _advance(kind: str, key_on_ms: int | None, summary: BodySummary, state: TripState | None,
             ) -> tuple[int, int | None, bool, TripState] | None:
    """(tid, KEY ON ms, stale, the state after this packet) for a realtime packet; None when it has no time."""
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
    if not stale:
        if tid != current.tid:
            current = current.new_trip(tid, key_on_ms, kind)
        current = _account(current, summary)
    return tid, key_on_ms, stale, current


class BodySummary(NamedTuple):
    """What the trip state takes from a realtime packet's bodies: `summarize` reads it from the
    records, `summarize_raw` straight from the packet's bytes (the server without MQTT); the two
    agree on every packet (tests/test_mapping.py)."""

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


def summarize(bodies: Sequence[Any]) -> BodySummary:
    if not bodies:
        return BodySummary()
    first, last = bodies[0], bodies[-1]
    speeds = [body.speed_kmh for body in bodies]
    times = [ms for ms in map(to_ms, (body.time for body in bodies)) if ms is not None]
    fuels = [_ml(body.total_fuel_l) for body in bodies if hasattr(body, "total_fuel_l")]
    codes = [body.status_code for body in bodies if isinstance(body, DtgBody)]
    return BodySummary(
        bodies=len(bodies), first_ms=times[0] if times else None, last_ms=times[-1] if times else None,
        first_total_km=first.total_distance_km, last_total_km=last.total_distance_km,
        max_total_km=max(body.total_distance_km for body in bodies),
        first_lat=first.lat, first_lon=first.lon, last_lat=last.lat, last_lon=last.lon,
        max_speed_kmh=max(speeds), speed_sum_kmh=sum(speeds), driving_s=len(speeds) - speeds.count(0),
        first_total_fuel_ml=fuels[0] if fuels else None, last_total_fuel_ml=fuels[-1] if fuels else None,
        last_status_code=codes[-1] if codes else None,
    )


_ENDS = ("total_distance_km", "lon", "lat", "total_fuel_l", "status_code")  # read from the first and last body


def summarize_raw(raw: bytes) -> BodySummary:
    """`summarize(decode(raw).bodies)` for a realtime frame, without building a record per body.

    Column reads where the summary needs every body (the speeds, the odometers), the first and
    the last body's values for the rest: through the protocol's layout of the packet's kind.
    """
    layout = realtime_layout(raw)
    assert layout is not None, "a realtime packet"
    count = layout.body_count(raw)
    if count <= 0:
        return BodySummary()
    first_ms, last_ms = layout.times_ms(raw)
    head, tail = layout.decoded(raw, 0, _ENDS), layout.decoded(raw, -1, _ENDS)
    speeds = layout.column(raw, "speed_kmh")
    fuel = "total_fuel_l" in head
    return BodySummary(
        count, first_ms, last_ms, head["total_distance_km"], tail["total_distance_km"],
        max(layout.column(raw, "total_distance_km")),
        head["lat"], head["lon"], tail["lat"], tail["lon"], max(speeds), sum(speeds), count - speeds.count(0),
        _ml(head["total_fuel_l"]) if fuel else None, _ml(tail["total_fuel_l"]) if fuel else None,
        tail.get("status_code"),
    )


def next_state(raw: bytes, state: TripState | None) -> TripState | None:
    """`map_record(decode(raw), state, messages=False)[1]` for one framed packet, cheaply.

    What the server keeps per packet when MQTT is off (so that forwarding can start any time): a
    realtime packet's bodies are read straight from the bytes (`summarize_raw`), not decoded
    into records; the other kinds are small and go through `map_record`.
    """
    layout = realtime_layout(raw)
    if layout is None:
        from ..protocol import decode

        return map_record(decode(raw), state, packet_id="", messages=False)[1]
    trip = _advance(layout.kind, layout.key_on_ms(raw), summarize_raw(raw), state)
    if trip is None:
        return state
    _, _, stale, current = trip
    return state if stale else current


def _account(state: TripState, summary: BodySummary) -> TripState:
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
        fwv=state.fwv,
    )


def _status_changes(status_code: int, bodies: Sequence[Any]) -> list[tuple[Any, int]]:
    """The DTG bodies whose device status differs from the one before (codes other than 0)."""
    changes = []
    for body in bodies:
        if isinstance(body, DtgBody):
            code = body.status_code
            if code != status_code and code != 0:
                changes.append((body, code))
            status_code = code
    return changes


def _envelope(ts: int | None, ty: int, pld: Any) -> dict[str, Any]:
    out: dict[str, Any] = {} if ts is None else {"ts": ts}
    out["ty"] = ty
    out["pld"] = pld
    return out


def _size(value: Any) -> int:
    # json.dumps' default separators (", ", ": ") are the widest encoding anyone stores: a chunk
    # sized with them stays under the limit in the compact encoding too
    return len(json.dumps(value, ensure_ascii=False).encode("utf-8"))


_VALUE_BOUND = 32
"""Characters an element's value takes in JSON at most: a float's repr is at most 24, a wire
integer (even × 1000, or in ms) at most 20, a `%g` text with its quotes at most 14, the
temperatures' "A,B" at most 27."""


@functools.lru_cache(maxsize=64)
def _element_bound(keys: tuple[str, ...]) -> int:
    """Bytes one element with these keys takes in JSON at most: `{`, each `"key": value, `, `}`."""
    return 2 + sum(len(json.dumps(key)) + 4 + _VALUE_BOUND for key in keys)


def _split(elements: list[dict[str, Any]], ty: int, packet_id: str, limit: int,
           element_bound: int | None = None) -> list[list[dict[str, Any]]]:
    """Elements in consecutive chunks whose encoded envelope stays below `limit` bytes.

    `element_bound`: no element encodes to more bytes than this; when even that many per
    element fit, nothing is encoded to find out (a minute's 60 elements are far below the limit).
    """
    # the envelope around the array, with the widest ts and message number it can get
    overhead = _size(_envelope(10**13, ty, []) | {"id": f"{packet_id}:99999"})
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


def _key_off(record: KeyOff, state: TripState | None, table: Profile,
             battery_warning_v: float) -> tuple[list[tuple[str, dict[str, Any], bool]], TripState | None]:
    topic = telemetry_topic(record.modem)
    key_off_ms = to_ms(record.key_off_time)
    sent_ms = to_ms(record.sent_time)
    # A KEY OFF from before the state's trip began is the terminal's backlog: not this trip's end.
    trip = state if (
        state is not None and state.tid is not None
        and (key_off_ms is None or state.key_on_ms is None or key_off_ms >= state.key_on_ms)
    ) else None
    messages: list[tuple[str, dict[str, Any], bool]] = []
    if trip is not None and not trip.trip_sent:
        end_ms = key_off_ms if key_off_ms is not None else trip.last_ms
        messages.append((topic, _envelope(end_ms, table.trip_ty[trip.kind], _trip(trip, end_ms)), False))
        state = trip = attrs.evolve(trip, trip_sent=True)

    tid = trip.tid if trip is not None else None
    parking = {"tid": tid, "clt": sent_ms, "lat": record.lat, "lon": record.lon, "try": PARKING,
               "vlt": record.battery_v}
    parking = {k: parking[k] for k in PARKING_KEYS if parking[k] is not None}
    kind = trip.kind if trip is not None else ""
    messages.append((topic, _envelope(sent_ms, table.parking_ty[kind], parking), False))

    if battery_warning_v > 0 and record.battery_v < battery_warning_v:
        warning = {"tid": tid, "wbv": record.battery_v} if tid is not None else {"wbv": record.battery_v}
        messages.append((topic, _envelope(sent_ms, table.battery_warning_ty, warning), False))
    return messages, state


def _trip(trip: TripState, end_ms: int | None) -> dict[str, Any]:
    def difference(last: int | None, first: int | None, scale: int) -> int | None:
        if last is None or first is None or last < first:
            return None
        return (last - first) * scale

    values: dict[str, Any] = {
        "tid": trip.tid,
        "stt": trip.key_on_ms,
        "edt": end_ms,
        "dis": difference(trip.last_total_km, trip.first_total_km, 1000),
        "stlat": trip.first_lat,
        "stlon": trip.first_lon,
        "edlat": trip.last_lat,
        "edlon": trip.last_lon,
        "hsts": trip.max_speed_kmh if trip.speed_count else None,
        "mesp": round(trip.speed_sum_kmh / trip.speed_count) if trip.speed_count else None,
        "dtvt": trip.driving_s if trip.speed_count else None,
        "fc": difference(trip.last_total_fuel_ml, trip.first_total_fuel_ml, 1),
        "fwv": trip.fwv or None,
    }
    return {k: values[k] for k in TRIP_KEYS if values[k] is not None}


# -- basic info → retained attributes ------------------------------------------------------------


def _basic_info(record: BasicInfo, state: TripState | None,
                received_ms: int | None) -> tuple[list[tuple[str, dict[str, Any], bool]], TripState]:
    attributes: dict[str, Any] = {} if received_ms is None else {"ts": received_ms}
    attributes |= {
        "modem": record.modem,
        "vid": str(record.registration_number),
        "vin": str(record.vin),
        "model": str(record.model),
        "vehicle_type": str(record.vehicle_type),
        "business_number": str(record.business_number),
        "driver_code": str(record.driver_code),
        "fwv": str(record.firmware_version),
    }
    state = attrs.evolve(state or TripState(), fwv=str(record.firmware_version))
    return [(attributes_topic(record.modem), attributes, True)], state
