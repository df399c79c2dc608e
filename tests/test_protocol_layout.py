"""protocol.layout: the offsets, lengths and column reads derived from the schemas agree with the
decoder on every packet, and no code outside protocol/ reads a packet's bytes by hand."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dtgserver.protocol import (
    FRAME_LENGTHS,
    KST,
    BadTime,
    BasicInfo,
    DtgRealtime,
    KeyOff,
    MdtRealtime,
    ObdRealtime,
    ProtocolError,
    Realtime,
    Response,
    StatusLog,
    decode,
    encode,
    frame_length,
)
from dtgserver.protocol.fields import KstTime
from dtgserver.protocol.layout import (
    REALTIME,
    REALTIME_BY_KIND,
    protocol_id,
    realtime,
    time_bytes,
    time_ms,
    wire_time_ms,
)
from dtgserver.testing import dtg, dtg_bytes, frames, records

REALTIME_IDS = tuple(REALTIME)
EPOCH = datetime(1970, 1, 1, tzinfo=KST) + timedelta(hours=9)


def ms(value: Any) -> int | None:
    return None if isinstance(value, BadTime) else (value - EPOCH) // timedelta(milliseconds=1)


# -- lengths ----------------------------------------------------------------------------------------


def test_frame_lengths_are_the_spec_tables_sizes() -> None:
    """Derived from the schemas, and equal to what the spec's tables add up to."""
    assert sorted(FRAME_LENGTHS) == [0x01, 0x03, 0x04, 0x06, 0x07, 0x09, 0x63, 0x99]
    header = bytes(14)

    def length(pid: int, count: int) -> int | None:
        return frame_length(bytes([pid]) + header[1:] + count.to_bytes(2, "big") + bytes(8))

    assert [length(pid, 0) for pid in (0x01, 0x04, 0x09)] == [101, 36, 2]
    assert [length(pid, 2) for pid in (0x03, 0x06, 0x07)] == [23 + 2 * 51, 23 + 2 * 42, 23 + 2 * 30]
    log = bytes([0x63]) + bytes(18) + (300).to_bytes(2, "big")
    assert frame_length(log) == 21 + 300 and frame_length(log[:20]) is None
    assert frame_length(bytes([0x03]) + bytes(14)) is None  # the body count not yet received


@pytest.mark.parametrize(("frame", "offset", "message"), [
    (bytes([0x03]) + bytes(13) + b"\x00\x00", 14, "body count 0 is not positive"),
    (bytes([0x06]) + bytes(13) + b"\xff\xff", 14, "body count -1 is not positive"),
    (bytes([0x07]) + bytes(13) + (3601).to_bytes(2, "big"), 14, "body count 3601 is above the maximum of 3600"),
    (bytes([0x99]) + bytes(18) + b"\x80\x00", 19, "log size -32768 is negative"),
])
def test_a_length_field_out_of_range_is_refused_at_its_offset(frame: bytes, offset: int, message: str) -> None:
    with pytest.raises(ProtocolError) as error:
        frame_length(frame)
    assert (error.value.offset, error.value.message) == (offset, message)


def test_protocol_id_and_realtime_layouts() -> None:
    raw = encode(KeyOff("0101", datetime(2026, 1, 1, tzinfo=KST), 127.0, 37.0, datetime(2026, 1, 1, tzinfo=KST), 12))
    assert protocol_id(raw) == 0x04 and realtime(raw) is None
    assert {layout.kind: (pid, layout.header_size, layout.body_size) for pid, layout in REALTIME.items()} == {
        "dtg": (0x03, 23, 51), "obd": (0x06, 23, 42), "mdt": (0x07, 23, 30)}
    for pid, layout in REALTIME.items():
        assert layout.protocol_id == layout.record.PROTOCOL_ID == pid and layout.record.KIND == layout.kind
        assert REALTIME_BY_KIND[layout.kind] is layout
    assert protocol_id(encode(Response(0))) == 0x09
    assert protocol_id(encode(StatusLog("1", datetime(2026, 1, 1, tzinfo=KST), "x", protocol_id=0x99))) == 0x99


