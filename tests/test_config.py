"""`dtgserver serve` configuration: command line > DTGSERVER_* environment > --config TOML > defaults.

No server runs here: the server's entry point (`dtgserver.server.app.serve`) is replaced by one
that records the ServerConfig it was given, so everything up to it (click parsing, the TOML
loader, type conversion, trio.run) is the real thing.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
from click.testing import CliRunner, Result
from mosquitto import make_test_ca

from dtgserver.cli import main
from dtgserver.server import app
from dtgserver.server.config import ServerConfig


@pytest.fixture
def configs(monkeypatch: pytest.MonkeyPatch) -> list[ServerConfig]:
    """Every ServerConfig `serve` would have run a server with."""
    seen: list[ServerConfig] = []

    async def capture(config: ServerConfig, **_: Any) -> None:
        seen.append(config)

    monkeypatch.setattr(app, "serve", capture)
    return seen


def serve(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, ["serve", *args], env=env)


def config_of(configs: list[ServerConfig], *args: str, env: dict[str, str] | None = None) -> ServerConfig:
    result = serve(*args, env=env)
    assert result.exit_code == 0, (result.output, result.exception)
    assert len(configs) == 1
    return configs.pop()


def write(path: Path, text: str) -> str:
    path.write_text(text, "utf-8")
    return str(path)


def test_command_line_defaults_are_the_config_defaults(configs: list[ServerConfig]) -> None:
    config = config_of(configs)
    assert config == ServerConfig()
    assert (config.host, config.port, config.data_dir, config.idle_timeout) == ("0.0.0.0", 9320, Path("dtg-data"), 3.0)


# Every option of `serve` that reaches ServerConfig, with a value that is not its default.
NON_DEFAULTS: dict[str, tuple[str, object]] = {
    "host": ('"127.0.0.2"', "127.0.0.2"),
    "port": ("19320", 19320),
    "data_dir": ('"elsewhere/data"', Path("elsewhere/data")),
    "idle_timeout": ("4.5", 4.5),
    "packet_timeout": ("12", 12.0),
    "max_connections": ("77", 77),
    "max_body_count": ("600", 600),
    "buffer_budget": ("128", 128),
    "queue_high_water": ("99", 99),
    "grace_period": ("0.5", 0.5),
    "commit_timeout": ("2.5", 2.5),
    "metrics_port": ("9100", 9100),
    "metrics_host": ('"0.0.0.0"', "0.0.0.0"),
    "mqtt_url": ('"mqtt://broker.example:1884"', "mqtt://broker.example:1884"),
    "mqtt_tls_ca": ('"ca.pem"', Path("ca.pem")),
    "topic_prefix": ('"fleet"', "fleet"),
    "client_id": ('"dtg-1"', "dtg-1"),
    "profile": ('"sf2019"', "sf2019"),
    "battery_warning_v": ("23.0", 23.0),
    "backlog_high_water": ("5", 5),
    "trip_cache": ("500", 500),
    "edition": ('"chart"', "chart"),
    "default_class": ('"none"', None),
    "vehicle_class": ('"01012345678=bus, 01099998888=truck"', {"01012345678": "bus", "01099998888": "truck"}),
    "trip_deadline_h": ("1.5", 1.5),
    "external_bridge": ("true", True),
    "store": ('"nats://n1.example:4222,n2.example:4222"', "nats://n1.example:4222,n2.example:4222"),
    "store_tls_ca": ('"nats-ca.pem"', Path("nats-ca.pem")),
    "store_replicas": ("1", 1),
    "store_ack_timeout": ("2.5", 2.5),
    "store_duplicate_window": ("2", 2.0),
    "store_partitions": ("4", 4),
}


# Options of the command itself, not of the server: logging, the config file, worker processes.
CLI_ONLY = {"config", "verbose", "quiet", "log_format", "workers", "writer_process"}


@pytest.mark.parametrize(("how", "expected"), [
    ("", (1, False)),  # one process: app.serve, not the supervisor
    ("--writer-process", (1, True)),
    ("--workers 3 --writer-process", (3, True)),
    ("--workers 2", (2, False)),
    ("env", (1, True)),
    ("file", (1, True)),
])
def test_workers_and_writer_process_reach_the_supervisor(monkeypatch: pytest.MonkeyPatch, configs: list[ServerConfig],
                                                         tmp_path: Path, how: str, expected: tuple[int, bool]) -> None:
    from dtgserver.server import workers

    supervised: list[tuple[int, bool]] = []

    async def capture(config: ServerConfig, count: int, verbosity: int, *, writer_process: bool = False) -> int:
        supervised.append((count, writer_process))
        return 0

    monkeypatch.setattr(workers, "serve_workers", capture)
    env = {"DTGSERVER_WRITER_PROCESS": "1"} if how == "env" else None
    args = ["--config", write(tmp_path / "c.toml", "writer-process = true\n")] if how == "file" \
        else [] if how == "env" else how.split()
    result = serve(*args, env=env)
    assert result.exit_code == 0, (result.output, result.exception)
    if expected == (1, False):
        assert supervised == [] and len(configs) == 1
    else:
        assert supervised == [expected] and configs == []


def test_every_serve_option_is_covered_here() -> None:
    from dtgserver.cli.server_cmds import serve as command

    fields = {f.name for f in attrs.fields(ServerConfig)}
    names = {p.name for p in command.params}
    assert names & fields == set(NON_DEFAULTS)
    assert names - fields == CLI_ONLY


@pytest.mark.parametrize("name", sorted(NON_DEFAULTS))
def test_each_option_from_the_file(configs: list[ServerConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   name: str) -> None:
    toml, expected = NON_DEFAULTS[name]
    if name in ("mqtt_tls_ca", "store_tls_ca"):  # read as a CA file before anything starts: it must be one
        monkeypatch.chdir(tmp_path)
        make_test_ca(tmp_path)
        (tmp_path / "ca.pem").rename(tmp_path / expected.name)  # type: ignore[attr-defined]
    key = "mqtt" if name == "mqtt_url" else name.replace("_", "-")  # the long option name, as documented
    config = config_of(configs, "--config", write(tmp_path / "dtg.toml", f"{key} = {toml}\n"))
    assert getattr(config, name) == expected
    assert getattr(ServerConfig(), name) != expected


def test_file_keys_with_underscores_and_a_serve_table(configs: list[ServerConfig], tmp_path: Path) -> None:
    path = write(tmp_path / "dtg.toml", '[serve]\nidle_timeout = 5\ndata-dir = "d"\nmetrics_port = 9101\n')
    config = config_of(configs, "--config", path)
    assert (config.idle_timeout, config.data_dir, config.metrics_port) == (5.0, Path("d"), 9101)


def test_precedence_cli_over_env_over_file_over_default(configs: list[ServerConfig], tmp_path: Path) -> None:
    path = write(tmp_path / "dtg.toml", "port = 1111\nidle-timeout = 5.0\nmax-connections = 50\ngrace-period = 1.0\n")
    env = {"DTGSERVER_PORT": "2222", "DTGSERVER_IDLE_TIMEOUT": "6.0", "DTGSERVER_MAX_BODY_COUNT": "100"}

    config = config_of(configs, "--config", path, "--port", "3333", env=env)
    assert config.port == 3333  # command line beats environment and file
    assert config.idle_timeout == 6.0  # environment beats file
    assert config.max_body_count == 100  # environment beats default
    assert config.max_connections == 50  # file beats default
    assert config.grace_period == 1.0
    assert config.packet_timeout == ServerConfig().packet_timeout  # nobody said: default

    config = config_of(configs, "--config", path, env=env)
    assert config.port == 2222
    config = config_of(configs, "--config", path)
    assert (config.port, config.idle_timeout) == (1111, 5.0)


def test_config_file_named_by_the_environment(configs: list[ServerConfig], tmp_path: Path) -> None:
    path = write(tmp_path / "dtg.toml", "port = 1111\n")
    assert config_of(configs, env={"DTGSERVER_CONFIG": path}).port == 1111
    assert config_of(configs, "--port", "4444", env={"DTGSERVER_CONFIG": path}).port == 4444


def test_option_order_on_the_command_line_does_not_matter(configs: list[ServerConfig], tmp_path: Path) -> None:
    path = write(tmp_path / "dtg.toml", "port = 1111\n")
    assert config_of(configs, "--port", "5555", "--config", path).port == 5555


def test_quiet_and_verbose_from_file_and_environment(configs: list[ServerConfig], tmp_path: Path) -> None:
    logger = logging.getLogger("dtgserver")
    config_of(configs, "--config", write(tmp_path / "dtg.toml", "quiet = true\n"))
    assert logger.level == logging.WARNING
    config_of(configs, env={"DTGSERVER_VERBOSE": "1"})
    assert logger.level == logging.DEBUG
    config_of(configs)
    assert logger.level == logging.INFO


def failure(result: Result) -> str:
    """A refused configuration: usage error (exit 2), a message, no traceback, no server run."""
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    return result.stderr


def test_unknown_key_in_file_is_refused(configs: list[ServerConfig], tmp_path: Path) -> None:
    path = write(tmp_path / "dtg.toml", "port = 1111\nidle-timout = 5\n")
    message = failure(serve("--config", path))
    assert "unknown option 'idle-timout'" in message and "dtg.toml" in message
    assert configs == []


@pytest.mark.parametrize("key", ["config", "help"])
def test_file_cannot_name_the_meta_options(configs: list[ServerConfig], tmp_path: Path, key: str) -> None:
    message = failure(serve("--config", write(tmp_path / "dtg.toml", f'{key} = "x"\n')))
    assert f"unknown option {key!r}" in message
    assert configs == []


def test_bad_toml_is_refused(configs: list[ServerConfig], tmp_path: Path) -> None:
    message = failure(serve("--config", write(tmp_path / "dtg.toml", "port = = 1\n")))
    assert "--config" in message and "line 1" in message
    assert configs == []


def test_missing_config_file_is_refused(configs: list[ServerConfig], tmp_path: Path) -> None:
    message = failure(serve("--config", str(tmp_path / "nowhere.toml")))
    assert "nowhere.toml" in message
    assert configs == []


@pytest.mark.parametrize(("text", "key"), [
    ('port = "ninety"\n', "port"),
    ("port = 70000\n", "port"),
    ("idle-timeout = 0\n", "idle-timeout"),
    ('profile = "traccar"\n', "profile"),
])
def test_bad_value_in_file_names_the_file_and_key(configs: list[ServerConfig], tmp_path: Path, text: str,
                                                  key: str) -> None:
    path = write(tmp_path / "dtg.toml", text)
    message = failure(serve("--config", path))
    assert f"Invalid value for {key!r} in {path}: " in message
    assert "DTGSERVER_" not in message
    assert configs == []


def test_bad_value_in_environment_names_the_variable(configs: list[ServerConfig]) -> None:
    message = failure(serve(env={"DTGSERVER_PORT": "ninety"}))
    assert "DTGSERVER_PORT" in message
    assert configs == []


@pytest.mark.parametrize(("text", "expected"), [
    ('port = 1111\n[serve]\nhost = "127.0.0.2"\n', "put every option under [serve] and [bridge] or none of them "
                                                   "(found port)"),
    ("serve = 5\n", "put every option under [serve] and [bridge] or none of them (found serve = 5)"),
    ('bridge = "x"\n[serve]\nport = 1111\n', "or none of them (found bridge = 'x')"),
    ('[bridge]\nquiet = true\n', "dtg.toml has no [serve] table (it has [bridge])"),
])
def test_options_beside_the_serve_table_are_refused(configs: list[ServerConfig], tmp_path: Path, text: str,
                                                    expected: str) -> None:
    """Not silently ignored: a port beside [serve] would otherwise not be the port served on."""
    message = failure(serve("--config", write(tmp_path / "dtg.toml", text)))
    assert expected in " ".join(message.split())
    assert configs == []


@pytest.mark.parametrize(("text", "shown"), [
    ("port = [1111, 2222]\n", "option 'port' in"),
    ("host = 2026-11-21\n", "option 'host' in"),
    ("[serve]\n[serve.metrics]\nport = 9100\n", "unknown option 'metrics'"),
    ('data-dir = { path = "x" }\n', "option 'data-dir' in"),
])
def test_values_that_are_no_option_value_are_refused(configs: list[ServerConfig], tmp_path: Path, text: str,
                                                     shown: str) -> None:
    message = " ".join(failure(serve("--config", write(tmp_path / "dtg.toml", text))).split())
    assert shown in message
    assert configs == []


# -- every option checked before anything starts -------------------------------------------------


@pytest.fixture
def supervised(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Worker counts the supervisor (`--workers`, `--writer-process`) would have been started with."""
    from dtgserver.server import workers

    seen: list[int] = []

    async def capture(config: ServerConfig, count: int, verbosity: int, *, writer_process: bool = False) -> int:
        seen.append(count)
        return 0

    monkeypatch.setattr(workers, "serve_workers", capture)
    return seen


