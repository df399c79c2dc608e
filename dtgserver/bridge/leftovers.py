"""Messages an earlier version queued and never had acknowledged: published once, before the consumer starts.

Versions before 2026-12 built each packet's messages inside the commit and kept them in an
`outbox` table of the shard until the broker acknowledged them. A data dir upgraded while some
were still waiting holds messages for packets that the new bridge, starting after the shard's
last packet, will never derive again. So on a shard's first start (no saved cursor), the bridge
first publishes those leftovers, in their order, each until its PUBACK, through a forwarder of
its own; only then does the consumer open its cursor and save its first position. A stop before
that leaves no cursor, so the next start publishes the leftovers again (QoS 1 duplicates, never
a loss); once the cursor is saved they are never published again. The table is left as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import trio

from ..store.log import LeftoverMessage
from .forwarder import Forwarder
from .outbox import Outbox, OutboxRow


class LeftoverOutbox:
    """The leftovers as an `Outbox` for a forwarder; `done` is set once every one is acknowledged."""

    def __init__(self, messages: Sequence[LeftoverMessage]):
        self.rows = [OutboxRow(n, m.modem, m.topic, m.payload, m.retain) for n, m in enumerate(messages, start=1)]
        self._waiting = {row.id for row in self.rows}
        self.done = trio.Event()
        if not self._waiting:
            self.done.set()

    async def fetch(self, after_id: int, limit: int) -> list[OutboxRow]:
        rows = [row for row in self.rows if row.id > after_id][:limit]
        if not rows:
            await trio.sleep_forever()  # all handed out: the forwarder is cancelled once they are acknowledged
        return rows

    async def mark_delivered(self, ids: Sequence[int]) -> None:
        self._waiting.difference_update(ids)
        if not self._waiting:
            self.done.set()

    def backlog(self) -> int:
        return len(self._waiting)


async def publish_leftovers(messages: Sequence[LeftoverMessage],
                            forwarder: Callable[[Outbox], Forwarder]) -> None:
    """Publish `messages` through `forwarder(outbox)` (a `Forwarder`) until all are acknowledged."""
    outbox = LeftoverOutbox(messages)
    if outbox.done.is_set():
        return
    running = forwarder(outbox)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(running.run)
        await outbox.done.wait()
        nursery.cancel_scope.cancel()
