"""Where the record → message mapping used to live: now `trips` (trip state) and `messages`
(message building, JSON). These names stay importable from here for the callers being moved to
`derive` (the store's commit, the replay); new code imports from the modules themselves."""

from __future__ import annotations

from .messages import MAX_PAYLOAD_BYTES, Message, map_record
from .messages import encode as encode_payload
from .trips import TripState, next_state

__all__ = ["MAX_PAYLOAD_BYTES", "Message", "TripState", "encode_payload", "map_record", "next_state"]
