"""The protocol core: no I/O. Bytes in, records out; results in, bytes out.

    conn = Connection(Role.SERVER)
    conn.receive_data(chunk)           # b"" = end of stream
    event = conn.next_event()          # Received(record, raw, offset) | NEED_DATA | CLOSED
    reply = conn.send(Result.OK)       # b"\\x09\\x00"

`decode`/`encode` convert exactly one frame; `to_json`/`from_json` give the public JSON format.
Nothing here raises anything but ProtocolError on any input (JsonError/ValueError on bad JSON
or records given to the encoders).
"""

from .errors import ProtocolError, Result
from .fields import KST, BadTime, SensorState, WireStr, format_time
from .framing import (
    CLOSED,
    DEFAULT_MAX_BODY_COUNT,
    FRAME_LENGTHS,
    NEED_DATA,
    Connection,
    Received,
    Role,
    decode,
    encode,
    frame_length,
    iter_packets,
    max_frame_length,
    received,
)
from .records import (
    BY_KIND,
    PACKET_TYPES,
    BasicInfo,
    Body,
    DtgBody,
    DtgRealtime,
    KeyOff,
    MdtBody,
    MdtRealtime,
    ObdBody,
    ObdRealtime,
    Packet,
    Realtime,
    Response,
    StatusLog,
)
from .views import JsonError, dumps, explain, format_table, from_json, to_json

__all__ = [
    "BY_KIND", "CLOSED", "DEFAULT_MAX_BODY_COUNT", "FRAME_LENGTHS", "KST", "NEED_DATA", "PACKET_TYPES",
    "BadTime", "BasicInfo", "Body", "Connection", "DtgBody", "DtgRealtime", "JsonError", "KeyOff", "MdtBody",
    "MdtRealtime", "ObdBody", "ObdRealtime", "Packet", "ProtocolError", "Realtime", "Received", "Response",
    "Result", "Role", "SensorState", "StatusLog", "WireStr", "decode", "dumps", "encode", "explain",
    "format_table", "format_time", "frame_length", "from_json", "iter_packets", "max_frame_length", "received",
    "to_json",
]
