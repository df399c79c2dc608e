"""contrib/: the systemd unit passes `systemd-analyze verify` and runs a command `serve` accepts;
the sample config file names every option of `serve` with its default."""

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
from dtgserver.cli.server_cmds import serve
from dtgserver.server.config import ServerConfig

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
UNIT = CONTRIB / "dtgserver.service"
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


def options() -> dict[str, click.Parameter]:
    return {long_name(p): p for p in serve.params if p.name not in ("config", "help")}


def test_the_sample_config_names_every_option_with_its_default() -> None:
    table = tomllib.loads(SAMPLE.read_text("utf-8"))["serve"]
    commented = set(re.findall(r"^# ([a-z-]+) = ", SAMPLE.read_text("utf-8"), re.MULTILINE))
    assert set(table) | commented == set(options())
    assert set(table) & commented == set()
    for key, value in table.items():
        assert value == default_of(options()[key]), key
    for key in commented:  # only what has no default may be left out
        assert default_of(options()[key]) is None, key


def test_the_sample_config_is_what_serve_runs_without_options(configs: list[ServerConfig]) -> None:  # noqa: F811
    result = CliRunner().invoke(main, ["serve", "--config", str(SAMPLE)])
    assert result.exit_code == 0, result.output
    assert configs == [ServerConfig()]


def unit() -> dict[str, list[str]]:
    entries: dict[str, list[str]] = {}
    for line in UNIT.read_text("utf-8").splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            entries.setdefault(key, []).append(value)
    return entries


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    """With ExecStart pointing at this checkout's dtgserver (verify wants an executable there)."""
    command = shlex.split(unit()["ExecStart"][0])
    assert command[0] == "/opt/dtgserver/bin/dtgserver"
    installed = tmp_path / "dtgserver.service"
    installed.write_text(UNIT.read_text("utf-8").replace(command[0], str(VENV_BIN / "dtgserver")), "utf-8")
    checked = subprocess.run(["systemd-analyze", "verify", str(installed)], capture_output=True, text=True,
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
