"""`dtgserver prune`: the packets and status log files older than the retention period go, beside a
running server; what the bridge has not published, and each shard's last packet, stay.

The store is filled the way terminals fill it (a real server on 127.0.0.1, packets over TCP); a
packet is made old by moving its `received_at` back in the shard, a status log file by its mtime.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner, Result
from test_export import fill
from test_server import OK, exchange, running

from dtgserver.bridge.cursor import SqliteCursor
from dtgserver.cli import main
from dtgserver.protocol import encode
from dtgserver.store import status_log_path
from dtgserver.store.retention import prune_shard
from dtgserver.testing import dtg_bytes, status_log

DAY = 86_400.0


def prune(data_dir: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["prune", "--data-dir", str(data_dir), *args])


def ids(data_dir: Path) -> list[int]:
    with sqlite3.connect(data_dir / "store-0.db") as db:
        return [row[0] for row in db.execute("SELECT id FROM packets ORDER BY id")]


def age(data_dir: Path, days: float, *, up_to: int | None = None) -> None:
    """Make the packets with an id up to `up_to` (all by default) `days` older."""
    db = sqlite3.connect(data_dir / "store-0.db")
    with db:
        db.execute("UPDATE packets SET received_at = received_at - ? WHERE id <= ?", (days * DAY, up_to or 2**62))
    db.close()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """Six packets of one terminal (ids 1-6: five minutes of driving and a status log) with its file."""
    packets = [dtg_bytes(minute=m, bodies=2) for m in range(5)] + [encode(status_log())]
    trio.run(fill, tmp_path, packets)
    assert ids(tmp_path) == [1, 2, 3, 4, 5, 6]
    return tmp_path


def test_the_old_packets_and_status_log_files_go_and_the_recent_stay(data_dir: Path) -> None:
    age(data_dir, 10, up_to=3)
    log = status_log_path(data_dir, status_log())
    recent = log.with_name("recent.log")
    recent.write_text("kept", "utf-8")
    os.utime(log, (time.time() - 10 * DAY,) * 2)
    result = prune(data_dir, "--keep-days", "3")
    assert result.exit_code == 0, result.output
    assert ids(data_dir) == [4, 5, 6]
    assert "store-0.db: removed 3 packets received before " in result.output
    assert "logs: removed 1 status log files" in result.output
    assert not log.exists() and recent.exists() and log.parent.is_dir()  # the folder stays
    again = prune(data_dir, "--keep-days", "3")  # nothing left to remove
    assert "removed 0 packets" in again.output and "removed 0 status log files" in again.output


def test_a_dry_run_says_what_would_go_and_removes_nothing(data_dir: Path) -> None:
    age(data_dir, 10, up_to=4)
    log = status_log_path(data_dir, status_log())
    os.utime(log, (time.time() - 10 * DAY,) * 2)
    result = prune(data_dir, "--keep-days", "2", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "store-0.db: would remove 4 packets" in result.output
    assert "logs: would remove 1 status log files" in result.output
    assert ids(data_dir) == [1, 2, 3, 4, 5, 6] and log.exists()


def test_what_the_bridge_has_not_published_stays_whatever_its_age(data_dir: Path) -> None:
    cursor = SqliteCursor(data_dir, 0)
    cursor.save(2, {})  # the messages of packets 1 and 2 acknowledged by the broker, not those of 3-6
    cursor.close()
    age(data_dir, 30, up_to=5)
    result = prune(data_dir, "--keep-days", "3")
    assert result.exit_code == 0, result.output
    assert ids(data_dir) == [3, 4, 5, 6]
    assert "removed 2 packets" in result.output and "(kept 3 after the bridge's cursor in bridge-0.db)" in result.output


def test_the_last_packet_stays_so_that_ids_are_never_handed_out_twice(data_dir: Path) -> None:
    """A cursor at 6 has published everything; were row 6 deleted, the next packet would get id 1 again
    (max(id) + 1 of an empty table), one the cursor is past: the bridge would never publish it."""
    cursor = SqliteCursor(data_dir, 0)
    cursor.save(6, {})
    cursor.close()
    age(data_dir, 30)
    result = prune(data_dir, "--keep-days", "3")
    assert result.exit_code == 0, result.output
    assert ids(data_dir) == [6] and "removed 5 packets" in result.output
    assert "(kept the shard's last packet)" in result.output

    async def one_more() -> None:
        async with running(data_dir) as server:
            assert await exchange(server.port or 0, dtg_bytes(minute=9, bodies=2)) == OK

    trio.run(one_more)
    assert ids(data_dir) == [6, 7]


def test_prune_beside_a_running_server_keeps_every_answer_0(tmp_path: Path) -> None:
    """Thousands of old packets go in small transactions while terminals send: each of their packets
    is answered 0 and stored; the old ones are gone at the end."""
    trio.run(fill, tmp_path, [dtg_bytes(minute=0, bodies=2)])
    db = sqlite3.connect(tmp_path / "store-0.db")
    with db:  # 3,000 old packets: copies of the first with other digests
        db.executemany("INSERT INTO packets(digest, modem, kind, protocol_id, body_count, received_at, peer, raw) "
                       "SELECT ?, modem, kind, protocol_id, body_count, received_at - 30 * 86400, peer, raw "
                       "FROM packets WHERE id = 1", [(n.to_bytes(16, "big"),) for n in range(3000)])
    db.close()
    fresh = [dtg_bytes("01099990000", minute=m, bodies=2) for m in range(30)]
    pruned: list[int] = []

    async def main() -> None:
        async with running(tmp_path) as server:
            assert await exchange(server.port or 0, fresh[0]) == OK  # the shard's last packet: a recent one
            async with trio.open_nursery() as nursery:
                async def in_thread() -> None:
                    result = await trio.to_thread.run_sync(
                        lambda: prune_shard(tmp_path / "store-0.db", time.time() - 3 * DAY, batch=50))
                    pruned.append(result.removed)

                nursery.start_soon(in_thread)
                for packet in fresh[1:]:
                    assert await exchange(server.port or 0, packet) == OK

    trio.run(main)
    assert pruned == [3000]  # every copy, received 30 days ago
    with sqlite3.connect(tmp_path / "store-0.db") as db:
        (old,) = db.execute("SELECT count(*) FROM packets WHERE received_at < ?", (time.time() - DAY,)).fetchone()
        (new,) = db.execute("SELECT count(*) FROM packets WHERE modem = '01099990000'").fetchone()
    assert (old, new) == (0, 30)


@pytest.mark.parametrize(("args", "shown"), [
    ([], "Missing option '--keep-days'"),
    (["--keep-days", "1"], "'--keep-days': 1.0 is not in the range 2.0<=x<=36500.0"),
    (["--keep-days", "nan"], "'--keep-days': 'nan' is not a finite number"),
    (["--keep-days", "a week"], "'--keep-days': 'a week' is not a valid float"),
    (["--keep-days", "1e6"], "'--keep-days': 1000000.0 is not in the range 2.0<=x<=36500.0"),
    (["--keep-days", "1e308"], "is not in the range 2.0<=x<=36500.0"),
])
def test_a_bad_retention_is_refused_in_one_line(data_dir: Path, args: list[str], shown: str) -> None:
    result = prune(data_dir, *args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and shown in errors[0], result.stderr
    assert ids(data_dir) == [1, 2, 3, 4, 5, 6]


def test_no_store_and_an_unreadable_cursor_are_errors_that_remove_nothing(data_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = prune(empty, "--keep-days", "3")
    assert result.exit_code == 1 and result.stderr == f"dtgserver: error: no store in {empty}\n"
    age(data_dir, 10)
    (data_dir / "bridge-0.db").write_bytes(b"not a database" * 100)  # whose cursor cannot be known
    result = prune(data_dir, "--keep-days", "3")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == ("dtgserver: error: bridge-0.db: file is not a database: the bridge's "
                                             "cursor is unknown, nothing removed from store-0.db")
    assert ids(data_dir) == [1, 2, 3, 4, 5, 6]
    db = sqlite3.connect(data_dir / "store-0.db")
    db.execute("BEGIN EXCLUSIVE")  # another program holds the shard past the busy timeout
    try:
        (data_dir / "bridge-0.db").unlink()
        started = time.monotonic()
        result = prune(data_dir, "--keep-days", "3")
    finally:
        db.rollback()
        db.close()
    assert result.exit_code == 1 and time.monotonic() - started < 30
    assert result.stderr.startswith("dtgserver: error: store-0.db: database is locked; nothing more removed")
    assert ids(data_dir) == [1, 2, 3, 4, 5, 6]


def test_links_in_the_logs_folder_are_not_followed(data_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "old.log").write_text("not ours", "utf-8")
    os.utime(outside / "old.log", (time.time() - 10 * DAY,) * 2)
    folder = status_log_path(data_dir, status_log()).parent
    (folder / "link.log").symlink_to(outside / "old.log")
    (data_dir / "logs" / "01099999999").symlink_to(outside)
    result = prune(data_dir, "--keep-days", "3")
    assert result.exit_code == 0, result.output
    assert (outside / "old.log").read_text("utf-8") == "not ours" and (folder / "link.log").is_symlink()


def test_each_shard_keeps_what_its_own_bridge_has_not_published(data_dir: Path) -> None:
    """Shard 1 is judged by bridge-1.db, even when it is the only shard file left."""
    age(data_dir, 10)
    source = sqlite3.connect(data_dir / "store-0.db")
    copy = sqlite3.connect(data_dir / "store-1.db")
    source.backup(copy)
    source.close()
    copy.close()
    cursor = SqliteCursor(data_dir, 1)
    cursor.save(2, {})
    cursor.close()
    result = prune(data_dir, "--keep-days", "3")
    assert result.exit_code == 0, result.output
    with sqlite3.connect(data_dir / "store-1.db") as db:
        assert [row[0] for row in db.execute("SELECT id FROM packets ORDER BY id")] == [3, 4, 5, 6]
    assert ids(data_dir) == [6]  # shard 0 has no bridge file
    for name in ("store-0.db", "store-0.db-wal", "store-0.db-shm"):
        (data_dir / name).unlink(missing_ok=True)
    source = sqlite3.connect(data_dir / "store-1.db")
    with source:
        source.execute("UPDATE packets SET received_at = received_at - 30 * 86400")
    source.close()
    result = prune(data_dir, "--keep-days", "3")
    assert "store-1.db: removed 0 packets" in result.output and "(kept 3 after the bridge's cursor in bridge-1.db" \
        in result.output


def test_a_logs_folder_that_is_a_link_is_not_followed(data_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    (outside / "01012345678").mkdir(parents=True)
    (outside / "01012345678" / "old.log").write_text("not ours", "utf-8")
    os.utime(outside / "01012345678" / "old.log", (time.time() - 10 * DAY,) * 2)
    os.rename(data_dir / "logs", tmp_path / "moved")
    (data_dir / "logs").symlink_to(outside)
    age(data_dir, 10)
    result = prune(data_dir, "--keep-days", "3")
    assert result.exit_code == 1
    assert result.stderr == (f"dtgserver: error: status log files: {data_dir / 'logs'} is a symbolic link or not "
                             "a folder: not followed\n")
    assert "store-0.db: removed 5 packets" in result.output  # the packets are the store's own
    assert (outside / "01012345678" / "old.log").exists()
