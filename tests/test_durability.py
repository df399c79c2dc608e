"""The durability promise, proven the hard way: a real server process SIGKILLed under load.

Every packet that was answered 0 must be in the store exactly once after the crash, and the
restarted server must treat a resend of it as already stored.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest
import trio
from serverproc import free_port, send, start_server

from dtgserver.testing import dtg_bytes

pytestmark = pytest.mark.slow


def stored_counts(data_dir: Path) -> tuple[dict[bytes, int], str]:
    db = sqlite3.connect(data_dir / "store-0.db")
    try:
        counts: dict[bytes, int] = {}
        for (raw,) in db.execute("SELECT raw FROM packets"):
            counts[bytes(raw)] = counts.get(bytes(raw), 0) + 1
        return counts, db.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        db.close()


async def load_until_killed(port: int, process: subprocess.Popen[bytes], round_: int, acked: list[bytes]) -> int:
    """16 terminals send unique packets as fast as answered; SIGKILL the server mid-stream."""
    sent = 0

    async def terminal(n: int) -> None:
        nonlocal sent
        for minute in range(10_000):
            packet = dtg_bytes(f"0101{round_:03d}{n:04d}", minute=minute, bodies=5)
            try:
                answer = await send(port, packet)
            except (OSError, trio.BrokenResourceError, trio.TooSlowError):
                return
            sent += 1
            if answer == b"\x09\x00":
                acked.append(packet)
            elif answer == b"":
                return

    async with trio.open_nursery() as nursery:
        for n in range(16):
            nursery.start_soon(terminal, n)
        with trio.fail_after(30):
            while len(acked) < 50 * (round_ + 1):
                await trio.sleep(0.01)
        process.send_signal(signal.SIGKILL)  # mid-stream: commits and answers are in flight
        process.wait()
    return sent


async def test_sigkill_under_load_loses_no_acknowledged_packet(tmp_path: Path) -> None:
    acked: list[bytes] = []
    port = free_port()
    for round_ in range(3):
        process = await start_server(tmp_path, port)
        acked_before = len(acked)
        try:
            sent = await load_until_killed(port, process, round_, acked)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            if process.stderr:
                process.stderr.close()
        assert sent >= len(acked) - acked_before > 0
        counts, integrity = stored_counts(tmp_path)
        assert integrity == "ok"
        missing = [p for p in acked if counts.get(p, 0) != 1]
        assert not missing, f"{len(missing)} acknowledged packets not stored exactly once"
        assert all(c == 1 for c in counts.values())

    # After a restart, resending what was acknowledged is answered 0 and stores nothing new.
    before = sum(stored_counts(tmp_path)[0].values())
    process = await start_server(tmp_path, port)
    try:
        for packet in acked[:: max(1, len(acked) // 40)]:
            assert await send(port, packet) == b"\x09\x00"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        if process.stderr:
            process.stderr.close()
    assert sum(stored_counts(tmp_path)[0].values()) == before
    assert os.path.exists(tmp_path / "control.db")


async def test_a_second_signal_during_shutdown_exits_cleanly(tmp_path: Path) -> None:
    """Ctrl-C twice (or a supervisor's SIGTERM after the terminal's SIGINT): exit 0, no traceback."""
    port = free_port()
    process = await start_server(tmp_path, port, "--grace-period", "2")
    packet = dtg_bytes()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(packet[:10])  # a session in flight: shutdown waits for it
        process.send_signal(signal.SIGINT)
        await trio.sleep(0.3)
        process.send_signal(signal.SIGINT)
        await trio.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        code = await trio.to_thread.run_sync(lambda: process.wait(timeout=20))
    assert process.stderr
    log = process.stderr.read().decode("utf-8", "replace")
    process.stderr.close()
    assert code == 0, log
    assert "Traceback" not in log
