"""The durable packet store: one SQLite shard (WAL, synchronous=FULL) and its group-commit writer.

An answer of 0 is sent only after the transaction holding the packet has committed, so a
terminal's data is on disk before the terminal is told so. Sessions hand packets to one writer
task, which commits whatever has queued up in one transaction: the fsync is shared by every
session waiting at that moment. A byte-identical resend finds its digest already stored and is
answered 0 without a second row. Trip state and the MQTT outbox are written in the same
transaction as the packet, so neither can get ahead of or behind the data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from ..bridge.mapping import next_state
from ..bridge.outbox import OutboxRow
from ..protocol import Received, Result, StatusLog, decode
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
CREATE TABLE IF NOT EXISTS trip_state (
    modem TEXT PRIMARY KEY,
    state TEXT NOT NULL                   -- TripState.to_json(): array of its values, or null
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused: the forwarder's cursor only moves forward
    packet_id INTEGER NOT NULL REFERENCES packets(id),
    modem TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    retain INTEGER NOT NULL
);
"""

DIGEST_SIZE = 16
_STAGE_CHUNK = 32  # packets staged between two turns of the event loop
_STAGE_CHUNK_MQTT = 4  # the same when each packet's MQTT messages are built too
SHARD_COUNT_KEY = "shards"  # in control.db settings: how many shards DIR's data is spread over


class ShardCountMismatch(Exception):
    """DIR was written with another number of shards; moving terminals between shards is not supported."""


def shard_of(modem: str, shards: int) -> int:
    """The one shard a terminal's packets, trip state and MQTT outbox live in, whichever worker accepted it.

    A stable hash (not Python's salted `hash`): every worker process and every restart agrees.
    """
    return zlib.crc32(modem.encode("ascii", "replace")) % shards if shards > 1 else 0

# map_record(record, state, *, packet_id) -> (messages, new state); see dtgserver.bridge.mapping
Mapper = Callable[..., tuple[list[Any], Any]]


@attrs.define
class Pending:
    received: Received
    peer: str
    received_at: float
    done: trio.Event = attrs.field(factory=trio.Event)
    result: Result = Result.OVERLOADED


@attrs.define
class _Staged:
    """What a batch's chunks staged so far in its transaction."""

    results: list[str | None] = attrs.field(factory=list)
    states: dict[str, Any] = attrs.field(factory=dict)  # trip states changed by the batch
    added: int = 0  # outbox rows
    logs: list[StatusLog] = attrs.field(factory=list)  # status logs to write before COMMIT

    def add(self, chunk: tuple[list[str | None], dict[str, Any], int]) -> None:
        results, states, added = chunk
        self.results += results
        self.states.update(states)
        self.added += added


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


