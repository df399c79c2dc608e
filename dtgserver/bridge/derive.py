"""One stored packet's bytes and its terminal's trip state → the messages to publish, encoded.

`derive` is the one function that live forwarding and `dtgserver replay` both call, so the two
publish the same bytes by construction: a pure function (no I/O, no clock) of the packet exactly
as stored, the terminal's `TripState` before it, and the options. The state it returns is the one
the terminal's next packet is derived with.
"""

from __future__ import annotations

import attrs

from .driving import DrivingConfig
from .messages import build, encode
from .trips import DEFAULT_DRIVING, DEFAULT_TRIP_DEADLINE_MS, TripState

__all__ = ["Outgoing", "TripState", "derive"]


@attrs.frozen
class Outgoing:
    """One message ready to publish: `topic` without the configured prefix, `payload` the JSON bytes."""

    topic: str
    payload: bytes
    retain: bool


def derive(raw: bytes, state: TripState | None, *, packet_id: str, received_ms: int, profile: str,
           battery_warning_v: float, driving: DrivingConfig = DEFAULT_DRIVING,
           trip_deadline_ms: int = DEFAULT_TRIP_DEADLINE_MS) -> tuple[list[Outgoing], TripState | None]:
    """The messages of one stored packet in publish order, and the terminal's next trip state.

    `raw` is one whole packet as the framer accepted it (the store's `raw`); bytes the framer
    would refuse raise ProtocolError. `packet_id` is the store's stable id of the packet (every
    message's `id` is `<packet_id>:<n>`); `received_ms` its receive time, used only where the
    packet carries no time of its own (basic info's `ts`); `profile` names a message profile
    (ValueError for an unknown one); `battery_warning_v` 0 disables Battery Warning events;
    `driving` says which dangerous-driving criteria apply to which terminal; `trip_deadline_ms`
    how long after its KEY OFF a trip whose last bodies have not come goes out partial.
    """
    messages, state = build(raw, state, packet_id=packet_id, profile=profile, battery_warning_v=battery_warning_v,
                            received_ms=received_ms, driving=driving, trip_deadline_ms=trip_deadline_ms)
    return [Outgoing(m.topic, encode(m.payload), m.retain) for m in messages], state
