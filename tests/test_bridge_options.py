"""The message options of `serve`, `bridge` and `replay`: the dangerous-driving edition, the
default class, per-terminal classes and the trip deadline reach the bridge, from the command
line, the environment and the config file alike; a bad value stops the command before anything
starts (exit 2, one line naming the option and the problem)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from test_config import configs  # noqa: F401  (the fixture)
from test_export import fill

from dtgserver.bridge.consumer import BridgeOptions
from dtgserver.bridge.driving import DrivingConfig
from dtgserver.cli import main
from dtgserver.server.app import DtgServer
from dtgserver.server.config import ServerConfig
from dtgserver.testing import dtg_bytes

BROKER = "mqtt://127.0.0.1:1"  # never connected to: nothing here runs a bridge
CHOSEN = ["--edition", "chart", "--default-class", "none", "--vehicle-class", "01011112222=bus",
          "--vehicle-class", "01033334444=truck,01055556666=taxi", "--trip-deadline-h", "2.5"]
EXPECTED = BridgeOptions(driving=DrivingConfig(edition="chart", default_class=None, classes={
    "01011112222": "bus", "01033334444": "truck", "01055556666": "taxi"}), trip_deadline_ms=9_000_000)


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def message_options(options: BridgeOptions) -> tuple[DrivingConfig, int]:
    return options.driving, options.trip_deadline_ms


def test_serve_gives_them_to_its_bridge(configs: list[ServerConfig], tmp_path: Path) -> None:  # noqa: F811
    result = invoke("serve", "--data-dir", str(tmp_path), "--mqtt", BROKER, *CHOSEN)
    assert result.exit_code == 0, result.output
    (config,) = configs
    bridge = DtgServer(config).bridge  # the server's own bridge, built from its configuration
    assert bridge is not None and message_options(bridge.options) == message_options(EXPECTED)


def test_serve_takes_them_from_the_environment_and_the_file(configs: list[ServerConfig],  # noqa: F811
                                                             tmp_path: Path) -> None:
    env = {"DTGSERVER_EDITION": "chart", "DTGSERVER_DEFAULT_CLASS": "none", "DTGSERVER_TRIP_DEADLINE_H": "2.5",
           "DTGSERVER_VEHICLE_CLASS": "01011112222=bus 01033334444=truck,01055556666=taxi"}
    assert invoke("serve", env=env).exit_code == 0
    file = tmp_path / "dtg.toml"
    file.write_text('[serve]\nedition = "chart"\ndefault-class = "none"\ntrip-deadline-h = 2.5\n'
                    'vehicle-class = "01011112222=bus, 01033334444=truck,01055556666=taxi"\n', "utf-8")
    assert invoke("serve", "--config", str(file)).exit_code == 0
    assert invoke("serve").exit_code == 0
    from_env, from_file, default = (config.driving() for config in configs)
    assert from_env == from_file == EXPECTED.driving
    assert [c.trip_deadline_ms for c in configs] == [9_000_000, 9_000_000, 24 * 3_600_000]
    assert default == DrivingConfig() and default.default_class == "taxi" and default.edition == "2022"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir with a store: `bridge` and `replay` refuse one without."""
    import trio

    path = tmp_path_factory.mktemp("data")
    trio.run(fill, path, [dtg_bytes()])
    return path


