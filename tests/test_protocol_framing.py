"""The sans-io framer's contract beyond the fixtures: roles, the body-count limit, end of stream,
sticky errors, the answer bytes, and the one-frame `decode`/`encode` helpers."""

from __future__ import annotations

import attrs
import pytest
from conftest import load_sample

from dtgserver.protocol import (
    CLOSED,
    DEFAULT_MAX_BODY_COUNT,
    FRAME_LENGTHS,
    NEED_DATA,
    Connection,
    ProtocolError,
    Realtime,
    Received,
    Response,
    Result,
    Role,
    decode,
    encode,
    frame_length,
    iter_packets,
    max_frame_length,
    received,
)
from dtgserver.testing import FIXED_SIZES, REALTIME_BODY_SIZES, STATUS_LOG_IDS, status_log

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


# -- what the server reads from a realtime packet without decoding its bodies ----------------------------
REALTIME = ["dtg_seoul_bus_60", "obd_busan_highway_20", "mdt_incheon_reefer_15"]


def header_as_framed(event: Received) -> tuple[str, str, int]:
    assert isinstance(event.modem, str) and type(event.body_count) is int
    return event.kind, event.modem, event.body_count


@pytest.mark.parametrize("name", REALTIME)
def test_a_realtime_packets_modem_and_body_count_come_from_the_framer(name: str) -> None:
    # The server answers, picks the shard and stores by `Received.modem` and `.body_count`
    # without building the body records: both must be right before `record` is ever read.
    sample = load_sample(name)
    expected = (sample.expected["kind"], sample.expected["modem"], sample.expected["body_count"])
    conn = Connection(Role.SERVER)
    conn.receive_data(KEY_OFF + sample.data)
    assert header_as_framed(conn.next_event()) == ("key_off", "01099998888", 0)  # type: ignore[arg-type]
    event = conn.next_event()
    assert isinstance(event, Received)
    assert header_as_framed(event) == expected
    relayed = received(sample.data)  # a frame relayed between workers: a stream of its own
    assert header_as_framed(relayed) == expected and (relayed.raw, relayed.offset) == (sample.data, 0)
    assert event.record == decode(sample.data)


@pytest.mark.parametrize("name", REALTIME)
@pytest.mark.parametrize("modem", ["0104", "01012345678"])
def test_a_modem_the_fast_path_cannot_read_is_decoded_from_the_header(name: str, modem: str) -> None:
    # A short modem is '#'-padded and the spec's own samples write raw digit bytes 0x00-0x09:
    # the framer decodes those headers. A report period whose high byte is an ASCII digit
    # (12,345 min is 0x30 0x39) must not be read as a twelfth digit of the modem.
    original = decode(load_sample(name).data)
    assert isinstance(original, Realtime)
    record = attrs.evolve(original, modem=modem, report_period_min=12_345)  # type: ignore[misc]
    raw = encode(record)
    raw_digits = raw[:1] + bytes(b - 0x30 if b != 0x23 else b for b in raw[1:12]) + raw[12:]
    for frame in (raw, raw_digits):
        [event] = iter_packets(frame)
        assert header_as_framed(event) == (record.KIND, modem, len(record.bodies))
        assert header_as_framed(received(frame)) == header_as_framed(event)
        assert event.record.modem == modem and type(event.modem) is type(event.record.modem)  # WireStr for raw digits


def test_received_takes_exactly_one_whole_frame() -> None:
    for frame in (BUS[:-1], BUS + KEY_OFF, b"\x09\x00"):  # a terminal never sends an answer
        with pytest.raises(ProtocolError) as caught:
            received(frame)
        assert (caught.value.offset, caught.value.result) == (0, Result.FORMAT_ERROR)
    with pytest.raises(ProtocolError, match=f"not one whole packet: {len(BUS) - 1} bytes, the header says {len(BUS)}"):
        received(BUS[:-1])
    with pytest.raises(ProtocolError, match="above the maximum of 59"):
        received(BUS, max_body_count=59)


def test_iter_packets_honours_a_max_body_count_below_the_count() -> None:
    assert [e.body_count for e in iter_packets(KEY_OFF + BUS, max_body_count=60)] == [0, 60]
    stream = iter_packets(KEY_OFF + BUS, max_body_count=59)
    assert next(stream).kind == "key_off"  # what came before the refused packet is still handed out
    with pytest.raises(ProtocolError, match="body count 60 is above the maximum of 59") as caught:
        next(stream)
    assert caught.value.offset == len(KEY_OFF) + 14


def test_equal_events_are_the_same_bytes_at_the_same_offset() -> None:
    first, again = list(iter_packets(KEY_OFF)), list(iter_packets(KEY_OFF))
    assert first == again and hash(first[0]) == hash(again[0])
    elsewhere = list(iter_packets(DTG + KEY_OFF))[1]
    assert elsewhere.raw == first[0].raw and elsewhere != first[0]
    assert len({first[0], again[0], elsewhere}) == 2
    assert first[0] != KEY_OFF


