"""Faults while serving: disk full, read-only data dir, SIGTERM under load.

The promise under test is the one an answer of 0 makes: the packet is committed. A write that
fails must turn into 4 (never 0), leave the store passing `PRAGMA integrity_check`, and leave the
server able to store again once the fault is gone. SIGKILL during group commit is proven in
tests/test_durability.py; broker outages in tests/test_bridge_e2e.py.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from conftest import store_of
from serverproc import free_port, send, start_server, stop
from test_server import running

from dtgserver.protocol import StatusLog, decode, encode
from dtgserver.store import Control
from dtgserver.testing import dtg_bytes, status_log

pytestmark = pytest.mark.slow

OK, UNKNOWN, MAINTENANCE, OVERLOADED = b"\x09\x00", b"\x09\x02", b"\x09\x03", b"\x09\x04"


def store_contents(data_dir: Path) -> tuple[list[bytes], str]:
    """Every stored raw packet, and the result of PRAGMA integrity_check."""
    db = sqlite3.connect(data_dir / "store-0.db")
    try:
        rows = [bytes(raw) for (raw,) in db.execute("SELECT raw FROM packets")]
        return rows, db.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        db.close()


def check_store(data_dir: Path, acked: list[bytes], sent: list[bytes]) -> list[bytes]:
    """The store is sound: integrity ok, every answered-0 packet once, nothing that was not sent whole."""
    rows, integrity = store_contents(data_dir)
    assert integrity == "ok"
    assert len(rows) == len(set(rows)), "a packet stored twice"
    assert set(acked) <= set(rows), f"{len(set(acked) - set(rows))} packets answered 0 are not stored"
    assert set(rows) <= set(sent), "stored a packet that was never sent"
    for raw in rows:
        decode(raw)  # whole packets only: each decodes
    return rows


def log_files(data_dir: Path, modem: str) -> dict[str, str]:
    folder = data_dir / "logs" / modem
    return {f.name: f.read_text("utf-8") for f in sorted(folder.iterdir())} if folder.exists() else {}


# -- disk full ----------------------------------------------------------------------------------


async def test_disk_full_answers_4_then_recovers(tmp_path: Path) -> None:
    """A real write failure with no mount: the running server's RLIMIT_FSIZE lowered to 1 byte.

    Every write past offset 0 of any file then fails with EFBIG (Python ignores SIGXFSZ), exactly as
    a full disk fails the write; raising the limit again is space coming back.
    """
    port = free_port()
    process = await start_server(tmp_path, port)
    sent: list[bytes] = []
    acked: list[bytes] = []
    try:
        for minute in range(10):
            sent.append(dtg_bytes("01011110000", minute=minute, bodies=5))
            assert await send(port, sent[-1]) == OK
            acked.append(sent[-1])

        _, hard = resource.prlimit(process.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (1, hard))
        during = [dtg_bytes("01022220000", minute=m, bodies=5) for m in range(20)]
        during.append(encode(status_log("01022220000", "written while the disk was full")))
        sent += during
        answers = [await send(port, packet) for packet in during]
        assert answers == [OVERLOADED] * len(during), answers  # never 0: nothing could be written
        assert process.poll() is None, "the server died of a full disk"
        assert check_store(tmp_path, acked, sent) == acked  # nothing of the failed commits is stored
        assert log_files(tmp_path, "01022220000") == {}  # nor a half-written log file

        resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (hard, hard))
        for packet in during:  # the terminals resend what was answered 4
            assert await send(port, packet) == OK
            acked.append(packet)
    finally:
        code, log = stop(process)
    assert code == 0, log
    assert "commit of 1 packets failed" in log
    rows = check_store(tmp_path, acked, sent)
    assert sorted(rows) == sorted(acked)
    assert log_files(tmp_path, "01022220000") == {"2026112108000000.log": "written while the disk was full"}


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small tmpfs at `path` (root only); unmounted at the end."""
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); "
                    "test_disk_full_answers_4_then_recovers covers the fault without a mount")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def fill(path: Path) -> Path:
    """Write zeros to one file until the filesystem has no space left."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for size in (65536, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, bytes(size))
    finally:
        os.close(fd)
    fd = os.open(filler, os.O_WRONLY | os.O_APPEND)
    try:
        with pytest.raises(OSError) as full:
            os.write(fd, bytes(1))
    finally:
        os.close(fd)
    assert full.value.errno == errno.ENOSPC
    return filler


async def test_tmpfs_full_answers_4_then_recovers(tmp_path: Path) -> None:
    """The same on a really full filesystem (ENOSPC): a 4 MiB tmpfs filled with one file."""
    with tmpfs(tmp_path / "small", "4m") as data_dir:
        acked: list[bytes] = []
        sent: list[bytes] = []
        async with running(data_dir) as server:
            assert server.port
            for minute in range(5):
                sent.append(dtg_bytes("01033330000", minute=minute, bodies=10))
                assert await send(server.port, sent[-1]) == OK
                acked.append(sent[-1])
            filler = fill(data_dir)
            answers = []
            for minute in range(200):  # more than the WAL already holds: new pages are needed
                sent.append(dtg_bytes("01044440000", minute=minute, bodies=60))
                answers.append(await send(server.port, sent[-1]))
                if answers[-1] == OK:
                    acked.append(sent[-1])  # written into space the WAL already had: truly stored
                elif answers.count(OVERLOADED) >= 5:
                    break
            assert set(answers) <= {OK, OVERLOADED}
            assert answers.count(OVERLOADED) >= 5, "the full disk never showed"
            assert answers[-5:] == [OVERLOADED] * 5  # once full, it stays 4 (never 0)
            check_store(data_dir, acked, sent)

            filler.unlink()
            for packet in sent:
                if packet not in acked:
                    assert await send(server.port, packet) == OK
                    acked.append(packet)
        assert store_of(server).stats.failed_commits >= 5
        rows = check_store(data_dir, acked, sent)
        assert sorted(rows) == sorted(acked)


# -- read-only data dir ------------------------------------------------------------------------


@contextlib.contextmanager
def immutable(*paths: Path) -> Iterator[None]:
    """chattr +i: even root, even through a file descriptor already open, can no longer write."""
    result = subprocess.run(["chattr", "+i", *map(str, paths)], capture_output=True, text=True)
    try:
        assert result.returncode == 0, f"chattr +i failed: {result.stderr}"
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, paths)], capture_output=True, check=False)


async def test_read_only_data_dir_answers_4_then_recovers(tmp_path: Path) -> None:
    """The data dir and the database files made immutable under a running server (root ignores
    permission bits; a read-only remount is refused while SQLite holds the files open for writing)."""
    acked: list[bytes] = []
    sent: list[bytes] = []
    async with running(tmp_path) as server:
        assert server.port
        for minute in range(5):
            sent.append(dtg_bytes("01055550000", minute=minute, bodies=5))
            assert await send(server.port, sent[-1]) == OK
            acked.append(sent[-1])
        (tmp_path / "logs").mkdir(exist_ok=True)
        during = [dtg_bytes("01066660000", minute=m, bodies=5) for m in range(10)]
        during.append(encode(status_log("01066660000", "written while read-only")))
        sent += during
        with immutable(tmp_path, tmp_path / "logs", tmp_path / "store-0.db", tmp_path / "store-0.db-wal"):
            answers = [await send(server.port, packet) for packet in during]
            assert answers == [OVERLOADED] * len(during)
        check_store(tmp_path, acked, sent)
        assert log_files(tmp_path, "01066660000") == {}
        for packet in during:
            assert await send(server.port, packet) == OK
            acked.append(packet)
    rows = check_store(tmp_path, acked, sent)
    assert sorted(rows) == sorted(acked)
    assert log_files(tmp_path, "01066660000") == {"2026112108000000.log": "written while read-only"}


async def test_an_unreadable_control_db_keeps_the_last_state_and_is_retried(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """control.db overwritten with garbage under a running server: every reload fails ("file is not
    a database"); the server keeps serving with the registry it had, then reloads once it is back."""
    control = Control(tmp_path)
    control.add_device("01011112222")
    control.set_registry_enforced(True)
    control.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in control.db itself
    control.close()
    path = tmp_path / "control.db"
    good = path.read_bytes()
    async with running(tmp_path) as server:
        assert server.port and server.control_state.registry_enforced
        for damaged in (path, tmp_path / "control.db-shm"):  # in place: the server's connection reads them
            with open(damaged, "r+b") as f:  # (the -shm too, or it would see no change and read nothing)
                f.write(b"garbage!" * (damaged.stat().st_size // 8))
        with trio.fail_after(10):
            while server.control_failures < 3:  # retried at every poll, the server still up
                await trio.sleep(0.02)
        assert await send(server.port, dtg_bytes("01011112222")) == OK
        assert await send(server.port, dtg_bytes("01033334444")) == UNKNOWN  # the registry loaded before
        assert server.metrics.gauges["control_reload_failures_total"]() >= 3
        with open(path, "r+b") as f:
            f.write(good)
        control = Control(tmp_path)
        try:
            control.set_maintenance(True)
        finally:
            control.close()
        with trio.fail_after(10):
            while not server.control_state.maintenance:
                await trio.sleep(0.02)
        assert await send(server.port, dtg_bytes("01011112222", minute=1)) == MAINTENANCE
    errors = [r.getMessage() for r in caplog.records if r.name == "dtgserver.server" and r.levelname == "ERROR"]
    assert len(errors) == 1 and "file is not a database" in errors[0]  # once per outage, not once a poll
    assert store_contents(tmp_path)[0] == [dtg_bytes("01011112222")]


# -- SIGTERM under load -----------------------------------------------------------------------


async def test_sigterm_under_load_answers_or_closes_and_exits_0(tmp_path: Path) -> None:
    """16 terminals, each one connection sending packet after packet; SIGTERM mid-stream.

    Every session in flight is answered or closed (no terminal hangs), the process exits 0 within
    the grace period, every answered-0 packet is stored once and nothing is stored half.
    """
    port = free_port()
    process = await start_server(tmp_path, port, "--grace-period", "2")
    sent: list[bytes] = []
    acked: list[bytes] = []
    endings: dict[str, int] = {}

    async def terminal(n: int) -> None:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            endings["refused"] = endings.get("refused", 0) + 1
            return
        async with stream:
            for minute in range(100_000):
                packet = (dtg_bytes(f"0107777{n:04d}", minute=minute, bodies=5) if minute % 10
                          else encode(status_log(f"0107777{n:04d}", f"log {minute}")))
                try:
                    await stream.send_all(packet)
                    sent.append(packet)
                    answer = b""
                    while len(answer) < 2 and (chunk := await stream.receive_some(2)):
                        answer += chunk
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    answer = b""
                if answer != OK:
                    ending = "closed" if answer == b"" else f"answered {answer[1]}"
                    endings[ending] = endings.get(ending, 0) + 1
                    return
                acked.append(packet)

    try:
        with trio.fail_after(30):  # grace period 2 s: every terminal ends well within this
            async with trio.open_nursery() as nursery:
                for n in range(16):
                    nursery.start_soon(terminal, n)
                while len(acked) < 300:
                    await trio.sleep(0.01)
                half = await trio.open_tcp_stream("127.0.0.1", port)  # half a packet in flight at SIGTERM
                await half.send_all(dtg_bytes("01077779999")[:1000])
                process.send_signal(signal.SIGTERM)
                code = await trio.to_thread.run_sync(process.wait)
                assert await half.receive_some(16) == b""  # closed unanswered
                await half.aclose()
    finally:
        code, log = stop(process)
    assert code == 0, log
    assert sum(endings.values()) == 16, endings
    assert set(endings) <= {"closed", "answered 4"}, endings  # closed by the grace deadline, or told to come back
    rows = check_store(tmp_path, acked, sent)  # the half packet was not sent whole: not stored
    assert len(rows) >= len(acked) >= 300
    for raw in rows:  # status logs: the file of every stored one exists, whole
        record = decode(raw)
        if isinstance(record, StatusLog):
            assert str(record.log) in log_files(tmp_path, str(record.modem)).values()
