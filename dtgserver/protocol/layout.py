"""Where each field sits in a packet, derived from the schemas: the only place offsets are known.

Everything outside `protocol/` that reads a packet's bytes without decoding it into records goes
through here: the framer's lengths (`framing`), the store's protocol ID, the bridge's reads of a
realtime packet's bodies as `struct` tuples and columns, and the simulator's re-addressing of
pre-rendered packets. Offsets, sizes and struct formats are computed from `schema` when this
module loads, so a change to a schema changes every reader with it.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import construct

from .codec import StructCodec, schema_fields
from .fields import KST, BadTime, Field, KstTime
from .records import Packet, Realtime
from .schema import CODECS, SCHEMAS, Bodies

_EPOCH_DAY = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


@attrs.frozen
class Slot:
    """One fixed-size field: its byte offset, and where its values sit in its struct's tuple."""

    name: str
    offset: int
    size: int
    index: int  # of its first value in the tuple `struct.unpack` gives for the whole struct
    arity: int  # how many values it takes there (a time: 7)
    adapter: Field

    @property
    def end(self) -> int:
        return self.offset + self.size


def slots(schema: construct.Struct) -> dict[str, Slot]:
    """The fixed-size fields of a schema, by name, in wire order (a variable tail is not one)."""
    out: dict[str, Slot] = {}
    offset = index = 0
    for name, adapter in schema_fields(schema):
        if not isinstance(adapter, Field) or _variable(adapter):
            break
        out[name] = Slot(name, offset, adapter.size, index, adapter.arity, adapter)
        offset += adapter.size
        index += adapter.arity
    return out


def _variable(adapter: Field) -> bool:
    length = getattr(adapter.subcon, "length", None)
    return isinstance(adapter.subcon, construct.Bytes) and not isinstance(length, int)


# -- times ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def day_ms(yy: int, month: int, day: int) -> int | None:
    """UTC ms of 00:00 KST on a wire date (year 2000 + yy); None when it is no calendar date."""
    try:
        return (datetime(2000 + yy, month, day, tzinfo=KST) - _EPOCH_DAY) // _MS
    except ValueError:
        return None


def wire_time_ms(yy: int, month: int, day: int, hour: int, minute: int, second: int, cc: int) -> int | None:
    """UTC ms of the seven values of a wire time (KST, cc in 1/100 s); None exactly where the
    decoder gives a `BadTime` (no calendar time): the same as decoding it and converting."""
    return _time_ms(bytes((yy, month, day, hour, minute, second, cc)))


def _time_ms(seven: bytes) -> int | None:
    """`wire_time_ms` of the 7 bytes of a time, unpacked here (cheaper than a call with *args)."""
    yy, month, day, hour, minute, second, cc = seven
    midnight = day_ms(yy, month, day)
    if midnight is None or hour > 23 or minute > 59 or second > 59 or cc > 99:
        return None
    return midnight + ((hour * 60 + minute) * 60 + second) * 1000 + cc * 10


def time_ms(value: datetime | BadTime) -> int | None:
    """UTC ms of a decoded wire time; None for a `BadTime` (no calendar time)."""
    if isinstance(value, datetime):
        return (value - _EPOCH_DAY) // _MS
    return None


def time_bytes(value: datetime) -> bytes:
    """The 7 wire bytes of a time (KST); ValueError for one the wire cannot carry."""
    return bytes(KstTime().encode(value))


# -- realtime packets -----------------------------------------------------------------------------


