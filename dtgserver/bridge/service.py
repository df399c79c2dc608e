"""The bridge as it runs: per shard, a consumer of the packet log and a forwarder to the broker.

The same code runs inside `serve --mqtt` (the shards this process writes, their commits waking
the consumers at once), inside each writer process of `serve --writer-process`, and as its own
process, `dtgserver bridge`, beside a `serve` that writes the data dir.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from pathlib import Path

import attrs
import trio

from ..store.log import LeftoverMessage, LeftoverMessages, PacketLog
from .consumer import BridgeOptions, Consumer
from .cursor import CursorStore
from .forwarder import Forwarder
from .leftovers import publish_leftovers
from .outbox import Outbox

log = logging.getLogger("dtgserver.bridge")

READY_WAIT_S = 5.0  # at start, how long the bridge waits for its consumers to know where they stand


@attrs.frozen
class MqttOptions:
    """Where to publish: `mqtt://[user:pass@]host[:port]` or `mqtts://…`."""

    url: str
    tls_ca: Path | None = None
    topic_prefix: str = ""
    client_id: str | None = None  # default dtgserver-<hostname>; with several shards, -shard<i> is added


class Bridge:
    """Consumers and forwarders for `shards` of `packet_log`. Bad MQTT options raise ValueError here.

    `start_at`: per shard, where a first start begins (see `Consumer`).
    """

    def __init__(self, packet_log: PacketLog, shards: Iterable[int], cursor: Callable[[int], CursorStore],
                 mqtt: MqttOptions, options: BridgeOptions | None = None,
                 start_at: Mapping[int, int] | None = None):
        self.log = packet_log
        self.options = options or BridgeOptions()
        self.cursor = cursor
        self.consumers: dict[int, Consumer] = {}
        self.forwarders: dict[int, Forwarder] = {}
        self._forwarder_of: dict[int, Callable[[Outbox], Forwarder]] = {}
        self.leftovers_published = 0  # messages an earlier version had queued, published on a first start
        for shard in shards:
            client_id = mqtt.client_id
            if packet_log.shards > 1:  # one MQTT session per shard: a broker drops the older of two equal ids
                client_id = f"{client_id or 'dtgserver-' + socket.gethostname()}-shard{shard}"
            consumer = Consumer(packet_log, shard, _opener(cursor, shard), self.options,
                                start_at=(start_at or {}).get(shard))
            self.consumers[shard] = consumer
            self._forwarder_of[shard] = partial(Forwarder, url=mqtt.url, tls_ca=mqtt.tls_ca,
                                                topic_prefix=mqtt.topic_prefix, client_id=client_id)
            self.forwarders[shard] = self._forwarder_of[shard](consumer)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled; then each consumer saves how far its broker acknowledged."""
        async with trio.open_nursery() as nursery:
            for shard in self.consumers:
                await nursery.start(self._run_shard, shard)
            # Until a consumer has opened its cursor it cannot say its backlog (it reports 0), so the
            # high-water mark would not hold for the first answers: wait for that, but not for long
            # (a cursor that cannot be opened yet, a standby, leftovers to publish first).
            with trio.move_on_after(READY_WAIT_S):
                for consumer in self.consumers.values():
                    await consumer.ready.wait()
            task_status.started()

    async def _run_shard(self, shard: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """A shard's consumer and forwarder; on its first start, after the leftovers (bridge/leftovers.py)."""
        leftovers: list[LeftoverMessage] | None = []
        if isinstance(self.log, LeftoverMessages):
            try:  # one quick look (a local file) before the server takes connections; retried below if it fails
                leftovers = await self._leftovers(shard)
            except Exception:
                leftovers = None
        task_status.started()
        if leftovers is None:
            leftovers = await self._leftovers_retried(shard)
        if leftovers:
            log.info("shard %d: publishing %d messages an earlier version had queued", shard, len(leftovers))
            await publish_leftovers(leftovers, self._forwarder_of[shard])
            self.leftovers_published += len(leftovers)
            log.info("shard %d: the earlier version's messages are acknowledged", shard)
        async with trio.open_nursery() as nursery:
            await nursery.start(self.consumers[shard].run)
            await nursery.start(self.forwarders[shard].run)

    async def _leftovers(self, shard: int) -> list[LeftoverMessage]:
        """On a first start (no saved cursor), the leftovers to publish. The consumer's first position
        is then fixed before they go out (not after the time they take)."""
        assert isinstance(self.log, LeftoverMessages)
        consumer = self.consumers[shard]
        try:
            if await trio.to_thread.run_sync(self._cursor_saved, shard):
                return []
        except Exception as e:
            if type(e).__name__ == "CursorBusy":  # another bridge has the shard: the leftovers are its
                return []
            raise
        leftovers = await self.log.leftover_messages(shard)
        if leftovers and consumer.start_at is None:
            consumer.start_at = await self.log.last(shard)
        return leftovers

    async def _leftovers_retried(self, shard: int) -> list[LeftoverMessage]:
        delay = self.options.backoff_initial_s
        while True:
            try:
                return await self._leftovers(shard)
            except Exception as e:
                log.error("shard %d: reading an earlier version's queued messages failed: %s; retrying in %.1f s",
                          shard, e, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, self.options.backoff_max_s)

    def _cursor_saved(self, shard: int) -> bool:
        store = self.cursor(shard)
        try:
            return store.load() is not None
        finally:
            store.close()

    # -- figures for the metrics endpoint ---------------------------------------------------------
    def total(self, name: str) -> float:
        return float(sum(getattr(c.stats, name) for c in self.consumers.values()))

    def forwarded(self, name: str) -> float:
        return float(sum(getattr(f, name) for f in self.forwarders.values()))

    def backlog(self) -> int:
        return sum(c.backlog() for c in self.consumers.values())

    def lag_quantile(self, q: float) -> float:
        return max((c.stats.lag_quantile(q) for c in self.consumers.values()), default=0.0)

    def connected(self) -> bool:
        return all(f.connected for f in self.forwarders.values())

    def trip_states(self) -> int:
        return sum(c.cached_states for c in self.consumers.values())

    def register_metrics(self, gauges: dict[str, Callable[[], float]]) -> None:
        """The bridge's figures, read when the metrics endpoint is scraped (names without `dtg_`)."""
        gauges["mqtt_backlog"] = self.backlog
        for name in ("published", "acknowledged", "reconnects"):
            gauges[f"mqtt_{name}_total"] = partial(self.forwarded, name)
        gauges["mqtt_connected"] = lambda: float(self.connected())
        for name in ("derived_packets", "derive_errors", "read_errors", "cursor_saves", "cursor_errors",
                     "resends_dropped"):
            gauges[f"bridge_{name}_total"] = partial(self.total, name)
        gauges["bridge_lag_p50_seconds"] = partial(self.lag_quantile, 0.5)
        gauges["bridge_lag_p99_seconds"] = partial(self.lag_quantile, 0.99)
        gauges["bridge_trip_states"] = self.trip_states
        gauges["bridge_leftovers_published_total"] = lambda: float(self.leftovers_published)


def _opener(cursor: Callable[[int], CursorStore], shard: int) -> Callable[[], CursorStore]:
    return lambda: cursor(shard)
