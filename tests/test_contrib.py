"""contrib/: the systemd units (the server's, and its bridge's in a process of its own) pass
`systemd-analyze verify` and run commands `serve` and `bridge` accept; the sample config file names
every option of `serve` and of `bridge` with its default, each in its command's table."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
from click.core import UNSET  # type: ignore[attr-defined]  # click's "no value" sentinel, not in its __all__
from click.testing import CliRunner
from test_config import configs  # noqa: F401  (the fixture)

from dtgserver.cli import main
from dtgserver.cli.bridge_cmds import bridge
from dtgserver.cli.server_cmds import serve
from dtgserver.server.config import ServerConfig

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
UNIT = CONTRIB / "dtgserver.service"
BRIDGE_UNIT = CONTRIB / "dtgserver-bridge.service"
PRUNE_UNIT, PRUNE_TIMER = CONTRIB / "dtgserver-prune.service", CONTRIB / "dtgserver-prune.timer"
SAMPLE = CONTRIB / "dtgserver.toml"
VENV_BIN = Path(sys.executable).parent  # where pip put this checkout's `dtgserver` script


def long_name(param: click.Parameter) -> str:
    return max(param.opts, key=len).removeprefix("--")


def default_of(param: click.Parameter) -> Any:
    """The value a file would give to mean the default: False for a flag, strings for paths, None for none."""
    value = param.default
    if isinstance(param, click.Option) and param.is_flag and not param.count:
        return bool(value) if value is not UNSET else False
    if value is UNSET or value is None:
        return None
    return str(value) if isinstance(value, Path) else value


COMMANDS = {"serve": serve, "bridge": bridge}


def options(command: str = "serve") -> dict[str, click.Parameter]:
    return {long_name(p): p for p in COMMANDS[command].params if p.name not in ("config", "help")}


@pytest.mark.parametrize("command", COMMANDS)
def test_the_sample_config_names_every_option_with_its_default(command: str) -> None:
    text = SAMPLE.read_text("utf-8")
    assert set(tomllib.loads(text)) == set(COMMANDS)
    table = tomllib.loads(text)[command]
    section = re.split(r"^\[", text, flags=re.MULTILINE)[list(COMMANDS).index(command) + 1]  # its table's lines
    commented = set(re.findall(r"^# ([a-z-]+) = ", section, re.MULTILINE))
    assert set(table) | commented == set(options(command))
    assert set(table) & commented == set()
    for key, value in table.items():
        assert value == default_of(options(command)[key]), key
    for key in commented:  # only what has no default may be left out
        assert default_of(options(command)[key]) is None, key


def test_the_sample_config_is_what_serve_runs_without_options(configs: list[ServerConfig]) -> None:  # noqa: F811
    result = CliRunner().invoke(main, ["serve", "--config", str(SAMPLE)])
    assert result.exit_code == 0, result.output
    assert configs == [ServerConfig()]


def unit(path: Path = UNIT) -> dict[str, list[str]]:
    entries: dict[str, list[str]] = {}
    for line in path.read_text("utf-8").splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            entries.setdefault(key, []).append(value)
    return entries


@pytest.mark.parametrize("paths", [[UNIT], [BRIDGE_UNIT], [PRUNE_UNIT, PRUNE_TIMER]],
                         ids=lambda paths: paths[0].stem)
def test_systemd_analyze_verifies_the_unit(tmp_path: Path, paths: list[Path]) -> None:
    """With ExecStart pointing at this checkout's dtgserver (verify wants an executable there)."""
    command = shlex.split(unit(paths[0])["ExecStart"][0])
    assert command[0] == "/opt/dtgserver/bin/dtgserver"
    installed = [tmp_path / path.name for path in paths]
    for path, copy in zip(paths, installed, strict=True):
        copy.write_text(path.read_text("utf-8").replace(command[0], str(VENV_BIN / "dtgserver")), "utf-8")
    checked = subprocess.run(["systemd-analyze", "verify", *map(str, installed)], capture_output=True, text=True,
                             timeout=120)
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", "")


@pytest.mark.parametrize(("line", "broken"), [("Restart=on-failure", "Restartt=on-failure"),
                                              ("ExecStart=/opt/dtgserver/bin/dtgserver", "ExecStart=/nonexistent")])
def test_systemd_analyze_finds_a_broken_unit(tmp_path: Path, line: str, broken: str) -> None:
    """The check above can fail: an unknown key or a missing program is reported."""
    text = UNIT.read_text("utf-8")
    assert line in text
    installed = tmp_path / "dtgserver.service"
    text = text.replace(line, broken).replace("/opt/dtgserver/bin/dtgserver", str(VENV_BIN / "dtgserver"))
    installed.write_text(text, "utf-8")
    checked = subprocess.run(["systemd-analyze", "verify", str(installed)], capture_output=True, text=True,
                             timeout=120)
    assert checked.returncode != 0 or checked.stderr