# -- times ------------------------------------------------------------------------------------------

# each byte of a time anywhere in 0..255, with the values at the limits of a calendar time likely
_TIME_BYTES = [st.integers(0, 255) | st.sampled_from(limits) for limits in (
    (0, 255), (0, 1, 2, 12, 13), (0, 1, 28, 29, 30, 31, 32), (23, 24), (59, 60), (59, 60), (99, 100))]


@settings(max_examples=1000, deadline=None)
@given(st.tuples(*_TIME_BYTES))
@example((24, 2, 29, 23, 59, 59, 99))  # a leap day, the last 1/100 s of it
@example((25, 2, 29, 0, 0, 0, 0))  # no such day
@example((26, 1, 1, 24, 0, 0, 0))
@example((26, 1, 1, 0, 60, 0, 0))
@example((26, 1, 1, 0, 0, 60, 0))
@example((26, 1, 1, 0, 0, 0, 100))
def test_wire_time_ms_is_the_decoded_time_in_utc_ms(values: tuple[int, ...]) -> None:
    """The raw fast path and the decoder agree on every 7 bytes, the calendar's limits included."""
    found = wire_time_ms(*values)
    assert found == ms(KstTime().decode(bytes(values))) and type(found) in (int, type(None))


def test_time_bytes_are_what_the_decoder_reads_back() -> None:
    t = datetime(2026, 11, 21, 8, 0, 59, 990000, tzinfo=KST)
    assert time_bytes(t) == bytes((26, 11, 21, 8, 0, 59, 99)) and KstTime().decode(time_bytes(t)) == t
    with pytest.raises(ValueError):
        time_bytes(datetime(1999, 12, 31, tzinfo=KST))


def test_the_times_of_a_packet_of_calendar_times_are_int_utc_ms() -> None:
    # random frames almost never hold a calendar time: a packet as a terminal sends it
    record = dtg(bodies=3)
    raw = encode(record)
    layout = REALTIME[0x03]
    first, last = ms(record.bodies[0].time), ms(record.bodies[-1].time)
    assert first is not None and last == first + 2000
    assert layout.times_ms(raw) == (first, last) and layout.key_on_ms(raw) == ms(record.key_on_time)
    assert [layout.body_time_ms(raw, i) for i in range(3)] == [first, first + 1000, last]
    found = [time_ms(record.bodies[0].time), wire_time_ms(*raw[29:36]), *layout.times_ms(raw), layout.key_on_ms(raw)]
    assert found[:2] == [first, first] and all(type(t) is int for t in found)
    assert time_ms(datetime(1970, 1, 1, 9, 0, 0, 10000, tzinfo=KST)) == 10 and time_ms(BadTime(bytes(7))) is None
    # the first and the last calendar time, past bodies whose time is none (None: a BadTime; hour 24,
    # though its last six bytes and the speed after them would read as 2001-01-24 00:00:00.40)
    start, bad = datetime(2026, 11, 21, 8, 0, tzinfo=KST), BadTime(bytes((26, 1, 1, 24, 0, 0, 0)))
    base = ms(start)
    assert base is not None
    cases: list[tuple[tuple[int | None, ...], tuple[int | None, int | None]]] = [
        ((None, 1, 2, 3), (1, 3)), ((None, None, None, 3), (3, 3)), ((1, 2, None, None), (1, 2)),
        ((None, 2, None, None), (2, 2)), ((None,) * 4, (None, None))]
    for seconds, expected in cases:
        bodies = [attrs.evolve(body, time=bad if s is None else start + timedelta(seconds=s))
                  for body, s in zip(dtg(bodies=4).bodies, seconds, strict=True)]
        raw = encode(attrs.evolve(record, bodies=bodies))
        assert layout.times_ms(raw) == tuple(None if s is None else base + 1000 * s for s in expected), seconds


# -- bodies -----------------------------------------------------------------------------------------

