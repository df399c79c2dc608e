"""Option checks run by click before anything starts: a bad value is a usage error (exit 2) naming
the option, its source (command line, DTGSERVER_* variable, or the --config file and key) and the problem.

A value that passed here cannot fail the server's start-up in a worker or writer process, where
the supervisor would restart it forever.
"""

from __future__ import annotations

import math
import re
import socket
import ssl
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

CONFIG_META = "dtgserver.config"  # ctx.meta: (the --config file, {parameter name: its key in the file})
MQTT_STRING_BYTES = 65535  # MQTT 3.1.1 §1.5.3: every UTF-8 string of the protocol fits a 2-byte length


class FiniteFloat(click.FloatRange):
    """A FloatRange that also refuses nan and inf (a nan timeout would end every session at once)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def broker_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--mqtt: mqtt:// or mqtts://, a host, a port 1-65535, no path."""
    from ..bridge.forwarder import BrokerUrl

    if value is None:
        return None
    try:
        broker = BrokerUrl.parse(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    if not 1 <= broker.port <= 65535:
        raise click.BadParameter(f"broker URL has a bad port: {value!r}")
    return value


def tls_ca(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """--mqtt-tls-ca: a readable file with at least one PEM certificate that OpenSSL accepts."""
    if value is None:
        return None
    try:
        ssl.create_default_context(cafile=str(value))
    except ssl.SSLError as e:
        raise click.BadParameter(f"{value} holds no PEM CA certificate ({e.reason or e})") from None
    except OSError as e:
        raise click.BadParameter(f"{value}: {e.strerror or e}") from None
    return value


def topic_prefix(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """--topic-prefix: a topic name's start, so no wildcard, no NUL and not a broker's own $ topics."""
    if "+" in value or "#" in value:
        raise click.BadParameter(f"{value!r} contains an MQTT wildcard (+ or #); a topic name cannot")
    if "\0" in value:
        raise click.BadParameter(f"{value!r} contains a NUL character; MQTT topics cannot")
    if value.startswith("$"):
        raise click.BadParameter(f"{value!r} starts with $: topics starting with $ are the broker's own")
    return value


def client_id(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and len(value.encode("utf-8", "surrogatepass")) > MQTT_STRING_BYTES:
        raise click.BadParameter(f"is longer than the {MQTT_STRING_BYTES} bytes an MQTT client id can have")
    return value


def modem(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--modem: a terminal's number as the registry and the store hold it, 1 to 11 digits."""
    if value is not None and not re.fullmatch(r"[0-9]{1,11}", value):
        raise click.BadParameter(f"{value!r} is no modem number (1 to 11 digits)")
    return value


def listen_host(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """--host, --metrics-host: an address (or a name that resolves) this machine could listen on."""
    try:
        socket.getaddrinfo(value, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as e:
        raise click.BadParameter(f"{value!r} is no address to listen on ({e})") from None
    return value


def check_together(ctx: click.Context, options: dict[str, Any], processes: int) -> None:
    """What no single option can check: the TLS CA needs mqtts://, and the metrics ports of all processes fit."""
    mqtt_url, ca = options.get("mqtt_url"), options.get("mqtt_tls_ca")
    if mqtt_url is not None and ca is not None and not mqtt_url.startswith("mqtts://"):
        raise click.BadParameter(f"a CA file needs an mqtts:// broker URL (--mqtt is {mqtt_url!r})",
                                 ctx=ctx, param_hint=hint(ctx, "mqtt_tls_ca", "'--mqtt-tls-ca'"))
    port = options.get("metrics_port")
    if port and port + processes - 1 > 65535:
        raise click.BadParameter(f"{port} + {processes - 1} (one endpoint per process, {processes} processes) "
                                 f"is above 65535", ctx=ctx, param_hint=hint(ctx, "metrics_port", "'--metrics-port'"))


def hint(ctx: click.Context, name: str, default: str) -> str:
    """How to name a parameter in an error: by where its value came from (command line, variable, file)."""
    param = next((p for p in ctx.command.params if p.name == name), None)
    source = ctx.get_parameter_source(name)
    if source == ParameterSource.DEFAULT_MAP and CONFIG_META in ctx.meta:
        path, keys = ctx.meta[CONFIG_META]
        return f"{keys.get(name, name)!r} in {path}"
    if source == ParameterSource.ENVIRONMENT and isinstance(param, click.Option) and isinstance(param.envvar, str):
        return f"environment variable {param.envvar}"
    if source == ParameterSource.COMMANDLINE and param is not None and param.opts:
        return f"{max(param.opts, key=len)!r}"
    return default


class ConfigCommand(click.Command):
    """A command whose errors about a value name where it came from: the option on the command line,
    the DTGSERVER_* variable, or the --config file and key.

    click names the option and its variable whatever the source, so a value from the file would
    be blamed on the variable.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.BadParameter as e:
            if e.param is None or e.param.name is None or e.param_hint is not None:
                raise
            where = hint(ctx, e.param.name, "")
            if not where:
                raise
            raise click.BadParameter(e.message, ctx=ctx, param_hint=where) from None