class RealtimeLayout:
    """One realtime kind (DTG, OBD, MDT): its header and its bodies, as the schema lays them out.

    `body` is the struct of one body (a time is 7 "B" values), `body_slots` says where each
    field is in it and in the tuple it unpacks to.
    """

    def __init__(self, record: type[Realtime], header: Mapping[str, Slot], header_size: int, body: struct.Struct,
                 body_slots: Mapping[str, Slot]):
        self.protocol_id = record.PROTOCOL_ID
        self.record = record
        self.kind = record.KIND
        self.header = header
        self.header_size = header_size
        self.body = body
        self.body_slots = body_slots
        self._size = body.size
        self._time_at = header_size + body_slots["time"].offset
        self._key_on_at = header["key_on_time"].offset
        self._pickers: dict[tuple[str, ...], tuple[struct.Struct, list[tuple[str, Any]]]] = {}
        self._column_pickers: dict[tuple[str, ...], tuple[struct.Struct, list[tuple[str, int, int]]]] = {}
        self._byte_columns = {name: header_size + slot.offset for name, slot in body_slots.items()
                              if slot.arity == 1 and slot.adapter.fmt == "B"}  # one unsigned byte: a slice
        self._width = sum(slot.arity for slot in body_slots.values())
        self._packet_structs: dict[int, struct.Struct] = {}
        self._columns = {  # one field of every body, the rest of the body skipped
            name: struct.Struct(f">{slot.offset}x{slot.adapter.fmt}{body.size - slot.end}x")
            for name, slot in body_slots.items() if slot.arity == 1}

    @property
    def body_size(self) -> int:
        return self.body.size

    def body_count(self, raw: bytes) -> int:
        """How many bodies a framed packet holds (from its length, which the framer checked)."""
        return (len(raw) - self.header_size) // self.body.size

    def bodies(self, raw: bytes) -> memoryview:
        """The bodies' bytes, back to back (no copy)."""
        return memoryview(raw)[self.header_size:]

    def tuples(self, raw: bytes) -> Iterator[tuple[Any, ...]]:
        """Each body's wire values, in `body_slots` order (`struct.iter_unpack`)."""
        return self.body.iter_unpack(memoryview(raw)[self.header_size:])

    def body_values(self, raw: bytes, index: int) -> tuple[Any, ...]:
        """The wire values of body `index` (negative counts from the last)."""
        if index < 0:
            index += self.body_count(raw)
        return self.body.unpack_from(raw, self.header_size + index * self.body.size)

    def decoded(self, raw: bytes, index: int, names: tuple[str, ...]) -> dict[str, Any]:
        """The values of the fields `names` of body `index` (negative counts from the last), decoded
        exactly as in its record; a name this kind's body does not have is left out."""
        picker = self._pickers.get(names)
        if picker is None:
            picker = self._pickers[names] = self._picker(names)
        reader, decoders = picker
        if index < 0:
            index += self.body_count(raw)
        values = reader.unpack_from(raw, self.header_size + index * self._size)
        return {name: decode(value) for (name, decode), value in zip(decoders, values)}  # noqa: B905  # same length

    def _picker(self, names: tuple[str, ...]) -> tuple[struct.Struct, list[tuple[str, Any]]]:
        """A struct reading only the fields `names` of a body (in wire order), and their decoders."""
        chosen = sorted((self.body_slots[name] for name in set(names) if name in self.body_slots),
                        key=lambda slot: slot.offset)
        fmt, position = ">", 0
        for slot in chosen:
            fmt += f"{slot.offset - position}x" if slot.offset > position else ""
            fmt += slot.adapter.fmt if slot.arity == 1 else f"{slot.size}s"
            position = slot.end
        return struct.Struct(fmt), [(slot.name, slot.adapter.decode) for slot in chosen]

    def columns(self, raw: bytes, names: tuple[str, ...]) -> dict[str, Any]:
        """The wire values of the fields `names` in every body, in order, read with one struct that
        skips the other fields: a column (a tuple) per one-value field, a tuple of columns per
        field of several values (a time: its seven); a name this kind's body does not have is left out."""
        picker = self._column_pickers.get(names)
        if picker is None:
            picker = self._column_pickers[names] = self._column_picker(names)
        reader, spans = picker
        columns = list(zip(*reader.iter_unpack(memoryview(raw)[self.header_size:]), strict=True))
        if not columns:  # no bodies
            columns = [()] * sum(arity for _, _, arity in spans)
        return {name: columns[at] if arity == 1 else tuple(columns[at:at + arity]) for name, at, arity in spans}

    def transposed(self, raw: bytes) -> list[tuple[Any, ...]]:
        """Every body's wire values as columns: column `slot.index + k` holds the k-th value of
        field `slot` (a time's seven, one column each) of every body, in order. One `struct` unpack
        of all the bodies at once and a slice per column: the cheapest way to the whole table."""
        count = (len(raw) - self.header_size) // self._size
        whole = self._packet_structs.get(count)
        if whole is None:
            if count > _WHOLE_MAX_BODIES or len(self._packet_structs) >= _WHOLE_STRUCTS or not count:
                columns = list(zip(*self.body.iter_unpack(memoryview(raw)[self.header_size:]), strict=True))
                return columns or [()] * self._width
            whole = self._packet_structs[count] = struct.Struct(">" + self.body.format.lstrip("<>!=@") * count)
        flat = whole.unpack_from(raw, self.header_size)
        width = self._width
        return [flat[at::width] for at in range(width)]

    def _column_picker(self, names: tuple[str, ...]) -> tuple[struct.Struct, list[tuple[str, int, int]]]:
        """A struct of a whole body reading only the fields `names` (each value of a several-value
        field on its own), and where each field's values are in what it unpacks to."""
        chosen = sorted((self.body_slots[name] for name in set(names) if name in self.body_slots),
                        key=lambda slot: slot.offset)
        fmt, position, spans, at = ">", 0, [], 0
        for slot in chosen:
            fmt += f"{slot.offset - position}x" if slot.offset > position else ""
            fmt += slot.adapter.fmt  # a time's is "7B": seven values
            position = slot.end
            spans.append((slot.name, at, slot.arity))
            at += slot.arity
        fmt += f"{self._size - position}x" if self._size > position else ""
        return struct.Struct(fmt), spans

    def column_max(self, raw: bytes, name: str) -> int:
        """The largest wire value of field `name` over the bodies (one-value fields only)."""
        at = self._byte_columns.get(name)
        if at is not None:
            return max(raw[at::self.body.size])
        return int(max(self._columns[name].iter_unpack(memoryview(raw)[self.header_size:]))[0])

    def column(self, raw: bytes, name: str) -> Sequence[int]:
        """The wire value of field `name` in every body, in order (one-value fields only).

        A one-byte unsigned field is a slice of the packet (a `bytes` of the values)."""
        at = self._byte_columns.get(name)
        if at is not None:
            return raw[at::self.body.size]
        return [v for (v,) in self._columns[name].iter_unpack(memoryview(raw)[self.header_size:])]

    def times_ms(self, raw: bytes) -> tuple[int | None, int | None]:
        """UTC ms of the first and of the last body whose time is a calendar time (None, None: none is)."""
        size = self._size
        first_at = self._time_at
        last_at = first_at + ((len(raw) - self.header_size) // size - 1) * size
        for at in range(first_at, last_at + 1, size):
            first = _time_ms(raw[at:at + 7])
            if first is not None:
                for back in range(last_at, at - 1, -size):
                    last = _time_ms(raw[back:back + 7])
                    if last is not None:
                        return first, last
        return None, None

    def body_time_ms(self, raw: bytes, index: int) -> int | None:
        """UTC ms of body `index`'s time; None when it is no calendar time."""
        at = self.header_size + index * self.body.size + self.body_slots["time"].offset
        return _time_ms(raw[at:at + 7])

    def modem(self, raw: bytes) -> str:
        """The header's modem, as the decoder reads it."""
        slot = self.header["modem"]
        wire = raw[slot.offset:slot.end]
        return wire.decode("ascii") if wire.isdigit() else str(slot.adapter.decode(wire))

    def key_on_ms(self, raw: bytes) -> int | None:
        """UTC ms of the header's KEY ON time; None when it is no calendar time."""
        at = self._key_on_at
        return _time_ms(raw[at:at + 7])

    def cut(self, raw: bytes) -> RealtimeCut:
        """The packet cut around what a load generator changes in each copy (docs/simulator.md):
        the modem, the KEY ON time, and each body's time down to the minute."""
        modem, key_on = self.header["modem"], self.header["key_on_time"]
        if not (modem.end <= key_on.offset and key_on.end == self.header_size):
            raise TypeError("RealtimeLayout.cut expects the modem before the KEY ON time, which ends the header")
        time_at = self.body_slots["time"].offset
        pieces, start = [], self.header_size
        for body in range(self.header_size, len(raw), self.body.size):
            pieces.append(raw[start:body + time_at])
            start = body + time_at + MINUTE_PREFIX
        pieces.append(raw[start:])
        return RealtimeCut(raw[:modem.offset], raw[modem.end:key_on.offset], tuple(pieces))


_WHOLE_MAX_BODIES = 120
_WHOLE_STRUCTS = 16
"""`transposed` keeps a struct of all the bodies for up to this many body counts (one or two
minutes of bodies: ~50-100 KB each); other packets are read body by body and transposed."""

MINUTE_PREFIX = 5
"""Bytes of a wire time down to the minute: YY MM DD hh mm."""


@attrs.frozen
class RealtimeCut:
    """A realtime packet without its modem, KEY ON time and body minutes: `render` puts new ones in."""

    head: bytes
    middle: bytes  # between the modem and the KEY ON time
    pieces: tuple[bytes, ...]  # the bytes around each body's YY MM DD hh mm

    def render(self, modem: bytes, key_on_time: bytes, minute: bytes) -> bytes:
        """The packet with another modem (11 bytes), KEY ON time (7) and minute of every body (5)."""
        return self.head + modem + self.middle + key_on_time + minute.join(self.pieces)


def _realtime_layout(record: type[Packet], codec: StructCodec) -> RealtimeLayout:
    assert codec.tail is not None and isinstance(codec.tail[1], Bodies)
    bodies = codec.tail[1]
    assert issubclass(record, Realtime)
    return RealtimeLayout(record, slots(SCHEMAS[record]), codec.size, bodies.codec.struct, slots(bodies.body))


REALTIME: dict[int, RealtimeLayout] = {
    record.PROTOCOL_ID: _realtime_layout(record, codec) for record, codec in CODECS.items()
    if codec.tail is not None and isinstance(codec.tail[1], Bodies)
}
"""Protocol ID → the layout of that realtime kind."""

REALTIME_BY_KIND: dict[str, RealtimeLayout] = {layout.kind: layout for layout in REALTIME.values()}


def protocol_id(raw: bytes) -> int:
    """The protocol ID of a packet: its first byte."""
    return raw[0]


def realtime(raw: bytes) -> RealtimeLayout | None:
    """The layout of a realtime packet's kind; None for a packet of another kind."""
    return REALTIME.get(raw[0])