realtime_frames = frames(REALTIME_IDS, max_bodies=5)


@settings(max_examples=300, deadline=None)
@given(realtime_frames)
def test_tuples_columns_and_values_are_the_decoded_bodies(raw: bytes) -> None:
    record = decode(raw)
    assert isinstance(record, Realtime)
    layout = realtime(raw)
    assert layout is not None and layout.kind == record.KIND and layout.body_count(raw) == len(record.bodies)
    assert len(list(layout.tuples(raw))) == len(record.bodies)
    names = list(layout.body_slots)
    for name in names:
        if layout.body_slots[name].arity == 1:
            column = [layout.body_slots[name].adapter.decode(v) for v in layout.column(raw, name)]
            assert column == [getattr(body, name) for body in record.bodies], name
    # several fields at once, one struct skipping the rest: the same values as the whole bodies' tuples
    picked = ("time", "speed_kmh", "lat", "lon", "rpm", "status_code", names[-1], "no_such_field")  # gaps, the end
    transposed = list(zip(*layout.tuples(raw), strict=True))
    expected = {name: transposed[at] if slot.arity == 1 else tuple(transposed[at:at + slot.arity])
                for name, slot in layout.body_slots.items() if name in picked for at in [slot.index]}
    assert layout.columns(raw, picked) == expected and "speed_kmh" in expected and "time" in expected
    for index, body in [(0, record.bodies[0]), (-1, record.bodies[-1]), (len(record.bodies) - 1, record.bodies[-1])]:
        assert layout.decoded(raw, index, (*names, "no_such_field")) == {name: getattr(body, name) for name in names}
        some = [name for name in picked if name in layout.body_slots]
        assert layout.decoded(raw, index, picked) == {name: getattr(body, name) for name in some}
    times = [t for t in (ms(body.time) for body in record.bodies) if t is not None]
    assert layout.times_ms(raw) == ((times[0], times[-1]) if times else (None, None))
    assert layout.key_on_ms(raw) == ms(record.key_on_time)
    # the whole table at once, single bodies, the bodies' bytes, each body's time, the modem
    assert layout.transposed(raw) == transposed
    tuples = list(layout.tuples(raw))
    assert [layout.body_values(raw, i) for i in (0, -1)] == [tuples[0], tuples[-1]]
    assert bytes(layout.bodies(raw)) == raw[layout.header_size:] and len(raw) > layout.header_size
    assert [layout.body_time_ms(raw, i) for i in range(len(record.bodies))] == [ms(b.time) for b in record.bodies]
    assert [time_ms(body.time) for body in record.bodies] == [ms(b.time) for b in record.bodies]
    assert all(type(t) is int for t in (*layout.times_ms(raw), time_ms(record.bodies[0].time)) if t is not None)
    for name, slot in layout.body_slots.items():
        if slot.arity == 1:
            assert layout.column_max(raw, name) == max(transposed[slot.index]), name
            # a one-byte unsigned field's column is a slice of the packet, no list built
            assert isinstance(layout.column(raw, name), bytes) == (slot.adapter.fmt == "B"), name
    assert layout.modem(raw) == record.modem


@settings(max_examples=100, deadline=None)
@given(st.one_of(records(DtgRealtime), records(ObdRealtime), records(MdtRealtime)),
       st.text("0123456789", min_size=11, max_size=11).map(str.encode),
       st.datetimes(datetime(2000, 1, 1), datetime(2255, 12, 31, 23, 59)))
def test_a_cut_packet_renders_with_a_new_modem_key_on_time_and_minute(record: Realtime, modem: bytes,
                                                                      when: datetime) -> None:
    raw = encode(record)
    layout = realtime(raw)
    assert layout is not None
    cut = layout.cut(raw)
    key_on = time_bytes(when.replace(microsecond=0, tzinfo=KST))
    rendered = cut.render(modem, key_on, key_on[:5])
    assert len(rendered) == len(raw) and protocol_id(rendered) == protocol_id(raw)
    again = decode(rendered)
    assert isinstance(again, Realtime)
    assert again.modem == modem.decode() and again.key_on_time == KstTime().decode(key_on)
    assert again.report_period_min == record.report_period_min
    original = decode(raw)
    assert isinstance(original, Realtime)
    for before, after in zip(original.bodies, again.bodies, strict=True):  # only each body's minute changed
        assert after == attrs.evolve(before, time=KstTime().decode(key_on[:5] + KstTime().encode(before.time)[5:]))


