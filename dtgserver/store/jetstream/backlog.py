"""The bridge's backlog on the stream: per partition, the packets not yet published, as JetStream counts them.

Each partition has a durable consumer, `dtg_bridge_<partition>` (headers only, acknowledged up to
a position with AckPolicy.ALL), whose acknowledgement floor the bridge that owns the partition
moves to its cursor at every save (`KvCursor`, store/jetstream/log.py). Its `num_pending` (not yet
delivered) plus `num_ack_pending` (delivered, not acknowledged) is then the number of the
partition's packets after the cursor: what the SQLite store's backlog means, counted by the
cluster, whichever bridge owns the partition, and growing while none does.

`NatsBacklog` reads the consumers of every partition about once a second, all from one listing
of the stream's consumers (a page of up to 256 per request, not a request per partition; on the
NATS thread, never on a session's path), for a server (`dtg_mqtt_backlog`, and 4 for the packets
of a partition at `--backlog-high-water`) and for `dtgserver bridge` (its `dtg_mqtt_backlog`). A
partition without its consumer has never been consumed (or its bridge is making it again on a
takeover): it counts as what was last read, 0 at first, and turns nothing away, like a SQLite
shard whose bridge has saved no cursor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from .backend import STREAM, UNAVAILABLE, NatsBackend

log = logging.getLogger("dtgserver.store.jetstream")

READ_INTERVAL_S = 1.0


def backlog_consumer(partition: int) -> str:
    return f"dtg_bridge_{partition}"


class NatsBacklog:
    """The backlog of every partition, as last read from the cluster."""

    def __init__(self, backend: NatsBackend, *, interval: float = READ_INTERVAL_S):
        self.backend = backend
        self.interval = interval
        self.partitions: dict[int, int] = {}  # the partitions whose consumer was read, and their backlog
        self.read_errors = 0
        self._failing = False

    def of(self, partition: int) -> int:
        return self.partitions.get(partition, 0)

    def total(self) -> int:
        return sum(self.partitions.values())

    def register_metrics(self, gauges: dict[str, Callable[[], float]]) -> None:
        gauges["mqtt_backlog"] = self.total

    async def _read(self) -> dict[int, int | None]:
        """Every partition's backlog (None: no consumer), from the stream's consumer list: one API
        request for up to a page of consumers (the server's limit, 256), not one per partition."""
        js = self.backend.js
        names = {backlog_consumer(p): p for p in range(self.backend.partitions)}
        found: dict[int, int | None] = dict.fromkeys(names.values())
        offset, left = 0, len(names)
        while left:
            page = await js.consumers_info(STREAM, offset or None)
            for info in page:
                partition = names.get(info.name or "")
                if partition is not None and found[partition] is None:
                    found[partition] = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
                    left -= 1
            if not page:
                break
            offset += len(page)
        return found

    async def read(self) -> None:
        """Read every partition's consumer once (nothing before the backend is set up)."""
        if not self.backend.ready:
            return
        try:
            found = await self.backend.link.call(self._read())
        except UNAVAILABLE as e:
            self.read_errors += 1
            if not self._failing:
                self._failing = True
                log.warning("cannot read the bridge's backlog from the NATS cluster (%s): keeping the last "
                            "figures until it can", e or type(e).__name__)
            return
        if self._failing:
            self._failing = False
            log.warning("the bridge's backlog can be read from the NATS cluster again")
        for partition, backlog in found.items():
            if backlog is not None:
                self.partitions[partition] = backlog

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled: read, then wait `interval`."""
        task_status.started()
        while True:
            await self.read()
            await trio.sleep(self.interval)
