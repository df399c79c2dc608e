"""`dtgserver prune`: a data dir's retention period, run beside the server (from cron or a timer)."""

from __future__ import annotations

import sqlite3
import sys
import time
from datetime import datetime
from pathlib import Path

import click

from ..protocol import KST
from . import checks
from .server_cmds import _nats, data_dir_option, store_options

MIN_KEEP_DAYS = 2.0
"""A terminal resends what was not answered 0 for up to 48 hours (spec §4.5), and a resend of a
packet whose row was pruned would be stored, and published, a second time."""
MAX_KEEP_DAYS = 36_500.0  # a century: a cut-off before any stored packet, and a date the calendar can name


@click.command()
@data_dir_option
@click.option("--keep-days", type=checks.FiniteFloat(min=MIN_KEEP_DAYS, max=MAX_KEEP_DAYS), required=True,
              help="Keep what was received in the last this many days; remove what is older. At least 2: "
                   "terminals resend for up to 48 hours, and a pruned packet's resend would be stored again.")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@store_options
def prune(data_dir: Path, keep_days: float, dry_run: bool, store: str | None, store_tls_ca: Path | None,
          store_replicas: int) -> None:
    """Remove the packets and status log files received more than --keep-days ago from a data dir.

    Safe beside a running server: the packets go in small transactions, each of which the server's
    commits wait for at most. Kept whatever their age: the packets after the MQTT bridge's saved
    cursor (DIR/bridge-<shard>.db: their messages are not all acknowledged yet) and each shard's
    last packet (the next packet's id follows it). The database files do not shrink: SQLite
    reuses the freed pages for new packets.

    With --store nats://...: the stream's packets, partition by partition, but those after the
    partition's bridge cursor in the cluster.
    """
    from ..bridge.cursor import cursor_path, read_position
    from ..store import shard_paths
    from ..store.retention import prune_shard, prune_status_logs

    before = time.time() - keep_days * 86_400
    verb = "would remove" if dry_run else "removed"
    cut = datetime.fromtimestamp(before, KST).isoformat(timespec="seconds")
    if store is not None:
        said = f"{verb} {{:,}} packets received before {cut}"
        _prune_stream(store, store_tls_ca, store_replicas, before, dry_run, said)
        return
    paths = shard_paths(data_dir)
    if not paths:
        click.echo(f"dtgserver: error: no store in {data_dir}", err=True)
        sys.exit(1)
    failed = False
    for path in paths:
        shard = int(path.stem.removeprefix("store-"))  # its number, whatever the others
        try:
            cursor = read_position(data_dir, shard)
        except sqlite3.Error as e:  # which packets the bridge still needs is unknown: none go
            click.echo(f"dtgserver: error: {cursor_path(data_dir, shard).name}: {e}: the bridge's cursor is "
                       f"unknown, nothing removed from {path.name}", err=True)
            failed = True
            continue
        try:
            pruned = prune_shard(path, before, keep_after=cursor, dry_run=dry_run)
        except sqlite3.Error as e:  # a damaged file, a lock held past the busy timeout: nothing more of it
            click.echo(f"dtgserver: error: {path.name}: {e}; nothing more removed from it", err=True)
            failed = True
            continue
        kept = []
        if pruned.kept_unpublished:
            kept.append(f"{pruned.kept_unpublished:,} after the bridge's cursor in {cursor_path(data_dir, shard).name}")
        if pruned.kept_last:
            kept.append("the shard's last packet")
        click.echo(f"{path.name}: {verb} {pruned.removed:,} packets received before {cut}"
                   + (f" (kept {' and '.join(kept)})" if kept else ""))
    try:
        logs = prune_status_logs(data_dir, before, dry_run=dry_run)
    except OSError as e:
        click.echo(f"dtgserver: error: status log files: {e}", err=True)
        sys.exit(1)
    click.echo(f"logs: {verb} {logs:,} status log files written before {cut}")
    if failed:
        sys.exit(1)


PRUNE_TIMEOUT_S = 600.0


def _prune_stream(store: str, tls_ca: Path | None, replicas: int, before: float, dry_run: bool, said: str) -> None:
    """`prune --store`: the stream's partitions (store/jetstream/retention.py), one line for each that had
    packets before the cut-off, and one for the stream."""
    from ..store.jetstream.backend import STREAM, UNAVAILABLE
    from ..store.jetstream.retention import prune_partitions

    with _nats(store, tls_ca, replicas) as backend:
        try:
            pruned = backend.link.call_blocking(prune_partitions(backend, before, dry_run=dry_run),
                                                timeout=PRUNE_TIMEOUT_S)
        except (*UNAVAILABLE, TimeoutError) as e:
            click.echo(f"dtgserver: error: pruning the stream {STREAM}: {e or type(e).__name__}", err=True)
            sys.exit(1)
    for partition in pruned:
        if partition.removed or partition.kept_unpublished:
            kept = (f" (kept {partition.kept_unpublished:,} after the bridge's cursor)"
                    if partition.kept_unpublished else "")
            click.echo(f"partition {partition.partition}: {said.format(partition.removed)}{kept}")
    click.echo(f"stream {STREAM}: {said.format(sum(p.removed for p in pruned))}")


COMMANDS = [prune]
