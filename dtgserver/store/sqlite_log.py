"""`PacketLog` over the SQLite shards of a data dir: a packet's position is its row id.

Ids are assigned by the shard's one writer inside its write transaction, and packets are never
deleted, so ids only grow in commit order. A reader sees a packet once its transaction has
committed (WAL: readers never block the writer, nor the writer them).

Waking up: when the shard's writer runs in this process (`serve --mqtt`, a writer process), the
reader waits on the writer's commit event, which costs nothing between commits. When it is
another process (`dtgserver bridge` beside `serve`), the reader asks the shard for its last id
every `poll_s` (a primary-key lookup).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from pathlib import Path

import trio

from .log import LeftoverMessage, LoggedPacket
from .packets import PacketStore

POLL_S = 0.05  # how often a shard written by another process is asked for new packets


class SqlitePacketLog:
    """Read-only access to `DIR/store-<i>.db`, i = 0 … shards − 1 (implements `PacketLog`).

    `writers`: the `PacketStore`s this process runs, by shard, whose commits wake a waiting
    reader at once. A shard file that does not exist yet is waited for (a bridge may start first).
    """

    def __init__(self, data_dir: Path, shards: int, *, writers: Mapping[int, PacketStore] | None = None,
                 poll_s: float = POLL_S):
        if shards < 1:
            raise ValueError("a store has at least one shard")
        self.data_dir = Path(data_dir)
        self._shards = shards
        self.writers = dict(writers or {})
        self.poll_s = poll_s
        self._connections: dict[int, sqlite3.Connection] = {}
        self._locks = {shard: trio.Lock() for shard in range(shards)}

    @property
    def shards(self) -> int:
        return self._shards

    def path(self, shard: int) -> Path:
        return self.data_dir / f"store-{shard}.db"

    def close(self) -> None:
        for db in self._connections.values():
            db.close()
        self._connections.clear()

    def _connection(self, shard: int) -> sqlite3.Connection | None:
        """The shard's read connection; None while the file does not exist (opening creates nothing)."""
        db = self._connections.get(shard)
        if db is None:
            if not 0 <= shard < self._shards:
                raise ValueError(f"no shard {shard}: the store has {self._shards}")
            try:
                db = sqlite3.connect(f"file:{self.path(shard)}?mode=rw", uri=True, isolation_level=None,
                                     check_same_thread=False, timeout=10.0)
            except sqlite3.OperationalError:
                if not self.path(shard).exists():
                    return None
                raise
            db.execute("PRAGMA query_only = ON")  # this connection never writes, whatever happens
            self._connections[shard] = db
        return db

    def _read(self, shard: int, after: int, limit: int, modem: str | None) -> list[LoggedPacket]:
        db = self._connection(shard)
        if db is None:
            return []
        sql = "SELECT id, modem, received_at, digest, raw FROM packets WHERE id > ?"
        args: tuple[object, ...] = (after,)
        if modem is not None:
            sql += " AND modem = ?"
            args += (modem,)
        try:
            rows = db.execute(sql + " ORDER BY id LIMIT ?", (*args, limit)).fetchall()
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):  # the writer created the file and has not made its tables yet
                return []
            raise
        return [LoggedPacket(i, m, t, bytes(d), bytes(r)) for i, m, t, d, r in rows]

    def _last(self, shard: int) -> int:
        db = self._connection(shard)
        if db is None:
            return 0
        try:
            return int(db.execute("SELECT coalesce(max(id), 0) FROM packets").fetchone()[0])
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return 0
            raise

    async def leftover_messages(self, shard: int) -> list[LeftoverMessage]:
        """What a version before 2026-12 left in the shard's `outbox` table (read only; see
        `LeftoverMessages`). The table is left as it is: the bridge remembers, by its cursor, that it
        published them."""
        async with self._locks[shard]:
            return await trio.to_thread.run_sync(self._leftover_messages, shard)

    def _leftover_messages(self, shard: int) -> list[LeftoverMessage]:
        db = self._connection(shard)
        if db is None:
            return []
        try:
            rows = db.execute("SELECT id, modem, topic, payload, retain FROM outbox ORDER BY id").fetchall()
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):  # a data dir made by this version
                return []
            raise
        return [LeftoverMessage(i, m, t, bytes(p), bool(r)) for i, m, t, p, r in rows]

    async def read(self, shard: int, after: int, limit: int, *, modem: str | None = None) -> list[LoggedPacket]:
        writer = self.writers.get(shard)
        if writer is not None and writer.last_id <= after and modem is None:
            return []  # nothing committed beyond `after`: no need to ask the file
        async with self._locks[shard]:
            return await trio.to_thread.run_sync(self._read, shard, after, limit, modem)

    async def last(self, shard: int) -> int:
        writer = self.writers.get(shard)
        if writer is not None:
            return writer.last_id
        async with self._locks[shard]:
            return await trio.to_thread.run_sync(self._last, shard)

    async def wait(self, shard: int, after: int) -> int:
        writer = self.writers.get(shard)
        if writer is not None:
            return await writer.wait_beyond(after)
        while True:
            last = await self.last(shard)
            if last > after:
                return last
            await trio.sleep(self.poll_s)
