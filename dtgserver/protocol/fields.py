"""Field adapters: how one wire field becomes one record value, and back, exactly.

Every field of every packet is one of these `construct` Adapters. Each knows its struct code
(for the derived fast path in `codec`), its exact decode/encode pair, its documented range (for
warnings), its unit, and its JSON form. Values the wire can carry but the domain type cannot
(a time in month 13, text that is not valid CP949, a modem written with raw digit bytes) are kept
verbatim, so `encode(decode(raw)) == raw` holds for every input the framer accepts.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar

import attrs
import construct

from .errors import ProtocolError

KST = timezone(timedelta(hours=9), "KST")

_HASH = ord("#")
# The spec's own samples write digits of the modem and firmware fields as raw values 0x00-0x09.
_RAW_DIGITS = bytes.maketrans(bytes(range(10)), b"0123456789")


class WireStr(str):
    """Text whose wire bytes are not the canonical encoding of its value; keeps those bytes.

    It is a `str` everywhere (comparison, JSON), and the encoder writes `wire` back unchanged.
    """

    wire: bytes

    def __new__(cls, value: str, wire: bytes) -> WireStr:
        self = super().__new__(cls, value)
        self.wire = wire
        return self

    def __repr__(self) -> str:
        return f"WireStr({str(self)!r}, wire={self.wire!r})"


@attrs.frozen
class BadTime:
    """A 7-byte time that is no calendar time (month 13, hour 25, 1/100 s above 99), kept raw."""

    raw: bytes

    def __str__(self) -> str:
        y, mo, d, h, mi, s, cc = self.raw
        return f"{2000 + y:04d}-{mo:02d}-{d:02d} {h:02d}:{mi:02d}:{s:02d}.{cc:02d}"


class SensorState(enum.Enum):
    """What a temperature field says besides a reading."""

    OK = "ok"
    ABSENT = "absent"  # wire 99.0: no sensor
    OFF = "off"  # wire 98.0: sensor switched off


Time = datetime | BadTime
Bind = Callable[[Any], str]


class Field(construct.Adapter):  # type: ignore[misc]
    """Base adapter: an identity over a fixed-size integer, with an optional documented range."""

    def __init__(
        self,
        subcon: construct.Construct,
        *,
        unit: str = "",
        lo: float | None = None,
        hi: float | None = None,
        doc: str = "",
    ):
        super().__init__(subcon)
        self.unit = unit
        self.lo = lo
        self.hi = hi
        self.doc = doc

    # -- the derived fast path (see codec.py) --------------------------------------------
    @property
    def fmt(self) -> str:
        """The struct code of the wire value this adapter converts."""
        sub = self.subcon
        if isinstance(sub, construct.FormatField):
            return str(sub.fmtstr[1:])
        if isinstance(sub, construct.Bytes) and isinstance(sub.length, int):
            return f"{sub.length}s"
        raise TypeError(f"{sub!r} has no fixed struct code")

    @property
    def size(self) -> int:
        return int(self.subcon.sizeof())

    arity: ClassVar[int] = 1
    """How many struct values `fmt` holds (a time is 7 bytes, so 7)."""

    def raw_expr(self, wire: str) -> str:
        """Python source for the value `decode` takes, from the struct values named in `wire`."""
        return wire

    def decode_expr(self, wire: str, conv: str, bind: Bind) -> str:
        """Python source for the decoded value, from the struct values named in `wire`.

        `conv` names this adapter's `decode`; `bind(obj)` names any other object the source
        needs. The source may raise ValueError where `decode` would return a value: the codec
        then decodes that buffer again through `decode` itself, so the result is always exact.
        """
        return wire if type(self).decode is Field.decode else f"{conv}({self.raw_expr(wire)})"

    def encode_expr(self, attr: str, tmp: str, conv: str, bind: Bind) -> str:
        """Python source for the struct value(s) of `attr` (a `*`-spread when `arity` > 1).

        `tmp` is a free local name; `conv` names this adapter's `encode`. The source handles the
        common case inline and calls `encode` for the rest, so it raises exactly when `encode`
        would (or struct.pack then does, for a value beyond the wire type).
        """
        if type(self).encode is Field.encode:
            return f"({tmp} if type({tmp} := {attr}) is int else {conv}({tmp}))"
        return f"{conv}({attr})"

    # -- the exact pair ---------------------------------------------------------------------
    def decode(self, raw: Any) -> Any:
        return raw

    def encode(self, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        return value

    def _decode(self, obj: Any, context: Any, path: Any) -> Any:
        return self.decode(obj)

    def _encode(self, obj: Any, context: Any, path: Any) -> Any:
        return self.encode(obj)

    # -- range ------------------------------------------------------------------------------
    def check(self, value: Any) -> str | None:
        """A warning when `value` is outside the documented range, else None."""
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            unit = f" {self.unit}" if self.unit else ""
            lo = "" if self.lo is None else f"{self.lo:g}"
            hi = "" if self.hi is None else f"{self.hi:g}"
            return f"{value!r} outside {lo}..{hi}{unit}"
        return None

    # -- JSON -------------------------------------------------------------------------------
    def to_json(self, name: str, value: Any, out: dict[str, Any], verbatim: dict[str, str]) -> None:
        out[name] = value

    def from_json(self, name: str, obj: Mapping[str, Any], verbatim: Mapping[str, str]) -> Any:
        value = obj[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        return value


class ProtocolId(Field):
    """The first byte; the packet kinds that accept aliases (0x63/0x99) list them all."""

    def __init__(self, *accepted: int):
        super().__init__(construct.Int8ub, doc="protocol ID")
        self.accepted = accepted

    def decode(self, raw: int) -> int:
        if raw not in self.accepted:
            accepted = ", ".join(f"0x{a:02X}" for a in self.accepted)
            raise ProtocolError(f"protocol ID 0x{raw:02X} is not one of {accepted}", 0)
        return raw

    def encode(self, value: Any) -> int:
        if value not in self.accepted:
            raise ValueError(f"protocol ID {value!r} is not one of {self.accepted}")
        return int(value)

    def from_json(self, name: str, obj: Mapping[str, Any], verbatim: Mapping[str, str]) -> Any:
        # Optional in JSON like every kind's protocol_id; only an alias (0x99) needs saying.
        return obj.get(name, self.accepted[0])


class Code(Field):
    """An integer from a code table of the spec; values outside the table are warned about."""

    def __init__(self, subcon: construct.Construct, table: Mapping[int, str], *, doc: str = ""):
        super().__init__(subcon, doc=doc)
        self.table = dict(table)

    def check(self, value: Any) -> str | None:
        return None if value in self.table else f"{value!r} is not in the code table"


class Flag(Field):
    """0/1 as a bool; any other byte is kept as its integer (and warned about)."""

    def decode_expr(self, wire: str, conv: str, bind: Bind) -> str:
        return f"({wire} == 1 if {wire} <= 1 else {wire})"

    def encode_expr(self, attr: str, tmp: str, conv: str, bind: Bind) -> str:
        return f"(1 if ({tmp} := {attr}) is True else 0 if {tmp} is False else {conv}({tmp}))"

    def decode(self, raw: int) -> bool | int:
        return raw == 1 if raw <= 1 else raw

    def encode(self, value: Any) -> int:
        if isinstance(value, bool):
            return int(value)
        return int(super().encode(value))

    def check(self, value: Any) -> str | None:
        return None if isinstance(value, bool) else f"{value!r} is neither 0 nor 1"

    def from_json(self, name: str, obj: Mapping[str, Any], verbatim: Mapping[str, str]) -> Any:
        value = obj[name]
        return value if isinstance(value, bool) else super().from_json(name, obj, verbatim)


class Scaled(Field):
    """An integer on the wire, a float of `unit` in the record: wire = round(value × scale)."""

    def __init__(self, subcon: construct.Construct, scale: int, *, unit: str, lo: float | None = None,
                 hi: float | None = None, doc: str = ""):
        super().__init__(subcon, unit=unit, lo=lo, hi=hi, doc=doc)
        self.scale = scale

    def decode_expr(self, wire: str, conv: str, bind: Bind) -> str:
        return f"{wire} / {self.scale}"

    def encode_expr(self, attr: str, tmp: str, conv: str, bind: Bind) -> str:
        # a float that is an exact multiple of 1/scale; anything else goes through encode
        return (f"({tmp}w if type({tmp} := {attr}) is float and ({tmp}w := {bind(round)}({tmp} * {self.scale}))"
                f" / {self.scale} == {tmp} else {conv}({tmp}))")

    def decode(self, raw: int) -> Any:
        return raw / self.scale

    def encode(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {value!r}")
        scaled = value * self.scale
        if scaled != scaled or scaled in (float("inf"), float("-inf")):  # NaN, ±inf, or a float that overflows
            raise ValueError(f"{value!r} is not a number the wire can carry")
        raw = round(scaled)
        # Float noise from arithmetic (129.0501 computed as 129.05010000000001) is not precision
        # the caller meant; a value between two wire steps (12.34 at ×10) is, and is refused.
        if abs(raw / self.scale - value) > 1e-9 * max(1.0, abs(value)):
            raise ValueError(f"{value!r} is not a multiple of 1/{self.scale} {self.unit}")
        return raw

    def from_json(self, name: str, obj: Mapping[str, Any], verbatim: Mapping[str, str]) -> Any:
        value = obj[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {value!r}")
        return float(value)


class Temperature(Scaled):
    """°C × 10, where 99.0 means no sensor and 98.0 sensor off (spec §7)."""

    SPECIAL: ClassVar[dict[int, SensorState]] = {990: SensorState.ABSENT, 980: SensorState.OFF}
    WIRE: ClassVar[dict[SensorState, int]] = {v: k for k, v in SPECIAL.items()}

    def __init__(self, doc: str = ""):
        super().__init__(construct.Int16sb, 10, unit="°C", doc=doc)

    def decode_expr(self, wire: str, conv: str, bind: Bind) -> str:
        return f"({bind(self.SPECIAL)}.get({wire}) or {wire} / {self.scale})"

    def encode_expr(self, attr: str, tmp: str, conv: str, bind: Bind) -> str:
        states = "".join(f"{wire} if {tmp} is {bind(state)} else " for state, wire in self.WIRE.items())
        states = states.replace(f" if {tmp} is", f" if ({tmp} := {attr}) is", 1)
        return (f"({states}{tmp}w if type({tmp}) is float and ({tmp}w := {bind(round)}({tmp} * {self.scale}))"
                f" / {self.scale} == {tmp} and {tmp}w not in {bind(self.SPECIAL)} else {conv}({tmp}))")

    def decode(self, raw: int) -> float | SensorState:
        return self.SPECIAL.get(raw) or raw / 10

    def encode(self, value: Any) -> int:
        if isinstance(value, SensorState):
            if value is SensorState.OK:
                raise ValueError("state 'ok' needs a reading")
            return self.WIRE[value]
        raw = super().encode(value)
        if raw in self.SPECIAL:
            raise ValueError(f"{value!r} °C means '{self.SPECIAL[raw].value}' on the wire; say so with the state")
        return raw

    @staticmethod
    def state_key(name: str) -> str:
        return name.removesuffix("_c") + "_state"

    def to_json(self, name: str, value: Any, out: dict[str, Any], verbatim: dict[str, str]) -> None:
        if isinstance(value, SensorState):
            out[name], out[self.state_key(name)] = None, value.value
        else:
            out[name], out[self.state_key(name)] = value, SensorState.OK.value

    def from_json(self, name: str, obj: Mapping[str, Any], verbatim: Mapping[str, str]) -> Any:
        state = obj.get(self.state_key(name), "ok" if obj.get(name) is not None else None)
        try:
            sensor = SensorState(state)
        except ValueError:
            raise ValueError(f"{self.state_key(name)} must be ok, absent or off, got {state!r}") from None
        if sensor is not SensorState.OK:
            return sensor
        return super().from_json(name, obj, verbatim)


class KstTime(Field):
    """YY MM DD hh mm ss cc (cc = 1/100 s), Korean local time, as an aware datetime."""

    arity = 7

    def __init__(self, doc: str = ""):
        super().__init__(construct.Bytes(7), doc=doc)

    @property
    def fmt(self) -> str:
        return "7B"  # the seven numbers, so the fast path needs no byte indexing

    def raw_expr(self, wire: str) -> str:
        return f"bytes(({wire}))"

    def decode_expr(self, wire: str, conv: str, bind: Bind) -> str:
        # datetime() raises ValueError for every time `decode` keeps as BadTime (1/100 s above
        # 99 makes microseconds above 999999), so the codec's fallback covers exactly those
        y, mo, d, h, mi, s, cc = wire.split(", ")
        return f"{bind(datetime)}(2000 + {y}, {mo}, {d}, {h}, {mi}, {s}, {cc} * 10000, {bind(KST)})"

    def encode_expr(self, attr: str, tmp: str, conv: str, bind: Bind) -> str:
        # a KST datetime on the wire's 1/100 s grid; a year outside 2000..2255 fails struct's "B"
        return (f"*(({tmp}.year - 2000, {tmp}.month, {tmp}.day, {tmp}.hour, {tmp}.minute, {tmp}.second,"
                f" {tmp}.microsecond // 10000) if type({tmp} := {attr}) is {bind(datetime)} and"
                f" {tmp}.tzinfo is {bind(KST)} and not {tmp}.microsecond % 10000 else {conv}({tmp}))")

    def decode(self, raw: bytes) -> Time:
        y, mo, d, h, mi, s, cc = raw
        if cc > 99:
            return BadTime(bytes(raw))
        try:
            return datetime(2000 + y, mo, d, h, mi, s, cc * 10000, KST)
        except ValueError:
            return BadTime(bytes(raw))

    def encode(self, value: Any) -> bytes:
        if isinstance(value, BadTime):
            return value.raw
        if not isinstance(value, datetime):
            raise ValueError(f"expected a datetime, got {value!r}")
        if value.tzinfo is None:
            value = value.replace(tzinfo=KST)
        value = value.astimezone(KST)
        if value.microsecond % 10000:
            raise ValueError(f"{value.isoformat()} is finer than the wire's 1/100 s")
        if not 2000 <= value.year <= 2255:
            raise ValueError(f"year {value.year} is outside the wire's 2000..2255")
        return bytes((value.year - 2000, value.month, value.day, value.hour, value.minute, value.second,
                      value.microsecond // 10000))

    def check(self, value: Any) -> str | None:
        return f"{value} is not a calendar time" if isinstance(value, BadTime) else None

    def to_json(self, name: str, value: Any, out: dict[str, Any], verbatim: dict[str, str]) -> None:
        if isinstance(value, BadTime):
            out[name] = None
            verbatim[name] = value.raw.hex()
        else:
            out[name] = format_time(value)

    def from_json(self, name: str, obj: Mapping[str, Any], verbatim: Mapping[str, str]) -> Any:
        if name in verbatim:
            raw = _hex(verbatim[name], 7)
            if not isinstance(self.decode(raw), BadTime):
                raise ValueError(f"verbatim {verbatim[name]} is a valid time; give it as {name}")
            return BadTime(raw)
        value = obj[name]
        if not isinstance(value, str):
            raise ValueError(f"expected an ISO 8601 time, got {value!r}")
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"expected an ISO 8601 time, got {value!r}") from None


def format_time(value: datetime) -> str:
    """ISO 8601 with offset, with the 1/100 s only when non-zero."""
    text = value.isoformat(timespec="seconds")
    if value.microsecond:
        cc = f"{value.microsecond / 1_000_000:.6f}"[1:].rstrip("0")
        text = text[:19] + cc + text[19:]
    return text


class Text(Field):
    """Fixed-width EUC-KR text, right-aligned, left-filled with '#'; decoded as CP949."""

    raw_digits = False

    def __init__(self, width: int, *, doc: str = ""):
        super().__init__(construct.Bytes(width), doc=doc)
        self.width = width

    def canonical(self, value: str) -> bytes | None:
        raw = euc_kr(value)
        if raw is None or len(raw) > self.width:
            return None
        return raw.rjust(self.width, b"#")

    def decode(self, raw: bytes) -> str:
        raw = bytes(raw)
        readable = raw.translate(_RAW_DIGITS) if self.raw_digits else raw
        try:
            value = readable.decode("cp949").strip("#")
        except UnicodeDecodeError:
            return WireStr(readable.decode("cp949", "replace").strip("#"), raw)
        return value if self.canonical(value) == raw else WireStr(value, raw)

    def encode(self, value: Any) -> bytes:
        if isinstance(value, WireStr):
            return value.wire
        if not isinstance(value, str):
            raise ValueError(f"expected text, got {value!r}")
        raw = self.canonical(value)
        if raw is None:
            raise ValueError(f"{value!r} is not EUC-KR text of at most {self.width} bytes")
        return raw

    def check(self, value: Any) -> str | None:
        if isinstance(value, WireStr) and "\ufffd" in value:
            return f"bytes {value.wire.hex()} are not CP949 text"
        return None

    def to_json(self, name: str, value: Any, out: dict[str, Any], verbatim: dict[str, str]) -> None:
        out[name] = str(value)
        if isinstance(value, WireStr):
            verbatim[name] = value.wire.hex()

    def from_json(self, name: str, obj: Mapping[str, Any], verbatim: Mapping[str, str]) -> Any:
        value = obj[name]
        if not isinstance(value, str):
            raise ValueError(f"expected text, got {value!r}")
        if name in verbatim:
            wire = _hex(verbatim[name], self.width if self.width else None)
            if self.decode(wire) != value:
                raise ValueError(f"verbatim {verbatim[name]} does not decode to {value!r}")
            return WireStr(value, wire)
        return value


class Digits(Text):
    """Text that the spec's samples also write as raw digit values 0x00-0x09 (firmware version)."""

    raw_digits = True


