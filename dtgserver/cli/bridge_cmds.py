"""`dtgserver bridge` (the MQTT bridge as its own process) and `dtgserver replay`."""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import click
import trio

from ..bridge.profiles import PROFILES
from ..bridge.tripmetrics import DEFAULT_BATTERY_WARNING_V
from . import checks
from .server_cmds import _parse_time, config_option, data_dir_option, driving_options, store_options

log = logging.getLogger("dtgserver.bridge")

F = TypeVar("F", bound=Callable[..., Any])

REPLAY_TIMEOUT_S = 300.0


def _mqtt_options(default_client_id: str | None) -> Callable[[F], F]:
    """The broker and message options `bridge` and `replay` share (`serve` has them too)."""

    def decorate(f: F) -> F:
        for option in reversed([
            click.option("--mqtt", "mqtt_url", required=True, callback=checks.broker_url, envvar="DTGSERVER_MQTT",
                         show_envvar=True, help="Broker: mqtt://[user:pass@]host[:port] or mqtts://..."),
            click.option("--mqtt-tls-ca", type=click.Path(dir_okay=False, path_type=Path), default=None,
                         callback=checks.tls_ca, envvar="DTGSERVER_MQTT_TLS_CA", show_envvar=True,
                         help="CA certificate file for mqtts://."),
            click.option("--topic-prefix", default="", callback=checks.topic_prefix, envvar="DTGSERVER_TOPIC_PREFIX",
                         show_envvar=True, help="Prepended to every MQTT topic."),
            click.option("--client-id", default=default_client_id, callback=checks.client_id,
                         help="MQTT client id" + ("." if default_client_id else " (default: dtgserver-<hostname>; "
                                                  "-shard<i> is added per shard when DIR has several).")),
            # the variables `serve` reads too: a replay or a bridge beside `serve` builds the same messages
            click.option("--profile", type=click.Choice(list(PROFILES)), default="seed", envvar="DTGSERVER_PROFILE",
                         show_envvar=True, help="Smart[Fleet] message numbering."),
            click.option("--battery-warning-v", type=checks.FiniteFloat(min=0), default=DEFAULT_BATTERY_WARNING_V,
                         envvar="DTGSERVER_BATTERY_WARNING_V", show_envvar=True,
                         help="KEY OFF battery below this raises a Battery Warning event (0 disables)."),
        ]):
            f = option(f)
        return f

    return decorate


def _check_tls(mqtt_url: str, mqtt_tls_ca: Path | None) -> None:
    if mqtt_tls_ca is not None and not mqtt_url.startswith("mqtts://"):
        raise click.BadParameter(f"a CA file needs an mqtts:// broker URL (--mqtt is {mqtt_url!r})",
                                 param_hint="'--mqtt-tls-ca'")


def _store_shards(data_dir: Path) -> int:
    """How many shards DIR's store has; exits 1 with a message when DIR holds no store."""
    from ..store import Control, shard_paths

    found = len(shard_paths(data_dir))
    if not found:
        click.echo(f"dtgserver: error: no store in {data_dir}", err=True)
        sys.exit(1)
    control = Control(data_dir)
    try:
        return control.shard_count() or found
    finally:
        control.close()


@click.command(cls=checks.ConfigCommand)
@config_option
@data_dir_option
@_mqtt_options(None)
@driving_options()
@click.option("--trip-cache", type=click.IntRange(1), default=100_000, envvar="DTGSERVER_TRIP_CACHE",
              show_envvar=True, help="Terminals whose trip state is kept in memory (least recently used "
                                     "first out; the rest are read back from DIR/bridge-<shard>.db).")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None, envvar="DTGSERVER_METRICS_PORT",
              show_envvar=True, help="Serve Prometheus /metrics and /healthz on this port (off when not given).")
@click.option("--metrics-host", default="127.0.0.1", callback=checks.listen_host, envvar="DTGSERVER_METRICS_HOST",
              show_envvar=True, help="Address of the metrics endpoint.")
