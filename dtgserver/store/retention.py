"""Retention: removing packets and status log files older than a cut-off from a data dir.

The store keeps every packet until it is told otherwise (`dtgserver prune`). What is removed, per
shard, is the packets received (`received_at`, the server's clock at arrival) before the
cut-off, with two exceptions:

- The packets after `keep_after` (the bridge's cursor, which the caller reads): their messages
  have not all been acknowledged by the broker, and the bridge still has to read them.
- The shard's last packet, whatever its age. A packet's id is one more than the largest id in the
  table (`INTEGER PRIMARY KEY` without AUTOINCREMENT), so deleting the last one would give the
  next packet an id already handed out: one the bridge's cursor is already past.

Deletes run in transactions of `batch` packets each, so that the server's commits (which wait for
the write lock, store/packets.py) wait for one batch at most. SQLite reuses the freed pages for
new packets; the file does not shrink (a `VACUUM` with the server stopped does that).

Status log files (`logs/<modem>/*.log`) are removed when last written before the cut-off. The
folders stay: a server may be writing into one. As when they are written (store/logfiles.py),
nothing is followed out of the data dir: `logs` and each terminal's folder are opened without
following a symbolic link, and only regular files in them are removed.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
from pathlib import Path

import attrs

from .control import BUSY_TIMEOUT_S
from .logfiles import UnsafeLogPath

DELETE_BATCH = 2000


@attrs.frozen
class ShardPruned:
    """What pruning a shard removed (or, dry, would remove) and what it kept of the packets before the cut-off."""

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
            return ShardPruned(removed, unpublished, last_old)
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
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            done += count
            if count < batch:
                return ShardPruned(done, unpublished, last_old)
    finally:
        db.close()


_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def prune_status_logs(data_dir: Path, before: float, *, dry_run: bool = False) -> int:
    """Remove the status log files under `data_dir/logs` last written before `before` (Unix
    seconds); returns how many. Only regular `*.log` files in a terminal's folder; a symbolic
    link at `logs` is an OSError naming it, one at a terminal's folder or file is left alone."""
    shown = Path(data_dir) / "logs"
    try:
        logs = os.open(shown, _FOLDER)
    except FileNotFoundError:
        return 0
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeLogPath(e.errno, f"{shown} is a symbolic link or not a folder: not followed") from None
        raise
    removed = 0
    try:
        with os.scandir(logs) as modems:
            folders = [entry.name for entry in modems if entry.is_dir(follow_symlinks=False)]
        for name in folders:
            try:
                folder = os.open(name, _FOLDER, dir_fd=logs)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                    continue  # replaced or removed since it was listed
                raise
            try:
                with os.scandir(folder) as entries:
                    old = [entry.name for entry in entries if entry.name.endswith(".log")
                           and _regular_before(entry, before)]
                for file in old:
                    if not dry_run:
                        try:
                            os.unlink(file, dir_fd=folder)
                        except FileNotFoundError:
                            continue
                    removed += 1
            finally:
                os.close(folder)
    finally:
        os.close(logs)
    return removed


def _regular_before(entry: os.DirEntry[str], before: float) -> bool:
    info = entry.stat(follow_symlinks=False)
    return stat.S_ISREG(info.st_mode) and info.st_mtime < before
