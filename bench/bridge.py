"""What the bridge costs per packet: derive + encode the messages of a 60-body DTG packet, against a
floor measured in the same run, and the trip-state update alone.

    .venv/bin/python bench/bridge.py [--rounds 40] [--number 200]

Contenders, each timed `--rounds` times (`--number` calls per round; the best round counts, as
timeit advises, and the median is printed too):

- floor: `struct.iter_unpack` over the bodies → one dict per body with the same keys and values as
  the seed profile's DTG microtrip → orjson of the envelope. Hand-written here, knowing the layout
  and the packet, with nothing to decide: what no general code can beat by much.
- derive: `dtgserver.bridge.derive.derive` on the packet's bytes and the terminal's state: the trip
  state, the microtrip built through the protocol's layout, the split check, the encoding.
- trip state: `dtgserver.bridge.trips.next_state`, what a consumer pays per packet without messages;
  of which "detector" (the dangerous-driving behaviours, `bridge.driving.detect`) and "measures"
  (metres, idle, battery: `bridge.tripmetrics.measure`) on the packet's columns.
- encoders: the same microtrip payload through orjson (with the exact-float hook dtgserver uses),
  msgspec, and json.dumps with compact separators: the choice of `messages.encode`.

Target (issue: the bridge reads the packet log): derive ≤ 1.5 × floor.

Then the memory of the bridge's trip-state cache (`--trip-cache`): `--terminals` distinct terminals'
states as the consumer holds them (an LRU of modem → `TripState`, each the state after two minutes
of driving: detector and measures included), measured with tracemalloc, per terminal and for the
default cache of 100,000.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import random
import statistics
import struct
import time
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

import orjson

try:
    import msgspec  # measured for the choice of encoder; not a dependency
except ImportError:
    msgspec = None  # type: ignore[assignment, unused-ignore]  # an error only where msgspec is installed

from dtgserver.bridge.derive import derive
from dtgserver.bridge.driving import DriveState, detect
from dtgserver.bridge.messages import build, encode
from dtgserver.bridge.tripmetrics import TripMeter, measure
from dtgserver.bridge.trips import DEFAULT_DRIVING, TripState, body_times_ms, next_state
from dtgserver.protocol import decode
from dtgserver.protocol.layout import realtime as realtime_layout
from dtgserver.sim.load import drive_templates

KST = 9 * 3600 * 1000
OPTIONS: dict[str, Any] = {"received_ms": 0, "profile": "seed", "battery_warning_v": 11.5}


def packets() -> tuple[bytes, bytes]:
    """Two consecutive minutes of one simulated DTG drive (60 bodies each): the state after the
    first is the state the second is derived with."""
    rng = random.Random(7)
    start = int(datetime(2026, 11, 21, 8, 0, tzinfo=UTC).timestamp()) // 60 * 60
    first, second = drive_templates("dtg", rng, start, 2)
    key_on = bytes((26, 11, 21, 17, 0, 0, 0))
    return (first.render(b"01099998888", key_on, bytes((26, 11, 21, 17, 0))),
            second.render(b"01099998888", key_on, bytes((26, 11, 21, 17, 1))))


# -- the floor: hand-written for this one layout (DTG body, 51 bytes, after a 23-byte header) ----------

BODY = struct.Struct(">hi7BBhBiihhhBiihhhhhB")
NO_READING = (990, 980)


@lru_cache(maxsize=64)
def midnight_ms(y: int, mo: int, d: int) -> int:
    return int((datetime(2000 + y, mo, d, tzinfo=UTC) - timedelta(hours=9)).timestamp() * 1000)


def floor(raw: bytes, tid: int, first_fuel_ml: int, cdit: list[int], em: list[str], packet_id: str) -> bytes:
    """`cdit` and `em` per body are given: computing them (the trip's measures and the dangerous-
    driving detector) is what derive does beyond this floor; `fc` is the total fuel since the
    trip's first body (its first total fuel given, in mL: the wire's L × 1000)."""
    elements: list[dict[str, Any]] = []
    for (dtr, dctr, y, mo, d, h, mi, s, cc, sp, rpm, brake, lon, lat, gan, acx, acy, _status, _daily_fuel, fuel,
         _level, ta, tb, vv, _eff, _work), metres, mask in zip(BODY.iter_unpack(memoryview(raw)[23:]), cdit, em,
                                                                strict=True):
        element = {
            "tid": tid, "clt": midnight_ms(y, mo, d) + ((h * 60 + mi) * 60 + s) * 1000 + cc * 10,
            "lat": lat / 1000000, "lon": lon / 1000000, "sp": sp, "rpm": rpm, "fc": fuel - first_fuel_ml,
            "cdit": metres,
            "vv": vv / 10, "dtr": dtr, "dctr": dctr, "bsg": brake, "gan": gan, "acx": acx / 10, "acy": acy / 10,
        }
        if ta not in NO_READING or tb not in NO_READING:
            a = "" if ta in NO_READING else format(ta / 10, "g")
            element["tmp"] = f"{a},{'' if tb in NO_READING else format(tb / 10, 'g')}"
        element["em"] = mask
        elements.append(element)
    return orjson.dumps({"ts": elements[-1]["clt"], "ty": 2, "pld": elements, "id": f"{packet_id}:0"})


# -- timing -------------------------------------------------------------------------------------------


def timed(contenders: dict[str, Callable[[], Any]], rounds: int, number: int) -> dict[str, tuple[float, float]]:
    """(best, median) µs of this process's CPU time per call of each contender, over `rounds`
    rounds of `number` calls; every round runs every contender in turn, so a busy moment of the
    machine falls on all of them (CPU time, not wall time: the other processes of a shared
    machine do not count, only what they do to the caches and the clock)."""
    per_call: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, function in contenders.items():
            started = time.process_time()
            for _ in range(number):
                function()
            per_call[name].append((time.process_time() - started) / number * 1e6)
    return {name: (min(times), statistics.median(times)) for name, times in per_call.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--number", type=int, default=200, help="calls per round")
    parser.add_argument("--terminals", type=int, default=10_000, help="terminals in the trip-state cache measured")
    args = parser.parse_args()

    previous, raw = packets()
    state = next_state(previous, None)
    assert state is not None and state.tid is not None and state.first_total_km is not None
    first_fuel_ml = state.first_total_fuel_ml
    assert first_fuel_ml is not None
    packet_id = "3ec776928906c79aa90a0087e416a9e6"
    out, _ = derive(raw, state, packet_id=packet_id, **OPTIONS)
    (message,) = out
    # the floor builds the same message: same keys and values (the float forms agree here); the
    # trip's measures and the detector's marks it is given, as derive computed them
    built = json.loads(message.payload)["pld"]
    cdit, em = [e["cdit"] for e in built], [e["em"] for e in built]
    if json.loads(floor(raw, state.tid, first_fuel_ml, cdit, em, packet_id)) != json.loads(message.payload):
        raise SystemExit("bench: the floor does not build derive's message; fix the floor")
    assert len(decode(raw).bodies) == 60  # type: ignore[attr-defined]
    payload = build(raw, state, packet_id=packet_id)[0][0].payload
    # the trip state's two new parts alone, on the packet's columns (part of "trip state" and "derive")
    layout = realtime_layout(raw)
    assert layout is not None and state.drive is not None and state.meter is not None
    rules = DEFAULT_DRIVING.criteria_for("", state.vehicle_type)
    assert rules is not None
    drive_state, meter = DriveState.from_list(state.drive), TripMeter.from_list(state.meter)
    times = body_times_ms(raw, layout)
    speeds = layout.column(raw, "speed_kmh")
    columns: dict[str, Any] = {"time_ms": times, "speed_kmh": speeds, "azimuth_deg": layout.column(raw, "azimuth_deg"),
               "lat": layout.column(raw, "lat"), "lon": layout.column(raw, "lon"),
               "status_code": layout.column(raw, "status_code")}
    meter_columns: dict[str, Any] = {
        "time_ms": times, "speed_kmh": speeds, "total_km": layout.column(raw, "total_distance_km"),
        "battery_v": [v / 10 for v in layout.column(raw, "battery_v")], "rpm": layout.column(raw, "rpm")}

    contenders: dict[str, Callable[[], Any]] = {
        "floor": lambda: floor(raw, tid, first_fuel_ml, cdit, em, packet_id),
        "derive": lambda: derive(raw, state, packet_id=packet_id, **OPTIONS),
        "trip state": lambda: next_state(raw, state),
        "  detector": lambda: detect(drive_state, rules, **columns),
        "  measures": lambda: measure(meter, **meter_columns),
        "encode: orjson": lambda: encode(payload),
        "encode: json": lambda: json.dumps(payload, ensure_ascii=False, separators=(",", ":"),
                                           allow_nan=False).encode(),
    }
    if msgspec is not None:
        contenders["encode: msgspec"] = lambda: msgspec.json.encode(payload)
    tid = state.tid
    figures = timed(contenders, args.rounds, args.number)
    print(f"one 60-body DTG packet, {len(raw)} bytes → {len(message.payload)} bytes of JSON; "
          f"{args.rounds} rounds of {args.number} calls")
    print(f"{'':<18} {'best µs':>9} {'median µs':>10} {'× floor':>8}")
    base = figures["floor"][0]
    for name, (best, median) in figures.items():
        print(f"{name:<18} {best:9.1f} {median:10.1f} {best / base:8.2f}")
    ratio = figures["derive"][0] / base
    print(f"derive / floor = {ratio:.2f} (target ≤ 1.5): {'met' if ratio <= 1.5 else 'NOT met'}")
    per_state = cache_bytes(next_state(raw, state), args.terminals)
    print(f"trip-state cache: {per_state:.0f} bytes per terminal ({args.terminals} terminals); "
          f"the default --trip-cache of 100,000: {per_state * 100_000 / 2**20:.0f} MiB")
    return 0


def cache_bytes(state: TripState | None, terminals: int) -> float:
    """Bytes per terminal of an LRU of `terminals` trip states like `state` (each its own objects,
    read back from the stored form as the consumer does after an eviction), keyed by modem."""
    assert state is not None
    text = state.to_json()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        cache: collections.OrderedDict[str, TripState | None] = collections.OrderedDict()
        for n in range(terminals):
            cache[f"{1_000_000_000 + n:011d}"] = TripState.from_json(text)
        return (tracemalloc.get_traced_memory()[0] - before) / terminals
    finally:
        tracemalloc.stop()


if __name__ == "__main__":
    raise SystemExit(main())
