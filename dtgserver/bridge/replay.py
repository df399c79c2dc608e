"""`dtgserver replay`: publish stored packets again, mapped afresh (after a mapping fix, or for a new consumer).

The messages are recomputed from the stored bytes in each terminal's order with a fresh trip
state, so a replay is exactly what a server started on an empty store would have published.
Packets before `--since` are mapped but not published: the trips they started are still known.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from ..protocol import ProtocolError, decode
from ..store import digest, read_stored
from .forwarder import Forwarder
from .mapping import TripState, map_record
from .outbox import OutboxRow


def replay_rows(data_dir: Path, *, modem: str | None = None, since: float | None = None, profile: str = "seed",
                battery_warning_v: float = 11.5) -> Iterator[OutboxRow]:
    """The rows a replay publishes, numbered from 1, in store order (each terminal's order kept)."""
    states: dict[str, TripState | None] = {}
    n = 0
    for packet in read_stored(data_dir, modem=modem):
        try:
            record = decode(packet.raw)
        except ProtocolError:
            continue
        messages, states[packet.modem] = map_record(
            record, states.get(packet.modem), packet_id=digest(packet.raw).hex(), profile=profile,
            battery_warning_v=battery_warning_v, received_ms=int(packet.received_at * 1000))
        if since is not None and packet.received_at < since:
            continue
        for message in messages:
            n += 1
            yield OutboxRow(n, packet.modem, message.topic,
                            json.dumps(message.payload, ensure_ascii=False).encode(), message.retain)


@attrs.define
class ReplayOutbox:
    """An Outbox over an iterator of rows: fetched lazily, done when all are acknowledged."""

    rows: Iterator[OutboxRow]
    buffered: list[OutboxRow] = attrs.field(factory=list)
    exhausted: bool = False
    delivered: int = 0
    outstanding: set[int] = attrs.field(factory=set)
    done: trio.Event = attrs.field(factory=trio.Event)

    async def fetch(self, after_id: int, limit: int) -> list[OutboxRow]:
        out = [row for row in self.buffered if row.id > after_id][:limit]
        while len(out) < limit and not self.exhausted:
            row = next(self.rows, None)
            if row is None:
                self.exhausted = True
                break
            self.buffered.append(row)
            self.outstanding.add(row.id)
            out.append(row)
        self._check_done()
        if not out:
            await trio.sleep_forever()
        return out

    async def mark_delivered(self, ids: Sequence[int]) -> None:
        for i in ids:
            if i in self.outstanding:
                self.outstanding.discard(i)
                self.delivered += 1
        self.buffered = [row for row in self.buffered if row.id in self.outstanding]
        self._check_done()

    def backlog(self) -> int:
        return len(self.outstanding)

    def _check_done(self) -> None:
        if self.exhausted and not self.outstanding:
            self.done.set()


async def replay(data_dir: Path, url: str, *, modem: str | None = None, since: float | None = None,
                 profile: str = "seed", battery_warning_v: float = 11.5, **forwarder_options: Any) -> int:
    """Publish the replay and return the number of messages acknowledged by the broker."""
    outbox = ReplayOutbox(replay_rows(data_dir, modem=modem, since=since, profile=profile,
                                      battery_warning_v=battery_warning_v))
    forwarder = Forwarder(outbox, url, **forwarder_options)
    async with trio.open_nursery() as nursery:
        await nursery.start(forwarder.run)
        await outbox.done.wait()
        nursery.cancel_scope.cancel()
    return outbox.delivered
