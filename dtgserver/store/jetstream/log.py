"""The packet stream as a `PacketLog` (dtgserver.store.log) and the bridge's cursor in a key-value bucket.

Positions are the stream's sequence numbers: they grow in PubAck order over the whole stream, so
within a partition (`dtg.packets.<partition>.>`, the log's "shard") they grow too, with gaps
where other partitions' packets sit. Each terminal's packets are all in one partition, in the
order the stream acknowledged them, whichever server node published them.

Reading: one pull consumer per partition (ephemeral, no acks: the position is the consumer's
own cursor, kept by whoever reads), made at the position asked for and reused while reads go on
from where the last one ended; made again at the asked position otherwise, or after it failed (a
node died, the meta leader changed). What it fetched beyond a read's limit is kept for the next.

The cursor (`KvCursor`): in the bucket `dtg_bridge`, per partition, the key
`cursor.<partition>` (the position) and `state.<partition>.<modem>` (each terminal's trip state at
its last packet up to the cursor). A key-value bucket has no transactions, so a save writes the
changed states first, each with the position it belongs to and the state it replaces, then the
cursor. A save cut short (the bridge killed between the two) leaves states newer than the cursor;
`states()` then gives the state they replaced, which is the state at the cursor. A partition is
consumed by one bridge at a time: `lease.<partition>` names the owner until it expires
(`LEASE_S` without renewal); another bridge takes the partition over after that.

The digests of the packets derived up to the cursor (so that the bridge skips a resend the stream
stored twice, after its duplicate window) go to the stream `DTG_BRIDGE_DIGESTS`, one message per
save on `dtg.bridge.digests.<partition>`: the digests, 16 bytes each, concatenated, and the header
`Dtg-At`, the cursor saved with them. A save writes them after the states and before the cursor;
`published()` reads back those whose `Dtg-At` is at most the cursor (a save cut short leaves some
beyond it: their packets are derived again, and saved again). The stream keeps a message
`DIGESTS_KEPT_S`, the bridge's 48 h horizon and an hour more.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
import trio
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, KeyValueConfig, StorageType, StreamConfig

from ..log import LoggedPacket
from .backend import STREAM, SUBJECT_PREFIX, UNAVAILABLE, NatsBackend, NatsOptions, subject
from .backlog import backlog_consumer
from .link import StoreUrl
from .packets import HEADER_RECEIVED_AT

log = logging.getLogger("dtgserver.store.jetstream")

BRIDGE_BUCKET = "dtg_bridge"
DIGEST_STREAM = "DTG_BRIDGE_DIGESTS"
DIGEST_SUBJECT_PREFIX = "dtg.bridge.digests"
DIGESTS_KEPT_S = 49 * 3600.0  # the bridge remembers 48 h (bridge/published.py); an hour more, whole hours
DIGESTS_PER_MESSAGE = 32_768  # 512 KB, under the server's default 1 MB payload limit
HEADER_AT = "Dtg-At"
FLOOR_BATCH = 256  # headers of the backlog consumer's packets fetched at a time, to acknowledge up to the cursor
FLOOR_FETCH_S = 1.0
FLOOR_ACK_WAIT_S = 12 * 3600.0  # delivered beyond the cursor and held: not sent again meanwhile
FLOOR_MAX_ACK_PENDING = 100_000
LEASE_S = 10.0  # a partition's owner that has not renewed its lease for this long has lost it
FETCH_WAIT_S = 1.0  # one fetch's wait for new packets (wait() fetches again until there are some)
JS_READ_S = 5.0  # one fetch of saved digests
READ_PEEK_S = 0.05  # read(): how long to look for packets when the consumer does not know of any


def _partition_filter(partition: int, modem: str | None) -> str:
    return subject(partition, modem) if modem is not None else f"{SUBJECT_PREFIX}.{partition}.>"


def _logged(msg: Any) -> LoggedPacket:
    headers = msg.headers or {}
    return LoggedPacket(msg.metadata.sequence.stream, msg.subject.rsplit(".", 1)[1],
                        float(headers.get(HEADER_RECEIVED_AT, "0")),
                        bytes.fromhex(headers.get("Nats-Msg-Id", "")), bytes(msg.data))


class _Reader:
    """One partition's pull consumer, on the NATS thread."""

    def __init__(self, backend: NatsBackend, partition: int, modem: str | None, after: int):
        self.backend = backend
        self.partition, self.modem = partition, modem
        self.position = after  # the last position fetched (handed out, or waiting in `buffered`)
        self.handed_out = after  # the last position handed out: a read after it continues this consumer
        self.buffered: collections.deque[LoggedPacket] = collections.deque()
        self.pending: int | None = None  # what the consumer said is left after its last message
        self.sub: Any = None

    async def _subscribe(self) -> None:
        self.sub = await self.backend.js.pull_subscribe(
            _partition_filter(self.partition, self.modem), stream=STREAM, config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.position + 1,
                ack_policy=AckPolicy.NONE, inactive_threshold=300.0, mem_storage=True))
        self.pending = int((await self.sub.consumer_info()).num_pending)  # what a first fetch may wait for

    async def fetch(self, limit: int, wait_s: float) -> None:
        if self.sub is None:
            await self._subscribe()
        try:
            messages = await self.sub.fetch(limit, timeout=wait_s)
        except (TimeoutError, nats.errors.TimeoutError):  # nothing within wait_s (nats-py raises either)
            return
        except UNAVAILABLE:
            await self.close()  # made again at the position on the next fetch
            raise
        for msg in messages:
            packet = _logged(msg)
            if packet.position > self.position:
                self.buffered.append(packet)
                self.position = packet.position
            self.pending = msg.metadata.num_pending

    def take(self, limit: int) -> list[LoggedPacket]:
        taken = [self.buffered.popleft() for _ in range(min(limit, len(self.buffered)))]
        if taken:
            self.handed_out = taken[-1].position
        return taken

    async def close(self) -> None:
        sub, self.sub = self.sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except UNAVAILABLE:
                pass


