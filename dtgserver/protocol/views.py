"""Records as the public JSON format (see docs/protocol.md) and as a per-field explanation table."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import attrs

from .codec import schema_fields
from .errors import ProtocolError
from .fields import Code, Field, LogText
from .records import BY_KIND, Packet, Record
from .schema import Bodies

DERIVED = ("body_count", "log_size")


class JsonError(ValueError):
    """A JSON packet that does not describe a valid packet; the message names the key."""


def to_json(record: Packet) -> dict[str, Any]:
    """The public JSON object of a record: kind, protocol_id, modem, then the fields in wire order."""
    out: dict[str, Any] = {"kind": record.KIND, "protocol_id": record.protocol_id, "modem": record.modem}
    _fields_to_json(record, out)
    warnings = record.warnings
    if warnings:
        out["warnings"] = warnings
    return out


def _fields_to_json(record: Record, out: dict[str, Any]) -> dict[str, Any]:
    verbatim: dict[str, str] = {}
    for name, adapter in schema_fields(record.SCHEMA):
        if name == "protocol_id":
            continue
        value = getattr(record, name)
        if isinstance(adapter, Bodies):
            out[name] = [_fields_to_json(body, {}) for body in value]
        else:
            adapter.to_json(name, value, out, verbatim)
    if verbatim:
        out["verbatim"] = verbatim
    return out


def from_json(obj: Any) -> Packet:
    """The record a JSON object describes; JsonError naming the key when it does not fit."""
    if not isinstance(obj, Mapping):
        raise JsonError(f"expected a JSON object, got {type(obj).__name__}")
    kind = obj.get("kind")
    cls = BY_KIND.get(kind) if isinstance(kind, str) else None  # a dict or list here is not hashable
    if cls is None:
        raise JsonError(f"kind must be one of {', '.join(BY_KIND)}, got {obj.get('kind')!r}")
    record = _fields_from_json(cls, obj, "")
    assert isinstance(record, Packet)
    if "protocol_id" in obj and obj["protocol_id"] != record.protocol_id:
        raise JsonError(f"protocol_id: {obj['protocol_id']!r} is not {record.KIND}'s {record.protocol_id}")
    for name in DERIVED:
        if name in obj and hasattr(record, name) and obj[name] != getattr(record, name):
            raise JsonError(f"{name}: {obj[name]!r} does not match the data ({getattr(record, name)})")
    return record


def _fields_from_json(cls: type[Record], obj: Any, path: str) -> Record:
    if not isinstance(obj, Mapping):
        raise JsonError(f"{path or 'packet'}: expected a JSON object")
    verbatim = obj.get("verbatim") or {}
    if not isinstance(verbatim, Mapping):
        raise JsonError(f"{path}verbatim: expected an object of hex strings")
    record_fields = {f.name for f in attrs.fields(cls)}  # type: ignore[arg-type]  # every Record is attrs
    values: dict[str, Any] = {}
    for name, adapter in schema_fields(cls.SCHEMA):
        if name not in record_fields:
            continue
        try:
            if isinstance(adapter, Bodies):
                bodies = obj[name]
                if not isinstance(bodies, list) or not bodies:
                    raise ValueError("expected a non-empty list of bodies")
                values[name] = [
                    _fields_from_json(cls.BODY, body, f"{path}{name}[{i}].")  # type: ignore[attr-defined]
                    for i, body in enumerate(bodies)
                ]
            else:
                values[name] = adapter.from_json(name, obj, verbatim)
                wire = adapter.encode(values[name])  # fails here, naming the key, if it cannot be sent
                if isinstance(wire, int) and isinstance(adapter, Field):
                    try:
                        struct.pack(">" + adapter.fmt, wire)
                    except struct.error:
                        raise ValueError(f"{values[name]!r} does not fit its wire type ({adapter.fmt})") from None
        except KeyError as e:
            raise JsonError(f"{path}{e.args[0]}: missing") from None
        except JsonError:
            raise
        except (ValueError, TypeError) as e:
            raise JsonError(f"{path}{name}: {e}") from None
        except ProtocolError as e:  # verbatim bytes the decoder refuses (a modem that is not digits)
            raise JsonError(f"{path}{name}: verbatim {e.message}") from None
    return cls(**values)


def dumps(record: Packet) -> str:
    return json.dumps(to_json(record), ensure_ascii=False)


# -- the explanation table (`dtgserver decode --format table`) -------------------------------------


@attrs.frozen
class Row:
    offset: int
    raw: bytes
    name: str
    value: str
    unit: str


def explain(record: Packet, raw: bytes) -> Iterator[Row]:
    """One row per wire field: offset, raw bytes, name, value (as in JSON), unit."""
    yield from _explain(record, raw, 0, "")


def _explain(record: Record, raw: bytes, offset: int, prefix: str) -> Iterator[Row]:
    for name, adapter in schema_fields(record.SCHEMA):
        value = getattr(record, name)
        if isinstance(adapter, Bodies):
            size = adapter.codec.size
            for i, body in enumerate(value):
                yield from _explain(body, raw, offset, f"{prefix}{name}[{i}].")
                offset += size
            continue
        size = len(adapter.encode(value)) if isinstance(adapter, LogText) else adapter.size
        shown: dict[str, Any] = {}
        verbatim: dict[str, str] = {}
        adapter.to_json(name, value, shown, verbatim)
        text = json.dumps(shown.pop(name), ensure_ascii=False)
        extras = [f"{k}={v}" for k, v in shown.items()]
        if isinstance(adapter, Code) and value in adapter.table:
            extras.append(adapter.table[value])
        if isinstance(adapter, Field) and adapter.check(value):
            extras.append(f"warning: {adapter.check(value)}")
        if extras:
            text += f" ({'; '.join(extras)})"
        yield Row(offset, raw[offset:offset + size], f"{prefix}{name}", text, adapter.unit)
        offset += size


def format_table(record: Packet, raw: bytes) -> str:
    rows = list(explain(record, raw))
    lines = [f"{record.KIND} (0x{record.protocol_id:02X}), {len(raw)} bytes"]
    lines.append(f"{'offset':>6}  {'raw':<24}  {'field':<32}  {'value'}")
    for row in rows:
        hexed = row.raw.hex(" ")
        if len(hexed) > 24:
            hexed = hexed[:21] + "..."
        unit = f" {row.unit}" if row.unit else ""
        lines.append(f"{row.offset:>6}  {hexed:<24}  {row.name:<32}  {row.value}{unit}")
    return "\n".join(lines)
