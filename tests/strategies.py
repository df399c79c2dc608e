"""Hypothesis strategies: records of every kind with valid, exactly representable values, and frames
of arbitrary bytes that the framer must accept (valid protocol ID, modem, body count, log size).

Record values are drawn as wire integers inside each field's documented range and mapped through
the field's own decode, so every value is one the wire can carry exactly (lat 37.497942, not 37.4979421).
"""

from __future__ import annotations

import itertools
import math
import struct
from datetime import datetime
from typing import Any

import attrs
from hypothesis import strategies as st

from dtgserver.protocol import KST, PACKET_TYPES, Packet, Realtime, SensorState
from dtgserver.protocol.codec import schema_fields
from dtgserver.protocol.fields import Code, Digits, Flag, KstTime, LogText, Modem, ProtocolId, Scaled, Temperature, Text
from dtgserver.protocol.framing import FRAME_LENGTHS
from dtgserver.protocol.schema import VEHICLE_TYPES, Bodies, VehicleType


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
    return st.one_of([records(cls) for cls in kinds])


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
