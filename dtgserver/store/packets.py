"""The durable packet store: one SQLite shard (WAL, synchronous=FULL) and its group-commit writer.

An answer of 0 is sent only after the transaction holding the packet has committed, so a
terminal's data is on disk before the terminal is told so. Sessions hand packets to one writer
task, which commits whatever has queued up in one transaction: the fsync is shared by every
session waiting at that moment. A byte-identical resend finds its digest already stored and is
answered 0 without a second row.

The store keeps packets and nothing derived from them: the MQTT bridge reads the committed
packets through `dtgserver.store.log.PacketLog` (`sqlite_log.SqlitePacketLog`) and keeps its own
cursor and trip states in its own files. Data dirs written by older versions also hold the
tables `trip_state` and `outbox` in each shard; nothing reads or writes them any more.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from ..protocol import Received, Result, StatusLog
from .control import BUSY_TIMEOUT_S, connect
from .logfiles import write_status_log

log = logging.getLogger("dtgserver.store")

PACKET_SCHEMA = """
CREATE TABLE IF NOT EXISTS packets (
    id INTEGER PRIMARY KEY,
    digest BLOB NOT NULL UNIQUE,          -- sha256(raw)[:16]: an identical resend is the same packet
    modem TEXT NOT NULL,
    kind TEXT NOT NULL,
    protocol_id INTEGER NOT NULL,
    body_count INTEGER NOT NULL,
    received_at REAL NOT NULL,            -- Unix seconds, server clock
    peer TEXT NOT NULL,
    raw BLOB NOT NULL                     -- the exact bytes: decode again with dtgserver.protocol.decode
);
CREATE INDEX IF NOT EXISTS packets_by_modem ON packets(modem, id);
CREATE INDEX IF NOT EXISTS packets_by_time ON packets(received_at);
"""

DIGEST_SIZE = 16
_STAGE_CHUNK = 32  # packets staged between two turns of the event loop


class ShardCountMismatch(Exception):
    """DIR was written with another number of shards; moving terminals between shards is not supported."""


def shard_of(modem: str, shards: int) -> int:
    """The one shard a terminal's packets live in (and so the bridge's trip state of it), whichever worker
    accepted it.

    A stable hash (not Python's salted `hash`): every worker process and every restart agrees.
    """
    return zlib.crc32(modem.encode("ascii", "replace")) % shards if shards > 1 else 0


@attrs.define
class Pending:
    received: Received
    peer: str
    received_at: float
    done: trio.Event = attrs.field(factory=trio.Event)
    result: Result = Result.OVERLOADED


class QueuedSubmit:
    """`submit` for a store that queues packets with `enqueue` and sets each one's `done` once it
    is durable (or refused): the SQLite shard and the JetStream stream alike."""

    def enqueue(self, received: Received, peer: str, received_at: float | None = None) -> Pending | None:
        raise NotImplementedError

    async def submit(self, received: Received, peer: str) -> Result:
        """Store one packet; returns OK only once it is durable, OVERLOADED when it was not stored."""
        item = self.enqueue(received, peer)
        if item is None:
            return Result.OVERLOADED
        await item.done.wait()
        return item.result


@attrs.define
class _Staged:
    """What a batch's chunks staged so far in its transaction."""

    results: list[str | None] = attrs.field(factory=list)  # "new", "duplicate" per packet
    last_id: int = 0  # the highest packet id the batch inserted
    logs: list[StatusLog] = attrs.field(factory=list)  # status logs to write before COMMIT


@attrs.frozen
class StoredPacket:
    id: int
    modem: str
    kind: str
    received_at: float
    peer: str
    raw: bytes


@attrs.define
class StoreStats:
    """Counters the metrics endpoint reads."""

    commits: int = 0
    committed_packets: int = 0
    duplicates: int = 0
    failed_commits: int = 0
    last_batch_size: int = 0
    batch_size_sum: int = 0
    commit_seconds_sum: float = 0.0
    last_commit_seconds: float = 0.0


def digest(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()[:DIGEST_SIZE]


class PacketStore(QueuedSubmit):
    """One shard: `DIR/store-<shard>.db`, with the status log files under `DIR/logs/`.

    Start `run()` in a nursery (the writer task), then `await submit(...)` from sessions.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        shard: int = 0,
        max_batch: int = 512,
        queue_high_water: int = 2048,
    ):
        """The shard's only writer (`serve --workers N` relays each packet to the one worker of its
        terminal's shard, server/relay.py)."""
        self.data_dir = Path(data_dir)
        self.shard = shard
        self.path = self.data_dir / f"store-{shard}.db"
        self.max_batch = max_batch
        self.queue_high_water = queue_high_water
        # Set by whoever runs a consumer that must keep up (the MQTT bridge): how many committed
        # packets it has yet to take, and the count at which new packets are answered 4.
        self.consumer_lag: Callable[[], int] | None = None
        self.consumer_high_water: int | None = None
        self.stats = StoreStats()
        self.db = connect(self.path)
        self.db.executescript(PACKET_SCHEMA)
        self.db.execute("PRAGMA busy_timeout = 0")  # _begin: try at once, wait in a thread only if busy
        self._reader = connect(self.path)  # export and tests
        self._pending: list[Pending] = []
        self._wake = trio.Event()
        self._committed = trio.Event()  # set (and replaced) by every commit that added packets
        self.last_id: int = self.db.execute("SELECT coalesce(max(id), 0) FROM packets").fetchone()[0]
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.db.close()
            self._reader.close()

    # -- the session side ---------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self._pending)

    def overloaded(self) -> str | None:
        """Why new packets must be answered 4 right now, or None."""
        if len(self._pending) >= self.queue_high_water:
            return f"commit queue at {len(self._pending)}"
        if self.consumer_lag is not None and self.consumer_high_water is not None:
            lag = self.consumer_lag()
            if lag >= self.consumer_high_water:
                return f"MQTT backlog at {lag} packets"
        return None

    def enqueue(self, received: Received, peer: str, received_at: float | None = None) -> Pending | None:
        """Queue one packet for the next commit without waiting for it; None when it must be
        answered 4 now. Its `done` is set once the commit ended, its `result` then says how."""
        if self.overloaded():
            return None
        item = Pending(received, peer, time.time() if received_at is None else received_at)
        self._pending.append(item)
        self._wake.set()
        return item

    # -- consumers in this process (dtgserver.store.sqlite_log) --------------------------------
    async def wait_beyond(self, position: int) -> int:
        """Until a packet with id > position is committed; the last id then."""
        while self.last_id <= position:
            await self._committed.wait()
        return self.last_id

    # -- the writer ----------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """This process's writer: commits batches until cancelled, then commits what is still queued."""
        task_status.started()
        try:
            while True:
                await self._wake.wait()
                await self._commit_pending()
        finally:
            with trio.CancelScope(shield=True):
                while self._pending:
                    await self._commit_pending()

    async def _commit_pending(self) -> None:
        self._wake = trio.Event()
        while self._pending:
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            started = time.perf_counter()
            # Not abandoned on cancel: a commit that began finishes, and its sessions learn of it.
            with trio.CancelScope(shield=True):
                results, last_id = await self._write_batch(batch)
            elapsed = time.perf_counter() - started
            if results[0] is not None:
                if last_id > self.last_id:
                    self.last_id = last_id
                    self._committed.set()
                    self._committed = trio.Event()
                self.stats.commits += 1
                self.stats.committed_packets += sum(1 for r in results if r == "new")
                self.stats.duplicates += sum(1 for r in results if r == "duplicate")
                self.stats.last_batch_size = len(batch)
                self.stats.batch_size_sum += len(batch)
                self.stats.commit_seconds_sum += elapsed
                self.stats.last_commit_seconds = elapsed
            else:
                self.stats.failed_commits += 1
            for item, outcome in zip(batch, results, strict=True):
                item.result = Result.OVERLOADED if outcome is None else Result.OK
                item.done.set()

    async def _write_batch(self, batch: Sequence[Pending]) -> tuple[list[str | None], int]:
        """One transaction for the whole batch; all or nothing. Returns each packet's outcome
        ("new", "duplicate", or None for all when the commit failed) and the highest id inserted.

        Only what may block goes to a worker thread: the durable end (status log files written
        and fsynced, then COMMIT and its fsync), and BEGIN IMMEDIATE when the write lock is busy
        (`_begin`). The statements in between run here, on the event
        loop's thread, in chunks between which sessions run: done in the worker thread, each of
        the thousands of sqlite3 steps gives up the GIL and must win it back from the busy event
        loop, and commits took tens of milliseconds of waiting for the GIL (docs/performance.md).

        """
        rows = [(digest(item.received.raw), item.received.modem, item.received.kind, item.received.protocol_id,
                 item.received.body_count, item.received_at, item.peer, item.received.raw) for item in batch]
        db = self.db
        try:
            await self._begin()
        except (sqlite3.Error, OSError) as e:
            return self._failed(batch, e)
        staged = _Staged()
        try:
            for start in range(0, len(batch), _STAGE_CHUNK):
                if start:
                    await trio.lowlevel.checkpoint()  # let sessions run between chunks
                self._write_rows(db, batch[start:start + _STAGE_CHUNK], rows[start:start + _STAGE_CHUNK], staged)
            await trio.to_thread.run_sync(self._finish, staged.logs)
        except BaseException as e:
            self._rollback()
            if not isinstance(e, (sqlite3.Error, OSError, ValueError)):
                raise
            return self._failed(batch, e)
        return staged.results, staged.last_id

    async def _begin(self) -> None:
        """BEGIN IMMEDIATE: on the event loop's thread when the write lock is free, which it is
        unless another process holds it (this is the shard's only writer); else in a thread that
        waits for it. A thread's round trip costs more CPU than the BEGIN."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as e:
            if e.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                raise
        await trio.to_thread.run_sync(self._begin_waiting)

    def _begin_waiting(self) -> None:
        self.db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        try:
            self.db.execute("BEGIN IMMEDIATE")
        finally:
            self.db.execute("PRAGMA busy_timeout = 0")

    def _rollback(self) -> None:
        try:
            self.db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # a failed COMMIT may have ended the transaction already

    @staticmethod
    def _failed(batch: Sequence[Pending], error: BaseException) -> tuple[list[str | None], int]:
        log.error("commit of %d packets failed, answering 4: %s", len(batch), error)
        return [None] * len(batch), 0

    def _finish(self, logs: Sequence[StatusLog]) -> None:
        """In a worker thread: the status logs durable on disk, then COMMIT."""
        for record in logs:
            write_status_log(self.data_dir, record)
        self.db.execute("COMMIT")

    @staticmethod
    def _write_rows(db: sqlite3.Connection, batch: Sequence[Pending], rows: list[tuple[Any, ...]],
                    staged: _Staged) -> None:
        """One chunk of the batch, inside its transaction: a fixed number of statements per chunk."""
        # Holding the write lock, and packets are never deleted: what this INSERT adds gets ids
        # above the largest id now. A digest not among them was stored before: a resend.
        last_id = db.execute("SELECT coalesce(max(id), 0) FROM packets").fetchone()[0]
        db.executemany(
            "INSERT OR IGNORE INTO packets(digest, modem, kind, protocol_id, body_count, received_at, peer, raw) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        inserted = dict(db.execute("SELECT digest, id FROM packets WHERE id > ?", (last_id,)).fetchall())
        if inserted:
            staged.last_id = max(staged.last_id, *inserted.values())
        for item, row in zip(batch, rows, strict=True):
            # popped: the same packet twice in one batch is one row
            if inserted.pop(row[0], None) is None:
                staged.results.append("duplicate")
                continue
            staged.results.append("new")
            if item.received.kind == StatusLog.KIND:
                record = item.received.record
                assert isinstance(record, StatusLog)
                staged.logs.append(record)

    # -- reading -------------------------------------------------------------------------------
    def packets(self, *, modem: str | None = None, since: float | None = None, until: float | None = None,
                after_id: int = 0) -> Iterator[StoredPacket]:
        """Stored packets in arrival order, filtered; reads through its own connection."""
        where, args = ["id > ?"], [after_id]
        if modem is not None:
            where.append("modem = ?")
            args.append(modem)  # type: ignore[arg-type]
        if since is not None:
            where.append("received_at >= ?")
            args.append(since)  # type: ignore[arg-type]
        if until is not None:
            where.append("received_at < ?")
            args.append(until)  # type: ignore[arg-type]
        sql = f"SELECT id, modem, kind, received_at, peer, raw FROM packets WHERE {' AND '.join(where)} ORDER BY id"
        for row in self._reader.execute(sql, args):
            yield StoredPacket(row[0], row[1], row[2], row[3], row[4], bytes(row[5]))

    def count(self) -> int:
        return int(self._reader.execute("SELECT count(*) FROM packets").fetchone()[0])


def shard_paths(data_dir: Path) -> list[Path]:
    """DIR's packet shards in shard order: store-<digits>.db only (a store-old.db is not one of ours)."""
    shards = [p for p in Path(data_dir).glob("store-*.db") if p.stem[6:].isascii() and p.stem[6:].isdigit()]
    return sorted(shards, key=lambda p: int(p.stem[6:]))


def read_stored(data_dir: Path, *, modem: str | None = None, since: float | None = None,
                until: float | None = None) -> Iterator[StoredPacket]:
    """Every stored packet of every shard, read-only, merged in receive-time order."""
    import heapq

    iterators, connections = [], []
    for path in shard_paths(data_dir):
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        connections.append(db)
        where, args = ["1"], []
        for clause, value in (("modem = ?", modem), ("received_at >= ?", since), ("received_at < ?", until)):
            if value is not None:
                where.append(clause)
                args.append(value)
        rows = db.execute(f"SELECT id, modem, kind, received_at, peer, raw FROM packets WHERE {' AND '.join(where)} "
                          "ORDER BY received_at, id", args)
        iterators.append(StoredPacket(r[0], r[1], r[2], r[3], r[4], bytes(r[5])) for r in rows)
    try:
        yield from heapq.merge(*iterators, key=lambda p: (p.received_at, p.id))
    finally:
        for db in connections:
            db.close()
