"""`dtgserver report`: dangerous-driving behaviours per 100 km, per vehicle or driver."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import click

from .server_cmds import _parse_time, data_dir_option, driving_options


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
@driving_options(deadline=False)
def report(data_dir: Path, since: str | None, until: str | None, modem: str | None, by: str, output_format: str,
           edition: str, default_class: str | None, vehicle_class: dict[str, str]) -> None:
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
    config = DrivingConfig(edition=edition, default_class=default_class, classes=vehicle_class)
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
