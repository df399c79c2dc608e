"""`derive`: a stored packet's bytes and the trip state → the encoded messages live and replay publish."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dtgserver.bridge.derive import Outgoing, TripState, derive
from dtgserver.bridge.messages import map_record
from dtgserver.protocol import DtgRealtime, KeyOff, MdtRealtime, ObdRealtime, Packet, ProtocolError, encode
from dtgserver.testing import KEY_ON, basic_info, dtg, key_off, packets, status_log

MODEM = "01012345678"
OPTIONS: dict[str, Any] = {"received_ms": 1_795_215_540_000, "profile": "seed", "battery_warning_v": 11.5}


END = KEY_ON + timedelta(minutes=1, seconds=2)  # the last body's time: the trip is complete at its KEY OFF


def drive() -> list[bytes]:
    return [encode(p) for p in (basic_info(), dtg(minute=0, bodies=3), dtg(minute=1, bodies=3),
                                key_off(at=KEY_ON + timedelta(minutes=2), battery_v=11.0, key_off_time=END))]


def derive_all(frames: list[bytes], **options: Any) -> tuple[list[Outgoing], TripState | None]:
    out: list[Outgoing] = []
    state: TripState | None = None
    for n, raw in enumerate(frames):
        messages, state = derive(raw, state, packet_id=f"p{n}", **(OPTIONS | options))
        out += messages
    return out, state


def test_derive_is_map_record_of_the_decoded_packet_encoded() -> None:
    out, state = derive_all(drive())
    expected: list[tuple[str, Any, bool]] = []
    mapped: TripState | None = None
    for n, packet in enumerate((basic_info(), dtg(minute=0, bodies=3), dtg(minute=1, bodies=3),
                                key_off(at=KEY_ON + timedelta(minutes=2), battery_v=11.0, key_off_time=END))):
        messages, mapped = map_record(packet, mapped, packet_id=f"p{n}", **OPTIONS)
        expected += [(m.topic, m.payload, m.retain) for m in messages]
    assert [(o.topic, json.loads(o.payload), o.retain) for o in out] == expected
    assert state == mapped
    assert [json.loads(o.payload)["ty"] for o in out if o.topic.endswith("/tre")] == [2, 2, 1, 2, 23]
    assert out[0].retain and out[0].topic == f"v1/sensors/{MODEM}/attributes"


def test_payloads_are_compact_utf8_json() -> None:
    out, _ = derive_all(drive())
    attributes = out[0].payload
    assert "서울33가1234".encode() in attributes  # UTF-8, not \\u escapes
    assert attributes.startswith(b'{"ts":1795215540000,"modem":"01012345678","vid":')
    parking = out[-2].payload
    assert parking == (b'{"ts":1795215720000,"ty":2,"pld":{"tid":1795215600,"clt":1795215720000,"lat":37.51,'
                       b'"lon":127.01,"try":2,"vlt":11.0,"tim":58},"id":"p3:1"}')


def test_the_same_bytes_and_state_give_the_same_bytes() -> None:
    assert derive_all(drive()) == derive_all(drive())


def test_a_state_stored_between_packets_changes_nothing() -> None:
    """The bridge stores the state (`to_json`) at its cursor and resumes from it."""
    frames = drive()
    straight, _ = derive_all(frames)
    resumed: list[Outgoing] = []
    state: TripState | None = None
    for n, raw in enumerate(frames):
        stored = "null" if state is None else state.to_json()
        messages, state = derive(raw, TripState.from_json(stored), packet_id=f"p{n}", **OPTIONS)
        resumed += messages
    assert resumed == straight


def test_options_reach_the_messages() -> None:
    sf2019, _ = derive_all(drive(), profile="sf2019")
    assert [json.loads(o.payload)["ty"] for o in sf2019 if o.topic.endswith("/tre")] == [10, 10, 9, 10, 104]
    quiet, _ = derive_all(drive(), battery_warning_v=0)
    assert len(quiet) == len(sf2019) - 1


def test_a_status_log_derives_nothing_and_keeps_the_state() -> None:
    state = TripState(fwv="1.0.2")
    assert derive(encode(status_log()), state, packet_id="s", **OPTIONS) == ([], state)


def test_bytes_the_framer_refuses_are_a_protocol_error() -> None:
    raw = encode(dtg(bodies=2))
    for bad in (raw[:-1], raw + b"\x00", b"\x55" + raw[1:]):
        with pytest.raises(ProtocolError):
            derive(bad, None, packet_id="x", **OPTIONS)


def test_an_unknown_profile_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="seed"):
        derive(encode(dtg(bodies=1)), None, packet_id="x", **(OPTIONS | {"profile": "nope"}))


@settings(max_examples=100, deadline=None)
@given(st.lists(packets((DtgRealtime, ObdRealtime, MdtRealtime, KeyOff)), min_size=1, max_size=4))
def test_every_payload_is_the_json_of_the_mapped_payload(records: list[Packet]) -> None:
    state: TripState | None = None
    mapped: TripState | None = None
    for n, record in enumerate(records):
        out, state = derive(encode(record), state, packet_id=f"{n:032x}", **OPTIONS)
        messages, mapped = map_record(record, mapped, packet_id=f"{n:032x}", **OPTIONS)
        assert [json.loads(o.payload) for o in out] == [m.payload for m in messages]
        for o in out:  # compact separators, UTF-8 text
            assert o.payload == json.dumps(json.loads(o.payload), ensure_ascii=False, separators=(",", ":")).encode()
        assert state == mapped
