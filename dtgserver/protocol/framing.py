"""Sans-io framing: bytes in any chunking → complete packets in order; results → response bytes.

The protocol has no length prefix and no checksum; a frame's length follows from its protocol
ID and its header (`FRAME_LENGTHS`). Nothing here does I/O, keeps time or logs; anything wrong
with the input is a `ProtocolError` carrying the result code to answer with.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterator

from .codec import StructCodec
from .errors import ProtocolError, Result
from .layout import REALTIME, slots
from .records import Packet, Response
from .schema import CODECS, SCHEMAS, Bodies

DEFAULT_MAX_BODY_COUNT = 3600
"""One hour of 1 Hz bodies: above any report period a terminal is configured with by SMS."""

FrameLength = Callable[[bytes | bytearray, int], int | None]

_CODECS_BY_ID: dict[int, StructCodec] = {}
for _record, _codec in CODECS.items():
    for _sub in SCHEMAS[_record].subcons[:1]:
        for _pid in _sub.subcon.accepted:
            _CODECS_BY_ID[_pid] = _codec


def _frame_length(codec: StructCodec) -> FrameLength:
    """How long a frame of this codec's packet is, from the schema: its fixed size, or its
    fixed header plus what the header's length field counts (bodies, log bytes)."""
    if codec.tail is None:
        size = codec.size
        return lambda buf, max_body_count: size
    tail = codec.tail[1]
    field = slots(codec.schema)[tail.length_field]
    header, at, end = codec.size, field.offset, field.end
    unit: int = tail.count_size
    read = struct.Struct(">" + field.adapter.fmt).unpack_from
    what = tail.length_field.replace("_", " ")
    bodies = isinstance(tail, Bodies)
    lo = field.adapter.lo or 0

    def length(buf: bytes | bytearray, max_body_count: int) -> int | None:
        if len(buf) < end:
            return None
        count: int = read(buf, at)[0]
        if count < lo:
            raise ProtocolError(f"{what} {count} is {'not positive' if lo == 1 else 'negative'}", at)
        if bodies and count > max_body_count:
            raise ProtocolError(f"{what} {count} is above the maximum of {max_body_count}", at)
        return header + count * unit

    return length


def _longest(codec: StructCodec) -> Callable[[int], int]:
    """The longest frame of this codec's packet the framer accepts, given its max_body_count."""
    if codec.tail is None:
        size = codec.size
        return lambda max_body_count: size
    tail = codec.tail[1]
    field = slots(codec.schema)[tail.length_field]
    header, unit = codec.size, tail.count_size
    if isinstance(tail, Bodies):
        return lambda max_body_count: header + max_body_count * unit
    width = struct.calcsize(">" + field.adapter.fmt)
    most = (1 << (8 * width - (1 if field.adapter.fmt.islower() else 0))) - 1
    if field.adapter.hi is not None:
        most = min(most, int(field.adapter.hi))
    return lambda max_body_count: header + most * unit


# Protocol ID → frame length from the bytes received so far (None: need more of the header).
# 0x99 is the status log's alias: the spec's ID table names it 0x99, its packet table 0x63.
FRAME_LENGTHS: dict[int, FrameLength] = {pid: _frame_length(codec) for pid, codec in sorted(_CODECS_BY_ID.items())}


_LONGEST: dict[int, Callable[[int], int]] = {pid: _longest(codec) for pid, codec in sorted(_CODECS_BY_ID.items())}


class Role(enum.Enum):
    """Which side's packets a connection reads: a server reads the terminal's, a client the answer."""

    SERVER = frozenset(FRAME_LENGTHS) - {Response.PROTOCOL_ID}
    CLIENT = frozenset({Response.PROTOCOL_ID})
    ANY = frozenset(FRAME_LENGTHS)


class Need(enum.Enum):
    NEED_DATA = "need data"
    CLOSED = "closed"


NEED_DATA = Need.NEED_DATA
CLOSED = Need.CLOSED


_RECORDS_BY_ID: dict[int, type[Packet]] = {pid: codec.record for pid, codec in _CODECS_BY_ID.items()}
_MODEM = {pid: layout.header["modem"] for pid, layout in REALTIME.items()}


