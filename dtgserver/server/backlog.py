"""The backlog of a bridge in another process (`serve --external-bridge` beside `dtgserver bridge`).

About once a second, in a thread (never on a session's path), the server reads the cursor each
of its shards' bridge saved in `DIR/bridge-<shard>.db` (read-only). Backlog = the shard's last
packet id − that cursor. While it is at `--backlog-high-water`, new packets are answered 4, as
with `--mqtt` in process. A shard whose bridge has saved no cursor yet counts all its packets as
backlog but turns nothing away: a bridge's first start begins after the last packet, so none of
them waits for it. A cursor file that cannot be read (locked past 1 s, damaged, unreadable) keeps
the last value read; it is logged once until a read succeeds again and counted in
`dtg_bridge_cursor_read_errors_total`.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import trio

from ..bridge.cursor import read_position
from ..store.packets import PacketStore

log = logging.getLogger("dtgserver.server")

READ_INTERVAL_S = 1.0


class ExternalBacklog:
    """The saved cursors of the bridge that consumes `stores` from another process."""

    def __init__(self, data_dir: Path, stores: Mapping[int, PacketStore], high_water: int,
                 interval: float = READ_INTERVAL_S):
        self.data_dir = Path(data_dir)
        self.stores = stores
        self.interval = interval
        self.cursors: dict[int, int | None] = {shard: None for shard in stores}  # None: no cursor saved yet
        self.read_errors = 0
        self._failing: set[int] = set()
        for shard, store in stores.items():
            store.consumer_lag = partial(self._lag_for_answers, shard)
            store.consumer_high_water = high_water

    def backlog(self, shard: int) -> int:
        """Committed packets of `shard` after its bridge's saved cursor (all of them before the first)."""
        return max(0, self.stores[shard].last_id - (self.cursors[shard] or 0))

    def total(self) -> int:
        return sum(self.backlog(shard) for shard in self.stores)

    def _lag_for_answers(self, shard: int) -> int:
        return 0 if self.cursors[shard] is None else self.backlog(shard)

    def register_metrics(self, gauges: dict[str, Callable[[], float]]) -> None:
        gauges["mqtt_backlog"] = self.total
        gauges["bridge_cursor_read_errors_total"] = lambda: self.read_errors

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled: read every shard's cursor, then wait `interval`."""
        await self.read_all()
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            await self.read_all()

    async def read_all(self) -> None:
        for shard in self.stores:
            try:
                position = await trio.to_thread.run_sync(read_position, self.data_dir, shard)
            except (sqlite3.Error, OSError) as e:
                self.read_errors += 1
                if shard not in self._failing:
                    self._failing.add(shard)
                    log.warning("cannot read the bridge's cursor of shard %d in %s (%s): keeping %s until it "
                                "can be read", shard, self.data_dir, e, self.cursors[shard])
                continue
            if shard in self._failing:
                self._failing.discard(shard)
                log.warning("the bridge's cursor of shard %d can be read again: %s", shard, position)
            self.cursors[shard] = position
