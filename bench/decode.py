"""Decode/encode speed of a 60-body DTG packet (0x03): our schema-derived codec against a
hand-written `struct` codec that produces the same records and the same bytes, side by side.

    .venv/bin/python bench/decode.py [--bodies 60] [--rounds 15] [--seconds 0.02]

Prints one table: per-packet times (best and median of the rounds), each line's ratio to the
hand-written codec, and for context bare `iter_unpack` into dicts (the floor), interpreted
construct and `.compile()`d construct on the same schema. The hand-written codec lives only here.
Exits non-zero only when the contenders disagree (records or bytes); never on a ratio, because
this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import statistics
import struct
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import construct

from dtgserver.protocol import KST, BadTime, DtgBody, DtgRealtime, ProtocolError, SensorState, WireStr, decode, encode
from dtgserver.protocol.schema import DTG_BODY, _realtime_header

TARGET = 1.5

# -- the hand-written codec: what a careful engineer writes with `struct` alone ----------------
HEADER = struct.Struct(">B11shh7B")
BODY = struct.Struct(">hi7BBhBiihhhBiihhhhhB")
BODY_NAMES = (
    "daily_distance_km total_distance_km year month day hour minute second centisecond speed_kmh rpm brake"
    " lon lat azimuth_deg accel_x_ms2 accel_y_ms2 status_code daily_fuel_l total_fuel_l fuel_level_pct"
    " temp_a_c temp_b_c battery_v fuel_efficiency_kmpl work_status"
).split()
TEMPERATURE_STATES = {990: SensorState.ABSENT, 980: SensorState.OFF}
TEMPERATURE_WIRE = {SensorState.ABSENT: 990, SensorState.OFF: 980}
RAW_DIGITS = bytes.maketrans(bytes(range(10)), b"0123456789")


def hand_modem(raw: bytes) -> str:
    modem = raw.translate(RAW_DIGITS).decode("ascii", "replace").strip("#")
    if not modem.isdigit() or not modem.isascii():
        raise ProtocolError(f"modem number {raw!r} is not digits", 1)
    return modem if modem.encode().rjust(11, b"#") == raw else WireStr(modem, raw)


def hand_time(y: int, mo: int, d: int, h: int, mi: int, s: int, cc: int) -> datetime | BadTime:
    try:
        return datetime(2000 + y, mo, d, h, mi, s, cc * 10000, KST)
    except ValueError:
        return BadTime(bytes((y, mo, d, h, mi, s, cc)))


def hand_body(daily_km: int, total_km: int, y: int, mo: int, d: int, h: int, mi: int, s: int, cc: int, speed: int,
              rpm: int, brake: int, lon: int, lat: int, azimuth: int, accel_x: int, accel_y: int, status: int,
              daily_fuel: int, total_fuel: int, fuel_level: int, temp_a: int, temp_b: int, battery: int,
              efficiency: int, work: int) -> DtgBody:
    """One body, for packets with an invalid time somewhere (the slow, careful way)."""
    return DtgBody(
        daily_km, total_km, hand_time(y, mo, d, h, mi, s, cc), speed, rpm, brake == 1 if brake <= 1 else brake,
        lon / 1000000, lat / 1000000, azimuth, accel_x / 10, accel_y / 10, status, daily_fuel / 1000,
        total_fuel / 1000, fuel_level / 100, TEMPERATURE_STATES.get(temp_a) or temp_a / 10,
        TEMPERATURE_STATES.get(temp_b) or temp_b / 10, battery / 10, efficiency / 10, work,
    )


def hand_decode(frame: bytes) -> DtgRealtime:
    if len(frame) < 23 or frame[0] != 0x03:
        raise ProtocolError("not a DTG realtime packet", 0)
    _, modem, period, count, *key_on = HEADER.unpack_from(frame)
    if count <= 0 or len(frame) != 23 + count * 51:
        raise ProtocolError(f"{len(frame)} bytes do not hold {count} bodies", 14)
    states = TEMPERATURE_STATES
    try:
        # datetime() raises ValueError for every invalid time, so the common case is one comprehension
        bodies = [
            DtgBody(
                daily_km, total_km, datetime(2000 + y, mo, d, h, mi, s, cc * 10000, KST), speed, rpm,
                brake == 1 if brake <= 1 else brake, lon / 1000000, lat / 1000000, azimuth, accel_x / 10,
                accel_y / 10, status, daily_fuel / 1000, total_fuel / 1000, fuel_level / 100,
                states.get(temp_a) or temp_a / 10, states.get(temp_b) or temp_b / 10, battery / 10, efficiency / 10,
                work,
            )
            for (daily_km, total_km, y, mo, d, h, mi, s, cc, speed, rpm, brake, lon, lat, azimuth, accel_x, accel_y,
                 status, daily_fuel, total_fuel, fuel_level, temp_a, temp_b, battery, efficiency, work)
            in BODY.iter_unpack(frame[23:])
        ]
    except ValueError:
        bodies = [hand_body(*values) for values in BODY.iter_unpack(frame[23:])]
    return DtgRealtime(hand_modem(modem), period, hand_time(*key_on), bodies)


def hand_time_wire(t: Any) -> tuple[int, ...]:
    if type(t) is BadTime:
        return tuple(t.raw)
    if type(t) is not datetime:
        raise ValueError(f"expected a datetime, got {t!r}")
    if t.tzinfo is None:
        t = t.replace(tzinfo=KST)
    elif t.tzinfo is not KST:
        t = t.astimezone(KST)
    if t.microsecond % 10000 or not 2000 <= t.year <= 2255:
        raise ValueError(f"{t} does not fit the wire's time")
    return t.year - 2000, t.month, t.day, t.hour, t.minute, t.second, t.microsecond // 10000


def hand_temperature(value: Any) -> int:
    if value is SensorState.ABSENT:
        return 990
    if value is SensorState.OFF:
        return 980
    raw: int = round(value * 10)
    if raw / 10 != value or raw in TEMPERATURE_STATES:
        raise ValueError(f"{value!r} °C does not fit the wire")
    return raw


def hand_encode(p: DtgRealtime) -> bytes:
    modem = p.modem.wire if type(p.modem) is WireStr else p.modem.encode().rjust(11, b"#")
    out = [HEADER.pack(3, modem, p.report_period_min, len(p.bodies), *hand_time_wire(p.key_on_time))]
    append, pack = out.append, BODY.pack
    for b in p.bodies:
        t = b.time
        if type(t) is datetime and t.tzinfo is KST and not t.microsecond % 10000:
            wire_time: tuple[int, ...] = (t.year - 2000, t.month, t.day, t.hour, t.minute, t.second,
                                          t.microsecond // 10000)
        else:
            wire_time = hand_time_wire(t)
        lon, lat, accel_x, accel_y = b.lon, b.lat, b.accel_x_ms2, b.accel_y_ms2
        daily_fuel, total_fuel, level, battery, efficiency = (
            b.daily_fuel_l, b.total_fuel_l, b.fuel_level_pct, b.battery_v, b.fuel_efficiency_kmpl)
        lon_w, lat_w = round(lon * 1000000), round(lat * 1000000)
        accel_x_w, accel_y_w = round(accel_x * 10), round(accel_y * 10)
        daily_fuel_w, total_fuel_w, level_w = round(daily_fuel * 1000), round(total_fuel * 1000), round(level * 100)
        battery_w, efficiency_w = round(battery * 10), round(efficiency * 10)
        if (lon_w / 1000000 != lon or lat_w / 1000000 != lat or accel_x_w / 10 != accel_x or accel_y_w / 10 != accel_y
                or daily_fuel_w / 1000 != daily_fuel or total_fuel_w / 1000 != total_fuel or level_w / 100 != level
                or battery_w / 10 != battery or efficiency_w / 10 != efficiency):
            raise ValueError("a value is not a multiple of its wire unit")
        append(pack(
            b.daily_distance_km, b.total_distance_km, *wire_time, b.speed_kmh, b.rpm, int(b.brake), lon_w, lat_w,
            b.azimuth_deg, accel_x_w, accel_y_w, b.status_code, daily_fuel_w, total_fuel_w, level_w,
            hand_temperature(b.temp_a_c), hand_temperature(b.temp_b_c), battery_w, efficiency_w, b.work_status,
        ))
    return b"".join(out)


def floor_decode(frame: bytes) -> list[dict[str, int]]:
    """The floor: bare `iter_unpack` into dicts, no conversion, no records."""
    return [dict(zip(BODY_NAMES, values, strict=True)) for values in BODY.iter_unpack(frame[23:])]


# -- construct on the same field list, for context ------------------------------------------------
INTERPRETED = construct.Struct(*_realtime_header(0x03), "bodies" / construct.Array(construct.this.body_count, DTG_BODY))
BODY_FIELDS = [sub.name for sub in DTG_BODY.subcons]


def construct_decoder(schema: Any) -> Callable[[bytes], DtgRealtime]:
    def decode_with_construct(frame: bytes) -> DtgRealtime:
        c = schema.parse(frame)
        bodies = [DtgBody(*[b[name] for name in BODY_FIELDS]) for b in c.bodies]
        return DtgRealtime(c.modem, c.report_period_min, c.key_on_time, bodies)

    return decode_with_construct


# -- a realistic packet: one minute of a drive, one body per second -------------------------------
def drive(bodies: int, seed: int = 20121025) -> bytes:
    rng = random.Random(seed)
    start = datetime(2026, 11, 21, 8, 14, 5, tzinfo=KST)
    lon, lat, speed, daily_km, total_km = 126.978_123, 37.566_456, 42, 37, 182_345
    daily_fuel, total_fuel, level = 5_230, 23_456_789, 6_250
    temp_a = rng.randint(-50, 60)
    out = [HEADER.pack(3, b"01099998888", 1, bodies, *hand_time_wire(start - timedelta(minutes=37)))]
    for i in range(bodies):
        t = start + timedelta(seconds=i, microseconds=rng.choice((0, 0, 0, 250_000, 500_000)))
        speed = max(0, min(110, speed + rng.randint(-4, 4)))
        azimuth = rng.randint(40, 50)
        lon += speed * 2.5e-6
        lat += speed * 1.5e-6
        daily_km += speed > 60
        daily_fuel += speed // 8
        total_fuel += speed // 8
        level -= speed // 60
        temp_a += rng.randint(-1, 1)
        out.append(BODY.pack(
            daily_km, total_km + daily_km, *hand_time_wire(t), speed, 700 + speed * 28 + rng.randint(0, 50),
            int(rng.random() < 0.1), round(lon * 1e6), round(lat * 1e6), azimuth, rng.randint(-25, 25),
            rng.randint(-15, 15), 0, daily_fuel, total_fuel, level, temp_a, 990 if i % 20 else 980,
            rng.randint(132, 141), rng.randint(0, 120), rng.choice((1, 5, 5, 5)),
        ))
    return b"".join(out)


def odd_packet() -> bytes:
    """Every value kind the fast path must handle like the slow one: bad times, raw-digit modem."""
    frame = bytearray(drive(4, seed=7))
    frame[1:4] = bytes([0, 1, 0])  # the spec sample's raw-digit modem
    frame[23 + 6: 23 + 13] = bytes([12, 13, 1, 0, 0, 0, 0])  # month 13
    frame[23 + 51 + 6: 23 + 51 + 13] = bytes([12, 2, 30, 0, 0, 0, 0])  # 30 February
    frame[23 + 102 + 12] = 150  # 1/100 s above 99
    frame[23 + 153 + 16] = 7  # brake byte neither 0 nor 1
    return bytes(frame)


# -- timing ---------------------------------------------------------------------------------------
def per_call(fn: Callable[[Any], Any], arg: Any, seconds: float) -> tuple[int, float]:
    """(repetitions, seconds per call) for about `seconds` of calls; gc off, as timeit does."""
    reps = 1
    while True:
        start = time.perf_counter()
        for _ in range(reps):
            fn(arg)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds / 4:
            return max(1, int(reps * seconds / elapsed)), elapsed / reps
        reps *= 2


Contenders = dict[str, tuple[Callable[[Any], Any], Any]]


def measure(contenders: Contenders, rounds: int, seconds: float) -> dict[str, list[float]]:
    reps = {name: per_call(fn, arg, seconds)[0] for name, (fn, arg) in contenders.items()}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            # rotate the order each round so a noisy moment does not always hit the same contender
            for name in order[r % len(order):] + order[:r % len(order)]:
                fn, arg = contenders[name]
                n = reps[name]
                start = time.perf_counter()
                for _ in range(n):
                    fn(arg)
                times[name].append((time.perf_counter() - start) / n)
    finally:
        gc.enable()
    return times


def compile_schema() -> tuple[Any, str]:
    """construct's `.compile()` of the same schema, or None and why it does not apply."""
    try:
        compiled = INTERPRETED.compile()
        if compiled.parse(drive(2)) is None:
            return None, "parse returned nothing"
    except Exception as error:  # construct raises many kinds; any means "does not apply"
        return None, f"{type(error).__name__}: {error}"
    # our Adapters have no _emitparse: compiled code links them and calls their _decode
    return compiled, "Adapters linked, run as written"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bodies", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seconds", type=float, default=0.02, help="time per contender per round")
    args = parser.parse_args()

    frame = drive(args.bodies)
    record = decode(frame)
    compiled, compiled_note = compile_schema()

    # honesty first: every contender gives the same records, every encoder the same bytes
    failures = []
    for name, sample in [("drive", frame), ("odd values", odd_packet())]:
        ours = decode(sample)
        assert isinstance(ours, DtgRealtime)
        if hand_decode(sample) != ours:
            failures.append(f"{name}: hand-written and derived decoders give different records")
        if construct_decoder(INTERPRETED)(sample) != ours:
            failures.append(f"{name}: interpreted construct gives different records")
        if compiled is not None and construct_decoder(compiled)(sample) != ours:
            failures.append(f"{name}: compiled construct gives different records")
        if not (encode(ours) == hand_encode(ours) == sample):
            failures.append(f"{name}: encoders give different bytes")
    odd = odd_packet()
    odd_record = decode(odd)
    assert isinstance(odd_record, DtgRealtime)
    if [b.time for b in odd_record.bodies[:3]] != [BadTime(odd[23 + 51 * i + 6: 23 + 51 * i + 13]) for i in range(3)]:
        failures.append("odd values: invalid times are not kept as BadTime")
    if failures:
        print("\n".join(failures), file=sys.stderr)
        return 1

    hand_dec, ours_dec = "hand-written struct decoder", "dtgserver decode (derived)"
    floor = "floor: iter_unpack to dicts"
    hand_enc, ours_enc = "hand-written struct encoder", "dtgserver encode (derived)"
    contenders: Contenders = {
        hand_dec: (hand_decode, frame),
        ours_dec: (decode, frame),
        floor: (floor_decode, frame),
        hand_enc: (hand_encode, record),
        ours_enc: (encode, record),
        "construct interpreted": (construct_decoder(INTERPRETED), frame),
    }
    if compiled is not None:
        contenders["construct .compile()"] = (construct_decoder(compiled), frame)
    times = measure(contenders, args.rounds, args.seconds)

    def ratio(name: str, base: str) -> float:
        """The median over rounds of name ÷ base, each round timing both back to back: on a shared
        machine this is steadier than best ÷ best, which pairs minima from different moments."""
        return statistics.median(t / b for t, b in zip(times[name], times[base], strict=True))

    cores = len(os.sched_getaffinity(0))
    print(f"{len(frame)}-byte DTG packet (0x03), {args.bodies} bodies; Python {platform.python_version()}, "
          f"{platform.machine()}, {cores} cores; {args.rounds} interleaved rounds, gc off while timing")
    print(f"{'per packet':34} {'best µs':>8} {'median µs':>9} {'÷ hand':>7} {'÷ floor':>8}")
    rows = [(hand_dec, hand_dec), (ours_dec, hand_dec), (floor, hand_dec), ("construct interpreted", hand_dec)]
    rows += [("construct .compile()", hand_dec)] if compiled is not None else []
    rows += [(hand_enc, hand_enc), (ours_enc, hand_enc)]
    for name, base in rows:
        best, median = min(times[name]), statistics.median(times[name])
        vs_floor = f"{ratio(name, floor):7.2f}x" if base == hand_dec else ""
        print(f"{name:34} {best * 1e6:8.1f} {median * 1e6:9.1f} {ratio(name, base):6.2f}x {vs_floor:>8}")
    if compiled is None:
        print(f"{'construct .compile()':34} does not apply: {compiled_note}")
    else:
        print(f"(construct .compile(): {compiled_note}; ratios are medians of per-round ratios)")
    for what, name, base in [("decode", ours_dec, hand_dec), ("encode", ours_enc, hand_enc)]:
        verdict = "meets" if ratio(name, base) <= TARGET else "MISSES"
        print(f"{what}: derived ÷ hand-written = {ratio(name, base):.2f}x median of rounds"
              f" ({min(times[name]) / min(times[base]):.2f}x best ÷ best; {verdict} the ≤ {TARGET}x target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
