"""Retention: removing packets and status log files older than a cut-off from a data dir.

The store keeps every packet until it is told otherwise (`dtgserver prune`). What is removed, per
shard, is the packets received before the cut-off, with three exceptions:

- The packets after `keep_after` (the bridge's cursor, which the caller reads): their messages
  have not all been acknowledged by the broker, and the bridge still has to read them.
- The shard's last packet, whatever its age. A packet's id is one more than the largest id in the
  table (`INTEGER PRIMARY KEY` without AUTOINCREMENT), so deleting the last one would give the
  next packet an id already handed out: one the bridge's cursor is already past.
- Nothing else: a packet's age is its `received_at`, the server's clock at arrival.

Deletes run in transactions of `batch` packets each, so that the server's commits (which wait for
the write lock, store/packets.py) wait for one batch at most. SQLite reuses the freed pages for
new packets; the file does not shrink (a `VACUUM` with the server stopped does that).

Status log files (`logs/<modem>/*.log`) are removed when last written before the cut-off. The
folders stay: a server may be writing into one.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import attrs

from .control import BUSY_TIMEOUT_S

DELETE_BATCH = 2000


@attrs.frozen
class ShardPruned:
    """What pruning a shard removed (or, dry, would remove) and what it kept of the packets before the cut-off."""

    path: Path
    removed: int
    kept_unpublished: int  # after the bridge's cursor
    kept_last: int  # 1 when the shard's last packet is before the cut-off: the ids go on from it


def prune_shard(path: Path, before: float, *, keep_after: int | None = None, dry_run: bool = False,
                batch: int = DELETE_BATCH) -> ShardPruned:
    """Delete the packets of the shard at `path` received before `before` (Unix seconds), except
    those with an id above `keep_after` and the shard's last one."""
    db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_S)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        last = db.execute("SELECT coalesce(max(id), 0) FROM packets").fetchone()[0]
        limit = last - 1
        old = db.execute("SELECT count(*) FROM packets WHERE received_at < ?", (before,)).fetchone()[0]
        last_old = int(db.execute("SELECT count(*) FROM packets WHERE id = ? AND received_at < ?",
                                  (last, before)).fetchone()[0])
        unpublished = 0
        if keep_after is not None and keep_after < limit:
            unpublished = db.execute("SELECT count(*) FROM packets WHERE received_at < ? AND id > ? AND id <= ?",
                                     (before, keep_after, limit)).fetchone()[0]
            limit = keep_after
        removed = old - unpublished - last_old
        if dry_run or removed == 0:
            return ShardPruned(path, removed, unpublished, last_old)
        done = 0
        while True:
            db.execute("BEGIN IMMEDIATE")
            try:
                count = db.execute(
                    "DELETE FROM packets WHERE id IN "
                    "(SELECT id FROM packets WHERE received_at < ? AND id <= ? LIMIT ?)",
                    (before, limit, batch)).rowcount
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            done += count
            if count < batch:
                return ShardPruned(path, done, unpublished, last_old)
    finally:
        db.close()


def prune_status_logs(data_dir: Path, before: float, *, dry_run: bool = False) -> int:
    """Remove the status log files under `data_dir/logs` last written before `before` (Unix
    seconds); returns how many. Only regular `*.log` files two levels down, no link followed."""
    logs = Path(data_dir) / "logs"
    removed = 0
    try:
        modems = list(os.scandir(logs))
    except FileNotFoundError:
        return 0
    for modem in modems:
        if not modem.is_dir(follow_symlinks=False):
            continue
        with os.scandir(modem.path) as entries:
            for entry in entries:
                if not entry.name.endswith(".log"):
                    continue
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(info.st_mode) and info.st_mtime < before:
                    if not dry_run:
                        os.unlink(entry.path)
                    removed += 1
    return removed