@pytest.fixture
def pems(tmp_path: Path) -> dict[str, Path]:
    """A PEM CA, the same certificate in DER, a text file and a folder: only the first is a CA file."""
    ca = make_test_ca(tmp_path / "ca")[0]
    der = tmp_path / "ca.der"
    subprocess.run(["openssl", "x509", "-in", ca, "-outform", "DER", "-out", der], check=True, timeout=60)
    (tmp_path / "notes.txt").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    return {"pem": ca, "der": der, "text": tmp_path / "notes.txt", "missing": tmp_path / "none.pem"}


BAD_SETTINGS = [
    (["--mqtt", "http://x"], "'--mqtt'", "must start with mqtt:// or mqtts://"),
    (["--mqtt", "mqtt://h:notaport"], "'--mqtt'", "bad port"),
    (["--mqtt", "mqtt://h:0"], "'--mqtt'", "bad port"),
    (["--mqtt", "mqtt://"], "'--mqtt'", "no host"),
    (["--mqtt", "mqtt://h/fleet"], "'--mqtt'", "no path"),
    (["--topic-prefix", "#"], "'--topic-prefix'", "wildcard"),
    (["--topic-prefix", "fleet/+/x"], "'--topic-prefix'", "wildcard"),
    (["--topic-prefix", "$SYS"], "'--topic-prefix'", "broker's own"),
    (["--mqtt", "mqtts://h", "--mqtt-tls-ca", "{der}"], "'--mqtt-tls-ca'", "holds no PEM CA certificate"),
    (["--mqtt", "mqtts://h", "--mqtt-tls-ca", "{text}"], "'--mqtt-tls-ca'", "holds no PEM CA certificate"),
    (["--mqtt", "mqtts://h", "--mqtt-tls-ca", "{missing}"], "'--mqtt-tls-ca'", "No such file"),
    (["--mqtt", "mqtt://h", "--mqtt-tls-ca", "{pem}"], "'--mqtt-tls-ca'", "needs an mqtts:// broker URL"),
    (["--store-tls-ca", "{der}"], "'--store-tls-ca'", "holds no PEM CA certificate"),
    (["--idle-timeout", "nan"], "'--idle-timeout'", "not a finite number"),
    (["--grace-period", "inf"], "'--grace-period'", "not a finite number"),
    (["--battery-warning-v", "-1"], "'--battery-warning-v'", "not in the range"),
    (["--host", "no-such-host.invalid"], "'--host'", "no address to listen on"),
    (["--metrics-host", "300.1.1.1"], "'--metrics-host'", "no address to listen on"),
    (["--metrics-port", "65535", "--workers", "2"], "'--metrics-port'", "above 65535"),
    (["--metrics-port", "65532", "--writer-process"], None, None),  # up to 4 processes: 65532-65535 fit
]