class JetStreamLog:
    """The stream's partitions as a `PacketLog`, for Trio (the NATS work runs on the backend's thread)."""

    def __init__(self, backend: NatsBackend):
        self.backend = backend
        self.link = backend.link
        # (partition, modem, "read" or "wait"): wait() runs ahead of read() in the bridge, each on its own consumer
        self._readers: dict[tuple[int, str | None, str], _Reader] = {}
        self._locks: dict[tuple[int, str | None, str], trio.Lock] = {}

    @property
    def shards(self) -> int:
        return self.backend.partitions

    def _reader(self, shard: int, modem: str | None, after: int, purpose: str) -> tuple[_Reader, _Reader | None]:
        """The reader to use, and the one it replaces (to close), if any."""
        if not 0 <= shard < self.shards:
            raise ValueError(f"no partition {shard}: the stream has {self.shards}")
        key = (shard, modem, purpose)
        reader = self._readers.get(key)
        if reader is not None and reader.handed_out == after:
            return reader, None
        self._readers[key] = fresh = _Reader(self.backend, shard, modem, after)
        return fresh, reader

    async def _read_on_loop(self, shard: int, modem: str | None, after: int, limit: int) -> list[LoggedPacket]:
        """Up to `limit` packets after `after`; at once (a short look when the consumer knows of none)."""
        reader, old = self._reader(shard, modem, after, "read")
        if old is not None:
            await old.close()
        if reader.sub is None:
            await reader._subscribe()
        if len(reader.buffered) < limit and reader.pending:  # known to be there: worth the wait
            await reader.fetch(limit - len(reader.buffered), FETCH_WAIT_S)
        elif not reader.buffered:  # none known: a short look for new ones
            await reader.fetch(limit, READ_PEEK_S)
        return reader.take(limit)

    async def _wait_on_loop(self, shard: int, after: int) -> int:
        """One fetch's wait for packets after `after`; the last position then (`after` if none came)."""
        reader, old = self._reader(shard, None, after, "wait")
        if old is not None:
            await old.close()
        if not reader.buffered:
            await reader.fetch(256, FETCH_WAIT_S)
        taken = reader.take(len(reader.buffered))
        return taken[-1].position if taken else after

    async def read(self, shard: int, after: int, limit: int, *, modem: str | None = None) -> list[LoggedPacket]:
        async with self._locks.setdefault((shard, modem, "read"), trio.Lock()):
            return await self.link.call(self._read_on_loop(shard, modem, after, limit))

    async def wait(self, shard: int, after: int) -> int:
        """Until the partition has a packet beyond `after`; its last position known then."""
        async with self._locks.setdefault((shard, None, "wait"), trio.Lock()):
            while True:
                try:
                    last = await self.link.call(self._wait_on_loop(shard, after))
                except UNAVAILABLE as e:
                    log.warning("waiting on partition %d: %s; again", shard, e or type(e).__name__)
                    await trio.sleep(FETCH_WAIT_S)
                    continue
                if last > after:
                    return last

    async def last(self, shard: int) -> int:
        async def newest() -> int:
            try:
                return int((await self.backend.js.get_last_msg(STREAM, f"{SUBJECT_PREFIX}.{shard}.>")).seq)
            except nats.js.errors.NotFoundError:
                return 0

        return await self.link.call(newest())

    def close(self) -> None:
        """Close the connection (the consumers go with it); from plain code, after Trio is done."""
        self.backend.close()

    async def aclose(self) -> None:
        readers, self._readers = list(self._readers.values()), {}

        async def close_all() -> None:
            for reader in readers:
                await reader.close()

        await self.link.call(close_all())