def test_transposed_reads_any_number_of_bodies_and_keeps_few_structs() -> None:
    """Past 120 bodies, or once 16 body counts have a struct of their own, the bodies are read one
    by one: the same columns, and the structs kept stay bounded however many counts arrive."""
    layout = REALTIME[0x03]
    for count in (1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 119, 120, 121, 144, 233, 7, 4, 6, 9, 10, 11):
        raw = dtg_bytes(bodies=count)
        expected = list(zip(*layout.tuples(raw), strict=True))
        assert layout.transposed(raw) == expected and len(expected[0]) == count, count
        assert len(layout._packet_structs) <= 16
    assert len(layout._packet_structs) == 16 and 121 not in layout._packet_structs


@pytest.mark.parametrize("pid", REALTIME_IDS)
def test_a_header_without_bodies_reads_as_empty_columns(pid: int) -> None:
    layout = REALTIME[pid]
    head = bytes([pid]) + bytes(layout.header_size - 1)
    assert layout.transposed(head) == [()] * sum(slot.arity for slot in layout.body_slots.values())  # a time: 7
    assert layout.columns(head, ("time", "lat")) == {"time": ((),) * 7, "lat": ()}
    assert layout.body_count(head) == 0 and list(layout.tuples(head)) == []


# -- nothing outside protocol/ reads a packet's bytes by hand -------------------------------------------

PACKAGE = Path(__file__).parent.parent / "dtgserver"
# a packet's bytes are called raw, frame, packet or buf wherever dtgserver handles them
_PACKET = r"(?:\braw|\bframe|\bpacket|\bbuf|\.raw)\b"
BY_HAND = {
    "an index or slice of a packet's bytes": re.compile(_PACKET + r"\s*\["),
    "an index or slice of a view of a packet's bytes": re.compile(r"memoryview\(\s*" + _PACKET + r"[^)]*\)\s*\["),
    "a struct read of a packet's bytes": re.compile(r"(?:unpack|unpack_from|iter_unpack|from_bytes)\(\s*" + _PACKET),
}


def by_hand(text: str) -> list[str]:
    return [f"{n}: {what}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1)
            for what, pattern in BY_HAND.items() if pattern.search(line)]


def test_the_wire_format_is_read_only_in_protocol() -> None:
    found = [f"{path.relative_to(PACKAGE)}:{hit}" for path in sorted(PACKAGE.rglob("*.py"))
             if "protocol" not in path.relative_to(PACKAGE).parts for hit in by_hand(path.read_text("utf-8"))]
    assert found == []


@pytest.mark.parametrize("line", [
    "modem = raw[1:12]", "kind = raw[0]", "x = item.received.raw[0]", "count = int.from_bytes(buf[14:16], 'big')",
    "speeds = raw [first::size]", "struct.unpack_from(raw, 16)", "S.iter_unpack(memoryview(raw)[23:])",
    "head = frame[:23]",
])
def test_the_check_finds_bytes_read_by_hand(line: str) -> None:
    assert by_hand(line)


def test_the_check_leaves_other_code_alone() -> None:
    assert by_hand("raws = [p.raw for p in packets]\nframes[0]\nraw_len = len(raw)\nbuffer[at:end]\n"
                   "view = memoryview(packet)\nsent = view[n:]") == []


def test_basic_info_is_not_realtime() -> None:
    raw = encode(BasicInfo("1", "m", "v", "11", "r", "b", "d", "1"))
    assert realtime(raw) is None and protocol_id(raw) == 0x01
