"""The sans-io framer's contract beyond the fixtures: roles, the body-count limit, end of stream,
sticky errors, the answer bytes, and the one-frame `decode`/`encode` helpers."""

from __future__ import annotations

import pytest
from conftest import load_sample

from dtgserver.protocol import (
    CLOSED,
    DEFAULT_MAX_BODY_COUNT,
    NEED_DATA,
    Connection,
    ProtocolError,
    Received,
    Response,
    Result,
    Role,
    decode,
    encode,
    frame_length,
    iter_packets,
)

DTG = load_sample("dtg_spec_sample").data
BUS = load_sample("dtg_seoul_bus_60").data
KEY_OFF = load_sample("key_off_spec_sample").data


def test_answers_are_two_bytes() -> None:
    assert Connection.send(Result.OK) == b"\x09\x00"
    assert [Connection.send(r) for r in Result] == [bytes([9, r]) for r in range(5)]
    assert encode(Response(2)) == b"\x09\x02"


def test_roles() -> None:
    # A server never reads a 0x09 answer from a terminal, and a terminal reads nothing else.
    server = Connection(Role.SERVER)
    server.receive_data(b"\x09\x00")
    with pytest.raises(ProtocolError, match="unknown protocol ID 0x09") as caught:
        server.next_event()
    assert caught.value.offset == 0
    client = Connection(Role.CLIENT)
    client.receive_data(KEY_OFF)
    with pytest.raises(ProtocolError, match="unknown protocol ID 0x04"):
        client.next_event()


def test_default_max_body_count_is_an_hour_of_bodies() -> None:
    assert DEFAULT_MAX_BODY_COUNT == 3600
    header = bytearray(BUS[:23])
    header[14:16] = (3600).to_bytes(2, "big")
    assert frame_length(bytes(header)) == 23 + 3600 * 51
    header[14:16] = (3601).to_bytes(2, "big")
    with pytest.raises(ProtocolError, match="above the maximum of 3600"):
        frame_length(bytes(header))


def test_max_body_count_is_configurable() -> None:
    conn = Connection(Role.SERVER, max_body_count=59)
    conn.receive_data(KEY_OFF + BUS)
    assert isinstance(conn.next_event(), Received)
    with pytest.raises(ProtocolError, match="body count 60 is above the maximum of 59") as caught:
        conn.next_event()
    assert caught.value.offset == len(KEY_OFF) + 14  # offsets count from the start of the stream
    assert [e.raw for e in iter_packets(BUS, max_body_count=60)] == [BUS]
    with pytest.raises(ProtocolError):
        decode(BUS, max_body_count=59)


def test_frame_length_needs_only_the_header() -> None:
    assert frame_length(b"") is None
    assert frame_length(BUS[:15]) is None  # body count not complete yet
    assert frame_length(BUS[:16]) == len(BUS)
    assert frame_length(KEY_OFF[:1]) == 36
    status = load_sample("status_log_spec_sample").data
    assert frame_length(status[:20]) is None
    assert frame_length(status[:21]) == 81


def test_a_partial_packet_then_end_of_stream_is_an_error() -> None:
    conn = Connection(Role.SERVER)
    conn.receive_data(KEY_OFF + BUS[:100])
    assert isinstance(conn.next_event(), Received)
    assert conn.next_event() is NEED_DATA
    assert (conn.offset, conn.buffered) == (36, 100)
    conn.receive_data(b"")
    with pytest.raises(ProtocolError, match=f"stream ended inside a packet: 100 bytes of {len(BUS)} bytes") as e:
        conn.next_event()
    assert e.value.offset == 136


def test_a_short_header_then_end_of_stream() -> None:
    conn = Connection(Role.SERVER)
    conn.receive_data(BUS[:10])
    conn.receive_data(b"")
    with pytest.raises(ProtocolError, match="10 bytes of a complete header"):
        conn.next_event()


def test_end_of_stream_between_packets_is_closed() -> None:
    conn = Connection(Role.SERVER)
    conn.receive_data(b"")
    assert conn.next_event() is CLOSED
    assert conn.next_event() is CLOSED
    with pytest.raises(ProtocolError, match="data after end of stream"):
        conn.receive_data(b"\x01")


def test_errors_are_sticky() -> None:
    conn = Connection(Role.SERVER)
    conn.receive_data(b"\x05")
    with pytest.raises(ProtocolError) as first:
        conn.next_event()
    conn.receive_data(KEY_OFF)  # the framing is lost: no resynchronising on later bytes
    with pytest.raises(ProtocolError) as second:
        conn.next_event()
    assert (second.value.message, second.value.offset) == (first.value.message, first.value.offset)


def test_decode_takes_exactly_one_frame() -> None:
    with pytest.raises(ProtocolError, match="1 bytes after the end of a 36-byte packet") as caught:
        decode(KEY_OFF + b"\x00")
    assert caught.value.offset == 36
    with pytest.raises(ProtocolError, match="truncated packet: 35 bytes, needs 36") as caught:
        decode(KEY_OFF[:35])
    assert caught.value.offset == 35
    with pytest.raises(ProtocolError, match="truncated packet: 0 bytes, needs its header"):
        decode(b"")


def test_packets_are_returned_as_soon_as_complete() -> None:
    # A terminal waits for each answer: the framer must not wait for more than the frame.
    conn = Connection(Role.SERVER)
    conn.receive_data(DTG)
    event = conn.next_event()
    assert isinstance(event, Received) and event.raw == DTG
    assert conn.next_event() is NEED_DATA
