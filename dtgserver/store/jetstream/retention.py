"""Retention on the JetStream stream (`dtgserver prune --store`): what store/retention.py does for SQLite.

Per partition, the packets received before the cut-off are purged (`STREAM.PURGE` with the
partition's subject filter and a sequence: everything of the partition below it goes), except
those after the bridge's saved cursor (`cursor.<partition>` in the bridge's bucket, a stream
sequence): their messages are not all acknowledged yet. A partition no bridge has saved a cursor
for has nothing held back. The age of a packet is the stream's own timestamp of it (its PubAck).
Unlike SQLite's ids, stream sequences are never handed out again, so the last packet may go too.

What is before the cut-off is found with short-lived consumers of the partition (ephemeral,
headers only, no acknowledgements, deleted after): one starting at the cut-off time (its pending count is what is
newer, its first message the first sequence kept), one from the start (the partition's count)
and, when a cursor holds some back, one after the cursor.
"""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime
from typing import Any

import attrs
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from .backend import STREAM, SUBJECT_PREFIX, NatsBackend
from .log import BRIDGE_BUCKET

FETCH_TIMEOUT_S = 5.0
CONSUMER_IDLE_S = 60.0  # an ephemeral consumer left by a process that died is gone after this


@attrs.frozen
class PartitionPruned:
    """What pruning a partition removed (or, dry, would remove) and what it kept of the packets before the cut-off."""

    partition: int
    removed: int
    kept_unpublished: int  # after the bridge's cursor


async def prune_partitions(backend: NatsBackend, before: float, *, dry_run: bool = False) -> list[PartitionPruned]:
    """Purge, partition by partition, the packets the stream received before `before` (Unix
    seconds), but those after the bridge's cursor of their partition. On the NATS thread."""
    cursors = await _cursors(backend)
    return [await _prune(backend, partition, before, cursors.get(partition), dry_run)
            for partition in range(backend.partitions)]


async def _cursors(backend: NatsBackend) -> dict[int, int]:
    try:
        kv = await backend.js.key_value(BRIDGE_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        return {}  # no bridge has run on this cluster
    found = {}
    for partition in range(backend.partitions):
        try:
            entry = await kv.get(f"cursor.{partition}")
        except nats.js.errors.KeyNotFoundError:
            continue
        if entry.value:
            found[partition] = int(entry.value)
    return found


async def _prune(backend: NatsBackend, partition: int, before: float, cursor: int | None,
                 dry_run: bool) -> PartitionPruned:
    js = backend.js
    subjects = f"{SUBJECT_PREFIX}.{partition}.>"
    start = datetime.fromtimestamp(before, UTC).isoformat().replace("+00:00", "Z")
    # In this order, so that a packet stored meanwhile (newer than the cut-off) is never purged
    # and at most makes a dry run's count lower: the stream's end, the partition's count, the newer.
    last = int((await js.stream_info(STREAM)).state.last_seq)
    total, _ = await _pending(backend, subjects, DeliverPolicy.ALL)
    newer, kept_from = await _pending(backend, subjects, DeliverPolicy.BY_START_TIME, opt_start_time=start,
                                      first=True)
    if kept_from is None:  # nothing of the partition is newer: everything up to the stream's end then is older
        kept_from = last + 1
    purge_below, unpublished = kept_from, 0
    if cursor is not None and cursor + 1 < kept_from:
        after_cursor, _ = await _pending(backend, subjects, DeliverPolicy.BY_START_SEQUENCE,
                                         opt_start_seq=cursor + 1)
        purge_below, unpublished = cursor + 1, after_cursor - newer
    removed = max(0, total - newer - unpublished)  # what a dry run says; a purge counts for itself
    if not dry_run and purge_below > 1:
        connection = backend.link.nc
        assert connection is not None  # the backend is open
        reply = await connection.request(
            f"$JS.API.STREAM.PURGE.{STREAM}", json.dumps({"filter": subjects, "seq": purge_below}).encode(),
            timeout=FETCH_TIMEOUT_S)
        answer: dict[str, Any] = json.loads(reply.data)
        if not answer.get("success"):
            raise nats.js.errors.APIError(description=str(answer.get("error", answer)))
        removed = int(answer.get("purged", 0))
    return PartitionPruned(partition, removed, unpublished)


async def _pending(backend: NatsBackend, subjects: str, policy: DeliverPolicy, *, first: bool = False,
                   **start: Any) -> tuple[int, int | None]:
    """The number of the partition's packets a consumer starting as asked would deliver, and (with
    `first`) the stream sequence of the first of them (None when there is none). The consumer is
    ephemeral, deleted after (and by the cluster within a minute if this process dies first)."""
    js = backend.js
    subscription = await js.pull_subscribe(subjects, stream=STREAM, config=ConsumerConfig(
        deliver_policy=policy, ack_policy=AckPolicy.NONE, headers_only=True, inactive_threshold=CONSUMER_IDLE_S,
        **start))
    try:
        info = await subscription.consumer_info()
        pending, sequence = int(info.num_pending or 0), None
        if first and pending:
            (message,) = await subscription.fetch(1, timeout=FETCH_TIMEOUT_S)
            sequence = int(message.metadata.sequence.stream)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_consumer(STREAM, info.name)
        return pending, sequence
    finally:
        await subscription.unsubscribe()