class Received:
    """One complete packet: its exact bytes, where it started in the stream, and its record.

    The framer validates everything that can be refused before returning a `Received`: the
    protocol ID, the length, and the header (the modem's digits). A realtime packet's bodies
    cannot be refused (every 1 Hz body value is kept as it came: an invalid time becomes a
    `BadTime`), so they are decoded only when `record` is first read; the server answers and
    stores from `raw`, `modem`, `kind` and `body_count` without building 60 body records.
    """

    __slots__ = ("_record", "body_count", "kind", "modem", "offset", "raw")

    def __init__(self, raw: bytes, offset: int, header: Packet | type[Packet], body_count: int,
                 record: Packet | None = None, *, modem: str | None = None):
        self.raw = raw
        self.offset = offset
        self.modem: str = header.modem if modem is None else modem
        self.kind: str = header.KIND
        self.body_count = body_count
        self._record = record

    @property
    def protocol_id(self) -> int:
        return self.raw[0]

    @property
    def record(self) -> Packet:
        """The decoded record (decoded once, on first use)."""
        if self._record is None:
            self._record = _CODECS_BY_ID[self.raw[0]].decode(self.raw)
        return self._record

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Received):
            return NotImplemented
        return (self.raw, self.offset) == (other.raw, other.offset)

    def __hash__(self) -> int:
        return hash((self.raw, self.offset))

    def __repr__(self) -> str:
        return f"Received(kind={self.kind!r}, modem={self.modem!r}, bytes={len(self.raw)}, offset={self.offset})"


def _received(raw: bytes, offset: int) -> Received:
    """Frame `raw` (exactly one packet) as a Received; ProtocolError for a header it must refuse."""
    codec = _CODECS_BY_ID[raw[0]]
    layout = REALTIME.get(raw[0])
    if layout is None:  # small packets: decoded whole, now
        record = codec.decode(raw)
        return Received(raw, offset, record, 0, record)
    body_count = layout.body_count(raw)
    slot = _MODEM[raw[0]]
    modem = raw[slot.offset:slot.end]
    if modem.isdigit():  # eleven ASCII digits, the usual modem: what Modem.decode returns for it
        return Received(raw, offset, _RECORDS_BY_ID[raw[0]], body_count, modem=modem.decode("ascii"))
    # The header alone, through the same codec (the bodies' slice is empty): validates the modem.
    header = codec.decode(raw[:layout.header_size])
    return Received(raw, offset, header, body_count)


def frame_length(buf: bytes | bytearray, *, role: Role = Role.ANY,
                 max_body_count: int = DEFAULT_MAX_BODY_COUNT) -> int | None:
    """The length of the frame starting at buf[0], or None while the header is incomplete."""
    if not buf:
        return None
    length = FRAME_LENGTHS.get(buf[0]) if buf[0] in role.value else None
    if length is None:
        raise ProtocolError(f"unknown protocol ID 0x{buf[0]:02X}", 0)
    return length(buf, max_body_count)


def max_frame_length(*, role: Role = Role.SERVER, max_body_count: int = DEFAULT_MAX_BODY_COUNT) -> int:
    """The longest frame a Connection of this role accepts: what one connection may have to buffer."""
    return max(_LONGEST[pid](max_body_count) for pid in role.value)


def decode(frame: bytes, *, max_body_count: int = DEFAULT_MAX_BODY_COUNT) -> Packet:
    """The record for exactly one frame; ProtocolError if it is not exactly one valid frame."""
    frame = bytes(frame)
    length = frame_length(frame, max_body_count=max_body_count)
    if length is None or len(frame) < length:
        need = "its header" if length is None else f"{length}"
        raise ProtocolError(f"truncated packet: {len(frame)} bytes, needs {need}", len(frame))
    if len(frame) > length:
        raise ProtocolError(f"{len(frame) - length} bytes after the end of a {length}-byte packet", length)
    record: Packet = _CODECS_BY_ID[frame[0]].decode(frame)
    return record


def received(frame: bytes, *, max_body_count: int = DEFAULT_MAX_BODY_COUNT) -> Received:
    """Exactly one frame as the framer hands it out (bodies not decoded yet); ProtocolError if it
    is not exactly one frame the framer would accept. For a frame that crossed a process
    boundary (`serve --workers N` relays packets between workers, server/relay.py)."""
    length = frame_length(frame, role=Role.SERVER, max_body_count=max_body_count)
    if length != len(frame):
        raise ProtocolError(f"not one whole packet: {len(frame)} bytes, the header says {length}", 0)
    return _received(frame, 0)


