"""`dtgserver replay`: publish stored packets again (after a mapping fix, or for a new consumer).

A replay is the live bridge's consumer run over a range: the same reading of the log, the same
`derive` and the same encoding, so it publishes byte for byte what the live bridge published
for the same packets (same ids). Its cursor lives in memory: the live cursor does not move.
Each shard is read from its first packet with fresh trip states, so a replay is what a bridge
started on an empty store would have published; packets outside `since`/`until` only advance
the trip states (a trip that began before `since` still gets its start).
"""

from __future__ import annotations

from typing import Any

import trio

from ..store.log import LoggedPacket, PacketLog
from .consumer import BridgeOptions, Consumer
from .cursor import MemoryCursor
from .forwarder import Forwarder


async def replay(packet_log: PacketLog, url: str, *, modem: str | None = None, since: float | None = None,
                 until: float | None = None, options: BridgeOptions | None = None,
                 **forwarder_options: Any) -> int:
    """Publish the replay, shard after shard; the number of messages the broker acknowledged."""

    def in_range(packet: LoggedPacket) -> bool:
        return (since is None or packet.received_at >= since) and (until is None or packet.received_at < until)

    pairs = []  # built before any is run: bad options fail before anything is published
    for shard in range(packet_log.shards):
        end = await packet_log.last(shard)
        if end:
            consumer = Consumer(packet_log, shard, MemoryCursor(0), options, publish=in_range, modem=modem, end=end)
            pairs.append((consumer, Forwarder(consumer, url, **forwarder_options)))
    delivered = 0
    for consumer, forwarder in pairs:  # shard after shard: a terminal's packets are all in one
        async with trio.open_nursery() as nursery:
            await nursery.start(consumer.run)
            await nursery.start(forwarder.run)
            await consumer.done.wait()
            nursery.cancel_scope.cancel()
        delivered += forwarder.acknowledged
    return delivered
