"""`serve --external-bridge`: the backlog of a `dtgserver bridge` in another process, read from its
cursor files, turns new packets away over `--backlog-high-water` (dtgserver/server/backlog.py).

In-process servers on loopback, real SQLite; the cursor is written by the bridge's own
`SqliteCursor`, as `dtgserver bridge` writes it."""

from __future__ import annotations

from pathlib import Path

import trio
from click.testing import CliRunner
from test_server import OK, OVERLOADED, exchange, running

from dtgserver.bridge.cursor import SqliteCursor, cursor_path
from dtgserver.cli import main
from dtgserver.server.app import DtgServer
from dtgserver.testing import dtg_bytes


def save_cursor(data_dir: Path, position: int) -> None:
    cursor = SqliteCursor(data_dir, 0)
    try:
        cursor.save(position, {})
    finally:
        cursor.close()


async def cursor_read(server: DtgServer, position: int | None) -> None:
    assert server.external_backlog is not None
    with trio.fail_after(30):
        while server.external_backlog.cursors[0] != position:
            await trio.sleep(0.05)


async def send(server: DtgServer, modem: int) -> bytes:
    assert server.port
    return await exchange(server.port, dtg_bytes(f"0100000{modem:04d}"))


async def test_a_bridge_far_behind_gets_4_and_catching_up_gets_0_again(tmp_path: Path) -> None:
    async with running(tmp_path, external_bridge=True, backlog_high_water=3) as server:
        backlog = server.metrics.gauges["mqtt_backlog"]
        # no bridge file yet: every packet is backlog, but none is turned away
        assert not cursor_path(tmp_path, 0).exists()
        assert [await send(server, i) for i in range(5)] == [OK] * 5
        assert backlog() == 5
        save_cursor(tmp_path, 1)  # the bridge had 1 packet acknowledged: 4 waiting, over the mark
        await cursor_read(server, 1)
        assert backlog() == 4
        assert await send(server, 5) == OVERLOADED
        assert not server.healthy()
        save_cursor(tmp_path, 5)  # caught up, without a restart
        await cursor_read(server, 5)
        assert backlog() == 0
        assert await send(server, 6) == OK
        assert backlog() == 1
        assert server.healthy()


async def test_without_the_option_a_bridge_behind_turns_nothing_away(tmp_path: Path) -> None:
    save_cursor(tmp_path, 0)
    async with running(tmp_path, backlog_high_water=1) as server:
        assert server.external_backlog is None
        assert [await send(server, i) for i in range(3)] == [OK] * 3
        assert server.metrics.gauges["mqtt_backlog"]() == 0


async def test_an_unreadable_cursor_file_keeps_the_last_value_and_the_server_up(tmp_path: Path) -> None:
    async with running(tmp_path, external_bridge=True, backlog_high_water=2) as server:
        assert server.external_backlog is not None
        assert [await send(server, i) for i in range(3)] == [OK] * 3
        save_cursor(tmp_path, 0)
        await cursor_read(server, 0)
        assert await send(server, 3) == OVERLOADED
        path = cursor_path(tmp_path, 0)
        for leftover in tmp_path.glob("bridge-0.db-*"):
            leftover.unlink()
        path.write_bytes(b"not a database, " * 256)  # damaged
        with trio.fail_after(30):
            while server.external_backlog.read_errors < 2:
                await trio.sleep(0.05)
        assert server.metrics.gauges["bridge_cursor_read_errors_total"]() >= 2
        assert server.external_backlog.cursors[0] == 0  # the last value read, still applied
        assert await send(server, 4) == OVERLOADED
        path.unlink()
        save_cursor(tmp_path, 3)  # readable again
        await cursor_read(server, 3)
        assert await send(server, 5) == OK
        assert not server.stopping


def test_external_bridge_is_refused_with_an_in_process_bridge(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["serve", "--data-dir", str(tmp_path), "--external-bridge",
                                       "--mqtt", "mqtt://127.0.0.1:1"])
    assert result.exit_code == 2, result.output
    assert "--external-bridge" in result.output and "--mqtt" in result.output
