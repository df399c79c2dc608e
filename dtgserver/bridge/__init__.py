"""The MQTT bridge: stored packets → Smart[Fleet] messages (mapping) → a broker (forwarder).

`map_record` is pure and runs inside the store's commit; the `Forwarder` publishes what the
store's outbox holds, so a terminal's answer never waits for the broker.
"""

from .mapping import Message, TripState, encode_payload, map_record
from .outbox import Outbox, OutboxRow
from .profiles import PROFILES, Profile

__all__ = ["PROFILES", "Message", "Outbox", "OutboxRow", "Profile", "TripState", "encode_payload", "map_record"]