def test_the_unit_runs_a_dedicated_user_with_room_for_every_connection(configs: list[ServerConfig]) -> None:  # noqa: F811
    entries = unit()
    assert entries["User"] == entries["Group"] == ["dtgserver"]
    assert "u dtgserver - " in (CONTRIB / "dtgserver.sysusers").read_text("utf-8")
    assert entries["Restart"] == ["on-failure"] and entries["RestartPreventExitStatus"] == ["2"]
    assert int(entries["LimitNOFILE"][0]) >= ServerConfig().max_connections + 1000
    assert entries["StateDirectory"] == ["dtgserver"] and entries["ProtectSystem"] == ["strict"]
    args = shlex.split(entries["ExecStart"][0])[1:]
    assert args[:3] == ["serve", "--config", "/etc/dtgserver.toml"]
    assert args[args.index("--data-dir") + 1] == "/var/lib/dtgserver"  # the StateDirectory
    args[2] = str(SAMPLE)  # the sample, installed as /etc/dtgserver.toml
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert configs == [ServerConfig(data_dir=Path("/var/lib/dtgserver"))]


def test_the_bridge_unit_runs_the_bridge_beside_the_server_as_its_user_on_its_data(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same user, data directory, config file and hardening as the server's unit; its command,
    with the sample config installed and a broker given, reaches the bridge with the sample's options."""
    import trio
    from test_export import fill

    import dtgserver.bridge.service
    from dtgserver.bridge.consumer import BridgeOptions
    from dtgserver.testing import dtg_bytes

    server, entries = unit(), unit(BRIDGE_UNIT)
    for key in ("User", "Group", "StateDirectory", "WorkingDirectory", "UMask", "Restart",
                "RestartPreventExitStatus"):
        assert entries[key] == server[key], key
    hardening = UNIT.read_text("utf-8").split("# The data directory", 1)[1]
    assert BRIDGE_UNIT.read_text("utf-8").split("# The data directory", 1)[1] == hardening
    assert "dtgserver.service" in entries["After"][0].split()
    args = shlex.split(entries["ExecStart"][0])[1:]
    server_args = shlex.split(server["ExecStart"][0])[1:]
    assert args[:3] == ["bridge", "--config", server_args[2]]  # one file: [serve] and [bridge]
    assert args[args.index("--data-dir") + 1] == server_args[server_args.index("--data-dir") + 1]

    trio.run(fill, tmp_path, [dtg_bytes()])  # a data dir with a store, as the server leaves it
    seen: list[BridgeOptions] = []

    def capture(packet_log: Any, shards: Any, cursor: Any, mqtt: Any, options: BridgeOptions) -> None:
        seen.append(options)
        raise ValueError("no bridge in this test")

    monkeypatch.setattr(dtgserver.bridge.service, "Bridge", capture)
    args[2], args[args.index("--data-dir") + 1] = str(SAMPLE), str(tmp_path)
    result = CliRunner().invoke(main, args, env={"DTGSERVER_MQTT": "mqtt://127.0.0.1:1"})
    assert result.exit_code == 1 and "no bridge in this test" in result.stderr, result.output
    assert seen == [BridgeOptions()]  # the sample's [bridge] is every default


def test_the_prune_timer_runs_prune_daily_on_the_servers_data_as_its_user(tmp_path: Path) -> None:
    import trio
    from test_export import fill

    from dtgserver.testing import dtg_bytes

    server, entries = unit(), unit(PRUNE_UNIT)
    for key in ("User", "Group", "StateDirectory", "WorkingDirectory", "UMask"):
        assert entries[key] == server[key], key
    hardening = UNIT.read_text("utf-8").split("# The data directory", 1)[1].split("[Install]")[0]
    assert PRUNE_UNIT.read_text("utf-8").split("# The data directory", 1)[1] == hardening
    assert entries["Type"] == ["oneshot"] and "[Install]" not in PRUNE_UNIT.read_text("utf-8")  # the timer starts it
    timer = unit(PRUNE_TIMER)
    assert timer["OnCalendar"] == ["*-*-* 04:00:00"] and timer["Persistent"] == ["true"]
    assert timer["WantedBy"] == ["timers.target"]
    args = shlex.split(entries["ExecStart"][0])[1:]
    server_args = shlex.split(server["ExecStart"][0])[1:]
    assert args[0] == "prune" and "--dry-run" not in args
    assert args[args.index("--data-dir") + 1] == server_args[server_args.index("--data-dir") + 1]
    trio.run(fill, tmp_path, [dtg_bytes()])
    args[args.index("--data-dir") + 1] = str(tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "store-0.db: removed 0 packets received before" in result.output
