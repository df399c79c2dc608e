"""Hypothesis strategies and sample packets for tests of code that reads or writes DTG packets.

A team writing a consumer, a gateway or terminal firmware can generate what the protocol allows,
and near-misses of it, in its own hypothesis tests::

    from hypothesis import given
    from dtgserver.protocol import decode, encode
    from dtgserver.testing import packets

    @given(packets())
    def test_round_trip(packet):
        assert decode(encode(packet)) == packet

Valid records: `packets`, `records`, `values` (one field), `drives` (one terminal's trip in order).
Framable bytes: `frames` (a valid header, arbitrary field bytes: decodes or raises ProtocolError on a
field), `damaged_streams` (valid frames with bytes overwritten, cut or appended), `chunkings` (any
cutting of a stream into reads). Fixed samples: `dtg`, `dtg_bytes`, `key_off`, `basic_info`,
`status_log`. docs/testing.md describes each; this module is the one the project's own tests use.

Record values are drawn as wire integers inside each field's documented range and mapped through
the field's own decode, so every value is one the wire can carry exactly (lat 37.497942, not 37.4979421).
Needs hypothesis (`pip install 'dtgserver[testing]'`).
"""

from __future__ import annotations

import itertools
import math
import struct
from datetime import datetime, timedelta
from typing import Any

import attrs

try:
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - exercised in a subprocess by tests/test_testing.py
    raise ImportError("dtgserver.testing needs hypothesis: pip install 'dtgserver[testing]'") from None

from dtgserver.protocol import (
    KST,
    PACKET_TYPES,
    BasicInfo,
    DtgBody,
    DtgRealtime,
    KeyOff,
    MdtRealtime,
    ObdRealtime,
    Packet,
    Realtime,
    SensorState,
    StatusLog,
    encode,
)
from dtgserver.protocol.codec import schema_fields
from dtgserver.protocol.fields import Code, Digits, Flag, KstTime, LogText, Modem, ProtocolId, Scaled, Temperature, Text
from dtgserver.protocol.framing import FRAME_LENGTHS
from dtgserver.protocol.schema import VEHICLE_TYPES, Bodies, VehicleType

__all__ = [
    "ASCII", "FIXED_SIZES", "HANGUL", "KEY_ON", "REALTIME_BODY_SIZES", "REALTIME_KINDS", "STATUS_LOG_IDS", "TEXT_CHARS",
    "basic_info", "chunkings", "damaged_streams", "drives", "dtg", "dtg_body", "dtg_bytes", "frames",
    "key_off", "kst_times", "modems", "packets", "records", "status_log", "texts", "values", "wire_bounds",
]


def _euc_kr(text: str) -> bytes | None:
    try:
        raw = text.encode("euc-kr")
    except UnicodeEncodeError:
        return None
    # Python also writes the 8822 other syllables as 8-byte jamo sequences, which read back as jamo.
    return raw if raw.decode("cp949") == text else None


# Text the terminals send: printable ASCII and the 2350 Hangul syllables of KS X 1001 (EUC-KR).
HANGUL = [chr(c) for c in range(0xAC00, 0xD7A4) if _euc_kr(chr(c)) is not None]
ASCII = [chr(c) for c in range(0x20, 0x7F)]
TEXT_CHARS = st.one_of(st.sampled_from(ASCII), st.sampled_from(HANGUL))


def wire_bounds(fmt: str) -> tuple[int, int]:
    """Smallest and largest integer of a struct code ('B', 'h', 'i')."""
    size = struct.calcsize(">" + fmt)
    if fmt.isupper():
        return 0, 2 ** (8 * size) - 1
    return -(2 ** (8 * size - 1)), 2 ** (8 * size - 1) - 1


@st.composite
def texts(draw: st.DrawFn, width: int | None, *, max_chars: int = 20) -> str:
    """Text that round-trips: EUC-KR within `width` bytes, no '#' at either end (the padding)."""
    chars, used = [], 0
    for char in draw(st.lists(TEXT_CHARS, max_size=max_chars)):
        size = 1 if char.isascii() else 2  # KS X 1001 syllables are 2 bytes in EUC-KR
        if width is not None and used + size > width:
            break
        chars.append(char)
        used += size
    return "".join(chars).strip("#")


