"""One virtual terminal: the spec's cadence (§4) and resend policy (§4.5) around a driving model.

Simulated time runs `time_scale` times faster than real time (`SimClock`); every cadence and
back-off below is in simulated seconds, while the answer timeout is real (it is about the network
and the server, not the vehicle).

The policy, as we read §4.5 (docs/simulator.md has the rulings):
- A packet without an answer (timeout, refused, reset), or answered 4 (overloaded) or with a bad
  answer, is resent up to 3 times; then the terminal backs off 30 min and starts over; after 48 h
  of failing it drops its backlog.
- Answer 2 (unknown subscriber): the terminal drops its backlog and stops sending for good.
- Answer 3 (maintenance): the terminal probes with its basic info packet (the "modem number
  send"; the same bytes every time, so the server stores it once) up to 3 times; if that fails,
  back off 30 min and probe again. Once a probe is answered 0 it sends its backlog.
- Answer 1 (format error): our packets are valid by construction, so resending the same bytes
  cannot fix anything: the packet is dropped (and counted under its result).
- The backlog is sent oldest first, and realtime data only while the key is on; a KEY OFF or
  status log packet may go while the key is off.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import date, datetime
from typing import Any

import attrs
import trio

from ..protocol import KST, DtgRealtime, KeyOff, MdtRealtime, ObdRealtime, Result, StatusLog, encode
from .session import Answer, Link, Stats
from .vehicle import Identity, Vehicle, status_log_text

REALTIME = {"dtg": DtgRealtime, "obd": ObdRealtime, "mdt": MdtRealtime}


@attrs.frozen
class Policy:
    """The terminal's settings (spec §4: report periods; §4.5: resends), simulated seconds unless noted."""

    report_period_s: int = 60  # KEY ON: one realtime packet per minute, 60 bodies
    key_off_period_s: int = 600  # KEY OFF: one KEY OFF packet every 10 minutes
    resends: int = 3  # after a failed send, up to 3 more tries
    probes: int = 3  # after "maintenance", up to 3 probes
    resend_gap_s: float = 5.0
    backoff_s: float = 30 * 60.0
    give_up_s: float = 48 * 3600.0
    answer_timeout_s: float = 5.0  # real seconds


class SimClock:
    """Simulated epoch seconds: `start_s` at the moment of creation, `time_scale` per real second."""

    def __init__(self, start_s: float, time_scale: float):
        if not time_scale > 0:
            raise ValueError(f"time scale must be positive, got {time_scale!r}")
        self.start_s = start_s
        self.time_scale = time_scale
        self.t0 = trio.current_time()

    def now_s(self) -> float:
        return self.start_s + (trio.current_time() - self.t0) * self.time_scale

    async def sleep_until(self, sim_s: float) -> None:
        await trio.sleep_until(self.t0 + (sim_s - self.start_s) / self.time_scale)

    async def sleep(self, sim_seconds: float) -> None:
        await trio.sleep(max(0.0, sim_seconds) / self.time_scale)


@attrs.define(eq=False)
class Pending:
    """A packet waiting for its answer 0."""

    raw: bytes
    kind: str
    body_count: int
    created_s: float
    backlog: bool  # driving data: kept, and sent only while the key is on
    attempts: int = 0


Exchange = Callable[[bytes], Awaitable[Answer]]


