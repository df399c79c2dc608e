"""The MQTT bridge: stored packets → Smart[Fleet] messages → a broker.

The bridge is a consumer of the store's packet log (`dtgserver.store.log.PacketLog`): per
shard it reads the committed packets in order (`consumer`), derives each one's messages from its
bytes and the terminal's trip state (`derive`: `trips`, `messages`), publishes them with QoS 1
(`forwarder`) and saves its cursor once the broker has acknowledged them (`cursor`). A
terminal's answer never waits for any of it.
"""

from .messages import Message, map_record
from .messages import encode as encode_payload
from .outbox import Outbox, OutboxRow
from .profiles import PROFILES, Profile
from .trips import TripState

__all__ = ["PROFILES", "Message", "Outbox", "OutboxRow", "Profile", "TripState", "encode_payload", "map_record"]
