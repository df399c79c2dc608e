"""The server's commands: `devices`, `maintenance`, and `serve --help` / `serve` failing cleanly.

Every command runs through click's CliRunner against real files in tmp_path; what a command
wrote is read back through the control database itself.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner, Result
from test_server import MAINTENANCE, OK, UNKNOWN, exchange, running, stored

from dtgserver.cli import main
from dtgserver.cli.server_cmds import serve as serve_command
from dtgserver.store import Control
from dtgserver.testing import dtg_bytes


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def refused(result: Result, code: int = 1) -> str:
    """A clear error: the exit code, a message on stderr, and no traceback."""
    assert result.exit_code == code, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert result.stderr.strip()
    return result.stderr


def registry(data_dir: Path) -> dict[str, tuple[str, str]]:
    control = Control(data_dir)
    try:
        return {d.modem: (d.status.value, d.note) for d in control.devices()}
    finally:
        control.close()


def switches(data_dir: Path) -> tuple[bool, bool]:
    control = Control(data_dir)
    try:
        state = control.load()
        return state.maintenance, state.registry_enforced
    finally:
        control.close()


# -- devices ------------------------------------------------------------------------------------


def test_devices_add_list_remove(tmp_path: Path) -> None:
    assert ok(run("devices", "add", "01011112222", "01033334444", "--note", "1호차 냉동탑",
                  "--data-dir", tmp_path)) == "2 device(s) active\n"
    assert registry(tmp_path) == {"01011112222": ("active", "1호차 냉동탑"), "01033334444": ("active", "1호차 냉동탑")}

    listing = ok(run("devices", "list", "--data-dir", tmp_path)).splitlines()
    assert listing[0] == "registry not enforced; 2 device(s)"
    assert [line.split()[:2] for line in listing[1:]] == [["01011112222", "active"], ["01033334444", "active"]]
    assert all(line.endswith("1호차 냉동탑") for line in listing[1:])

    assert ok(run("devices", "remove", "01011112222", "--data-dir", tmp_path)) == "removed 1 device(s): 01011112222\n"
    assert list(registry(tmp_path)) == ["01033334444"]
    as_json = json.loads(ok(run("devices", "list", "--json", "--data-dir", tmp_path)))
    assert as_json == {"registry_enforced": False, "maintenance": False,
                       "devices": [{"modem": "01033334444", "status": "active", "note": "1호차 냉동탑"}]}


def test_devices_list_json_says_whether_the_registry_is_enforced(tmp_path: Path) -> None:
    """The JSON carries the switches with the entries: a program needs no second command (or parse of the text)."""
    def listed() -> dict[str, object]:
        output = ok(run("devices", "list", "--json", "--data-dir", tmp_path))
        assert output.count("\n") == 1  # one object, one line
        parsed: dict[str, object] = json.loads(output)
        return parsed

    ok(run("devices", "add", "01011112222", "--cancelled", "--data-dir", tmp_path))
    cancelled = [{"modem": "01011112222", "status": "cancelled", "note": ""}]
    assert listed() == {"registry_enforced": False, "maintenance": False, "devices": cancelled}
    ok(run("devices", "enforce", "on", "--data-dir", tmp_path))
    ok(run("maintenance", "on", "--data-dir", tmp_path))
    assert listed() == {"registry_enforced": True, "maintenance": True, "devices": cancelled}
    ok(run("devices", "remove", "01011112222", "--data-dir", tmp_path))
    ok(run("devices", "enforce", "off", "--data-dir", tmp_path))
    assert listed() == {"registry_enforced": False, "maintenance": True, "devices": []}


def test_devices_add_cancelled_and_back(tmp_path: Path) -> None:
    ok(run("devices", "add", "01011112222", "--data-dir", tmp_path))
    assert ok(run("devices", "add", "01011112222", "--cancelled", "--note", "계약 해지",
                  "--data-dir", tmp_path)) == "1 device(s) cancelled\n"
    assert registry(tmp_path) == {"01011112222": ("cancelled", "계약 해지")}
    assert "01011112222  cancelled  계약 해지" in ok(run("devices", "list", "--data-dir", tmp_path))
    ok(run("devices", "add", "01011112222", "--data-dir", tmp_path))  # adding again re-activates
    assert registry(tmp_path) == {"01011112222": ("active", "")}


@pytest.mark.parametrize("bad", ["010123456789", "010-1234-5678", "abc", "", "０１０", "0101234\n"])
def test_devices_add_bad_modem_is_refused(tmp_path: Path, bad: str) -> None:
    message = refused(run("devices", "add", "01011112222", bad, "--data-dir", tmp_path), code=2)
    assert "modem numbers are 1 to 11 digits" in message
    assert registry(tmp_path) == {}  # not even the good one: all or nothing


def test_devices_add_needs_a_modem(tmp_path: Path) -> None:
    refused(run("devices", "add", "--data-dir", tmp_path), code=2)


def test_devices_remove_unknown_is_an_error(tmp_path: Path) -> None:
    ok(run("devices", "add", "01011112222", "--data-dir", tmp_path))
    result = run("devices", "remove", "01099999999", "01011112222", "--data-dir", tmp_path)
    assert refused(result) == "dtgserver: error: not in the registry: 01099999999\n"
    assert result.stdout == "removed 1 device(s): 01011112222\n"
    assert registry(tmp_path) == {}  # the known one is removed all the same


def test_devices_enforce_on_off(tmp_path: Path) -> None:
    result = run("devices", "enforce", "on", "--data-dir", tmp_path)
    assert ok(result) == "registry enforcement on\n"
    assert "no active device" in result.stderr  # every terminal would get 2 and drop its backlog
    assert switches(tmp_path) == (False, True)
    assert ok(run("devices", "list", "--data-dir", tmp_path)).startswith("registry enforced; 0 device(s)")
    ok(run("devices", "enforce", "off", "--data-dir", tmp_path))
    assert switches(tmp_path) == (False, False)
    refused(run("devices", "enforce", "maybe", "--data-dir", tmp_path), code=2)


def test_devices_enforce_on_with_active_devices_says_nothing_more(tmp_path: Path) -> None:
    ok(run("devices", "add", "01011112222", "--data-dir", tmp_path))
    result = run("devices", "enforce", "on", "--data-dir", tmp_path)
    assert ok(result) == "registry enforcement on\n" and result.stderr == ""


def test_data_dir_from_the_environment(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["devices", "add", "01011112222"], env={"DTGSERVER_DATA_DIR": str(tmp_path)})
    ok(result)
    assert list(registry(tmp_path)) == ["01011112222"]


BROKEN = b"not a database, " * 512


@pytest.mark.parametrize("command", [["devices", "add", "01011112222"], ["devices", "remove", "01011112222"],
                                     ["devices", "list"], ["devices", "enforce", "on"], ["maintenance", "on"]])
def test_broken_control_db_is_a_clear_error(tmp_path: Path, command: list[str]) -> None:
    (tmp_path / "control.db").write_bytes(BROKEN)
    message = refused(run(*command, "--data-dir", tmp_path))
    assert message == f"dtgserver: error: {tmp_path / 'control.db'}: file is not a database\n"
    assert (tmp_path / "control.db").read_bytes() == BROKEN  # left as it was


def test_data_dir_that_cannot_be_made_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    data_dir = tmp_path / "file" / "dir"
    message = refused(run("maintenance", "on", "--data-dir", data_dir))
    assert message.startswith(f"dtgserver: error: {data_dir / 'control.db'}: [Errno 20] Not a directory")


@pytest.mark.parametrize("command", [["devices", "list"], ["devices", "list", "--json"],
                                     ["devices", "remove", "01011112222"], ["maintenance", "status"]])
def test_reading_a_data_dir_that_holds_nothing_is_an_error_and_makes_nothing(tmp_path: Path,
                                                                              command: list[str]) -> None:
    """A mistyped --data-dir is said, not shown as an empty registry (and no control.db appears there)."""
    typo = tmp_path / "dtg-dta"
    message = refused(run(*command, "--data-dir", typo))
    assert message == (f"dtgserver: error: --data-dir {typo}: no dtgserver data here (no control.db); "
                       "`dtgserver serve` or `dtgserver devices add` makes it\n")
    assert not typo.exists()


# -- maintenance --------------------------------------------------------------------------------


def test_maintenance_on_off_writes_the_control_db(tmp_path: Path) -> None:
    assert ok(run("maintenance", "on", "--data-dir", tmp_path)) == "maintenance on\n"
    assert (tmp_path / "control.db").is_file()
    assert switches(tmp_path) == (True, False)
    ok(run("maintenance", "off", "--data-dir", tmp_path))
    assert switches(tmp_path) == (False, False)
    refused(run("maintenance", "soon", "--data-dir", tmp_path), code=2)


def test_maintenance_status_shows_both_switches(tmp_path: Path) -> None:
    ok(run("maintenance", "off", "--data-dir", tmp_path))
    assert ok(run("maintenance", "status", "--data-dir", tmp_path)) == \
        "maintenance off\nregistry not enforced; 0 device(s)\n"
    ok(run("maintenance", "on", "--data-dir", tmp_path))
    ok(run("devices", "add", "01011112222", "01033334444", "--data-dir", tmp_path))
    ok(run("devices", "enforce", "on", "--data-dir", tmp_path))
    assert ok(run("maintenance", "status", "--data-dir", tmp_path)) == \
        "maintenance on\nregistry enforced; 2 device(s)\n"
    assert switches(tmp_path) == (True, True)  # status changes nothing


@pytest.mark.parametrize("bad", ["abc", "010-1234-5678", "010123456789", ""])
def test_export_of_a_modem_that_is_no_number_is_a_usage_error(tmp_path: Path, bad: str) -> None:
    message = refused(run("export", "--modem", bad, "--data-dir", tmp_path), code=2)
    assert f"Invalid value for '--modem': {bad!r} is no modem number (1 to 11 digits)" in message


async def test_commands_reach_a_running_server(tmp_path: Path) -> None:
    """What the docs promise: the commands change a running server's answers, no restart."""

    async def until(condition: Callable[[], bool]) -> None:
        with trio.fail_after(5):
            while not condition():
                await trio.sleep(0.01)

    async with running(tmp_path) as server:
        assert server.port
        ok(run("maintenance", "on", "--data-dir", tmp_path))
        await until(lambda: server.control_state.maintenance)
        assert await exchange(server.port, dtg_bytes("01011112222")) == MAINTENANCE
        ok(run("maintenance", "off", "--data-dir", tmp_path))
        ok(run("devices", "add", "01011112222", "--data-dir", tmp_path))
        ok(run("devices", "enforce", "on", "--data-dir", tmp_path))
        await until(lambda: server.control_state.registry_enforced and not server.control_state.maintenance)
        assert await exchange(server.port, dtg_bytes("01011112222")) == OK
        assert await exchange(server.port, dtg_bytes("01033334444")) == UNKNOWN
        ok(run("devices", "add", "01011112222", "--cancelled", "--data-dir", tmp_path))
        ok(run("devices", "enforce", "off", "--data-dir", tmp_path))
        await until(lambda: not server.control_state.registry_enforced)
        assert await exchange(server.port, dtg_bytes("01033334444")) == OK  # anyone, when not enforced
        # ... except a cancelled terminal, which gets 2 whether or not the registry is enforced
        assert await exchange(server.port, dtg_bytes("01011112222", minute=1)) == UNKNOWN
    assert [m for m, _, _ in stored(tmp_path)] == ["01011112222", "01033334444"]


