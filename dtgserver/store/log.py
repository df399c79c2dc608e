"""The store's read interface for consumers: each shard's packets, in commit order.

A consumer (the MQTT bridge, a replay) reads a shard the way it would read a log: the packets
after a position it remembers, in position order, a batch at a time, waiting when it has read
everything. Positions are integers that only grow in commit order within a shard; a terminal's
packets all live in one shard, so position order is each terminal's order.

This module is the whole contract: it imports nothing of the store's and nothing of SQLite, so
a consumer depends on it alone and works over any store that implements `PacketLog` (the SQLite
shards, `dtgserver.store.sqlite_log`; a replicated log later).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import attrs


@attrs.frozen(slots=True)
class LoggedPacket:
    """One stored packet as a consumer sees it."""

    position: int  # grows in commit order within the shard
    modem: str
    received_at: float  # Unix seconds, the server's clock when the packet arrived
    digest: bytes  # sha256(raw)[:16]: the packet's stable identity (a resend is the same packet)
    raw: bytes  # the exact bytes the terminal sent: decode with dtgserver.protocol


class PacketLog(Protocol):
    """Read access to a store's shards. Reads never change what is stored."""

    @property
    def shards(self) -> int:
        """How many shards the store has (shard numbers are 0 … shards − 1)."""
        ...

    async def read(self, shard: int, after: int, limit: int, *, modem: str | None = None) -> list[LoggedPacket]:
        """Up to `limit` packets of `shard` with position > `after`, in position order; `modem`: only
        that terminal's. Returns at once, empty when there are none yet (`wait` waits for them)."""
        ...

    async def wait(self, shard: int, after: int) -> int:
        """Wait until `shard` holds a packet with position > `after`; returns the shard's last position."""
        ...

    async def last(self, shard: int) -> int:
        """The position of the shard's newest packet; 0 when it has none."""
        ...


@attrs.frozen(slots=True)
class LeftoverMessage:
    """A message that a version before 2026-12 had queued in a shard's `outbox` table (it built the
    messages inside the commit then) and the broker had not yet acknowledged when it stopped."""

    id: int  # grows in the order the old version would have published them
    modem: str
    topic: str  # without the configured prefix
    payload: bytes
    retain: bool


@runtime_checkable
class LeftoverMessages(Protocol):
    """Implemented by a store that may hold such messages (the SQLite shards)."""

    async def leftover_messages(self, shard: int) -> list[LeftoverMessage]:
        """The shard's leftover messages in id order; empty when it has none (or no such table)."""
        ...
