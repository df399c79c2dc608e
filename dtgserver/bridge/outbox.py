"""What the forwarder publishes from: the consumer's messages, and where it reports the broker's acks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import attrs


@attrs.frozen
class OutboxRow:
    """One message waiting for its PUBACK: `topic` is without the configured prefix."""

    id: int
    modem: str
    topic: str
    payload: bytes
    retain: bool = False


class Outbox(Protocol):
    """Implemented by the consumer (bridge/consumer.py); ids grow in the shard's order, so id order is
    each terminal's order. Ids are the consumer's own, valid while it runs."""

    async def fetch(self, after_id: int, limit: int) -> list[OutboxRow]:
        """Rows with id > after_id in id order; waits until there is at least one.

        Cancel-safe: a cancelled fetch has taken nothing (the rows are fetched again later).
        """
        ...

    async def mark_delivered(self, ids: Sequence[int]) -> None:
        """The broker acknowledged these rows (QoS 1 PUBACK): never publish them again."""
        ...

    def backlog(self) -> int:
        """How much is not yet delivered (cheap: read by the metrics endpoint)."""
        ...