def test_bridge_and_replay_give_them_to_the_consumer(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dtgserver.bridge.replay
    import dtgserver.bridge.service

    seen: list[BridgeOptions] = []

    def bridge(*args: Any, **kwargs: Any) -> None:
        seen.append(args[4])
        raise ValueError("no bridge in this test")

    async def replay(*args: Any, options: BridgeOptions, **kwargs: Any) -> int:
        seen.append(options)
        return 0

    monkeypatch.setattr(dtgserver.bridge.service, "Bridge", bridge)
    monkeypatch.setattr(dtgserver.bridge.replay, "replay", replay)
    for command in ("bridge", "replay"):
        result = invoke(command, "--data-dir", str(data_dir), "--mqtt", BROKER, *CHOSEN)
        assert result.exit_code in (0, 1) and "Error" not in result.output, result.output
        result = invoke(command, "--data-dir", str(data_dir), "--mqtt", BROKER, env={
            "DTGSERVER_EDITION": "chart", "DTGSERVER_DEFAULT_CLASS": "none", "DTGSERVER_TRIP_DEADLINE_H": "2.5",
            "DTGSERVER_VEHICLE_CLASS": "01011112222=bus,01033334444=truck 01055556666=taxi"})
        assert result.exit_code in (0, 1) and "Error" not in result.output, result.output
        invoke(command, "--data-dir", str(data_dir), "--mqtt", BROKER)
    assert [message_options(o) for o in seen] == [message_options(EXPECTED)] * 2 + [
        (DrivingConfig(), 24 * 3_600_000)] + [message_options(EXPECTED)] * 2 + [(DrivingConfig(), 24 * 3_600_000)]


BAD = [
    (["--edition", "2019"], "'--edition'", "'2019' is not one of '2022', 'chart'"),
    (["--default-class", "lorry"], "'--default-class'", "'lorry' is not one of"),
    (["--vehicle-class", "bus"], "'--vehicle-class'", "'bus': expected MODEM=CLASS with CLASS one of truck, bus, taxi"),
    (["--vehicle-class", "01012345678=lorry"], "'--vehicle-class'", "expected MODEM=CLASS"),
    (["--vehicle-class", "010-1234-5678=bus"], "'--vehicle-class'", "'010-1234-5678' is no modem number"),
    (["--trip-deadline-h", "0"], "'--trip-deadline-h'", "0"),
    (["--trip-deadline-h", "-1"], "'--trip-deadline-h'", "-1"),
    (["--trip-deadline-h", "nan"], "'--trip-deadline-h'", "not a finite number"),
    (["--trip-deadline-h", "9000"], "'--trip-deadline-h'", "9000"),
    (["--trip-deadline-h", "a day"], "'--trip-deadline-h'", "'a day' is not a valid float"),
]


def error_line(result: Result) -> str:
    """A usage error: exit 2, no traceback, exactly one line saying what is wrong."""
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.mark.parametrize("command", ["serve", "bridge", "replay"])
@pytest.mark.parametrize(("args", "option", "problem"), BAD)
def test_a_bad_value_is_a_usage_error_before_anything_starts(
        configs: list[ServerConfig], data_dir: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        command: str, args: list[str], option: str, problem: str) -> None:
    import dtgserver.bridge.replay
    import dtgserver.bridge.service

    started: list[str] = []
    monkeypatch.setattr(dtgserver.bridge.service, "Bridge", lambda *a, **k: started.append("bridge"))
    monkeypatch.setattr(dtgserver.bridge.replay, "replay", lambda *a, **k: started.append("replay"))
    line = error_line(invoke(command, "--data-dir", str(data_dir), "--mqtt", BROKER, *args))
    assert line.startswith(f"Error: Invalid value for {option}: ") and problem in line, line
    assert configs == [] and started == []


def test_a_bad_value_names_the_variable_or_the_file_and_key(configs: list[ServerConfig],  # noqa: F811
                                                            tmp_path: Path) -> None:
    line = error_line(invoke("serve", env={"DTGSERVER_VEHICLE_CLASS": "01012345678=lorry"}))
    assert "DTGSERVER_VEHICLE_CLASS" in line and "expected MODEM=CLASS" in line
    line = error_line(invoke("bridge", "--mqtt", BROKER, env={"DTGSERVER_TRIP_DEADLINE_H": "0"}))
    assert "DTGSERVER_TRIP_DEADLINE_H" in line
    file = tmp_path / "dtg.toml"
    file.write_text('edition = "2019"\n', "utf-8")
    line = error_line(invoke("serve", "--config", str(file)))
    assert f"Invalid value for 'edition' in {file}: " in line
    assert configs == []


@pytest.mark.parametrize("command", ["serve", "bridge", "replay", "report"])
def test_help_shows_them(command: str) -> None:
    text = " ".join(invoke(command, "--help").output.split())
    for option in ("--edition [2022|chart]", "--default-class [truck|bus|taxi|none]", "--vehicle-class MODEM=CLASS",
                   "DTGSERVER_EDITION", "DTGSERVER_DEFAULT_CLASS", "DTGSERVER_VEHICLE_CLASS"):
        assert option in text, (command, option)
    assert ("--trip-deadline-h" in text) == (command != "report")


def test_bridge_and_replay_read_the_message_variables_serve_reads(data_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """One environment for `serve`, `bridge` and `replay`: the same profile and battery threshold,
    so a replay publishes what the live bridge published; never the live client id."""
    import dtgserver.bridge.replay
    import dtgserver.bridge.service

    seen: list[tuple[str, float, str | None]] = []

    def bridge(*args: Any, **kwargs: Any) -> None:
        options: BridgeOptions = args[4]
        seen.append((options.profile, options.battery_warning_v, None))
        raise ValueError("no bridge in this test")

    async def replay(*args: Any, options: BridgeOptions, client_id: str, **kwargs: Any) -> int:
        seen.append((options.profile, options.battery_warning_v, client_id))
        return 0

    monkeypatch.setattr(dtgserver.bridge.service, "Bridge", bridge)
    monkeypatch.setattr(dtgserver.bridge.replay, "replay", replay)
    env = {"DTGSERVER_PROFILE": "sf2019", "DTGSERVER_BATTERY_WARNING_V": "12.5", "DTGSERVER_CLIENT_ID": "live"}
    for command in ("bridge", "replay"):
        invoke(command, "--data-dir", str(data_dir), "--mqtt", BROKER, env=env)
        invoke(command, "--data-dir", str(data_dir), "--mqtt", BROKER)
    (bridge_env, bridge_default, (replay_profile, replay_v, replay_client), replay_default) = seen
    assert bridge_env[:2] == (replay_profile, replay_v) == ("sf2019", 12.5)
    assert bridge_default[:2] == replay_default[:2] == ("seed", 11.5)
    assert replay_client != "live"
    line = error_line(invoke("replay", "--data-dir", str(data_dir), "--mqtt", BROKER,
                             env={"DTGSERVER_PROFILE": "sf2020"}))
    assert "DTGSERVER_PROFILE" in line and "'sf2020' is not one of" in line


@pytest.mark.parametrize("command", ["bridge", "replay"])
def test_help_names_the_message_variables(command: str) -> None:
    text = " ".join(invoke(command, "--help").output.split())
    assert "DTGSERVER_PROFILE" in text and "DTGSERVER_BATTERY_WARNING_V" in text