class PacketStore:
    """One shard: `DIR/store-<shard>.db`, with the status log files under `DIR/logs/`.

    Start `run()` in a nursery (the writer task), then `await submit(...)` from sessions.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        shard: int = 0,
        mapper: Mapper | None = None,
        forward: bool = False,
        max_batch: int = 512,
        queue_high_water: int = 2048,
        outbox_high_water: int = 100_000,
    ):
        """The shard's only writer: the trip states are cached between batches (`serve --workers N`
        relays each packet to the one worker of its terminal's shard, server/relay.py)."""
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / f"store-{shard}.db"
        self.mapper = mapper
        self.forward = forward
        self.max_batch = max_batch
        self.queue_high_water = queue_high_water
        self.outbox_high_water = outbox_high_water
        self.stats = StoreStats()
        self.db = connect(self.path)
        self.db.executescript(PACKET_SCHEMA)
        self.db.execute("PRAGMA busy_timeout = 0")  # _begin: try at once, wait in a thread only if busy
        self._reader = connect(self.path)  # export and the forwarder's fetch
        self._acker = connect(self.path)  # the forwarder's deletes of delivered rows
        self._reader_lock = trio.Lock()
        self._acker_lock = trio.Lock()
        self._pending: list[Pending] = []
        self._wake = trio.Event()
        self._outbox_wake = trio.Event()
        self._trip_states: dict[str, Any] = {}
        self._backlog = self._count_outbox()
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.db.close()
            self._reader.close()
            self._acker.close()

    # -- the session side ---------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self._pending)

    def overloaded(self) -> str | None:
        """Why new packets must be answered 4 right now, or None."""
        if len(self._pending) >= self.queue_high_water:
            return f"commit queue at {len(self._pending)}"
        if self.forward and self._backlog >= self.outbox_high_water:
            return f"MQTT backlog at {self._backlog}"
        return None

    async def submit(self, received: Received, peer: str) -> Result:
        """Store one packet; returns OK only once it is committed, OVERLOADED when it was not stored."""
        item = self.enqueue(received, peer)
        if item is None:
            return Result.OVERLOADED
        await item.done.wait()
        return item.result

    def enqueue(self, received: Received, peer: str, received_at: float | None = None) -> Pending | None:
        """Queue one packet for the next commit without waiting for it; None when it must be
        answered 4 now. Its `done` is set once the commit ended, its `result` then says how."""
        if self.overloaded():
            return None
        item = Pending(received, peer, time.time() if received_at is None else received_at)
        self._pending.append(item)
        self._wake.set()
        return item

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

    def _count_outbox(self) -> int:
        return int(self._reader.execute("SELECT count(*) FROM outbox").fetchone()[0])

    async def _commit_pending(self) -> None:
        self._wake = trio.Event()
        while self._pending:
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            started = time.perf_counter()
            # Not abandoned on cancel: a commit that began finishes, and its sessions learn of it.
            with trio.CancelScope(shield=True):
                results, states, added = await self._write_batch(batch)
            elapsed = time.perf_counter() - started
            if results[0] is not None:
                self._trip_states.update(states)
                self._backlog += added
                if added:
                    self._outbox_wake.set()
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

    async def _write_batch(self, batch: Sequence[Pending]) -> tuple[list[str | None], dict[str, Any], int]:
        """One transaction for the whole batch; all or nothing.

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
            # With MQTT each packet's messages take ~1 ms to build: smaller chunks, shorter stalls.
            chunk = _STAGE_CHUNK_MQTT if self.forward else _STAGE_CHUNK
            for start in range(0, len(batch), chunk):
                if start:
                    await trio.lowlevel.checkpoint()  # let sessions run between chunks
                staged.add(self._write_rows(db, batch[start:start + chunk], rows[start:start + chunk],
                                            staged.states, staged.logs))
            await trio.to_thread.run_sync(self._finish, staged.logs)
        except BaseException as e:
            self._rollback()
            if not isinstance(e, (sqlite3.Error, OSError, ValueError)):
                raise
            return self._failed(batch, e)
        return staged.results, staged.states, staged.added

    async def _begin(self) -> None:
        """BEGIN IMMEDIATE: on the event loop's thread when the write lock is free, which it is
        unless the forwarder is deleting delivered rows (this is the shard's only writer); else
        in a thread that waits for it. A thread's round trip costs more CPU than the BEGIN."""
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
    def _failed(batch: Sequence[Pending], error: BaseException) -> tuple[list[str | None], dict[str, Any], int]:
        log.error("commit of %d packets failed, answering 4: %s", len(batch), error)
        return [None] * len(batch), {}, 0

    def _finish(self, logs: Sequence[StatusLog]) -> None:
        """In a worker thread: the status logs durable on disk, then COMMIT."""
        for record in logs:
            write_status_log(self.data_dir, record)
        self.db.execute("COMMIT")

    def _write_rows(self, db: sqlite3.Connection, batch: Sequence[Pending], rows: list[tuple[Any, ...]],
                    earlier: dict[str, Any], logs: list[StatusLog],
                    ) -> tuple[list[str | None], dict[str, Any], int]:
        """One chunk of the batch, inside its transaction: a fixed number of statements per chunk.

        `earlier`: trip states already changed by the batch's earlier chunks; `logs` collects
        the status logs to write before COMMIT.
        """
        # Holding the write lock, and packets are never deleted: what this INSERT adds gets ids
        # above the largest id now. A digest not among them was stored before: a resend.
        last_id = db.execute("SELECT coalesce(max(id), 0) FROM packets").fetchone()[0]
        db.executemany(
            "INSERT OR IGNORE INTO packets(digest, modem, kind, protocol_id, body_count, received_at, peer, raw) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        inserted = dict(db.execute("SELECT digest, id FROM packets WHERE id > ?", (last_id,)).fetchall())
        results: list[str | None] = []
        new: list[tuple[Pending, bytes, int]] = []
        for item, row in zip(batch, rows, strict=True):
            packet_id = inserted.pop(row[0], None)  # popped: the same packet twice in one batch is one row
            if packet_id is None:
                results.append("duplicate")
            else:
                results.append("new")
                new.append((item, row[0], packet_id))
        for item, _, _ in new:
            if item.received.kind == StatusLog.KIND:
                record = item.received.record
                assert isinstance(record, StatusLog)
                logs.append(record)
        if self.mapper is None:
            return results, {}, 0

        states = self._trip_states_of(db, {item.received.modem for item, _, _ in new} - earlier.keys())
        states.update(earlier)
        changed: dict[str, Any] = {}
        outbox: list[tuple[int, str, str, bytes, int]] = []
        for item, key, packet_id in new:
            received = item.received
            modem = received.modem
            state = states.get(modem)
            if self.forward:
                messages, new_state = self.mapper(received.record, state, packet_id=key.hex(),
                                                  received_ms=int(item.received_at * 1000))
                outbox.extend((packet_id, modem, m.topic, json.dumps(m.payload, ensure_ascii=False).encode(),
                               int(m.retain)) for m in messages)
            else:
                # Without MQTT only the trip state is kept (so that forwarding can start any time),
                # read from the bytes: the bodies are never decoded into records.
                new_state = next_state(received.raw, state)
            if new_state is not state:
                states[modem] = changed[modem] = new_state
        if changed:
            db.executemany(
                "INSERT INTO trip_state(modem, state) VALUES (?, ?) "
                "ON CONFLICT(modem) DO UPDATE SET state = excluded.state",
                [(modem, "null" if state is None else state.to_json()) for modem, state in changed.items()])
        if outbox:  # in packet order: the forwarder publishes in id order, each terminal's order
            db.executemany("INSERT INTO outbox(packet_id, modem, topic, payload, retain) VALUES (?, ?, ?, ?, ?)",
                           outbox)
        return results, changed, len(outbox)

    def _trip_states_of(self, db: sqlite3.Connection, modems: set[str]) -> dict[str, Any]:
        """The states before this batch: from the cache, else read inside the writing transaction."""
        from ..bridge.mapping import TripState

        states: dict[str, Any] = {}
        wanted = []
        for modem in modems:
            if modem in self._trip_states:
                states[modem] = self._trip_states[modem]
            else:
                wanted.append(modem)
        for start in range(0, len(wanted), 500):  # below SQLite's limit of variables per statement
            chunk = wanted[start:start + 500]
            for modem, stored in db.execute(
                    f"SELECT modem, state FROM trip_state WHERE modem IN ({','.join('?' * len(chunk))})", chunk):
                states[modem] = TripState.from_json(stored)
        return states

    # -- the outbox (dtgserver.bridge.outbox.Outbox) -------------------------------------------
    def backlog(self) -> int:
        return self._backlog

    async def fetch(self, after_id: int, limit: int) -> list[OutboxRow]:
        while True:
            wake = self._outbox_wake = trio.Event()
            async with self._reader_lock:
                rows = await trio.to_thread.run_sync(self._fetch, after_id, limit)
            if rows:
                return rows
            await wake.wait()

    def _fetch(self, after_id: int, limit: int) -> list[OutboxRow]:
        rows = self._reader.execute(
            "SELECT id, modem, topic, payload, retain FROM outbox WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
        ).fetchall()
        return [OutboxRow(i, m, t, bytes(p), bool(r)) for i, m, t, p, r in rows]

    async def mark_delivered(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        async with self._acker_lock:
            removed = await trio.to_thread.run_sync(self._delete_outbox, list(ids))
        self._backlog -= removed

    def _delete_outbox(self, ids: list[int]) -> int:
        db = self._acker
        db.execute("BEGIN IMMEDIATE")
        try:
            removed = db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids]).rowcount
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return int(removed)

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


def decode_stored(packet: StoredPacket) -> Any:
    return decode(packet.raw)


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
