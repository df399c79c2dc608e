"""The control database: the device registry and the runtime switches (maintenance, registry).

It lives apart from the packet shards (`DIR/control.db`) so that every worker and every command
(`devices`, `maintenance`) sees one registry, and a running server picks up changes by polling
`PRAGMA data_version`, which changes whenever another connection commits.
"""

from __future__ import annotations

import enum
import sqlite3
import time
from pathlib import Path

import attrs
import trio

CONTROL_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    modem TEXT PRIMARY KEY CHECK (modem GLOB '[0-9]*' AND length(modem) BETWEEN 1 AND 11),
    status TEXT NOT NULL CHECK (status IN ('active', 'cancelled')),
    note TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class DeviceStatus(enum.Enum):
    ACTIVE = "active"
    CANCELLED = "cancelled"


@attrs.frozen
class Device:
    modem: str
    status: DeviceStatus
    note: str
    updated_at: float


@attrs.frozen
class ControlState:
    """What the server needs on its hot path, loaded whole and swapped atomically."""

    maintenance: bool = False
    registry_enforced: bool = False
    active: frozenset[str] = frozenset()
    cancelled: frozenset[str] = frozenset()


BUSY_TIMEOUT_S = 10.0  # how long a statement waits for another connection's lock


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode with the pragmas every dtgserver database uses."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S)
    try:
        db.execute("PRAGMA journal_mode=WAL")  # the first read: a file that is no database fails here
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
    except sqlite3.DatabaseError as e:  # sqlite3 names no file: say which one
        db.close()
        raise type(e)(f"{path}: {e}") from None
    return db


class Control:
    """Registry and switches in `DIR/control.db`; safe to open from many processes at once."""

    def __init__(self, data_dir: Path):
        self.path = Path(data_dir) / "control.db"
        self.db = connect(self.path)
        self.db.executescript(CONTROL_SCHEMA)
        self._version: int | None = None

    def close(self) -> None:
        self.db.close()

    # -- switches ---------------------------------------------------------------------------
    def _get(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set(self, key: str, value: str) -> None:
        self.db.execute("INSERT INTO settings(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = ?",
                        (key, value, value))

    def set_maintenance(self, on: bool) -> None:
        self._set("maintenance", "on" if on else "off")

    def set_registry_enforced(self, on: bool) -> None:
        self._set("registry", "on" if on else "off")

    def shard_count(self) -> int | None:
        """The number of shards recorded by `claim_shard_count`, if any."""
        recorded = self._get("shards")
        return None if recorded is None else int(recorded)

    def claim_shard_count(self, shards: int, found: int) -> int | None:
        """Record that DIR's packets are spread over `shards` shards; the number recorded before, if another.

        `found` counts the shard files already in DIR, for a data dir that predates the record.
        Check and record are one transaction, so workers starting together agree.
        """
        self.db.execute("BEGIN IMMEDIATE")
        try:
            recorded = self._get("shards")
            before = int(recorded) if recorded is not None else (found or None)
            if before is None or before == shards:
                self._set("shards", str(shards))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return before if before != shards else None

    # -- registry ---------------------------------------------------------------------------
    def add_device(self, modem: str, note: str = "", status: DeviceStatus = DeviceStatus.ACTIVE) -> None:
        self.db.execute(
            "INSERT INTO devices(modem, status, note, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(modem) DO UPDATE SET status = excluded.status, note = excluded.note, "
            "updated_at = excluded.updated_at",
            (modem, status.value, note, time.time()),
        )

    def remove_device(self, modem: str) -> bool:
        return self.db.execute("DELETE FROM devices WHERE modem = ?", (modem,)).rowcount > 0

    def devices(self) -> list[Device]:
        rows = self.db.execute("SELECT modem, status, note, updated_at FROM devices ORDER BY modem").fetchall()
        return [Device(m, DeviceStatus(s), n, t) for m, s, n, t in rows]

    def load(self) -> ControlState:
        devices = self.devices()
        return ControlState(
            maintenance=self._get("maintenance") == "on",
            registry_enforced=self._get("registry") == "on",
            active=frozenset(d.modem for d in devices if d.status is DeviceStatus.ACTIVE),
            cancelled=frozenset(d.modem for d in devices if d.status is DeviceStatus.CANCELLED),
        )

    async def wait_changed(self, poll: float) -> bool:
        """In a server: after `poll` seconds, whether another process committed a change meanwhile."""
        await trio.sleep(poll)
        return await trio.to_thread.run_sync(self.changed)

    def changed(self) -> bool:
        """True when another connection committed since the last call (cheap: no table read)."""
        version = int(self.db.execute("PRAGMA data_version").fetchone()[0])
        changed = version != self._version
        self._version = version
        return changed