@store_options
@click.option("-v", "--verbose", count=True, help="More logging (-v: debug).")
@click.option("-q", "--quiet", is_flag=True, help="Warnings only.")
def bridge(data_dir: Path, mqtt_url: str, mqtt_tls_ca: Path | None, topic_prefix: str, client_id: str | None,
           profile: str, battery_warning_v: float, edition: str, default_class: str | None,
           vehicle_class: dict[str, str], trip_deadline_h: float, trip_cache: int, metrics_port: int | None,
           metrics_host: str, verbose: int, quiet: bool, store: str | None, store_tls_ca: Path | None,
           store_replicas: int) -> None:
    """Forward a data dir's packets to MQTT from a process of its own, beside a `serve` writing DIR.

    Reads every shard's committed packets, publishes their messages with QoS 1, and keeps its
    cursor and trip states in DIR/bridge-<shard>.db: killed and started again, it resumes where
    the broker's acknowledgements had got to. The first start begins after the packets already
    stored. Runs until SIGINT or SIGTERM. One bridge (this command, or `serve --mqtt`) consumes a
    shard at a time; another one waits for it.

    With --store nats://...: the JetStream stream's partitions instead of DIR's shards, the cursor
    and trip states in the cluster (bucket dtg_bridge); several bridges share the partitions and
    take over those of one that died (docs/scaling.md).
    """
    from .. import logs
    from ..bridge.service import Bridge, MqttOptions

    _check_tls(mqtt_url, mqtt_tls_ca)
    logs.configure(-1 if quiet else verbose)
    packet_log: Any
    backlog: Any = None
    if store is not None:  # the JetStream stream: cursor and trip states per partition in the cluster
        packet_log, cursor = _nats_log(store, store_tls_ca, store_replicas)
        from ..store.jetstream.backlog import NatsBacklog

        backlog = NatsBacklog(packet_log.backend)  # packets not yet published, as the cluster counts them
        shards = packet_log.shards
        client_id = client_id or f"dtgserver-bridge-{socket.gethostname()}-{os.getpid()}"  # several per host
    else:
        from ..bridge.cursor import SqliteCursor
        from ..store.sqlite_log import SqlitePacketLog

        shards = _store_shards(data_dir)
        packet_log, cursor = SqlitePacketLog(data_dir, shards), partial(SqliteCursor, data_dir)
    try:
        service = Bridge(packet_log, range(shards), cursor,
                         MqttOptions(mqtt_url, mqtt_tls_ca, topic_prefix, client_id),
                         _bridge_options(profile, battery_warning_v, edition, default_class, vehicle_class,
                                         trip_deadline_h, trip_cache=trip_cache))
        trio.run(_run_bridge, service, metrics_host, metrics_port, backlog)
    except* (OSError, ValueError) as group:
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
        click.echo(f"dtgserver: error: {error}", err=True)
        sys.exit(1)
    finally:
        packet_log.close()


def _bridge_options(profile: str, battery_warning_v: float, edition: str, default_class: str | None,
                    vehicle_class: dict[str, str], trip_deadline_h: float, **more: Any) -> Any:
    """How the messages are built, from the options `bridge` and `replay` share with `serve`."""
    from ..bridge.consumer import BridgeOptions
    from ..bridge.driving import DrivingConfig

    return BridgeOptions(profile=profile, battery_warning_v=battery_warning_v,
                         driving=DrivingConfig(edition=edition, default_class=default_class, classes=vehicle_class),
                         trip_deadline_ms=round(trip_deadline_h * 3_600_000), **more)


def _nats_log(store: str, tls_ca: Path | None, replicas: int) -> tuple[Any, Any]:
    """The stream as the bridge's log and its cursors, or exit 1 with one line when the cluster is out of reach."""
    from ..store.jetstream.log import open_bridge_log

    try:
        return open_bridge_log(store, tls_ca=tls_ca, replicas=replicas)
    except (ConnectionError, TimeoutError) as e:
        click.echo(f"dtgserver: error: {e}", err=True)
        sys.exit(1)


