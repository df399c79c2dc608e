"""Where the bridge remembers how far it got: per shard, a cursor and the trip states at that cursor.

The cursor is the position of the last packet whose messages the broker has all acknowledged;
the trip states are those derived from the packets up to and including it. Both are written
together, in one transaction, so on restart the bridge resumes with exactly the state it had
derived up to the cursor, and derives the same messages (with the same ids) from there on.

`SqliteCursor` keeps them in `DIR/bridge-<shard>.db`, a file of the bridge's own: the packet
writer's lock is never shared with it, so a slow or failing cursor write never delays an answer.
`DIR/bridge-<shard>.lock` (flock) makes sure only one bridge consumes a shard at a time.
`MemoryCursor` is for a replay, which must not move the live cursor.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

BUSY_TIMEOUT_S = 2.0  # a cursor write waiting for a foreign lock: then it fails, and is retried later

CURSOR_SCHEMA = """
CREATE TABLE IF NOT EXISTS cursor (
    shard INTEGER PRIMARY KEY,
    position INTEGER NOT NULL,            -- the last packet id whose messages were all acknowledged
    updated_at REAL NOT NULL              -- Unix seconds
);
CREATE TABLE IF NOT EXISTS trip_state (
    modem TEXT PRIMARY KEY,
    state TEXT NOT NULL                   -- the trip state after the modem's last packet up to the cursor
);
"""


class CursorBusy(Exception):
    """Another bridge consumes this shard (it holds the shard's lock file)."""


class CursorStore(Protocol):
    """What the consumer needs to persist: a position and opaque per-terminal states (JSON text)."""

    def load(self) -> int | None:
        """The saved position, or None when this shard was never consumed."""
        ...

    def states(self, modems: Iterable[str]) -> dict[str, str]:
        """The saved states of these terminals (absent: none saved)."""
        ...

    def save(self, position: int, states: Mapping[str, str], digests: Sequence[bytes] = ()) -> None:
        """Position and the states changed up to it, in one transaction; with the digests of the
        packets derived up to it, when `published()` is not None."""
        ...

    def published(self) -> list[tuple[float, bytes]] | None:
        """The digests saved with the cursor, up to it (concatenated 16-byte digests, with the Unix
        time of their save), for the bridge to skip a packet stored twice; None when the store
        never holds a packet twice (then none are saved)."""
        ...

    def close(self) -> None:
        ...


def cursor_path(data_dir: Path, shard: int) -> Path:
    return Path(data_dir) / f"bridge-{shard}.db"


def read_position(data_dir: Path, shard: int) -> int | None:
    """The saved cursor of `shard`, read by another process (the server, for its backlog); None
    when there is none yet. A file that cannot be read (locked past 1 s, damaged) raises sqlite3.Error."""
    path = cursor_path(data_dir, shard)
    if not path.exists():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
    try:
        row = db.execute("SELECT position FROM cursor WHERE shard = ?", (shard,)).fetchone()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return None  # not made yet
        raise
    finally:
        db.close()
    return None if row is None else int(row[0])


class SqliteCursor:
    """`DIR/bridge-<shard>.db` (WAL, synchronous=FULL). Raises CursorBusy when another bridge has the shard."""

    def __init__(self, data_dir: Path, shard: int):
        self.shard = shard
        self.path = cursor_path(data_dir, shard)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_suffix(".lock")
        self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise CursorBusy(f"another bridge consumes shard {shard} ({lock_path} is locked)") from None
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                      timeout=BUSY_TIMEOUT_S)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(CURSOR_SCHEMA)
            # reads on their own connection: never queued behind a save waiting for a lock
            self._reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                           timeout=BUSY_TIMEOUT_S)
        except BaseException:
            os.close(self._lock_fd)
            raise

    def load(self) -> int | None:
        row = self._reader.execute("SELECT position FROM cursor WHERE shard = ?", (self.shard,)).fetchone()
        return None if row is None else int(row[0])

    def states(self, modems: Iterable[str]) -> dict[str, str]:
        wanted = list(modems)
        found: dict[str, str] = {}
        for start in range(0, len(wanted), 500):  # below SQLite's limit of variables per statement
            chunk = wanted[start:start + 500]
            found.update(self._reader.execute(
                f"SELECT modem, state FROM trip_state WHERE modem IN ({','.join('?' * len(chunk))})", chunk))
        return found

    def published(self) -> None:
        return None  # the store keeps one row per digest: a resend is never a second packet

    def save(self, position: int, states: Mapping[str, str], digests: Sequence[bytes] = ()) -> None:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            if states:
                db.executemany("INSERT INTO trip_state(modem, state) VALUES (?, ?) "
                               "ON CONFLICT(modem) DO UPDATE SET state = excluded.state", states.items())
            db.execute("INSERT INTO cursor(shard, position, updated_at) VALUES (?, ?, ?) "
                       "ON CONFLICT(shard) DO UPDATE SET position = excluded.position, "
                       "updated_at = excluded.updated_at", (self.shard, position, time.time()))
            db.execute("COMMIT")
        except BaseException:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # a failed COMMIT may have ended the transaction already
            raise

    def close(self) -> None:
        try:
            self._reader.close()
            self.db.close()
        finally:
            os.close(self._lock_fd)  # releases the flock


class MemoryCursor:
    """A cursor that lives as long as the process: a replay's, so the live cursor stays where it is."""

    def __init__(self, position: int | None = 0):
        self.position = position
        self.saved: dict[str, str] = {}
        self.digests: list[tuple[float, bytes]] = []
        self.saves = 0

    def load(self) -> int | None:
        return self.position

    def states(self, modems: Iterable[str]) -> dict[str, str]:
        return {m: self.saved[m] for m in modems if m in self.saved}

    def published(self) -> list[tuple[float, bytes]]:
        return list(self.digests)

    def save(self, position: int, states: Mapping[str, str], digests: Sequence[bytes] = ()) -> None:
        if digests:
            self.digests.append((time.time(), b"".join(digests)))
        self.saved.update(states)
        self.position = position
        self.saves += 1

    def close(self) -> None:
        pass
