"""`dtgserver replay`: republish stored records to an MQTT broker."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import click
import trio

from . import checks
from .server_cmds import _parse_time, data_dir_option

REPLAY_TIMEOUT_S = 300.0


@click.command(cls=checks.ConfigCommand)
@data_dir_option
@click.option("--mqtt", "mqtt_url", required=True, callback=checks.broker_url, envvar="DTGSERVER_MQTT",
              show_envvar=True, help="Broker: mqtt://[user:pass@]host[:port] or mqtts://...")
@click.option("--mqtt-tls-ca", type=click.Path(dir_okay=False, path_type=Path), default=None, callback=checks.tls_ca,
              envvar="DTGSERVER_MQTT_TLS_CA", show_envvar=True, help="CA certificate file for mqtts://.")
@click.option("--topic-prefix", default="", callback=checks.topic_prefix, envvar="DTGSERVER_TOPIC_PREFIX",
              show_envvar=True, help="Prepended to every MQTT topic.")
@click.option("--client-id", default="dtgserver-replay", callback=checks.client_id, help="MQTT client id.")
@click.option("--modem", default=None, callback=checks.modem, help="Only this terminal.")
@click.option("--since", default=None, help="Publish packets received at or after this (ISO 8601, KST when no "
                                             "offset; or Unix seconds). Earlier ones only rebuild trip state.")
@click.option("--profile", type=click.Choice(["seed", "sf2019"]), default="seed", help="Smart[Fleet] numbering.")
@click.option("--battery-warning-v", type=checks.FiniteFloat(min=0), default=11.5,
              help="Battery Warning threshold (0 disables).")
@click.option("--timeout", type=checks.FiniteFloat(min=0), default=REPLAY_TIMEOUT_S, show_default=True,
              help="Seconds the whole replay may take (connecting included); then it stops and exits 1. "
                   "0: no limit.")
def replay(data_dir: Path, mqtt_url: str, mqtt_tls_ca: Path | None, topic_prefix: str, client_id: str,
           modem: str | None, since: str | None, profile: str, battery_warning_v: float, timeout: float) -> None:
    """Republish stored records (all shards), mapped afresh, with QoS 1; exits when the broker acked them all.

    Exits 1 when the broker has not acknowledged them all within --timeout (unreachable, refusing,
    or too slow): what it did acknowledge stays published, and a second replay publishes all again.
    """
    from ..bridge.forwarder import BrokerUrl
    from ..bridge.replay import replay as run_replay
    from ..store import shard_paths

    if mqtt_tls_ca is not None and not mqtt_url.startswith("mqtts://"):
        raise click.BadParameter(f"a CA file needs an mqtts:// broker URL (--mqtt is {mqtt_url!r})",
                                 param_hint="'--mqtt-tls-ca'")
    since_s = _parse_time(since, "--since")
    if not shard_paths(data_dir):
        click.echo(f"dtgserver: error: no store in {data_dir}", err=True)
        sys.exit(1)

    async def bounded() -> int | None:
        with trio.move_on_after(timeout or math.inf):
            return await run_replay(data_dir, mqtt_url, modem=modem, since=since_s, profile=profile,
                                    battery_warning_v=battery_warning_v, tls_ca=mqtt_tls_ca,
                                    topic_prefix=topic_prefix, client_id=client_id)
        return None

    try:
        delivered = trio.run(bounded)
    except ValueError as e:
        click.echo(f"dtgserver: error: {e}", err=True)
        sys.exit(1)
    if delivered is None:
        click.echo(f"dtgserver: error: replay not finished after {timeout:g} s (--timeout): the broker "
                   f"{BrokerUrl.parse(mqtt_url)} has not acknowledged every message; is it reachable?", err=True)
        sys.exit(1)
    click.echo(f"replayed {delivered} messages")


COMMANDS = [replay]