def kst_times() -> st.SearchStrategy[datetime]:
    """Calendar times the 7-byte wire holds: 2000..2255, whole 1/100 s, KST."""
    return st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2255, 12, 31, 23, 59, 59),
                        timezones=st.just(KST)).map(lambda t: t.replace(microsecond=t.microsecond // 10000 * 10000))


def values(adapter: Any) -> st.SearchStrategy[Any]:
    """Valid values of one field: inside its documented range and exactly representable."""
    if isinstance(adapter, ProtocolId):
        return st.sampled_from(adapter.accepted)
    if isinstance(adapter, Modem):
        return st.from_regex(r"[0-9]{1,11}", fullmatch=True)
    if isinstance(adapter, VehicleType):
        return st.sampled_from(sorted(VEHICLE_TYPES))
    if isinstance(adapter, Digits):  # raw bytes 0x00-0x09 read as digits: keep them out of the text
        return st.from_regex(rf"[0-9A-Z.]{{0,{adapter.width}}}", fullmatch=True)
    if isinstance(adapter, LogText):
        return texts(None, max_chars=40) | st.just("")
    if isinstance(adapter, Text):
        return texts(adapter.width)
    if isinstance(adapter, KstTime):
        return kst_times()
    if isinstance(adapter, Temperature):
        readings = st.integers(-500, 1500).filter(lambda raw: raw not in Temperature.SPECIAL).map(lambda raw: raw / 10)
        return st.sampled_from([SensorState.ABSENT, SensorState.OFF]) | readings
    if isinstance(adapter, Flag):
        return st.booleans()
    if isinstance(adapter, Code):
        return st.sampled_from(sorted(adapter.table))
    lo, hi = wire_bounds(adapter.fmt)
    scale = adapter.scale if isinstance(adapter, Scaled) else 1
    if adapter.lo is not None:
        lo = max(lo, math.ceil(adapter.lo * scale))
    if adapter.hi is not None:
        hi = min(hi, math.floor(adapter.hi * scale))
    if isinstance(adapter, Scaled):
        return st.integers(lo, hi).map(adapter.decode)
    return st.integers(lo, hi)


def records(cls: type[Any], *, max_bodies: int = 4) -> st.SearchStrategy[Any]:
    """Records of `cls` (a packet or body class) with valid values in every field."""
    fields = {f.name for f in attrs.fields(cls)}
    kwargs: dict[str, st.SearchStrategy[Any]] = {}
    for name, adapter in schema_fields(cls.SCHEMA):
        if name not in fields:
            continue  # derived on the wire: body_count, log_size; fixed: protocol_id
        if isinstance(adapter, Bodies):
            kwargs[name] = st.lists(records(cls.BODY), min_size=1, max_size=max_bodies)
        else:
            kwargs[name] = values(adapter)
    return st.builds(cls, **kwargs)


def packets(kinds: tuple[type[Packet], ...] = PACKET_TYPES) -> st.SearchStrategy[Packet]:
    """Packets of the given kinds (all seven by default), each field valid: `decode(encode(p)) == p`."""
    return st.one_of([records(cls) for cls in kinds])


REALTIME_KINDS: tuple[type[Realtime], ...] = (DtgRealtime, ObdRealtime, MdtRealtime)
_LAST_KEY_ON = datetime(2255, 12, 31, 0, 0)  # leaves a day for the bodies and the KEY OFF on the 7-byte wire


@st.composite
def drives(draw: st.DrawFn, kinds: tuple[type[Realtime], ...] = REALTIME_KINDS, *, max_packets: int = 4,
           max_bodies: int = 10) -> list[Packet]:
    """One terminal's trip in the order it sends it: a BasicInfo half the time, 1..`max_packets`
    realtime packets of one kind sharing the modem and KEY ON time whose bodies are one second apart
    from the KEY ON on, then a KeyOff at or after the last body. Other field values are as `records`."""
    cls = draw(st.sampled_from(kinds))
    modem = draw(st.from_regex(r"[0-9]{1,11}", fullmatch=True))
    key_on = draw(st.datetimes(min_value=datetime(2000, 1, 1), max_value=_LAST_KEY_ON, timezones=st.just(KST)))
    key_on = key_on.replace(microsecond=0)
    trip: list[Packet] = []
    if draw(st.booleans()):
        trip.append(attrs.evolve(draw(records(BasicInfo)), modem=modem))
    second = 0
    for _ in range(draw(st.integers(1, max_packets))):
        template = draw(records(cls, max_bodies=1))
        bodies = []
        for body in draw(st.lists(records(cls.BODY), min_size=1, max_size=max_bodies)):
            bodies.append(attrs.evolve(body, time=key_on + timedelta(seconds=second)))
            second += 1
        trip.append(attrs.evolve(template, modem=modem, key_on_time=key_on, bodies=bodies))
    off = key_on + timedelta(seconds=second - 1 + draw(st.integers(0, 3600)))
    trip.append(attrs.evolve(draw(records(KeyOff)), modem=modem, key_off_time=off, sent_time=off))
    return trip


# -- frames of arbitrary bytes that must decode ---------------------------------------------------------
REALTIME_BODY_SIZES = {cls.PROTOCOL_ID: cls.BODY.SCHEMA.sizeof() for cls in PACKET_TYPES if issubclass(cls, Realtime)}
STATUS_LOG_IDS = (0x63, 0x99)
FIXED_SIZES = {0x01: 101, 0x04: 36, 0x09: 2}
assert set(REALTIME_BODY_SIZES) | set(STATUS_LOG_IDS) | set(FIXED_SIZES) == set(FRAME_LENGTHS)


@st.composite
def modems(draw: st.DrawFn) -> bytes:
    """1-11 digits, each as ASCII or as the raw value 0x00-0x09, '#'-padded on the left."""
    digits = draw(st.lists(st.integers(0, 9), min_size=1, max_size=11))
    raw = bytes(d if draw(st.booleans()) else 0x30 + d for d in digits)
    return raw.rjust(11, b"#")


@st.composite
def frames(draw: st.DrawFn, protocol_ids: tuple[int, ...] = tuple(FRAME_LENGTHS), max_bodies: int = 4) -> bytes:
    """One frame: arbitrary bytes except a valid ID, modem, body count and log size."""
    pid = draw(st.sampled_from(protocol_ids))
    if pid == 0x09:
        return bytes([pid]) + draw(st.binary(min_size=1, max_size=1))
    head = bytes([pid]) + draw(modems())
    if pid in REALTIME_BODY_SIZES:
        count = draw(st.integers(1, max_bodies))
        return (head + draw(st.binary(min_size=2, max_size=2)) + count.to_bytes(2, "big")
                + draw(st.binary(min_size=7 + count * REALTIME_BODY_SIZES[pid],
                                 max_size=7 + count * REALTIME_BODY_SIZES[pid])))
    if pid in STATUS_LOG_IDS:
        log = draw(st.binary(max_size=48))
        return head + draw(st.binary(min_size=7, max_size=7)) + len(log).to_bytes(2, "big") + log
    rest = FIXED_SIZES[pid] - len(head)
    return head + draw(st.binary(min_size=rest, max_size=rest))


@st.composite
def chunkings(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """`data` cut at random places (every cut possible, including 1-byte pieces)."""
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(data) - 1)), max_size=8))) if len(data) > 1 else []
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@st.composite
def damaged_streams(draw: st.DrawFn) -> bytes:
    """Invalid input: 1-3 `frames` back to back with a few bytes overwritten, perhaps cut short, and
    up to 30 bytes of junk after them. A reader must answer a format error or wait, never crash."""
    stream = bytearray(b"".join(draw(st.lists(frames(), min_size=1, max_size=3))))
    for _ in range(draw(st.integers(0, 3))):
        stream[draw(st.integers(0, len(stream) - 1))] = draw(st.integers(0, 255))
    stream = stream[:draw(st.integers(0, len(stream)))] if draw(st.booleans()) else stream
    return bytes(stream) + draw(st.binary(max_size=30))


