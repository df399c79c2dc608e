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

from ..store.log import PacketLog
from .consumer import BridgeOptions, Consumer
from .cursor import CursorStore
from .forwarder import Forwarder

log = logging.getLogger("dtgserver.bridge")


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
        self.consumers: dict[int, Consumer] = {}
        self.forwarders: dict[int, Forwarder] = {}
        for shard in shards:
            client_id = mqtt.client_id
            if packet_log.shards > 1:  # one MQTT session per shard: a broker drops the older of two equal ids
                client_id = f"{client_id or 'dtgserver-' + socket.gethostname()}-shard{shard}"
            consumer = Consumer(packet_log, shard, _opener(cursor, shard), self.options,
                                start_at=(start_at or {}).get(shard))
            self.consumers[shard] = consumer
            self.forwarders[shard] = Forwarder(consumer, mqtt.url, tls_ca=mqtt.tls_ca, topic_prefix=mqtt.topic_prefix,
                                               client_id=client_id)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled; then each consumer saves how far its broker acknowledged."""
        async with trio.open_nursery() as nursery:
            for shard, consumer in self.consumers.items():
                await nursery.start(consumer.run)
                await nursery.start(self.forwarders[shard].run)
            task_status.started()

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
        for name in ("derived_packets", "derive_errors", "read_errors", "cursor_saves", "cursor_errors"):
            gauges[f"bridge_{name}_total"] = partial(self.total, name)
        gauges["bridge_lag_p50_seconds"] = partial(self.lag_quantile, 0.5)
        gauges["bridge_lag_p99_seconds"] = partial(self.lag_quantile, 0.99)
        gauges["bridge_trip_states"] = self.trip_states


def _opener(cursor: Callable[[int], CursorStore], shard: int) -> Callable[[], CursorStore]:
    return lambda: cursor(shard)
