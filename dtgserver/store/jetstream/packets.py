"""The packet store on JetStream: answered 0 only once the stream's PubAck says a quorum has the packet.

The session side is PacketStore's (`submit`, `enqueue`, `overloaded`, `run`, `stats`), so the
server uses either. Sessions queue packets; the `run` task hands everything queued to the NATS
thread in one hand-off, where each packet becomes one `publish_async` (many in flight at once:
the equivalent of a group commit), and the PubAcks come back to Trio in batches.

- PubAck → 0; a PubAck marked duplicate (the digest is in the stream's duplicate window) → 0.
- An error reply (no quorum, no stream leader), no responders, or no PubAck within
  `ack_timeout` → 4, never 0.
- No connection to any node for RECONNECT_GRACE_S → 4 at once, and the server goes on accepting;
  nats-py reconnects in the background and answers are 0 again as soon as the cluster has a
  quorum. Within the grace (the node the connection was on died, the client moves to another)
  packets are published as usual and wait for their PubAck, retried, up to the ack timeout.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Generator
from functools import partial
from typing import Any

import nats.errors
import trio

from ...protocol import Received, Result
from ..packets import Pending, QueuedSubmit, StoredPacket, StoreStats, digest, shard_of
from .backend import JS_API_TIMEOUT_S, STREAM, SUBJECT_PREFIX, UNAVAILABLE, NatsBackend, partition_of_subject, subject
from .backlog import NatsBacklog

log = logging.getLogger("dtgserver.store.jetstream")

HEADER_RECEIVED_AT = "Dtg-Received-At"
HEADER_PEER = "Dtg-Peer"
HEADER_KIND = "Dtg-Kind"
DRAIN_MARGIN_S = 1.0  # at shutdown: the ack timeout plus this for the last answers to come back
ATTEMPT_TIMEOUT_S = 2.0  # one publish's wait for its PubAck before it is sent again
RETRY_DELAY_S = 0.25
RECONNECT_GRACE_S = 2.0  # the connection lost for less than this: packets are queued for the next node, not refused
READER_OPEN_S = 30.0  # export: how long to wait for JetStream to make the reading consumer

_Message = tuple[str, bytes, dict[str, str]]  # subject, payload, headers


class JetStreamStore(QueuedSubmit):
    """Every partition of the cluster's packet stream, for one server process."""

    def __init__(self, backend: NatsBackend, *, queue_high_water: int = 2048, control: Any = None):
        """`control`: the server's NatsControl; until its watch has the registry, packets are answered 4."""
        self.backend = backend
        self.control = control
        self.link = backend.link
        self.queue_high_water = queue_high_water
        self.backlog = NatsBacklog(backend)  # the bridges' backlog per partition, read about once a second
        self.backlog_high_water: int | None = None  # packets of a partition at this backlog are answered 4
        self.stats = StoreStats()
        self.failed_publishes = 0  # packets answered 4 for want of a PubAck
        self.retries = 0  # publishes sent again
        self.max_in_flight = 0  # the most packets waiting for PubAcks at once
        self._tasks: set[asyncio.Task[None]] = set()
        self._queued: list[Pending] = []  # not yet handed to the NATS thread
        self._outstanding = 0  # handed over, answer not yet back
        self._wake = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        self._done: list[tuple[Pending, bool | None]] = []  # (item, duplicate or None if failed), NATS thread →
        self._done_lock = threading.Lock()
        self._token: trio.lowlevel.TrioToken | None = None

    def close(self) -> None:
        """The connection belongs to the backend, closed by its owner."""

    # -- the session side (as PacketStore) ----------------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self._queued) + self._outstanding

    def overloaded(self) -> str | None:
        """Why new packets must be answered 4 (those of a partition whose backlog is at the mark: any
        partition's, for /healthz), or None."""
        return self._refusal() or self._backlog_refusal(None)

    def _backlog_refusal(self, partition: int | None) -> str | None:
        high_water = self.backlog_high_water
        if high_water is None:
            return None
        partitions = self.backlog.partitions if partition is None else [partition]
        for p in partitions:
            if self.backlog.of(p) >= high_water:
                return f"MQTT backlog of partition {p} at {self.backlog.of(p)} packets"
        return None

    def _refusal(self) -> str | None:
        if not self.backend.ready:
            return "NATS cluster not reached yet"
        if self.link.down_for() > RECONNECT_GRACE_S:  # a moment to move to another node: packets wait for it
            return "NATS cluster unreachable"
        if self.control is not None and not self.control.loaded:
            return "registry not read from the NATS cluster yet"
        if self.queued >= self.queue_high_water:
            return f"{self.queued} publishes waiting for a PubAck"
        return None

    def enqueue(self, received: Received, peer: str, received_at: float | None = None) -> Pending | None:
        if self._refusal() or self._backlog_refusal(shard_of(received.modem, self.backend.partitions)):
            return None
        item = Pending(received, peer, time.time() if received_at is None else received_at)
        self._queued.append(item)
        self._wake.set()
        return item

    # -- the publisher ------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect in the background, hand queued packets over until cancelled, then wait for their answers."""
        self._token = trio.lowlevel.current_trio_token()
        try:
            async with trio.open_nursery() as nursery:
                # connects until it can; raises PartitionMismatch, which ends the server
                nursery.start_soon(self.link.call, self.backend.setup())
                nursery.start_soon(self.backlog.run)
                task_status.started()
                while True:
                    await self._wake.wait()
                    self._wake = trio.Event()
                    self._hand_over()
        finally:
            with trio.CancelScope(shield=True):
                self._hand_over()
                with trio.move_on_after(self.backend.options.ack_timeout + DRAIN_MARGIN_S):
                    await self._idle.wait()

    def _hand_over(self) -> None:
        if not self._queued:
            return
        batch, self._queued = self._queued, []
        self._outstanding += len(batch)
        self.max_in_flight = max(self.max_in_flight, self._outstanding)
        self._idle = trio.Event()
        partitions = self.backend.partitions
        messages = [(subject(shard_of(item.received.modem, partitions), item.received.modem), item.received.raw, {
            "Nats-Msg-Id": digest(item.received.raw).hex(), HEADER_RECEIVED_AT: repr(item.received_at),
            HEADER_PEER: item.peer, HEADER_KIND: item.received.kind}) for item in batch]
        self.link.call_soon(self._publish_batch_soon, batch, messages)

    # on the NATS thread
    def _publish_batch_soon(self, batch: list[Pending], messages: list[_Message]) -> None:
        self._spawn(self._publish_batch(batch, messages))

    def _spawn(self, coro: Any) -> None:
        task = self.link.loop.create_task(coro)
        self._tasks.add(task)  # asyncio keeps only a weak reference to a task
        task.add_done_callback(self._tasks.discard)

    async def _publish_batch(self, batch: list[Pending], messages: list[_Message]) -> None:
        deadline = self.link.loop.time() + self.backend.options.ack_timeout
        for item, message in zip(batch, messages, strict=True):
            await self._attempt(item, message, deadline)

    async def _attempt(self, item: Pending, message: _Message, deadline: float) -> None:
        """One publish of the packet; its PubAck (or its failure) arrives in `_acked`."""
        loop = self.link.loop
        left = deadline - loop.time()
        name, raw, headers = message
        try:
            future = await self.backend.js.publish_async(name, raw, headers=headers, wait_stall=max(left, 0.001))
        except Exception as e:  # not sent: closed connection, too many in flight
            self._retry_or_fail(item, message, deadline, e)
            return
        timer = loop.call_later(min(ATTEMPT_TIMEOUT_S, max(left, 0.001)), future.cancel)
        future.add_done_callback(partial(self._acked, item, message, deadline, timer))

    def _acked(self, item: Pending, message: _Message, deadline: float, timer: asyncio.TimerHandle,
               future: asyncio.Future[Any]) -> None:
        timer.cancel()
        if future.cancelled():
            error: BaseException = TimeoutError(f"no PubAck within {ATTEMPT_TIMEOUT_S} s")
        elif (raised := future.exception()) is not None:
            error = raised
        else:
            ack = future.result()
            self._finished(item, bool(ack.duplicate), None)
            return
        self._retry_or_fail(item, message, deadline, error)

    def _retry_or_fail(self, item: Pending, message: _Message, deadline: float, error: BaseException) -> None:
        """Publish again (same Nats-Msg-Id: a copy that did reach the stream is acknowledged as a
        duplicate) while the ack timeout allows, else answer 4. Covers a stream leader's
        election after a node died, and the client's move to another node."""
        loop = self.link.loop
        if loop.time() + RETRY_DELAY_S < deadline:
            self.retries += 1
            loop.call_later(RETRY_DELAY_S, lambda: self._spawn(self._attempt(item, message, deadline)))
        else:
            self._finished(item, None, error)

    def _finished(self, item: Pending, duplicate: bool | None, error: BaseException | None) -> None:
        if error is not None:
            log.debug("publish of a packet from %s failed: %s", item.received.modem, error or type(error).__name__)
        with self._done_lock:
            first = not self._done
            self._done.append((item, duplicate))
        if first:  # after the PubAcks this turn of the loop read: one hand-off for all of them
            self.link.loop.call_soon(self._hand_back)

    def _hand_back(self) -> None:
        if self._token is not None:
            try:
                self._token.run_sync_soon(self._deliver)
            except trio.RunFinishedError:
                pass

    # back on the Trio thread
    def _deliver(self) -> None:
        with self._done_lock:
            done, self._done = self._done, []
        failed = 0
        for item, duplicate in done:
            if duplicate is None:
                item.result = Result.OVERLOADED
                failed += 1
            else:
                item.result = Result.OK
                if duplicate:
                    self.stats.duplicates += 1
                else:
                    self.stats.committed_packets += 1
            item.done.set()
        if failed:
            self.failed_publishes += failed
            self.stats.failed_commits += 1
            log.error("%d packets got no PubAck, answering 4", failed)
        self.stats.commits += 1
        self.stats.last_batch_size = len(done)
        self.stats.batch_size_sum += len(done)
        self._outstanding -= len(done)
        if not self._outstanding:
            self._idle.set()


