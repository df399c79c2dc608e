"""`dtgserver replay`: republish stored records to an MQTT broker."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import trio

from .server_cmds import _parse_time, data_dir_option


@click.command()
@data_dir_option
@click.option("--mqtt", "mqtt_url", required=True, envvar="DTGSERVER_MQTT", show_envvar=True,
              help="Broker: mqtt://[user:pass@]host[:port] or mqtts://...")
@click.option("--mqtt-tls-ca", type=click.Path(dir_okay=False, path_type=Path), default=None,
              envvar="DTGSERVER_MQTT_TLS_CA", show_envvar=True, help="CA certificate file for mqtts://.")
@click.option("--topic-prefix", default="", envvar="DTGSERVER_TOPIC_PREFIX", show_envvar=True,
              help="Prepended to every MQTT topic.")
@click.option("--client-id", default="dtgserver-replay", help="MQTT client id.")
@click.option("--modem", default=None, help="Only this terminal.")
@click.option("--since", default=None, help="Publish packets received at or after this (ISO 8601, KST when no "
                                             "offset; or Unix seconds). Earlier ones only rebuild trip state.")
@click.option("--profile", type=click.Choice(["seed", "sf2019"]), default="seed", help="Smart[Fleet] numbering.")
@click.option("--battery-warning-v", type=float, default=11.5, help="Battery Warning threshold (0 disables).")
def replay(data_dir: Path, mqtt_url: str, mqtt_tls_ca: Path | None, topic_prefix: str, client_id: str,
           modem: str | None, since: str | None, profile: str, battery_warning_v: float) -> None:
    """Republish stored records (all shards), mapped afresh, with QoS 1; exits when the broker acked them all."""
    from ..bridge.replay import replay as run_replay
    from ..store import shard_paths

    if not shard_paths(data_dir):
        click.echo(f"dtgserver: error: no store in {data_dir}", err=True)
        sys.exit(1)
    try:
        delivered = trio.run(lambda: run_replay(
            data_dir, mqtt_url, modem=modem, since=_parse_time(since), profile=profile,
            battery_warning_v=battery_warning_v, tls_ca=mqtt_tls_ca, topic_prefix=topic_prefix,
            client_id=client_id))
    except ValueError as e:
        click.echo(f"dtgserver: error: {e}", err=True)
        sys.exit(1)
    click.echo(f"replayed {delivered} messages")


COMMANDS = [replay]
