"""Sans-io framing: bytes in any chunking → complete packets in order; results → response bytes.

The protocol has no length prefix and no checksum; a frame's length follows from its protocol
ID and its header (`FRAME_LENGTHS`). Nothing here does I/O, keeps time or logs; anything wrong
with the input is a `ProtocolError` carrying the result code to answer with.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator

from .codec import StructCodec
from .errors import ProtocolError, Result
from .records import Packet, Response
from .schema import CODECS, SCHEMAS

DEFAULT_MAX_BODY_COUNT = 3600
"""One hour of 1 Hz bodies: above any report period a terminal is configured with by SMS."""

FrameLength = Callable[[bytes | bytearray, int], int | None]


def _fixed(size: int) -> FrameLength:
    return lambda buf, max_body_count: size


def _realtime(body_size: int) -> FrameLength:
    def length(buf: bytes | bytearray, max_body_count: int) -> int | None:
        if len(buf) < 16:
            return None
        count = int.from_bytes(buf[14:16], "big", signed=True)
        if count <= 0:
            raise ProtocolError(f"body count {count} is not positive", 14)
        if count > max_body_count:
            raise ProtocolError(f"body count {count} is above the maximum of {max_body_count}", 14)
        return 23 + count * body_size

    return length


def _status_log(buf: bytes | bytearray, max_body_count: int) -> int | None:
    if len(buf) < 21:
        return None
    size = int.from_bytes(buf[19:21], "big", signed=True)
    if size < 0:
        raise ProtocolError(f"log size {size} is negative", 19)
    return 21 + size


# Protocol ID → frame length from the bytes received so far (None: need more of the header).
FRAME_LENGTHS: dict[int, FrameLength] = {
    0x01: _fixed(101),
    0x03: _realtime(51),
    0x04: _fixed(36),
    0x06: _realtime(42),
    0x07: _realtime(30),
    0x63: _status_log,
    0x99: _status_log,  # the spec's ID table names the status log 0x99; its packet table says 0x63
    0x09: _fixed(2),
}

_CODECS_BY_ID: dict[int, StructCodec] = {}
for _record, _codec in CODECS.items():
    for _sub in SCHEMAS[_record].subcons[:1]:
        for _pid in _sub.subcon.accepted:
            _CODECS_BY_ID[_pid] = _codec


class Role(enum.Enum):
    """Which side's packets a connection reads: a server reads the terminal's, a client the answer."""

    SERVER = frozenset(FRAME_LENGTHS) - {0x09}
    CLIENT = frozenset({0x09})
    ANY = frozenset(FRAME_LENGTHS)


class Need(enum.Enum):
    NEED_DATA = "need data"
    CLOSED = "closed"


NEED_DATA = Need.NEED_DATA
CLOSED = Need.CLOSED


REALTIME_HEADER_SIZE = 23
"""The header the three realtime kinds share; their bodies follow it."""
_RECORDS_BY_ID: dict[int, type[Packet]] = {pid: codec.record for pid, codec in _CODECS_BY_ID.items()}
BODY_SIZES: dict[int, int] = {pid: codec.tail[1].codec.size for pid, codec in _CODECS_BY_ID.items()
                               if codec.tail is not None and hasattr(codec.tail[1], "codec")}


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
    body_size = BODY_SIZES.get(raw[0])
    if body_size is None:  # small packets: decoded whole, now
        record = codec.decode(raw)
        return Received(raw, offset, record, 0, record)
    body_count = (len(raw) - REALTIME_HEADER_SIZE) // body_size
    modem = raw[1:12]
    if modem.isdigit():  # eleven ASCII digits, the usual modem: what Modem.decode returns for it
        return Received(raw, offset, _RECORDS_BY_ID[raw[0]], body_count, modem=modem.decode("ascii"))
    # The header alone, through the same codec (the bodies' slice is empty): validates the modem.
    header = codec.decode(raw[:REALTIME_HEADER_SIZE])
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
    and raises nothing but ProtocolError; after one, the stream has lost its framing and every
    later call raises the same error. The buffer never holds more than one frame plus what the
    caller fed since the last NEED_DATA.
    """

    def __init__(self, role: Role = Role.SERVER, *, max_body_count: int = DEFAULT_MAX_BODY_COUNT):
        self.role = role
        self.max_body_count = max_body_count
        self._buffer = bytearray()
        self._offset = 0
        self._eof = False
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as a packet (a partial packet, when NEED_DATA)."""
        return len(self._buffer)

    @property
    def offset(self) -> int:
        """Stream offset of the next packet's first byte."""
        return self._offset

    def receive_data(self, data: bytes | bytearray) -> None:
        if data:
            if self._eof:
                raise ProtocolError("data after end of stream", self._offset + len(self._buffer))
            self._buffer += data
        else:
            self._eof = True

    def next_event(self) -> Received | Need:
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except ProtocolError as error:
            self._error = error.shifted(self._offset)
            raise self._error from None

    def _next_event(self) -> Received | Need:
        buf = self._buffer
        if not buf:
            return CLOSED if self._eof else NEED_DATA
        length = frame_length(buf, role=self.role, max_body_count=self.max_body_count)
        if length is None or len(buf) < length:
            if self._eof:
                need = "a complete header" if length is None else f"{length} bytes"
                raise ProtocolError(f"stream ended inside a packet: {len(buf)} bytes of {need}", len(buf))
            return NEED_DATA
        raw = bytes(buf[:length])
        event = _received(raw, self._offset)
        del buf[:length]
        self._offset += length
        return event

    @staticmethod
    def send(result: Result | int) -> bytes:
        """The 2-byte answer `0x09 <result>`."""
        answer = _ANSWERS.get(result)
        return answer if answer is not None else encode(Response(int(result)))


_ANSWERS: dict[int, bytes] = {int(r): encode(Response(int(r))) for r in Result}