def encode(record: Packet) -> bytes:
    """The bytes of a record; ValueError naming the field when a value does not fit the wire."""
    return CODECS[type(record)].encode(record)


def iter_packets(data: bytes, *, role: Role = Role.ANY,
                 max_body_count: int = DEFAULT_MAX_BODY_COUNT) -> Iterator[Received]:
    """Every packet in `data` (back to back); ProtocolError at the first bad or truncated one."""
    conn = Connection(role, max_body_count=max_body_count)
    conn.receive_data(data)
    conn.receive_data(b"")
    while True:
        event = conn.next_event()
        if event is CLOSED:
            return
        assert isinstance(event, Received)
        yield event


class Connection:
    """One side of one TCP connection, h11-style: `receive_data`, `next_event`, `send`.

    `next_event()` returns a `Received`, `NEED_DATA`, or `CLOSED` (after `receive_data(b"")`),
    and raises nothing but ProtocolError; after one, the stream has lost its framing, nothing
    received is kept, and every later call raises the same error. The buffer never holds more
    than one frame plus what the caller fed since the last NEED_DATA; a caller that reads no more
    than `wanted` bytes while it is known keeps it to one frame (or one read, while no header has
    told a length).
    """

    def __init__(self, role: Role = Role.SERVER, *, max_body_count: int = DEFAULT_MAX_BODY_COUNT):
        self.role = role
        self.max_body_count = max_body_count
        self._buffer = bytearray()
        self._offset = 0
        self._eof = False
        self._error: ProtocolError | None = None
        self._wanted: int | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as a packet (a partial packet, when NEED_DATA)."""
        return len(self._buffer)

    @property
    def wanted(self) -> int | None:
        """After `next_event()` returned NEED_DATA: the bytes that complete the packet being received,
        once its header has told its length; None while it has not (or no packet has begun)."""
        return self._wanted

    @property
    def offset(self) -> int:
        """Stream offset of the next packet's first byte."""
        return self._offset

    def receive_data(self, data: bytes | bytearray) -> None:
        if self._error is not None:
            return  # after a ProtocolError nothing more is framed or kept
        if data:
            if self._eof:
                raise ProtocolError("data after end of stream", self._offset + len(self._buffer))
            self._buffer += data
        else:
            self._eof = True

    def next_event(self) -> Received | Need:
        if self._error is not None:
            raise self._error.shifted(0)
        try:
            return self._next_event()
        except ProtocolError as error:
            # The stream has lost its framing: what it buffered is let go now. The error kept is
            # never raised itself (a copy is), so no traceback ties the caller's frame, which holds
            # this Connection, to it in a cycle that keeps the buffer until a collection.
            self._buffer.clear()
            self._error = kept = error.shifted(self._offset)
        raise kept.shifted(0) from None

    def _next_event(self) -> Received | Need:
        buf = self._buffer
        self._wanted = None
        if not buf:
            return CLOSED if self._eof else NEED_DATA
        length = frame_length(buf, role=self.role, max_body_count=self.max_body_count)
        if length is None or len(buf) < length:
            if self._eof:
                need = "a complete header" if length is None else f"{length} bytes"
                raise ProtocolError(f"stream ended inside a packet: {len(buf)} bytes of {need}", len(buf))
            if length is not None:
                self._wanted = length - len(buf)
            return NEED_DATA
        raw = bytes(buf[:length])
        event = _received(raw, self._offset)
        del buf[:length]
        self._offset += length
        return event

    @staticmethod
    def send(result: Result | int) -> bytes:
        """The 2-byte answer `0x09 <result>`; a bool is refused (True would pass for 1, a format error)."""
        if isinstance(result, bool):
            raise ValueError(f"result: {result!r} is not a result code")
        answer = _ANSWERS.get(result)
        return answer if answer is not None else encode(Response(int(result)))


_ANSWERS: dict[int, bytes] = {int(r): encode(Response(int(r))) for r in Result}