@pytest.mark.parametrize("processes", [[], ["--workers", "2"], ["--writer-process"]])
@pytest.mark.parametrize(("args", "option", "problem"), BAD_SETTINGS)
def test_a_bad_setting_is_a_usage_error_before_anything_starts(
        configs: list[ServerConfig], supervised: list[int], pems: dict[str, Path], processes: list[str],
        args: list[str], option: str | None, problem: str | None) -> None:
    """No traceback, no server and no supervisor (whose workers would crash and be restarted forever)."""
    result = serve(*[a.format(**pems) for a in args], *processes)
    if option is None:
        assert result.exit_code == 0, result.output
        return
    message = failure(result)
    error = [line for line in message.splitlines() if line.startswith("Error:")]
    assert len(error) == 1, message
    assert error[0].startswith(f"Error: Invalid value for {option}: "), message
    assert problem is not None and problem in error[0]
    assert configs == [] and supervised == []


def test_a_good_ca_file_is_accepted(configs: list[ServerConfig], pems: dict[str, Path]) -> None:
    config = config_of(configs, "--mqtt", "mqtts://broker.example", "--mqtt-tls-ca", str(pems["pem"]))
    assert config.mqtt_tls_ca == pems["pem"]


def test_a_bad_setting_names_where_it_came_from(configs: list[ServerConfig], tmp_path: Path) -> None:
    """The command-line option, the environment variable, or the file and its key: not the variable for all."""
    path = write(tmp_path / "dtg.toml", 'topic_prefix = "a/#"\n')
    assert "Invalid value for 'topic_prefix' in " + path + ": 'a/#' contains" in failure(serve("--config", path))
    message = failure(serve(env={"DTGSERVER_TOPIC_PREFIX": "a/#"}))
    assert "Invalid value for environment variable DTGSERVER_TOPIC_PREFIX: 'a/#' contains" in message
    message = failure(serve("--topic-prefix", "a/#"))
    assert "Invalid value for '--topic-prefix': 'a/#' contains" in message
    assert configs == []