# -- fixed samples: valid packets with plausible values, for tests that need one, not any -----------------

KEY_ON = datetime(2026, 11, 21, 8, 0, 0, tzinfo=KST)


def dtg_body(t: datetime, i: int = 0, *, speed_kmh: int = 40, status_code: int = 0) -> DtgBody:
    """The DTG body of second `i` of a drive at `t`: distances, fuel and position growing with `i`."""
    return DtgBody(
        daily_distance_km=12 + i // 60, total_distance_km=123_456 + i // 60, time=t, speed_kmh=speed_kmh,
        rpm=1500 + speed_kmh * 10, brake=False, lon=round(127.0 + i * 0.0001, 6), lat=round(37.5 + i * 0.0001, 6),
        azimuth_deg=45,
        accel_x_ms2=0.5, accel_y_ms2=-0.2, status_code=status_code, daily_fuel_l=round(3.5 + i / 1000, 3),
        total_fuel_l=45_678.9, fuel_level_pct=55.5, temp_a_c=4.5, temp_b_c=SensorState.ABSENT, battery_v=24.5,
        fuel_efficiency_kmpl=5.2, work_status=5,
    )


def dtg(modem: str = "01012345678", *, key_on: datetime = KEY_ON, minute: int = 0, bodies: int = 60,
        speed_kmh: int = 40) -> DtgRealtime:
    """Minute `minute` of the drive started at `key_on`: a DTG realtime packet of `bodies` seconds."""
    start = key_on + timedelta(minutes=minute)
    return DtgRealtime(modem, 1, key_on, [dtg_body(start + timedelta(seconds=s), minute * 60 + s, speed_kmh=speed_kmh)
                                          for s in range(bodies)])


def dtg_bytes(modem: str = "01012345678", *, key_on: datetime = KEY_ON, minute: int = 0, bodies: int = 60,
              speed_kmh: int = 40) -> bytes:
    """`dtg(...)` on the wire."""
    return encode(dtg(modem, key_on=key_on, minute=minute, bodies=bodies, speed_kmh=speed_kmh))


def key_off(modem: str = "01012345678", *, at: datetime = KEY_ON + timedelta(hours=1),
            battery_v: float = 24.1, key_off_time: datetime | None = None) -> KeyOff:
    """A KEY OFF report sent at `at` (an hour after `KEY_ON` by default), the key having gone off
    then or at `key_off_time`."""
    return KeyOff(modem, at, 127.01, 37.51, key_off_time or at, battery_v)


def basic_info(modem: str = "01012345678") -> BasicInfo:
    """A vehicle and driver: model, VIN, a Seoul plate, business number, driver code, firmware."""
    return BasicInfo(modem, "DTG-1000", "KMHFC41MP6A123456", "11", "서울33가1234", "1234567890",
                     "123456789012345678", "1.0.2")


def status_log(modem: str = "01012345678", text: str = "GPS 수신 양호\nmodem ok") -> StatusLog:
    """A status log (0x63) sent at `KEY_ON`, Korean and ASCII text by default."""
    return StatusLog(modem, KEY_ON, text)
