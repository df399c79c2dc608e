"""`dtgserver report`: dangerous-driving behaviours per 100 km, per vehicle or driver."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import click

from ..bridge.driving import DEFAULT_EDITION, EDITIONS, VEHICLE_CLASSES
from .server_cmds import _parse_time, data_dir_option


def _classes(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, str]:
    from ..bridge.driving import parse_classes

    try:
        return parse_classes(",".join(value))
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None


@click.command()
@data_dir_option
@click.option("--since", default=None,
              help="Bodies recorded at or after (ISO 8601, KST when no offset; or Unix seconds).")
@click.option("--until", default=None, help="Bodies recorded before (same forms as --since).")
@click.option("--modem", default=None, help="Only this terminal.")
@click.option("--by", type=click.Choice(["vehicle", "driver"]), default="vehicle",
              help="One row per vehicle (modem) or per driver (the basic info's driver code).")
@click.option("--format", "output_format", type=click.Choice(["table", "json", "csv"]), default="table",
              help="A table for a terminal, or JSON / CSV for a program.")
@click.option("--edition", type=click.Choice(list(EDITIONS)), default=DEFAULT_EDITION, envvar="DTGSERVER_EDITION",
              show_envvar=True, help="Which edition of KOTSA's criteria (docs/driving.md).")
@click.option("--default-class", type=click.Choice([*VEHICLE_CLASSES, "none"]), default="taxi",
              envvar="DTGSERVER_DEFAULT_CLASS", show_envvar=True,
              help="Criteria for vehicle type 41 (non-commercial), unknown types and terminals without basic "
                   "info; none: no behaviours for them.")
@click.option("--vehicle-class", "classes", multiple=True, callback=_classes, metavar="MODEM=CLASS",
              help="The class of one terminal's vehicle, whatever its basic info says (repeatable, or "
                   "comma-separated).")
def report(data_dir: Path, since: str | None, until: str | None, modem: str | None, by: str, output_format: str,
           edition: str, default_class: str, classes: dict[str, str]) -> None:
    """Distance, driving time and KOTSA's dangerous-driving behaviours per 100 km, from the stored packets.

    Speeding is not among them: no packet carries the road's speed limit.
    """
    from ..bridge.driving import DrivingConfig
    from ..bridge.report import as_csv, as_json, as_table
    from ..bridge.report import report as build
    from ..store import read_stored, shard_paths

    if not shard_paths(data_dir):
        click.echo(f"dtgserver: error: no store in {data_dir}", err=True)
        sys.exit(1)
    config = DrivingConfig(edition=edition, default_class=None if default_class == "none" else default_class,
                           classes=classes)
    since_s, until_s = _parse_time(since, "--since"), _parse_time(until, "--until")
    try:
        # a body is received after it was recorded: packets received before --since hold none of the period
        rows = build(read_stored(data_dir, modem=modem, since=since_s), config, by=by, since=since_s, until=until_s)
    except sqlite3.Error as e:
        click.echo(f"dtgserver: error: cannot read the store in {data_dir}: {e}", err=True)
        sys.exit(1)
    if output_format == "json":
        click.echo(as_json(rows, by, config))
    elif output_format == "csv":
        click.echo(as_csv(rows, by), nl=False)
    else:
        for line in as_table(rows, by, config):
            click.echo(line)


COMMANDS = [report]