# -- serve --------------------------------------------------------------------------------------


def test_serve_help_lists_every_option_with_its_variable() -> None:
    text = ok(run("serve", "--help"))
    flat = " ".join(text.split())  # help wraps lines; names are never split
    options = [p for p in serve_command.params if p.name]
    assert len(options) >= 20
    for option in options:
        long_name = next(o for o in option.opts if o.startswith("--"))
        envvar = f"DTGSERVER_{option.name.upper()}" if option.name != "mqtt_url" else "DTGSERVER_MQTT"
        assert re.search(rf"(^|\s|, ){re.escape(long_name)}\b", flat), long_name
        assert f"env var: {envvar}" in flat, (long_name, envvar)
    assert "default: 9320" in flat and "default: 3.0" in flat and "default: dtg-data" in flat


def test_serve_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        message = refused(run("serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir", tmp_path, "-q"))
        assert message == (f"dtgserver: error: cannot listen on 127.0.0.1:{port} (--host, --port): "
                           "Address already in use\n")
        message = refused(run("serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
                              "--data-dir", tmp_path / "workers", "-q"))
        assert message == (f"dtgserver: error: cannot listen on 127.0.0.1:{port} (--host, --port): "
                           "Address already in use\n")


def test_serve_metrics_port_in_use_names_the_metrics_address(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        message = refused(run("serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", str(port),
                              "--data-dir", tmp_path, "-q"))
    assert message == (f"dtgserver: error: cannot listen on 127.0.0.1:{port} (--metrics-host, --metrics-port): "
                       "Address already in use\n")


def test_serve_on_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "store-0.db").write_bytes(BROKEN)
    message = refused(run("serve", "--host", "127.0.0.1", "--port", "0", "--data-dir", tmp_path, "-q"))
    assert message == f"dtgserver: error: {tmp_path / 'store-0.db'}: file is not a database\n"