# -- the cursor ----------------------------------------------------------------------------------------


class CursorBusy(Exception):
    """Another bridge holds this partition's lease (named as the SQLite cursor's exception is: the
    bridge's consumer waits and tries again on either)."""


async def ensure_bridge_bucket(backend: NatsBackend) -> Any:
    js = backend.js
    try:
        return await js.key_value(BRIDGE_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        pass
    return await js.create_key_value(KeyValueConfig(
        bucket=BRIDGE_BUCKET, history=1, storage=StorageType.FILE, replicas=backend.options.replicas,
        description="dtgserver bridge: per partition, the cursor, trip states and the consumer's lease"))


async def ensure_digest_stream(backend: NatsBackend) -> None:
    js = backend.js
    try:
        await js.stream_info(DIGEST_STREAM)
        return
    except nats.js.errors.NotFoundError:
        pass
    await js.add_stream(StreamConfig(
        name=DIGEST_STREAM, subjects=[f"{DIGEST_SUBJECT_PREFIX}.>"], storage=StorageType.FILE,
        num_replicas=backend.options.replicas, max_age=DIGESTS_KEPT_S,
        description="dtgserver bridge: per partition, the digests of the packets derived up to the cursor"))


def owner_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class KvCursor:
    """`CursorStore` of one partition in the bucket `dtg_bridge`; holds the partition's lease while open.

    The methods block (they are called from a worker thread, as SQLite's cursor is).
    """

    def __init__(self, backend: NatsBackend, partition: int, *, owner: str | None = None, lease_s: float = LEASE_S):
        self.backend = backend
        self.link = backend.link
        self.partition = partition
        self.owner = owner or owner_name()
        self.lease_s = lease_s
        self.kv: Any = self.link.call_blocking(ensure_bridge_bucket(backend))
        self.link.call_blocking(ensure_digest_stream(backend))
        self._lease_revision: int | None = None
        self._position: int | None = None
        self.lost: str | None = None  # why the lease was lost, once it was
        self._floor_sub: Any = None  # the backlog consumer (store/jetstream/backlog.py), once this owner made it
        self._floor = 0  # the position it is acknowledged up to
        self._delivered: collections.deque[Any] = collections.deque()  # fetched from it, not yet acknowledged
        self.link.call_blocking(self._acquire())
        self._keeper = self.link.submit(self._keep())

    # lease
    @property
    def _lease_key(self) -> str:
        return f"lease.{self.partition}"

    async def _acquire(self) -> None:
        value = json.dumps({"owner": self.owner, "until": time.time() + self.lease_s}).encode()
        try:
            self._lease_revision = await self.kv.create(self._lease_key, value)
            return
        except nats.js.errors.KeyWrongLastSequenceError:
            pass
        entry = await self.kv.get(self._lease_key)
        held = json.loads(entry.value) if entry.value else {}
        if held.get("owner") != self.owner and held.get("until", 0) > time.time():
            raise CursorBusy(f"partition {self.partition} is consumed by {held.get('owner')} "
                                 f"(lease for {held['until'] - time.time():.1f} s more)")
        self._lease_revision = await self.kv.update(self._lease_key, value, last=entry.revision)

    async def _renew(self) -> None:
        if self.lost is not None:
            raise CursorBusy(self.lost)
        value = json.dumps({"owner": self.owner, "until": time.time() + self.lease_s}).encode()
        try:
            self._lease_revision = await self.kv.update(self._lease_key, value, last=self._lease_revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            self.lost = f"partition {self.partition}: another bridge took the lease"
            raise CursorBusy(self.lost) from None

    async def _keep(self) -> None:
        """On the NATS thread while open: renew the lease every third of its time, idle or not."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self._renew()
            except CursorBusy:
                log.error("%s", self.lost)
                return
            except UNAVAILABLE as e:  # the lease runs on; renewed at the next turn if the cluster answers
                log.warning("renewing the lease of partition %d: %s", self.partition, e or type(e).__name__)

    def renew(self) -> None:
        """Extend the lease now; raises CursorBusy when another bridge took it meanwhile."""
        self.link.call_blocking(self._renew())

    # the backlog's consumer (store/jetstream/backlog.py): acknowledged up to the cursor
    async def _reset_floor(self, position: int) -> None:
        """Make the partition's backlog consumer again, starting after `position` (a new owner: the
        last one's deliveries are not this bridge's to acknowledge)."""
        js = self.backend.js
        name = backlog_consumer(self.partition)
        await self._close_floor()
        try:
            await js.delete_consumer(STREAM, name)
        except nats.js.errors.NotFoundError:
            pass
        await js.add_consumer(STREAM, ConsumerConfig(
            durable_name=name, filter_subject=f"{SUBJECT_PREFIX}.{self.partition}.>",
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=position + 1,
            ack_policy=AckPolicy.ALL, ack_wait=FLOOR_ACK_WAIT_S, max_ack_pending=FLOOR_MAX_ACK_PENDING,
            headers_only=True, description="dtgserver bridge: acknowledged up to the partition's cursor"))
        self._floor_sub = await js.pull_subscribe_bind(durable=name, stream=STREAM)
        self._floor = position
        self._delivered.clear()

    async def _move_floor(self, position: int) -> None:
        """Acknowledge the backlog consumer up to `position` (its last packet at or before it)."""
        if self._floor_sub is None:
            await self._reset_floor(position)
            return
        if position <= self._floor:
            return
        delivered = self._delivered
        while not delivered or delivered[-1].metadata.sequence.stream < position:
            try:
                messages = await self._floor_sub.fetch(FLOOR_BATCH, timeout=FLOOR_FETCH_S)
            except (TimeoutError, nats.errors.TimeoutError):
                break  # none delivered: the partition has nothing more up to `position`
            newest = delivered[-1].metadata.sequence.stream if delivered else self._floor
            delivered.extend(m for m in messages if m.metadata.sequence.stream > newest)  # not a redelivery
            if messages and messages[-1].metadata.num_pending == 0 and \
                    messages[-1].metadata.sequence.stream < position:
                break
        last = None
        while delivered and delivered[0].metadata.sequence.stream <= position:
            last = delivered.popleft()
        if last is not None:
            await last.ack_sync(timeout=JS_READ_S)  # AckPolicy.ALL: and every one before it
        self._floor = position

    async def _close_floor(self) -> None:
        sub, self._floor_sub = self._floor_sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except UNAVAILABLE:
                pass

    # CursorStore
    def load(self) -> int | None:
        async def load() -> int | None:
            try:
                entry = await self.kv.get(f"cursor.{self.partition}")
            except nats.js.errors.KeyNotFoundError:
                return None
            position = int(entry.value)
            if self._floor_sub is None:  # a new owner: the backlog consumer from this cursor on
                try:
                    await self._reset_floor(position)
                except UNAVAILABLE as e:  # made at the next save
                    log.warning("partition %d: cannot make the backlog consumer: %s", self.partition,
                                e or type(e).__name__)
            return position

        self._position = self.link.call_blocking(load())
        return self._position

    def states(self, modems: Iterable[str]) -> dict[str, str]:
        cursor = self._position if self._position is not None else self.load()

        async def get_all(wanted: list[str]) -> dict[str, str]:
            async def one(modem: str) -> tuple[str, str | None]:
                try:
                    entry = await self.kv.get(f"state.{self.partition}.{modem}")
                except nats.js.errors.KeyNotFoundError:
                    return modem, None
                saved = json.loads(entry.value)
                if cursor is None or saved["at"] > cursor:  # written by a save whose cursor never was
                    return modem, saved["before"]
                return modem, saved["state"]

            found = await asyncio.gather(*(one(m) for m in wanted))
            return {m: s for m, s in found if s is not None}

        return self.link.call_blocking(get_all(list(modems)))

    def published(self) -> list[tuple[float, bytes]]:
        """The digests saved with cursors up to the saved one, oldest first, with their save times."""
        cursor = self._position if self._position is not None else self.load()

        async def read() -> list[tuple[float, bytes]]:
            sub = await self.backend.js.pull_subscribe(
                f"{DIGEST_SUBJECT_PREFIX}.{self.partition}", stream=DIGEST_STREAM, config=ConsumerConfig(
                    deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=60.0,
                    mem_storage=True))
            found: list[tuple[float, bytes]] = []
            try:
                pending = int((await sub.consumer_info()).num_pending)
                while pending > 0:
                    for msg in await sub.fetch(min(pending, 256), timeout=JS_READ_S):
                        pending = msg.metadata.num_pending
                        at = int((msg.headers or {}).get(HEADER_AT, "0"))
                        if cursor is not None and at <= cursor:
                            found.append((msg.metadata.timestamp.timestamp(), bytes(msg.data)))
            finally:
                await sub.unsubscribe()
            return found

        return self.link.call_blocking(read())

    def save(self, position: int, states: Mapping[str, str], digests: Sequence[bytes] = ()) -> None:
        """States first, then the digests, then the cursor (see the module's docstring); CursorBusy if
        the lease is gone."""
        earlier = self.states(states.keys()) if states else {}

        async def save() -> None:
            await asyncio.gather(*(self.kv.put(f"state.{self.partition}.{modem}", json.dumps(
                {"at": position, "state": state, "before": earlier.get(modem)}).encode())
                for modem, state in states.items()))
            for start in range(0, len(digests), DIGESTS_PER_MESSAGE):
                await self.backend.js.publish(
                    f"{DIGEST_SUBJECT_PREFIX}.{self.partition}", b"".join(digests[start:start + DIGESTS_PER_MESSAGE]),
                    stream=DIGEST_STREAM, headers={HEADER_AT: str(position)})
            await self.kv.put(f"cursor.{self.partition}", str(position).encode())
            try:
                await self._move_floor(position)
            except UNAVAILABLE as e:  # the cursor is saved; the consumer is made again at the next save
                log.warning("partition %d: acknowledging the backlog consumer up to %d: %s", self.partition,
                            position, e or type(e).__name__)
                await self._close_floor()

        self.renew()
        self.link.call_blocking(save())
        self._position = position

    def close(self) -> None:
        """Give the lease back at once (another bridge may take the partition without waiting)."""
        self._keeper.cancel()

        async def release() -> None:
            await self._close_floor()
            try:
                await self.kv.delete(self._lease_key, last=self._lease_revision)
            except (nats.js.errors.KeyWrongLastSequenceError, *UNAVAILABLE):
                pass

        try:
            self.link.call_blocking(release())
        except (TimeoutError, *UNAVAILABLE):
            pass


def open_bridge_log(url: str, *, tls_ca: Path | None = None, replicas: int = 3,
                    name: str = "dtgserver-bridge") -> tuple[JetStreamLog, Callable[[int], KvCursor]]:
    """For `dtgserver bridge --store` and `replay --store`: the stream as a log, and a cursor per partition.

    Connects now: ConnectionError (or TimeoutError) when the cluster cannot be reached.
    """
    backend = NatsBackend(NatsOptions(StoreUrl.parse(url, tls_ca=tls_ca), replicas=replicas), name=name)
    try:
        backend.open_blocking()
    except BaseException:
        backend.close()
        raise
    return JetStreamLog(backend), partial(KvCursor, backend)
