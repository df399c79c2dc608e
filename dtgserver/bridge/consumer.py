"""The bridge as a consumer of the packet log: one shard's packets → messages → the forwarder.

The store keeps packets only; everything published is derived from them here, by
`derive(raw, state)`, a pure function of the stored bytes and the terminal's trip state. The
consumer reads the shard in position order (commit order, so each terminal's order), derives the
messages of each packet, and hands them to the `Forwarder` (it implements `Outbox`).

How far it got is one number per shard, the **cursor**: the last packet whose messages the
broker has all acknowledged (PUBACK). The cursor and the trip states derived up to it are saved
together (`cursor.CursorStore`), a batch of acknowledgements at a time (at most every
`flush_interval_s`), never per message. On restart the consumer resumes after the cursor with
those states, so it derives exactly the messages it had derived before, with the same ids: a
subscriber sees at most the QoS 1 duplicates of the window that was unacknowledged, in order.

Errors: a failed read of the log, a failed or blocked cursor write (disk full, a foreign lock),
a cursor file that cannot be opened — each is logged, counted in `stats`, and retried with a
growing delay; none ends the consumer, and none reaches the terminals' answers (they only see
the backlog grow, and 4 once it is over the high-water mark).

A packet stored twice (the JetStream stream stores a resend again once its duplicate window has
passed) is derived once: when the cursor store says so (`CursorStore.published()` is not None),
the consumer remembers the digests it derived for `resend_horizon_s` (`published.PublishedDigests`),
saves them with the cursor, and skips a packet whose digest it already has: no messages, no change
to the trip state. Counted in `stats.resends_dropped`.

Trip states live in an LRU cache of `trip_cache` terminals; a terminal falls out of it only when
its state is saved (not in flight, not waiting to be written), and is read back from the cursor
store when its next packet comes.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import trio

from ..store.log import LoggedPacket, PacketLog
from .cursor import CursorStore
from .derive import Outgoing, derive
from .driving import DrivingConfig
from .outbox import OutboxRow
from .published import HORIZON_S, PublishedDigests
from .tripmetrics import DEFAULT_BATTERY_WARNING_V
from .trips import DEFAULT_DRIVING, DEFAULT_TRIP_DEADLINE_MS, TripState

log = logging.getLogger("dtgserver.bridge")

SECONDS = 1.0
WARMUP_S = 48 * 3600 * SECONDS  # §4.5: a terminal keeps at most 48 h of unsent data

Derive = Callable[..., tuple[list[Outgoing], Any]]


@attrs.frozen
class BridgeOptions:
    """How messages are built and how the consumer batches its work."""

    profile: str = "seed"
    battery_warning_v: float = DEFAULT_BATTERY_WARNING_V
    driving: DrivingConfig = DEFAULT_DRIVING  # the dangerous-driving edition and vehicle classes
    trip_deadline_ms: int = DEFAULT_TRIP_DEADLINE_MS  # a trip waiting this long after its KEY OFF goes out partial
    read_batch: int = 256  # packets per read of the log
    trip_cache: int = 100_000  # terminals whose trip state is kept in memory (LRU)
    flush_interval_s: float = 0.2 * SECONDS  # the cursor is saved at most this often
    warmup_s: float = WARMUP_S  # a first start on a store with history: states rebuilt from this far back
    resend_horizon_s: float = HORIZON_S  # how long a derived packet's digest is remembered (stores that need it)
    backoff_initial_s: float = 0.5 * SECONDS
    backoff_max_s: float = 30 * SECONDS


@attrs.define
class ConsumerStats:
    """Counters the metrics endpoint reads."""

    derived_packets: int = 0
    messages: int = 0  # derived messages (each published at least once)
    derive_errors: int = 0  # packets whose messages could not be built (logged, skipped)
    read_errors: int = 0  # failed reads of the log or of saved trip states
    cursor_saves: int = 0
    cursor_errors: int = 0  # failed cursor writes (retried)
    warmup_packets: int = 0  # packets read to rebuild trip states on a first start
    resends_dropped: int = 0  # packets skipped: their digest was derived before (a resend stored twice)
    lags: collections.deque[float] = attrs.field(factory=lambda: collections.deque(maxlen=10_000))

    def lag_quantile(self, q: float) -> float:
        """Seconds from a packet's arrival to the PUBACK of its last message, over the recent packets."""
        if not self.lags:
            return 0.0
        ordered = sorted(self.lags)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@attrs.define(slots=True)