@pytest.mark.parametrize("processes", [["--workers", "2"], ["--writer-process"]])
def test_serve_with_processes_on_a_file_that_is_not_a_database(tmp_path: Path, processes: list[str]) -> None:
    """Found by the supervisor before any process starts, where a worker would fail and be restarted forever."""
    shards = 2 if "--workers" in processes else 1
    for shard in range(shards):
        (tmp_path / f"store-{shard}.db").write_bytes(BROKEN if shard == shards - 1 else b"")
    message = refused(run("serve", "--host", "127.0.0.1", "--port", "0", "--data-dir", tmp_path, "-q", *processes))
    assert message == f"dtgserver: error: {tmp_path / f'store-{shards - 1}.db'}: file is not a database\n"


def test_serve_data_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    message = refused(run("serve", "--port", "0", "--data-dir", tmp_path / "file"), code=2)
    assert "is a file" in message


# -- docs/server.md says what the code does -----------------------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs" / "server.md"


def option_rows() -> dict[str, str]:
    rows = {}
    for line in DOCS.read_text("utf-8").splitlines():
        if match := re.match(r"\| `(--[a-z-]+)[^`]*`", line) or re.match(r"\| `-[a-z]`, `(--[a-z-]+)`", line):
            rows[match.group(1)] = line
    return rows


