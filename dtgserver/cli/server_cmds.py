"""`dtgserver serve`, `devices`, `maintenance` and `export`."""

from __future__ import annotations

import contextlib
import json
import math
import re
import sqlite3
import sys
import tomllib
from collections.abc import Callable, Iterator
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

import click
import trio

from ..bridge.driving import DEFAULT_EDITION, EDITIONS, VEHICLE_CLASSES
from ..bridge.profiles import PROFILES
from ..bridge.tripmetrics import DEFAULT_BATTERY_WARNING_V
from ..protocol import DEFAULT_MAX_BODY_COUNT, KST
from ..server.config import DEFAULT_PORT, MAX_TRIP_DEADLINE_H, ServerConfig
from . import checks

if TYPE_CHECKING:
    from ..store import Control

F = TypeVar("F", bound=Callable[..., Any])

DATA_DIR_HELP = "Directory of the databases and status log files."


CONFIG_SECTIONS = ("serve", "bridge")
"""The tables a config file may hold, one per long-running command: each reads its own."""


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--config FILE: a TOML table of option names (dashes or underscores) → values, under the CLI and env.

    The options sit at the top level, or all of them under tables named after the commands
    (`[serve]`, `[bridge]`), each command reading its own: one file for a server and its bridge."""
    if value is None:
        return None
    try:
        with open(value, "rb") as f:
            table = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None
    sections = [name for name in CONFIG_SECTIONS if name in table]
    if sections:  # all options under the tables, or none: a key beside them would be silently ignored
        outside = [key if key not in CONFIG_SECTIONS else f"{key} = {table[key]!r}" for key in sorted(table)
                   if key not in CONFIG_SECTIONS or not isinstance(table[key], dict)]
        if outside:
            raise click.BadParameter(f"in {value}, put every option under [serve] and [bridge] or none of them "
                                     f"(found {', '.join(outside)})", ctx=ctx, param=param)
        command = ctx.command.name or ""
        if command not in table:
            raise click.BadParameter(f"{value} has no [{command}] table (it has "
                                     f"{', '.join(f'[{name}]' for name in sections)})", ctx=ctx, param=param)
        table = table[command]
    known = {}  # long option name (--mqtt) or parameter name (mqtt_url), dashes as underscores → parameter
    for p in ctx.command.params:
        if p.name and p.name not in ("config", "help"):
            known[p.name] = p.name
            known.update((opt[2:].replace("-", "_"), p.name) for opt in p.opts if opt.startswith("--"))
    defaults, keys = {}, {}
    for key, item in table.items():
        name = known.get(key.replace("-", "_"))
        if name is None:
            raise click.BadParameter(f"unknown option {key!r} in {value}", ctx=ctx, param=param)
        if not isinstance(item, str | int | float):  # bool is an int; arrays, tables and dates are no option value
            raise click.BadParameter(f"option {key!r} in {value} is {item!r}: give a string, number or true/false",
                                     ctx=ctx, param=param)
        option = next(p for p in ctx.command.params if p.name == name)
        if isinstance(option, click.Option) and option.multiple:  # a repeatable option: the string is one value
            item = (item,)
        defaults[name], keys[name] = item, key
    ctx.meta[checks.CONFIG_META] = (value, keys)  # a bad value is then named by file and key
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _workers(ctx: click.Context, param: click.Parameter, value: str | int) -> int:
    from ..server.workers import worker_count

    if value != "auto" and not (str(value).isdigit() and int(value) >= 1):
        raise click.BadParameter(f"{value!r} is neither a positive number nor 'auto'", ctx=ctx, param=param)
    try:
        return worker_count(value)
    except ValueError as e:  # too many for this machine
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None


def config_option(f: Any) -> Any:
    return click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
                        callback=_load_config, envvar="DTGSERVER_CONFIG", show_envvar=True,
                        help="TOML file of options (keys as the long option names; in a file of [serve] "
                             "and [bridge] tables, this command's table).")(f)


def data_dir_option(f: Any) -> Any:
    return click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("dtg-data"),
                        envvar="DTGSERVER_DATA_DIR", show_envvar=True, help=DATA_DIR_HELP)(f)


def _env(name: str) -> dict[str, Any]:
    return {"envvar": f"DTGSERVER_{name}", "show_envvar": True}


def _vehicle_classes(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, str]:
    """--vehicle-class MODEM=CLASS, repeated or comma-separated: {modem: class}."""
    from ..bridge.driving import parse_classes

    try:
        classes = parse_classes(",".join(value))
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None
    for modem in classes:
        if not re.fullmatch(r"[0-9]{1,11}", modem):
            raise click.BadParameter(f"{modem!r} is no modem number (1 to 11 digits)", ctx=ctx, param=param)
    return classes


def _no_class(ctx: click.Context, param: click.Parameter, value: str) -> str | None:
    return None if value == "none" else value


def driving_options(*, deadline: bool = True) -> Callable[[F], F]:
    """--edition, --default-class, --vehicle-class (which dangerous-driving criteria apply to which
    terminal, docs/driving.md) and --trip-deadline-h: `serve`, `bridge`, `replay` (and `report`
    without the deadline) take them alike."""

    options = [
        click.option("--edition", type=click.Choice(list(EDITIONS)), default=DEFAULT_EDITION, **_env("EDITION"),
                     help="Which edition of KOTSA's dangerous-driving criteria (docs/driving.md)."),
        click.option("--default-class", type=click.Choice([*VEHICLE_CLASSES, "none"]), default="taxi",
                     callback=_no_class, **_env("DEFAULT_CLASS"),
                     help="Criteria for vehicle type 41 (non-commercial), unknown types and terminals without "
                          "basic info; none: no behaviours for them."),
        click.option("--vehicle-class", multiple=True, callback=_vehicle_classes, metavar="MODEM=CLASS",
                     **_env("VEHICLE_CLASS"),
                     help="The class (truck, bus, taxi) of one terminal's vehicle, whatever its basic info says "
                          "(repeatable, or comma-separated; in the environment and the config file one string "
                          "of them)."),
    ]
    if deadline:
        options.append(click.option(
            "--trip-deadline-h", type=checks.FiniteFloat(min=0, min_open=True, max=MAX_TRIP_DEADLINE_H),
            default=24.0, **_env("TRIP_DEADLINE_H"),
            help="Hours after its KEY OFF that a trip still waiting for its last bodies (a terminal sends "
                 "unsent data at its next KEY ON) is published without them, marked partial."))

    def decorate(f: F) -> F:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def _store_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--store: checked here, so a bad URL is a usage error naming the option (never echoing a password)."""
    if value is None:
        return None
    from ..store.jetstream import StoreUrl

    try:
        StoreUrl.parse(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None
    return value


def store_options(f: Any) -> Any:
    """--store and what goes with it, on every command that reads or writes the store."""
    for decorate in reversed((
        click.option("--store", default=None, callback=_store_url, **_env("STORE"),
                     help="Keep packets, registry and maintenance mode on a NATS JetStream cluster instead of "
                          "SQLite in --data-dir: nats://[user:pass@]host[:port][,host[:port]...] or tls://... "
                          "Give credentials through DTGSERVER_STORE, DTGSERVER_STORE_USER/_PASSWORD/_TOKEN or "
                          "(serve, bridge) --config, not on the command line (ps shows it)."),
        click.option("--store-tls-ca", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     callback=checks.tls_ca, **_env("STORE_TLS_CA"), help="CA certificate file for a tls:// store."),
        click.option("--store-replicas", type=click.IntRange(1, 5), default=3, **_env("STORE_REPLICAS"),
                     help="Copies of the packet stream and control bucket, when this command creates them."),
    )):
        f = decorate(f)
    return f


@contextlib.contextmanager
def _nats(store_url: str, tls_ca: Path | None, replicas: int) -> Iterator[Any]:
    """A command's connection to the cluster (stream and bucket made if missing); a clear error if it fails."""
    from ..store.jetstream import NatsBackend, NatsOptions, PartitionMismatch, StoreUrl

    url = StoreUrl.parse(store_url, tls_ca=tls_ca)
    backend = NatsBackend(NatsOptions(url, replicas=replicas), name="dtgserver-cli")
    try:
        try:
            backend.open_blocking()
        except (ConnectionError, TimeoutError, PartitionMismatch) as e:
            click.echo(f"dtgserver: error: {e}", err=True)
            sys.exit(1)
        yield backend
    finally:
        backend.close()


@click.command(cls=checks.ConfigCommand)
@config_option
@click.option("--host", default="0.0.0.0", callback=checks.listen_host, **_env("HOST"), help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, **_env("PORT"), help="TCP port.")
@data_dir_option
@click.option("--idle-timeout", type=checks.FiniteFloat(min=0.1), default=3.0, **_env("IDLE_TIMEOUT"),
              help="Seconds without a byte, from connect or the last byte, before the connection is closed.")
@click.option("--packet-timeout", type=checks.FiniteFloat(min=0.1), default=30.0, **_env("PACKET_TIMEOUT"),
              help="Seconds one packet may take to arrive in full (bounds slow-drip clients).")
@click.option("--max-connections", type=click.IntRange(1), default=10_000, **_env("MAX_CONNECTIONS"),
              help="Open connections above this are answered 4 (overloaded) and closed.")
@click.option("--max-body-count", type=click.IntRange(1, 32767), default=DEFAULT_MAX_BODY_COUNT,
              **_env("MAX_BODY_COUNT"), help="Realtime packets declaring more bodies are answered 1.")
@click.option("--buffer-budget", type=click.IntRange(1), default=64, **_env("BUFFER_BUDGET"),
              help="MiB of partly received packets all sessions of a process may hold: a session that would "
                   "take it past this, and a new connection while less than one packet of --max-body-count "
                   "is left, are answered 4 and closed.")
@click.option("--queue-high-water", type=click.IntRange(1), default=2048, **_env("QUEUE_HIGH_WATER"),
              help="Packets waiting for a commit above which new packets are answered 4.")
@click.option("--commit-timeout", type=checks.FiniteFloat(min=0.1), default=10.0, **_env("COMMIT_TIMEOUT"),
              help="Seconds a packet may wait for its commit (a hung disk, a stopped writer process) before it "
                   "is answered 4; /healthz then says 503 until a commit ends.")
@click.option("--grace-period", type=checks.FiniteFloat(min=0), default=10.0, **_env("GRACE_PERIOD"),
              help="Seconds in-flight sessions get to finish on SIGINT/SIGTERM.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None, **_env("METRICS_PORT"),
              help="Serve Prometheus /metrics and /healthz on this port (off when not given). With several "
                   "processes, one endpoint each: this port + 0, 1, … for the sessions' processes, then the writers.")
@click.option("--metrics-host", default="127.0.0.1", callback=checks.listen_host, **_env("METRICS_HOST"),
              help="Address of the metrics endpoint.")
@click.option("--mqtt", "mqtt_url", default=None, callback=checks.broker_url, **_env("MQTT"),
              help="Forward records to this broker: mqtt://[user:pass@]host[:port] or mqtts://...")
@click.option("--mqtt-tls-ca", type=click.Path(dir_okay=False, path_type=Path), default=None, callback=checks.tls_ca,
              **_env("MQTT_TLS_CA"),
              help="CA certificate file for mqtts://.")
@click.option("--topic-prefix", default="", callback=checks.topic_prefix, **_env("TOPIC_PREFIX"),
              help="Prepended to every MQTT topic.")
@click.option("--client-id", default=None, callback=checks.client_id, **_env("CLIENT_ID"),
              help="MQTT client id (default: generated).")
@click.option("--profile", type=click.Choice(list(PROFILES)), default="seed", **_env("PROFILE"),
              help="Smart[Fleet] message numbering.")
@click.option("--battery-warning-v", type=checks.FiniteFloat(min=0), default=DEFAULT_BATTERY_WARNING_V,
              **_env("BATTERY_WARNING_V"),
              help="KEY OFF battery below this raises a Battery Warning event (0 disables).")
@click.option("--backlog-high-water", "--outbox-high-water", "backlog_high_water", type=click.IntRange(1),
              default=100_000, **_env("BACKLOG_HIGH_WATER"),
              help="With --mqtt or --external-bridge: committed packets the bridge has not yet had "
                   "acknowledged by the broker, at which new packets are answered 4. With --store: the "
                   "same, per partition of the stream, as the bridges' consumers count it.")
@click.option("--external-bridge", is_flag=True, **_env("EXTERNAL_BRIDGE"),
              help="A separate `dtgserver bridge` forwards this data dir: read its saved cursors "
                   "(DIR/bridge-<shard>.db, about once a second) and apply --backlog-high-water to its "
                   "backlog. Not with --mqtt or --store.")
@click.option("--trip-cache", type=click.IntRange(1), default=100_000, **_env("TRIP_CACHE"),
              help="With --mqtt: terminals whose trip state the bridge keeps in memory (least recently used "
                   "first out; the rest are read back from DIR/bridge-<shard>.db).")
@driving_options()
@click.option("--workers", default="1", callback=_workers, **_env("WORKERS"),
              help="Server processes on the one port (SO_REUSEPORT), a shard each; auto = one per CPU, "
                   "at most 4 per CPU. A data dir keeps the number it was first served with. With --writer-process: N "
                   "sessions' processes on the port and N writers.")
@click.option("--writer-process", is_flag=True, **_env("WRITER_PROCESS"),
              help="Commit in separate processes: per shard, one writer process (store and MQTT forwarder) "
                   "takes the packets of the sessions' processes, which answer after its commit. Uses a "
                   "second core even with one worker.")
@store_options
@click.option("--store-ack-timeout", type=click.FloatRange(min=0.1), default=10.0, **_env("STORE_ACK_TIMEOUT"),
              help="With --store: seconds a packet may wait for the stream's PubAck (publishes are retried "
                   "meanwhile) before it is answered 4.")
@click.option("--store-duplicate-window", type=click.FloatRange(min=1.0), default=600.0,
              **_env("STORE_DUPLICATE_WINDOW"),
              help="With --store: seconds the packet stream remembers a packet's digest (a resend inside it is "
                   "stored once); set when the first server creates the stream, kept from then on.")
@click.option("--store-partitions", type=click.IntRange(1, 1024), default=None, **_env("STORE_PARTITIONS"),
              help="With --store: partitions of the packet stream, recorded by the first server (default 16).")
@click.option("-v", "--verbose", count=True, **_env("VERBOSE"), help="More logging (-v: debug).")
@click.option("-q", "--quiet", is_flag=True, **_env("QUIET"), help="Warnings only (no line per session).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", **_env("LOG_FORMAT"),
              help="text: a line of words per record; json: one JSON object per line, a session's fields as keys.")
def serve(verbose: int, quiet: bool, log_format: Literal["text", "json"], workers: int, writer_process: bool,
          **options: Any) -> None:
    """Accept terminal connections, store every packet durably, answer 0x09 <result>.

    An answer of 0 is sent only after the packet is committed to disk (SQLite WAL, synchronous=FULL).
    Options also come from DTGSERVER_* environment variables and a --config TOML file
    (command line first, then environment, then the file).
    """
    from ..server.app import held_stop_signals

    with held_stop_signals():  # a SIGINT/SIGTERM during start-up waits for the server's handler
        _serve(verbose, quiet, log_format, workers, writer_process, options)


def _serve(verbose: int, quiet: bool, log_format: Literal["text", "json"], workers: int, writer_process: bool,
           options: dict[str, Any]) -> None:
    from .. import logs
    from ..server.app import serve as run_server
    from ..server.workers import serve_workers
    from ..store.jetstream import PartitionMismatch
    from ..store.packets import ShardCountMismatch

    if options["external_bridge"] and (options["mqtt_url"] or options["store"] is not None):
        raise click.UsageError("--external-bridge is for a `dtgserver bridge` beside a SQLite data dir: "
                               "not with --mqtt (the bridge is then in process) or --store")
    if options["store"] is not None and (writer_process or options["mqtt_url"]):
        raise click.UsageError("--store nats://... has no local writer and forwards nothing: no --writer-process "
                               "or --mqtt (`dtgserver bridge` forwards from the stream)")
    checks.check_together(click.get_current_context(), options, workers * (2 if writer_process else 1))
    verbosity = -1 if quiet else verbose
    logs.configure(verbosity, log_format)
    try:
        config = ServerConfig(**options)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    exit_code = 0
    try:
        if workers == 1 and not writer_process:
            trio.run(run_server, config)
        else:
            exit_code = trio.run(partial(serve_workers, writer_process=writer_process), config, workers, verbosity)
    # nurseries wrap errors in groups: say the first one
    except* (OSError, sqlite3.Error, ShardCountMismatch, PartitionMismatch) as group:
        click.echo(f"dtgserver: error: {_first_error(group)}", err=True)
        sys.exit(1)
    sys.exit(exit_code)


def _first_error(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


@contextlib.contextmanager
def _control(data_dir: Path, store: str | None = None, store_tls_ca: Path | None = None,
             store_replicas: int = 3, *, existing: bool = False) -> Iterator[Control]:
    """DIR/control.db (or the cluster's control bucket with --store) for one command; a clear error if it fails.

    existing=True for commands that only read or remove: a data dir without control.db is then an
    error (most likely a mistyped path), not a new empty registry made where nobody will look.
    """
    from ..store import Control

    if store is not None:
        from ..store.jetstream import NatsControl

        with _nats(store, store_tls_ca, store_replicas) as backend:
            try:
                yield cast(Control, NatsControl(backend))
            except (TimeoutError, ConnectionError) as e:
                click.echo(f"dtgserver: error: {e}", err=True)
                sys.exit(1)
        return
    if existing and not (data_dir / "control.db").is_file():
        click.echo(f"dtgserver: error: --data-dir {data_dir}: no dtgserver data here (no control.db); "
                   "`dtgserver serve` or `dtgserver devices add` makes it", err=True)
        sys.exit(1)
    try:
        control = Control(data_dir)
        try:
            yield control
        finally:
            control.close()
    except (sqlite3.Error, OSError) as e:
        path = str(data_dir / "control.db")
        click.echo(f"dtgserver: error: {e}" if str(e).startswith(path) else f"dtgserver: error: {path}: {e}", err=True)
        sys.exit(1)


@click.group()
def devices() -> None:
    """The registry of terminals allowed to send (result 2 for others, when enforced)."""


@devices.command("add")
@click.argument("modems", nargs=-1, required=True)
@click.option("--note", default="", help="Free text kept with the entry.")
@click.option("--cancelled", is_flag=True, help="Mark as cancelled: its packets are answered 2.")
@data_dir_option
@store_options
def devices_add(modems: tuple[str, ...], note: str, cancelled: bool, data_dir: Path, **store_opts: Any) -> None:
    """Add (or update) terminals by modem number."""
    from ..store import DeviceStatus

    bad = [m for m in modems if not re.fullmatch(r"[0-9]{1,11}", m)]
    if bad:
        raise click.BadParameter(f"modem numbers are 1 to 11 digits: {', '.join(bad)}")
    with _control(data_dir, **store_opts) as control:
        for modem in modems:
            control.add_device(modem, note, DeviceStatus.CANCELLED if cancelled else DeviceStatus.ACTIVE)
    click.echo(f"{len(modems)} device(s) {'cancelled' if cancelled else 'active'}")


@devices.command("remove")
@click.argument("modems", nargs=-1, required=True)
@data_dir_option
@store_options
def devices_remove(modems: tuple[str, ...], data_dir: Path, **store_opts: Any) -> None:
    """Remove terminals from the registry."""
    with _control(data_dir, **store_opts, existing=True) as control:
        removed = {m: control.remove_device(m) for m in dict.fromkeys(modems)}
    if any(removed.values()):
        click.echo(f"removed {sum(removed.values())} device(s): {', '.join(m for m, done in removed.items() if done)}")
    missing = [m for m, done in removed.items() if not done]
    if missing:
        click.echo(f"dtgserver: error: not in the registry: {', '.join(missing)}", err=True)
        sys.exit(1)


@devices.command("list")
@data_dir_option
@store_options
@click.option("--json", "as_json", is_flag=True,
              help='One JSON object: {"registry_enforced": true|false, "maintenance": true|false, '
                   '"devices": [{"modem", "status", "note"}, ...]}.')
def devices_list(data_dir: Path, as_json: bool, **store_opts: Any) -> None:
    """List the registry and whether it is enforced."""
    with _control(data_dir, **store_opts, existing=True) as control:
        state, entries = control.load(), control.devices()
    if as_json:  # one object, so that a program reads the enforcement with the entries, in one snapshot
        click.echo(json.dumps({
            "registry_enforced": state.registry_enforced, "maintenance": state.maintenance,
            "devices": [{"modem": d.modem, "status": d.status.value, "note": d.note} for d in entries],
        }, ensure_ascii=False))
        return
    click.echo(f"registry {'enforced' if state.registry_enforced else 'not enforced'}; {len(entries)} device(s)")
    for d in entries:
        click.echo(f"{d.modem:<11}  {d.status.value:<9}  {d.note}")


@devices.command("enforce")
@click.argument("switch", type=click.Choice(["on", "off"]))
@data_dir_option
@store_options
def devices_enforce(switch: str, data_dir: Path, **store_opts: Any) -> None:
    """Turn the allow-list on (unknown terminals get 2) or off; a running server follows within a second."""
    with _control(data_dir, **store_opts) as control:
        control.set_registry_enforced(switch == "on")
        active = len(control.load().active)
    click.echo(f"registry enforcement {switch}")
    if switch == "on" and not active:
        # A 2 makes terminals stop sending and drop their backlog: say so before it happens.
        click.echo("dtgserver: warning: no active device in the registry: every terminal will be answered 2 "
                   "(unknown subscriber) and will drop its backlog", err=True)


@click.command()
@click.argument("switch", type=click.Choice(["on", "off", "status"]))
@data_dir_option
@store_options
def maintenance(switch: str, data_dir: Path, **store_opts: Any) -> None:
    """Maintenance mode on (every packet answered 3, nothing stored) or off; status shows it and the registry.

    Written to DIR/control.db (with --store: the cluster's control bucket); every running server on the same
    data dir (or cluster) follows within a second.
    """
    with _control(data_dir, **store_opts, existing=switch == "status") as control:
        if switch == "status":
            state, count = control.load(), len(control.devices())
            click.echo(f"maintenance {'on' if state.maintenance else 'off'}")
            click.echo(f"registry {'enforced' if state.registry_enforced else 'not enforced'}; {count} device(s)")
            return
        control.set_maintenance(switch == "on")
    click.echo(f"maintenance {switch}")


def _parse_time(value: str | None, option: str | None = None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
        if math.isfinite(seconds):  # 'nan' would match nothing and 'inf' everything, silently
            return seconds
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither ISO 8601 nor Unix seconds", param_hint=option) from None
    return (t if t.tzinfo else t.replace(tzinfo=KST)).timestamp()


@click.command()
@data_dir_option
@store_options
@click.option("--modem", default=None, callback=checks.modem, help="Only this terminal.")
@click.option("--since", default=None, help="Received at or after (ISO 8601, KST when no offset; or Unix seconds).")
@click.option("--until", default=None, help="Received before (same forms as --since).")
@click.option("--format", "output_format", type=click.Choice(["jsonl", "geojson"]), default="jsonl",
              help="jsonl: the decode JSON plus received_at and peer; geojson: one LineString per trip.")
def export(data_dir: Path, modem: str | None, since: str | None, until: str | None, output_format: str,
           store: str | None, store_tls_ca: Path | None, store_replicas: int) -> None:
    """Print stored packets (all shards) in receive order (with --store: the stream's order)."""
    from ..store import read_stored, shard_paths

    since_s, until_s = _parse_time(since, "--since"), _parse_time(until, "--until")
    if store is not None:
        from ..store.jetstream import read_stream

        with _nats(store, store_tls_ca, store_replicas) as backend, \
                contextlib.closing(read_stream(backend, modem=modem, since=since_s, until=until_s)) as packets:
            try:
                _print_packets(packets, output_format)
            except BrokenPipeError:  # the reader stopped reading (`| head`): as with the SQLite store
                raise
            except (TimeoutError, ConnectionError) as e:
                click.echo(f"dtgserver: error: cannot read the stream: {e}", err=True)
                sys.exit(1)
        return
    if not shard_paths(data_dir):
        click.echo(f"dtgserver: error: no store in {data_dir}", err=True)
        sys.exit(1)
    try:
        _print_packets(read_stored(data_dir, modem=modem, since=since_s, until=until_s), output_format)
    except sqlite3.Error as e:
        click.echo(f"dtgserver: error: cannot read the store in {data_dir}: {e}", err=True)
        sys.exit(1)


def _print_packets(packets: Any, output_format: str) -> None:
    from ..store.export import geojson, jsonl

    if output_format == "geojson":
        click.echo(json.dumps(geojson(packets), ensure_ascii=False))
    else:
        for obj in jsonl(packets):
            click.echo(json.dumps(obj, ensure_ascii=False))


COMMANDS = [serve, devices, maintenance, export]