async def _run_bridge(service: Any, metrics_host: str, metrics_port: int | None, backlog: Any = None) -> None:
    """`backlog` (--store): a NatsBacklog, whose count replaces the consumers' `dtg_mqtt_backlog`."""
    from ..server.metrics import Metrics, serve_metrics

    metrics = Metrics()
    service.register_metrics(metrics.gauges)
    if backlog is not None:
        backlog.register_metrics(metrics.gauges)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            if backlog is not None:
                nursery.start_soon(backlog.run)
            if metrics_port is not None:
                await nursery.start(serve_metrics, metrics, metrics_host, metrics_port, lambda: True)
            log.info("bridge of %d shard(s) running", len(service.consumers))
            async for signum in signals:
                log.info("%s: saving the cursors and stopping", signal.Signals(signum).name)
                break
            nursery.cancel_scope.cancel()


@click.command(cls=checks.ConfigCommand)
@data_dir_option
@_mqtt_options("dtgserver-replay")
@driving_options()
@click.option("--modem", default=None, callback=checks.modem, help="Only this terminal.")
@click.option("--since", default=None, help="Publish packets received at or after this (ISO 8601, KST when no "
                                             "offset; or Unix seconds). Earlier ones only rebuild trip state.")
@click.option("--until", default=None, help="Publish packets received before this (same forms as --since).")
@click.option("--timeout", type=checks.FiniteFloat(min=0), default=REPLAY_TIMEOUT_S, show_default=True,
              help="Seconds the whole replay may take (connecting included); then it stops and exits 1. "
                   "0: no limit.")
@store_options
def replay(data_dir: Path, mqtt_url: str, mqtt_tls_ca: Path | None, topic_prefix: str, client_id: str,
           profile: str, battery_warning_v: float, edition: str, default_class: str | None,
           vehicle_class: dict[str, str], trip_deadline_h: float, modem: str | None, since: str | None,
           until: str | None, timeout: float, store: str | None, store_tls_ca: Path | None,
           store_replicas: int) -> None:
    """Republish stored packets (all shards), derived afresh, with QoS 1; exits when the broker acked them all.

    The live bridge's consumer with its cursor in memory: the same messages, byte for byte, and
    the live cursor does not move. Exits 1 when the broker has not acknowledged them all within
    --timeout (unreachable, refusing, or too slow): what it did acknowledge stays published, and a
    second replay publishes all again.
    """
    from ..bridge.forwarder import BrokerUrl
    from ..bridge.replay import replay as run_replay
    from ..store.sqlite_log import SqlitePacketLog

    _check_tls(mqtt_url, mqtt_tls_ca)
    since_s, until_s = _parse_time(since, "--since"), _parse_time(until, "--until")
    packet_log: Any = _nats_log(store, store_tls_ca, store_replicas)[0] if store is not None \
        else SqlitePacketLog(data_dir, _store_shards(data_dir))

    async def bounded() -> int | None:
        with trio.move_on_after(timeout or math.inf):
            return await run_replay(packet_log, mqtt_url, modem=modem, since=since_s, until=until_s,
                                    options=_bridge_options(profile, battery_warning_v, edition, default_class,
                                                            vehicle_class, trip_deadline_h),
                                    tls_ca=mqtt_tls_ca, topic_prefix=topic_prefix, client_id=client_id)
        return None

    try:
        delivered = trio.run(bounded)
    except ValueError as e:
        click.echo(f"dtgserver: error: {e}", err=True)
        sys.exit(1)
    finally:
        packet_log.close()
    if delivered is None:
        click.echo(f"dtgserver: error: replay not finished after {timeout:g} s (--timeout): the broker "
                   f"{BrokerUrl.parse(mqtt_url)} has not acknowledged every message; is it reachable?", err=True)
        sys.exit(1)
    click.echo(f"replayed {delivered} messages")


COMMANDS = [bridge, replay]