class Terminal:
    """A terminal in a vehicle: generates its packets from the driving model and delivers them."""

    def __init__(self, identity: Identity, rng: random.Random, start_s: float, policy: Policy | None = None,
                 *, driving: bool | None = None):
        self.identity = identity
        self.rng = rng
        self.policy = policy or Policy()
        self.vehicle = Vehicle(identity, rng, start_s)
        self.backlog: deque[Pending] = deque()
        self.cursor_s = int(start_s)  # the last simulated second generated
        self.key_on = False
        self.key_on_s = 0
        self.key_off_s = 0
        self.bodies: list[Any] = []
        self.basic_info_day: date | None = None
        self.basic_info_raw = encode(identity.basic_info())
        self.last_status_code = 0
        # delivery state (§4.5)
        self.suspended_until_s = -math.inf
        self.failing_since_s: float | None = None
        self.maintenance = False
        self.stopped = False
        # Start either about to drive (phases spread over a minute, so reports do not come in
        # lock step) or parked for a while already.
        if driving is None:
            driving = rng.random() < 0.5
        if driving:
            self.next_key_on_s = self.cursor_s + rng.randrange(60)
            self.key_off_s = self.cursor_s - 3600
            self.next_key_off_report_s = math.inf
        else:
            self.key_off_s = self.cursor_s - rng.randrange(1800)
            self.next_key_on_s = self.cursor_s + rng.randrange(5, 45 * 60)
            period = self.policy.key_off_period_s
            self.next_key_off_report_s = self.key_off_s + period * (1 + (self.cursor_s - self.key_off_s) // period)

    # -- generating packets -------------------------------------------------------------------
    def generate_until(self, now_s: float) -> None:
        """Run the vehicle up to simulated time `now_s`, queueing every packet that falls due."""
        target = int(now_s)
        while self.cursor_s < target:
            if self.key_on:
                second = self.cursor_s + 1
                body = self.vehicle.step(second)
                self.cursor_s = second
                self.bodies.append(body)
                if self.vehicle.status_code != self.last_status_code:
                    if self.vehicle.status_code:
                        self._queue_status_log(second, self.vehicle.status_code)
                    self.last_status_code = self.vehicle.status_code
                if len(self.bodies) >= self.policy.report_period_s:  # bodies are 1 Hz
                    self._queue_realtime(second)
                if self.vehicle.trip_over:
                    self._key_off(second)
            else:
                due = min(self.next_key_on_s, self.next_key_off_report_s)
                if due > target:
                    self.cursor_s = target
                    break
                self.cursor_s = int(due)
                if due == self.next_key_off_report_s:
                    self._queue_key_off(self.cursor_s)
                    self.next_key_off_report_s += self.policy.key_off_period_s
                if due == self.next_key_on_s:
                    self._key_on(self.cursor_s)

    def next_due_s(self) -> float:
        """The next simulated time at which this terminal has something to do."""
        if self.key_on:
            # wake at the end of the report period, or when the trip may end
            due: float = self.cursor_s + max(1, min(self.policy.report_period_s - len(self.bodies),
                                                    self.vehicle.trip_remaining_s))
        else:
            due = min(self.next_key_on_s, self.next_key_off_report_s)
        if self.suspended_until_s > self.cursor_s and self._sendable() is not None:
            due = min(due, self.suspended_until_s)
        return due

    def _key_on(self, second: int) -> None:
        self.vehicle.park(second - self.key_off_s)
        self.vehicle.start_trip(second)
        self.key_on, self.key_on_s, self.bodies = True, second, []
        self.next_key_off_report_s = math.inf
        day = datetime.fromtimestamp(second, KST).date()
        if day != self.basic_info_day:  # basic info at the first KEY ON of the day
            self.basic_info_day = day
            self.backlog.append(Pending(self.basic_info_raw, "basic_info", 0, second, True))
        if self.rng.random() < 0.05:
            self._queue_status_log(second, 0)

    def _key_off(self, second: int) -> None:
        if self.bodies:
            self._queue_realtime(second)
        self.key_on, self.key_off_s = False, second
        self.next_key_off_report_s = second  # tell the server at once, then every KEY OFF period
        self.next_key_on_s = second + self.vehicle.parking_s(second)

    def _queue_realtime(self, second: int) -> None:
        record = REALTIME[self.identity.kind](self.identity.modem, self.policy.report_period_s // 60,
                                              datetime.fromtimestamp(self.key_on_s, KST), self.bodies)
        self.backlog.append(Pending(encode(record), self.identity.kind, len(self.bodies), second, True))
        self.bodies = []

    def _queue_key_off(self, second: int) -> None:
        lon, lat = self.vehicle.position
        record = KeyOff(self.identity.modem, datetime.fromtimestamp(second, KST), lon, lat,
                        datetime.fromtimestamp(self.key_off_s, KST),
                        self.vehicle.parked_battery_v(second - self.key_off_s))
        self.backlog.append(Pending(encode(record), "key_off", 0, second, False))

    def _queue_status_log(self, second: int, fault_code: int) -> None:
        text = status_log_text(self.rng, self.identity, fault_code)
        record = StatusLog(self.identity.modem, datetime.fromtimestamp(second, KST), text)
        self.backlog.append(Pending(encode(record), "status_log", 0, second, False))

    # -- delivering them (§4.5) ---------------------------------------------------------------
    def _sendable(self) -> Pending | None:
        """The oldest packet that may go now: any while the key is on; only non-driving data while off."""
        if self.key_on:
            return self.backlog[0] if self.backlog else None
        return next((p for p in self.backlog if not p.backlog), None)

    async def flush(self, clock: SimClock, exchange: Exchange, stats: Stats, until_s: float = math.inf) -> None:
        """Send what may be sent now, oldest first, until done, suspended, stopped or `until_s`."""
        while not self.stopped and self.suspended_until_s <= clock.now_s() < until_s:
            if self.maintenance and not await self._probe(clock, exchange, stats):
                return
            item = self._sendable()
            if item is None:
                return
            round_start_s = clock.now_s()
            result = await self._send_with_resends(item, clock, exchange, stats)
            if result is None or result == Result.OVERLOADED:
                self._failed_round(round_start_s, clock, stats)
                return
            self.failing_since_s = None
            if result in (Result.OK, Result.FORMAT_ERROR):
                self.backlog.remove(item)
            elif result == Result.UNKNOWN_SUBSCRIBER:
                self._stop(stats)
            elif result == Result.MAINTENANCE:
                self.maintenance = True

    async def _send_with_resends(self, item: Pending, clock: SimClock, exchange: Exchange,
                                 stats: Stats) -> int | None:
        """The result of the first attempt that got a result other than 4; None if none did."""
        result: int | None = None
        for attempt in range(1 + self.policy.resends):
            if attempt:
                await clock.sleep(self.policy.resend_gap_s)
            if item.attempts:
                stats.resends += 1
            item.attempts += 1
            answer = await exchange(item.raw)
            stats.record(item.kind, item.body_count, answer)
            result = answer.result
            if result is not None and result != Result.OVERLOADED:
                return result
        return result

    async def _probe(self, clock: SimClock, exchange: Exchange, stats: Stats) -> bool:
        """After "maintenance": is the server back? Up to `probes` tries, then back off."""
        for attempt in range(self.policy.probes):
            if attempt:
                await clock.sleep(self.policy.resend_gap_s)
            stats.probes += 1
            answer = await exchange(self.basic_info_raw)
            stats.record("basic_info", 0, answer)
            if answer.result == Result.OK:
                self.maintenance = False
                return True
            if answer.result == Result.UNKNOWN_SUBSCRIBER:
                self._stop(stats)
                return False
        self.suspended_until_s = clock.now_s() + self.policy.backoff_s
        stats.backoffs += 1
        return False

    def _failed_round(self, round_start_s: float, clock: SimClock, stats: Stats) -> None:
        now = clock.now_s()
        if self.failing_since_s is None:
            self.failing_since_s = round_start_s
        if now - self.failing_since_s >= self.policy.give_up_s:
            stats.dropped_packets += len(self.backlog)
            self.backlog.clear()
            self.failing_since_s = None
        self.suspended_until_s = now + self.policy.backoff_s
        stats.backoffs += 1

    def _stop(self, stats: Stats) -> None:
        stats.dropped_packets += len(self.backlog)
        stats.stopped_terminals += 1
        self.backlog.clear()
        self.stopped = True

    # -- the terminal's life ----------------------------------------------------------------
    async def run(self, clock: SimClock, link: Link, stats: Stats, until_s: float = math.inf) -> None:
        """Drive, report and deliver on the spec's cadence until `until_s` or told to stop (result 2)."""
        while not self.stopped and clock.now_s() < until_s:
            self.generate_until(clock.now_s())
            await self.flush(clock, link.exchange, stats, until_s)
            if not self.stopped:
                await clock.sleep_until(min(self.next_due_s(), until_s))