def test_docs_list_every_serve_option_with_variable_and_default() -> None:
    rows = option_rows()
    for option in serve_command.params:
        long_name = next(o for o in option.opts if o.startswith("--"))
        assert long_name in rows, f"{long_name} is not in the options table of docs/server.md"
        row = rows[long_name]
        assert f"`{option.envvar}`" in row, (long_name, option.envvar)
        default = option.default
        if default is not None and isinstance(default, str | int | float | Path) and not isinstance(default, bool):
            shown = '""' if default == "" else str(default)
            assert f"`{shown}`" in row, (long_name, shown)


def test_docs_schema_is_the_code_schema() -> None:
    from dtgserver.store.control import CONTROL_SCHEMA
    from dtgserver.store.packets import PACKET_SCHEMA

    text = DOCS.read_text("utf-8")
    for schema in (PACKET_SCHEMA, CONTROL_SCHEMA):
        for statement in filter(None, (s.strip() for s in schema.split(";"))):
            assert statement + ";" in text, f"docs/server.md lacks, verbatim:\n{statement}"


async def test_docs_list_every_metric(tmp_path: Path) -> None:
    async with running(tmp_path) as server:  # without --mqtt: no bridge metrics
        assert server.port
        assert await exchange(server.port, dtg_bytes(), b"\x05\x00") == OK + bytes([9, 1])
    rendered = {re.split(r"[{ ]", line)[0] for line in server.metrics.render().splitlines()
                if line and not line.startswith("#")}
    documented = set(re.findall(r"^\| `(dtg_[a-z0-9_]+)", DOCS.read_text("utf-8"), re.MULTILINE))
    bridge = {"dtg_mqtt_published_total", "dtg_mqtt_acknowledged_total", "dtg_mqtt_reconnects_total",
              "dtg_mqtt_connected", "dtg_bridge_derived_packets_total", "dtg_bridge_derive_errors_total",
              "dtg_bridge_read_errors_total", "dtg_bridge_cursor_saves_total", "dtg_bridge_cursor_errors_total",
              "dtg_bridge_lag_p50_seconds", "dtg_bridge_lag_p99_seconds", "dtg_bridge_trip_states",  # with --mqtt
              "dtg_bridge_leftovers_published_total", "dtg_bridge_resends_dropped_total",
              "dtg_bridge_cursor_read_errors_total"}  # with --external-bridge
    assert rendered - documented == set()
    assert documented - rendered == bridge


def test_docs_name_tests_that_exist() -> None:
    tests = Path(__file__).resolve().parent
    text = DOCS.read_text("utf-8")
    named = re.findall(r"tests/(test_\w+\.py)(?:::(test_\w+))?", text)
    assert len(named) >= 20
    for file, test in named:
        assert (tests / file).is_file(), file
        if test:
            assert re.search(rf"def {test}\(", (tests / file).read_text("utf-8")), f"{file}::{test}"


def test_docs_session_line_is_the_code_format() -> None:
    from dtgserver.server.app import Session

    text = DOCS.read_text("utf-8")
    example = next(line for line in text.splitlines() if " INFO dtgserver.session " in line)
    line = Session("10.1.2.3:40112", "01012345678", ["basic_info", "dtg", "key_off"], 60, [0, 0, 0]).line(0.0184)
    assert example.endswith(" INFO dtgserver.session " + line)
    app_source = (Path(__file__).resolve().parent.parent / "dtgserver" / "server" / "app.py").read_text("utf-8")
    for end in re.findall(r'session\.end = f?"([a-z ]+)', app_source):
        assert f"`{end.strip()}" in text, end