class Modem(Digits):
    """The terminal's phone number: the identity of every packet, so it must be digits."""

    _DIGITS = re.compile(r"[0-9]+")

    def __init__(self) -> None:
        super().__init__(11, doc="modem (terminal phone number)")

    def decode(self, raw: bytes) -> str:
        value = super().decode(raw)
        if not self._DIGITS.fullmatch(value):
            raise ProtocolError(f"modem number {bytes(raw)!r} is not digits", 1)
        return value

    def encode(self, value: Any) -> bytes:
        if not isinstance(value, str) or not self._DIGITS.fullmatch(value) or len(value) > self.width:
            raise ValueError(f"modem must be 1 to 11 digits, got {value!r}")
        return super().encode(value)


class LogText(Text):
    """The status log: L bytes of EUC-KR text, no padding; L is the header field `length_field`."""

    count_size = 1  # bytes per count of `length_field`

    def __init__(self, length_field: str):
        construct.Adapter.__init__(self, construct.Bytes(construct.this[length_field]))
        self.length_field = length_field
        self.unit, self.lo, self.hi, self.doc, self.width = "", None, None, "log text", 0

    def canonical(self, value: str) -> bytes | None:
        return euc_kr(value)

    def encode(self, value: Any) -> bytes:
        if isinstance(value, WireStr):
            return value.wire
        if not isinstance(value, str):
            raise ValueError(f"expected text, got {value!r}")
        raw = self.canonical(value)
        if raw is None:
            raise ValueError(f"{value!r} is not EUC-KR text")
        if len(raw) > 0x7FFF:
            raise ValueError(f"log of {len(raw)} bytes is longer than the wire's 32767")
        return raw


def euc_kr(value: str) -> bytes | None:
    """The EUC-KR bytes of `value`, or None when it has none that read back as `value`.

    Python's EUC-KR codec writes a syllable outside KS X 1001's 2350 (e.g. 똠) as an 8-byte jamo
    sequence (KS X 1001 annex 3) that CP949, like the terminals, reads as four jamo: not sendable.
    """
    try:
        raw = value.encode("euc-kr")
    except UnicodeEncodeError:
        return None
    return raw if raw.decode("cp949") == value else None


def _hex(text: Any, size: int | None) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except (TypeError, ValueError):
        raise ValueError(f"verbatim {text!r} is not hex") from None
    if size is not None and len(raw) != size:
        raise ValueError(f"verbatim {text!r} is not {size} bytes")
    return raw