def test_a_bad_port_in_the_file_names_the_file_and_key(configs: list[ServerConfig], tmp_path: Path) -> None:
    path = write(tmp_path / "dtg.toml", 'port = "abc"\n')
    message = failure(serve("--config", path))
    assert f"Invalid value for 'port' in {path}: 'abc' is not a valid integer range" in message
    assert "DTGSERVER_PORT" not in message


def test_a_bad_mqtt_url_with_workers_exits_at_once(tmp_path: Path) -> None:
    """The real command, processes and all: exit 2 and one error line, where it used to crash-loop."""
    result = subprocess.run([sys.executable, "-m", "dtgserver", "serve", "--workers", "2", "--writer-process",
                             "--port", "0", "--data-dir", str(tmp_path), "--mqtt", "http://x"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == ("Error: Invalid value for '--mqtt': broker URL must start with "
                                              "mqtt:// or mqtts://, got 'http://x'")
    assert not (tmp_path / "control.db").exists()


# -- one file for a server and its bridge ---------------------------------------------------------

BOTH = """\
[serve]
port = 1111
external-bridge = true

[bridge]
mqtt = "mqtt://127.0.0.1:1"
trip-cache = 7
profile = "sf2019"
"""


@pytest.fixture
def bridges(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple[Any, ...]]:
    """What `bridge` would have run: (the data dir's packet log's path, the MQTT options, the message options);
    the data dir is a store with one shard (`bridge` refuses a directory without)."""
    import trio
    from test_export import fill

    import dtgserver.bridge.service
    from dtgserver.testing import dtg_bytes

    trio.run(fill, tmp_path / "data", [dtg_bytes()])
    seen: list[tuple[Any, ...]] = []

    def capture(packet_log: Any, shards: Any, cursor: Any, mqtt: Any, options: Any) -> None:
        seen.append((packet_log.data_dir, mqtt, options))
        raise ValueError("no bridge in this test")

    monkeypatch.setattr(dtgserver.bridge.service, "Bridge", capture)
    return seen


def test_serve_and_bridge_each_read_their_table_of_one_file(configs: list[ServerConfig], bridges: list[Any],
                                                           tmp_path: Path) -> None:
    path = write(tmp_path / "dtg.toml", BOTH)
    config = config_of(configs, "--config", path)
    assert (config.port, config.external_bridge, config.mqtt_url) == (1111, True, None)
    result = CliRunner().invoke(main, ["bridge", "--config", path, "--data-dir", str(tmp_path / "data")])
    assert result.exit_code == 1 and "no bridge in this test" in result.stderr, result.output
    ((data_dir, mqtt, options),) = bridges
    assert data_dir == tmp_path / "data"
    assert (mqtt.url, options.trip_cache, options.profile) == ("mqtt://127.0.0.1:1", 7, "sf2019")


def test_bridge_reads_dtgserver_config_too_and_names_a_bad_value_by_file_and_key(bridges: list[Any],
                                                                                  tmp_path: Path) -> None:
    path = write(tmp_path / "dtg.toml", BOTH.replace("trip-cache = 7", "trip-cache = 0"))
    result = CliRunner().invoke(main, ["bridge", "--data-dir", str(tmp_path / "data")],
                                env={"DTGSERVER_CONFIG": path})
    message = " ".join(failure(result).split())
    assert f"Invalid value for 'trip-cache' in {path}: " in message
    assert bridges == []


@pytest.mark.parametrize(("text", "expected"), [
    ('[serve]\nport = 1111\n', "dtg.toml has no [bridge] table (it has [serve])"),
    ('[bridge]\nport = 1111\n', "unknown option 'port'"),  # a server's option, not the bridge's
    ('mqtt = "mqtt://127.0.0.1:1"\n[bridge]\nquiet = true\n', "or none of them (found mqtt)"),
])
def test_bridge_refuses_a_file_without_its_table_or_with_options_it_has_not(bridges: list[Any], tmp_path: Path,
                                                                            text: str, expected: str) -> None:
    path = write(tmp_path / "dtg.toml", text)
    result = CliRunner().invoke(main, ["bridge", "--config", path, "--data-dir", str(tmp_path / "data")])
    assert expected in " ".join(failure(result).split())
    assert bridges == []


def test_the_store_help_names_the_commands_that_take_a_config_file() -> None:
    """Every command with --store says how to give it credentials; --config only where it has one."""
    import re

    import click

    devices = main.commands["devices"]
    assert isinstance(devices, click.Group)
    commands = dict(main.commands) | {f"devices {name}": command for name, command in devices.commands.items()}
    with_store = {name: c for name, c in commands.items() if any(p.name == "store" for p in c.params)}
    assert {"serve", "bridge", "replay", "export", "maintenance", "devices add"} <= set(with_store)
    for name, command in with_store.items():
        store = next(p for p in command.params if p.name == "store")
        assert isinstance(store, click.Option)
        found = re.search(r"\(([a-z, ]+)\) --config", store.help or "")
        assert found is not None, name
        named = set(found.group(1).split(", "))
        assert named == {n for n, c in with_store.items() if any(p.name == "config" for p in c.params)}, name