def test_data_after_end_of_stream_names_where_it_arrived() -> None:
    conn = Connection(Role.SERVER)
    conn.receive_data(KEY_OFF + BUS[:10])
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), Received)
    with pytest.raises(ProtocolError) as caught:
        conn.receive_data(b"\x03")
    assert str(caught.value) == "at byte 46: data after end of stream"


def test_an_answer_outside_the_result_table_is_still_two_bytes() -> None:
    # The server only sends `Result`s; a caller's other byte goes out as given (the terminal
    # decides what it means), and one that is no byte is refused naming the field.
    assert Connection.send(5) == b"\x09\x05"
    assert Connection.send(255) == b"\x09\xff"
    assert Connection.send(int(Result.OVERLOADED)) == b"\x09\x04"
    for result in (256, -1):
        with pytest.raises(ValueError, match=r"^result: value does not fit its wire type$"):
            Connection.send(result)
    for flag in (True, False):  # equal to 1 and 0 as dict keys: without the check True answered "format error"
        with pytest.raises(ValueError, match=r"^result: (True|False) is not a result code$"):
            Connection.send(flag)


@pytest.mark.parametrize("max_body_count", [1, 2, 60, DEFAULT_MAX_BODY_COUNT, 32_767])
def test_max_frame_length_is_the_longest_frame_a_header_may_announce(max_body_count: int) -> None:
    # What one connection may have to buffer (the buffer budget keeps that much free for a new
    # one): for each role, the longest length the framer accepts from any header it reads.
    longest: dict[int, int | None] = {}
    for pid in FRAME_LENGTHS:
        head = bytes([pid]) + b"01012345678"
        if pid in REALTIME_BODY_SIZES:  # ID, modem, 2 bytes, the body count, 7 bytes
            longest[pid] = frame_length(head + bytes(2) + max_body_count.to_bytes(2, "big") + bytes(7),
                                        max_body_count=max_body_count)
            over = (f"{max_body_count + 1} is above the maximum of {max_body_count}" if max_body_count < 0x7FFF
                    else "-32768 is not positive")  # the count is a signed 2-byte field too
            with pytest.raises(ProtocolError, match=f"body count {over}"):
                frame_length(head + bytes(2) + (max_body_count + 1).to_bytes(2, "big") + bytes(7),
                             max_body_count=max_body_count)
        elif pid in STATUS_LOG_IDS:  # ID, modem, the time, the log size (a signed 2-byte field)
            longest[pid] = frame_length(head + bytes(7) + (0x7FFF).to_bytes(2, "big"), max_body_count=max_body_count)
            with pytest.raises(ProtocolError, match="log size -32768 is negative"):
                frame_length(head + bytes(7) + (0x8000).to_bytes(2, "big"), max_body_count=max_body_count)
        else:
            longest[pid] = frame_length(bytes([pid]), max_body_count=max_body_count)
    assert longest[0x03] == 23 + 51 * max_body_count and longest[0x63] == longest[0x99] == 21 + 32_767
    assert longest[0x01] == FIXED_SIZES[0x01] and longest[0x09] == 2
    for role in Role:
        most = max_frame_length(role=role, max_body_count=max_body_count)
        assert type(most) is int  # a byte count, for buffers and reads
        assert most == max(length for pid, length in longest.items() if pid in role.value and length is not None)
    assert max_frame_length(role=Role.CLIENT, max_body_count=max_body_count) == 2


def test_a_frame_of_the_longest_length_is_received_whole() -> None:
    # With one body per packet the status log is the longest frame: 32,767 bytes of log.
    frame = encode(status_log(text="x" * 32_767))
    assert len(frame) == max_frame_length(max_body_count=1)
    conn = Connection(Role.SERVER, max_body_count=1)
    conn.receive_data(frame[:-1])
    assert conn.next_event() is NEED_DATA and conn.wanted == 1
    conn.receive_data(frame[-1:])
    event = conn.next_event()
    assert isinstance(event, Received) and event.raw == frame and event.record == status_log(text="x" * 32_767)


def test_wanted_is_known_only_while_a_begun_packet_has_told_its_length() -> None:
    # A session reads no more than `wanted` bytes when it is a number, one read's worth when it is None.
    conn = Connection(Role.SERVER)
    seen: list[tuple[bool, int | None]] = [(False, conn.wanted)]  # nothing received yet
    for piece in (BUS[:10], BUS[10:100], BUS[100:], b""):  # the body count not in yet, then in; then none begun
        if piece:
            conn.receive_data(piece)
        seen.append((isinstance(conn.next_event(), Received), conn.wanted))
    assert seen == [(False, None), (False, None), (False, len(BUS) - 100), (True, None), (False, None)]


def test_an_error_moved_into_a_stream_keeps_its_result_and_an_unknown_offset() -> None:
    # `shifted` is how an error found inside one packet is told at its place in the stream.
    error = ProtocolError("bad thing", 3, Result.MAINTENANCE)
    moved = error.shifted(100)
    assert (moved.offset, moved.result, str(moved)) == (103, Result.MAINTENANCE, "at byte 103: bad thing")
    unplaced = ProtocolError("no place").shifted(100)
    assert (unplaced.offset, unplaced.result, str(unplaced)) == (None, Result.FORMAT_ERROR, "no place")