# -- reading the stream back (export) ----------------------------------------------------------------


def _packet(msg: Any) -> StoredPacket:
    headers = msg.headers or {}
    _, modem = partition_of_subject(msg.subject)
    return StoredPacket(msg.metadata.sequence.stream, modem, headers.get(HEADER_KIND, ""),
                        float(headers.get(HEADER_RECEIVED_AT, "0")), headers.get(HEADER_PEER, ""), bytes(msg.data))


async def _open_reader(backend: NatsBackend, modem: str | None) -> Any:
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    filter_subject = subject(shard_of(modem, backend.partitions), modem) if modem else f"{SUBJECT_PREFIX}.>"
    return await backend.js.pull_subscribe(filter_subject, stream=STREAM, config=ConsumerConfig(
        deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=60.0))


async def _pending(sub: Any) -> int:
    return int((await sub.consumer_info()).num_pending)


async def _fetch(sub: Any, batch: int) -> list[Any]:
    try:
        return list(await sub.fetch(batch, timeout=2))
    except nats.errors.TimeoutError:
        return []


def read_stream(backend: NatsBackend, *, modem: str | None = None, since: float | None = None,
                until: float | None = None, batch: int = 512) -> Generator[StoredPacket, None, None]:
    """The stream's packets in stream order (the order their PubAcks were given), filtered.

    Called from plain code (the CLI) on a backend opened with `open_blocking`; reads in batches
    through an ephemeral consumer until it reports nothing pending.
    """
    link = backend.link
    deadline = time.monotonic() + READER_OPEN_S
    while True:  # a consumer is made by the meta leader: after a node died, wait for the next one's election
        try:
            sub = link.call_blocking(_open_reader(backend, modem), timeout=2 * JS_API_TIMEOUT_S)
            break
        except (TimeoutError, *UNAVAILABLE):
            if time.monotonic() > deadline:
                raise
    try:
        while True:
            messages = link.call_blocking(_fetch(sub, batch))
            if not messages:  # an empty stream, or a slow answer: ask the consumer what is left
                if link.call_blocking(_pending(sub)) == 0:
                    return
                continue
            for msg in messages:
                packet = _packet(msg)
                if (since is None or packet.received_at >= since) and (until is None or packet.received_at < until):
                    yield packet
                if msg.metadata.num_pending == 0:  # the stream leader's count of what is left for this reader
                    return
    finally:
        try:
            link.call_blocking(sub.unsubscribe())
        except (TimeoutError, *UNAVAILABLE):
            pass
