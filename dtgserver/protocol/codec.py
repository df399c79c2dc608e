"""The fast path, derived from the construct schemas: one struct format and one generated
function per schema, so decoding costs about what a hand-written `struct` decoder costs while the
schema stays the single source of truth. Also the range check every record carries."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import construct

from .fields import Field


def schema_fields(schema: construct.Struct) -> Iterator[tuple[str, Any]]:
    """(name, adapter) for each field of a schema, in wire order."""
    for sub in schema.subcons:
        yield sub.name, sub.subcon


class StructCodec:
    """Decode and encode one record class through one `struct.Struct` built from its schema.

    The schema's fields are fixed-size `Field` adapters, except an optional last field whose
    size comes from the header (the bodies, or the log text): its adapter decodes the rest.

    The generated functions inline each field's common case (`Field.decode_expr`/`encode_expr`):
    no call per field, so 60 bodies cost what a hand-written `struct` codec costs (bench/decode.py).
    Exactness does not depend on the inlining: a decode whose fast form raises ValueError (an
    invalid time) is redone through each adapter's own `decode`, and an encode that fails is
    explained field by field through each adapter's own `encode`.
    """

    def __init__(self, schema: construct.Struct, record: type):
        self.schema = schema
        self.record = record
        fields = list(schema_fields(schema))
        self.tail: tuple[str, Any] | None = None
        if fields and _variable(fields[-1][1]):
            self.tail = fields.pop()
        self.fixed: list[tuple[str, Field]] = fields
        self.struct = struct.Struct(">" + "".join(adapter.fmt for _, adapter in fields))
        self.size = self.struct.size
        self._compile()

    def _compile(self) -> None:
        record_fields = {f.name: f for f in attrs.fields(self.record)}
        positional = [f.name for f in attrs.fields(self.record) if not f.kw_only]
        names = [name for name, _ in self.fixed] + ([self.tail[0]] if self.tail else [])
        if [n for n in names if n in positional] != positional or not set(record_fields) <= set(names):
            raise TypeError(f"{self.record.__name__} fields {list(record_fields)} do not follow its schema {names}")
        ns: dict[str, Any] = {
            "_cls": self.record,
            "_unpack_from": self.struct.unpack_from,
            "_iter": self.struct.iter_unpack,
            "_pack": self.struct.pack,
            "_join": b"".join,
        }
        bound: dict[int, str] = {}

        def bind(obj: Any) -> str:
            """A global name for `obj` in the generated source (one per object)."""
            if id(obj) not in bound:
                bound[id(obj)] = f"_g{len(bound)}"
                ns[bound[id(obj)]] = obj
            return bound[id(obj)]

        wire: list[str] = []
        fast: list[str] = []  # inline expressions; may raise ValueError on what `decode` keeps
        exact: list[str] = []  # each adapter's own `decode`: the fallback, exact by definition
        keywords: list[tuple[str, str, str]] = []  # (name, fast, exact) of kw_only record fields
        packed: list[str] = []
        for i, (name, adapter) in enumerate(self.fixed):
            ns[f"_c{i}"], ns[f"_e{i}"] = adapter.decode, adapter.encode
            values = ", ".join(f"f{len(wire) + k}" for k in range(adapter.arity))
            wire += values.split(", ")
            packed.append(adapter.encode_expr(f"r.{name}", f"v{i}", f"_e{i}", bind))
            if name in record_fields:
                fast_expr = adapter.decode_expr(values, f"_c{i}", bind)
                exact_expr = Field.decode_expr(adapter, values, f"_c{i}", bind)
                if record_fields[name].kw_only:
                    keywords.append((name, fast_expr, exact_expr))
                else:
                    fast.append(fast_expr)
                    exact.append(exact_expr)
        tuple_ = ", ".join(wire) + ("," if len(wire) == 1 else "")
        if self.tail:
            name, adapter = self.tail
            ns["_tc"], ns["_te"] = adapter.decode, adapter.encode
            fast.append(f"_tc(buf[{self.size}:])")
            exact.append(f"_tc(buf[{self.size}:])")
            tail_encode = f" + _te(r.{name})"
        else:
            tail_encode = ""
        for name, fast_expr, exact_expr in keywords:
            fast.append(f"{name}={fast_expr}")
            exact.append(f"{name}={exact_expr}")
        fast_args, exact_args, pack_args = ", ".join(fast), ", ".join(exact), ", ".join(packed)
        source = (
            f"def decode(buf):\n"
            f"    {tuple_} = _unpack_from(buf)\n"
            f"    try:\n"
            f"        return _cls({fast_args})\n"
            f"    except ValueError:\n"
            f"        return _cls({exact_args})\n"
            f"def decode_many(buf):\n"
            f"    try:\n"
            f"        return tuple([_cls({fast_args}) for {tuple_} in _iter(buf)])\n"
            f"    except ValueError:\n"
            f"        return tuple([_cls({exact_args}) for {tuple_} in _iter(buf)])\n"
            f"def encode(r):\n"
            f"    return _pack({pack_args}){tail_encode}\n"
            f"def encode_many(rs):\n"
            f"    return _join([_pack({pack_args}){tail_encode} for r in rs])\n"
        )
        exec(compile(source, f"<codec {self.record.__name__}>", "exec"), ns)
        self.source = source
        self.decode: Callable[[bytes], Any] = ns["decode"]
        self._decode_many: Callable[[bytes], tuple[Any, ...]] = ns["decode_many"]
        self._encode: Callable[[Any], bytes] = ns["encode"]
        self._encode_many: Callable[[Any], bytes] = ns["encode_many"]

    def decode_many(self, buf: bytes) -> tuple[Any, ...]:
        """Records from `buf`, a whole number of fixed-size records back to back."""
        return self._decode_many(buf)

    def encode(self, record: Any) -> bytes:
        """Bytes for `record`; a ValueError naming the field when a value does not fit the wire."""
        try:
            return self._encode(record)
        except _ENCODE_ERRORS:
            self._explain_failure(record)
            raise

    def encode_many(self, records: Any) -> bytes:
        if not isinstance(records, (tuple, list)):
            records = tuple(records)
        try:
            return self._encode_many(records)
        except _ENCODE_ERRORS:
            for record in records:  # the first record that fails says which field and why
                self.encode(record)
            raise

    def _explain_failure(self, record: Any) -> None:
        # The tail first: a header field derived from it (body_count, log_size) fails because
        # of it, and the tail's own error says why (which body, how long the log is).
        for name, adapter in ([self.tail] if self.tail else []) + self.fixed:
            try:
                value = getattr(record, name)
            except AttributeError:
                raise ValueError(f"{name}: missing") from None
            try:
                raw = adapter.encode(value)
                if isinstance(adapter, Field) and not _variable(adapter):
                    struct.pack(">" + adapter.fmt, *(raw if adapter.arity > 1 else (raw,)))
            except (ValueError, TypeError, struct.error) as e:
                raise ValueError(f"{name}: {_plain(e)}") from None


# What the generated encoder can raise for a value it cannot write: `round` raises OverflowError
# for an infinite float. Each is explained by the field's own `encode` as a ValueError.
_ENCODE_ERRORS = (ValueError, TypeError, OverflowError, struct.error, AttributeError)


def _variable(adapter: Any) -> bool:
    length = getattr(adapter.subcon, "length", None)
    return isinstance(adapter.subcon, construct.Bytes) and not isinstance(length, int)


def _plain(error: Exception) -> str:
    message = str(error)
    if isinstance(error, struct.error):
        return "value does not fit its wire type"
    return message


def check(record: Any) -> list[str]:
    """Warnings naming each field whose value is outside its documented range."""
    found: list[str] = []
    for name, adapter in schema_fields(type(record).SCHEMA):
        if not hasattr(record, name):
            continue
        value = getattr(record, name)
        if isinstance(value, tuple):
            for i, body in enumerate(value):
                found.extend(f"{name}[{i}].{w}" for w in check(body))
        elif isinstance(adapter, Field):
            warning = adapter.check(value)
            if warning:
                found.append(f"{name}: {warning}")
    return found