class _InFlight:
    """A derived packet whose messages are not all acknowledged yet."""

    position: int
    modem: str
    state: Any  # the terminal's state after this packet
    changed: bool
    outstanding: int
    received_at: float
    publishes: bool
    digest: bytes | None = None  # to save with the cursor once acknowledged (stores that need it)


class Consumer:
    """One shard's consumer; an `Outbox` for the forwarder. Run `run()` beside the forwarder.

    `publish(packet)`: whether a derived packet's messages are published (a replay's range); the
    trip state is advanced by every packet either way. `end`: stop deriving after this position
    (a replay); `done` is set once everything up to it is acknowledged. `start_at`: where a first
    start (no saved cursor) begins; by default the shard's last packet when the cursor is opened.
    A server passes its store's last id before it accepts any connection, so that nothing it
    answers is taken for history.
    """

    def __init__(self, packet_log: PacketLog, shard: int, cursor: CursorStore | Callable[[], CursorStore],
                 options: BridgeOptions | None = None, *, derive_fn: Derive = derive,
                 publish: Callable[[LoggedPacket], bool] | None = None, modem: str | None = None,
                 end: int | None = None, start_at: int | None = None):
        self.log = packet_log
        self.shard = shard
        self._cursor_source = cursor
        self.cursor: CursorStore | None = None
        self.options = options or BridgeOptions()
        self.derive_fn = derive_fn
        self.publish_filter = publish
        self.modem = modem
        self.end = end
        self.start_at = start_at
        self.stats = ConsumerStats()
        self.ready = trio.Event()
        self.done = trio.Event()
        self.position = 0  # saved cursor
        self.acked = 0  # last packet whose messages are all acknowledged (saved or not)
        self.derived = 0  # last packet derived
        self.last_seen = 0  # the shard's last position, as last read
        self._states: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._pins: collections.Counter[str] = collections.Counter()  # in-flight packets per terminal
        self._dirty: dict[str, Any] = {}  # states up to `acked`, not yet saved
        self._inflight: collections.deque[_InFlight] = collections.deque()
        self._by_row: dict[int, _InFlight] = {}
        self._buffer: collections.deque[OutboxRow] = collections.deque()
        self._next_row = 1
        self._acked_wake = trio.Event()
        self._range_done = False
        self.published: PublishedDigests | None = None  # set when the cursor store keeps them
        self._unsaved_digests: list[bytes] = []  # derived and acknowledged, not yet saved with the cursor

    @property
    def cached_states(self) -> int:
        """Trip states in memory (bounded by `trip_cache`, plus those not yet saved)."""
        return len(self._states)

    # -- the Outbox interface (for the forwarder) ---------------------------------------------
    def backlog(self) -> int:
        """Packets after the saved cursor (0 until the cursor is open)."""
        return self.lag(max(self.last_seen, self.derived))

    def lag(self, last: int) -> int:
        """Packets up to position `last` (the shard's newest, as its writer knows it) after the saved
        cursor; 0 until the cursor is open, when the consumer does not know where it stands."""
        return max(0, last - self.position) if self.ready.is_set() else 0

    async def fetch(self, after_id: int, limit: int) -> list[OutboxRow]:
        await self.ready.wait()
        while self._buffer and self._buffer[0].id <= after_id:
            self._buffer.popleft()  # the forwarder has them: from now on they are its to resend
        delay = self.options.backoff_initial_s
        while not self._buffer:
            try:
                await self._derive_more()
                delay = self.options.backoff_initial_s
            except Exception as e:  # any store's read error: logged, counted, retried
                self.stats.read_errors += 1
                log.error("shard %d: reading packets after %d failed: %s; retrying in %.1f s", self.shard,
                          self.derived, e, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, self.options.backoff_max_s)
        return list(itertools.islice(self._buffer, limit))  # in id order, every one after `after_id`

    async def mark_delivered(self, ids: Iterable[int]) -> None:
        for row_id in ids:
            entry = self._by_row.pop(row_id, None)
            if entry is not None:
                entry.outstanding -= 1
        self._advance()

    def _advance(self) -> None:
        """Move `acked` over the leading packets whose messages are all acknowledged."""
        inflight = self._inflight
        moved = False
        now = time.time()
        while inflight and inflight[0].outstanding <= 0:
            entry = inflight.popleft()
            self.acked = entry.position
            moved = True
            if entry.changed:
                self._dirty[entry.modem] = entry.state
            self._pins[entry.modem] -= 1
            if self._pins[entry.modem] <= 0:
                del self._pins[entry.modem]
            if entry.publishes:
                self.stats.lags.append(now - entry.received_at)
            if entry.digest is not None:
                self._unsaved_digests.append(entry.digest)
        if moved:
            self._acked_wake.set()
        if self._range_done and not inflight:
            self.done.set()

    # -- deriving -------------------------------------------------------------------------------
    async def _derive_more(self) -> None:
        """Read the next batch of packets (waiting for one if there is none) and derive them."""
        if self._range_done:
            await trio.sleep_forever()  # a replay's range is done: its runner waits for `done`
        packets = await self.log.read(self.shard, self.derived, self.options.read_batch, modem=self.modem)
        if self.end is not None:
            packets = [p for p in packets if p.position <= self.end]
            if not packets:  # nothing more in the range (a read never waits)
                self._range_done = True
                self._advance()
                return
        elif not packets:
            self.last_seen = await self.log.wait(self.shard, self.derived)
            return
        self.last_seen = max(self.last_seen, packets[-1].position)
        self._load_states({p.modem for p in packets})
        for n, packet in enumerate(packets):
            if n and n % 8 == 0:
                await trio.lowlevel.checkpoint()  # deriving costs CPU: let sessions run
            self._derive_one(packet)

    def _load_states(self, modems: set[str]) -> None:
        """Saved states of the terminals not in the cache (before any is derived: a failed read changes nothing)."""
        missing = [m for m in modems if m not in self._states]
        if not missing:
            return
        assert self.cursor is not None
        saved = self.cursor.states(missing)
        for modem in missing:
            text = saved.get(modem)
            self._states[modem] = None if text is None else TripState.from_json(text)
        self._evict(keep=modems)

    def _evict(self, keep: set[str] | None = None) -> None:
        """Drop the least recently used states beyond `trip_cache`, but never one not yet saved
        (or one the batch being derived needs)."""
        excess = len(self._states) - self.options.trip_cache
        if excess <= 0:
            return
        for modem in list(self._states):
            if excess <= 0:
                break
            if modem in self._pins or modem in self._dirty or (keep is not None and modem in keep):
                continue
            del self._states[modem]
            excess -= 1

    def _derive_one(self, packet: LoggedPacket) -> None:
        modem = packet.modem
        state = self._states.get(modem)
        self._states[modem] = state
        self._states.move_to_end(modem)
        if self.published is not None:
            if packet.digest in self.published:
                self._skip_resend(packet, state)
                return
            self.published.add(packet.digest, time.time())
        try:
            messages, new_state = self.derive_fn(
                packet.raw, state, packet_id=packet.digest.hex(), received_ms=int(packet.received_at * 1000),
                profile=self.options.profile, battery_warning_v=self.options.battery_warning_v,
                driving=self.options.driving, trip_deadline_ms=self.options.trip_deadline_ms)
        except Exception as e:  # a packet the mapping cannot handle must not stop the bridge
            self.stats.derive_errors += 1
            log.error("shard %d: no messages for packet %d of %s: %s", self.shard, packet.position, modem, e)
            messages, new_state = [], state
        publishes = self.publish_filter is None or self.publish_filter(packet)
        if not publishes:
            messages = []
        changed = new_state is not state
        self._states[modem] = new_state
        entry = _InFlight(packet.position, modem, new_state, changed, len(messages), packet.received_at, publishes,
                          packet.digest if self.published is not None else None)
        self._inflight.append(entry)
        self._pins[modem] += 1
        for message in messages:
            row = OutboxRow(self._next_row, modem, message.topic, message.payload, message.retain)
            self._next_row += 1
            self._by_row[row.id] = entry
            self._buffer.append(row)
        self.derived = packet.position
        self.stats.derived_packets += 1
        self.stats.messages += len(messages)
        if not messages:
            self._advance()

    def _skip_resend(self, packet: LoggedPacket, state: Any) -> None:
        """A packet derived before (a resend the store kept twice): nothing published, the state as it was."""
        self.stats.resends_dropped += 1
        log.info("shard %d: packet %d of %s (%s) was derived before: a resend, skipped", self.shard,
                 packet.position, packet.modem, packet.digest.hex())
        self._inflight.append(_InFlight(packet.position, packet.modem, state, False, 0, packet.received_at, False))
        self._pins[packet.modem] += 1
        self.derived = packet.position
        self._advance()

    # -- the cursor -----------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the cursor, then save it as acknowledgements come, until cancelled (then a last save)."""
        task_status.started()
        try:
            await self._open()
            self.ready.set()
            async with trio.open_nursery() as nursery:
                if self.end is None:
                    nursery.start_soon(self._watch_last)
                while True:
                    await self._acked_wake.wait()
                    await trio.sleep(self.options.flush_interval_s)  # acknowledgements come in bursts: batch them
                    await self._save_until_saved()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5 * SECONDS):
                if self.cursor is not None and self.ready.is_set():
                    try:
                        await self._save()
                    except Exception as e:
                        log.error("shard %d: last cursor save failed: %s (the messages after %d are sent again)",
                                  self.shard, e, self.position)
            if self.cursor is not None:
                self.cursor.close()

    async def _watch_last(self) -> None:
        """Keep `last_seen` current while nothing is fetched (the broker away): the backlog grows."""
        delay = self.options.backoff_initial_s
        while True:
            try:
                self.last_seen = max(self.last_seen, await self.log.wait(self.shard, self.last_seen))
                delay = self.options.backoff_initial_s
            except Exception as e:  # logged and counted like any read error
                self.stats.read_errors += 1
                log.error("shard %d: reading the last position failed: %s", self.shard, e)
                await trio.sleep(delay)
                delay = min(delay * 2, self.options.backoff_max_s)

    async def _open(self) -> None:
        delay = self.options.backoff_initial_s
        while True:
            try:
                if self.cursor is None:
                    source = self._cursor_source
                    self.cursor = source() if callable(source) else source
                saved = await trio.to_thread.run_sync(self.cursor.load)
                await self._load_published()
                if saved is None:
                    saved = await self._first_start()
                self.position = self.acked = self.derived = saved
                self.last_seen = max(self.last_seen, saved)
                log.info("shard %d: bridge resumes after packet %d", self.shard, saved)
                return
            except Exception as e:  # the cursor file or the log: logged, retried
                if type(e).__name__ == "CursorBusy":
                    log.warning("shard %d: %s; trying again in %.0f s", self.shard, e, delay)
                else:
                    self.stats.cursor_errors += 1
                    log.error("shard %d: cannot open the bridge's cursor: %s; retrying in %.1f s", self.shard, e,
                              delay)
                await trio.sleep(delay)
                delay = min(delay * 2, self.options.backoff_max_s)

    async def _load_published(self) -> None:
        """The digests saved with the cursor, when the store keeps them (before anything is derived)."""
        assert self.cursor is not None
        saved = await trio.to_thread.run_sync(self.cursor.published)
        if saved is None:
            self.published = None
            return
        published = PublishedDigests(self.options.resend_horizon_s)
        for at, digests in saved:
            published.add_many(digests, at)
            await trio.lowlevel.checkpoint()
        self.published = published
        if published:
            log.info("shard %d: %d digests of packets derived before read back (resends of them are skipped)",
                     self.shard, len(published))

    async def _first_start(self) -> int:
        """No saved cursor: start at the shard's last packet, with the trip states rebuilt from the
        packets received in the `warmup_s` before it (nothing of them is published)."""
        assert self.cursor is not None
        last = self.start_at if self.start_at is not None else await self.log.last(self.shard)
        if last == 0:
            await trio.to_thread.run_sync(self.cursor.save, 0, {})
            return 0
        start = await self._first_after(time.time() - self.options.warmup_s, last)
        states: dict[str, Any] = {}
        warmup_digests: list[bytes] = []
        position = start
        while position < last:
            packets = await self.log.read(self.shard, position, self.options.read_batch)
            for packet in packets:
                if packet.position > last:
                    break
                if self.published is not None:
                    if packet.digest in self.published:
                        continue  # a resend stored twice: counted once
                    self.published.add(packet.digest, time.time())
                    warmup_digests.append(packet.digest)
                try:
                    _, states[packet.modem] = self.derive_fn(
                        packet.raw, states.get(packet.modem), packet_id=packet.digest.hex(),
                        received_ms=int(packet.received_at * 1000), profile=self.options.profile,
                        battery_warning_v=self.options.battery_warning_v, driving=self.options.driving,
                        trip_deadline_ms=self.options.trip_deadline_ms)
                except Exception:  # a packet without messages changes no state
                    continue
                self.stats.warmup_packets += 1
            if not packets:
                break
            position = packets[-1].position
            await trio.lowlevel.checkpoint()
        texts = {m: s.to_json() if s is not None else "null" for m, s in states.items()}
        await trio.to_thread.run_sync(self.cursor.save, last, texts, warmup_digests)
        log.info("shard %d: bridge starts after packet %d (the store's last); trip states of %d terminals "
                 "rebuilt from %d packets", self.shard, last, len(states), self.stats.warmup_packets)
        return last

    async def _first_after(self, since: float, last: int) -> int:
        """The position after which packets were received at `since` or later (bisection: the
        receive times grow with the positions, up to the odd clock step)."""
        low, high = 0, last
        while low < high:
            middle = (low + high) // 2
            packets = await self.log.read(self.shard, middle, 1)
            if not packets or packets[0].received_at >= since:
                high = middle
            else:
                low = middle + 1
        return low

    async def _save_until_saved(self) -> None:
        delay = self.options.backoff_initial_s
        while True:
            try:
                await self._save()
                return
            except Exception as e:  # disk full, a foreign lock, I/O: logged, counted, retried
                self.stats.cursor_errors += 1
                log.error("shard %d: saving the bridge's cursor at %d failed: %s; retrying in %.1f s",
                          self.shard, self.acked, e, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, self.options.backoff_max_s)

    async def _save(self) -> None:
        self._acked_wake = trio.Event()
        position, dirty, digests = self.acked, dict(self._dirty), list(self._unsaved_digests)
        if position == self.position and not dirty:
            return
        texts = {m: s.to_json() if s is not None else "null" for m, s in dirty.items()}
        assert self.cursor is not None
        await trio.to_thread.run_sync(self.cursor.save, position, texts, digests)
        del self._unsaved_digests[:len(digests)]
        self.position = position
        self.stats.cursor_saves += 1
        for modem, state in dirty.items():
            if self._dirty.get(modem) is state:
                del self._dirty[modem]
        self._evict()
