"""The runner: many virtual terminals against one server, in one of three modes, and the report.

- cadence (default): every terminal drives and reports on the spec's cadence, compressed by the
  time scale, with the §4.5 resend policy. What a fleet looks like to the server.
- open loop (`max_rate`): sessions start at a fixed rate whatever the answers: latency under load.
- closed loop (`concurrency`): K sessions in flight, each starting the next as soon as it is
  answered: throughput.

The two load modes send realtime packets pre-rendered from the driving model at start-up
(`PacketPool`); each session re-addresses and re-times one (a join of pre-encoded pieces), so
every packet is new data to the server while the generator stays cheap, and they run on the
selector engine in `engine` rather than a Trio task per session.
"""

from __future__ import annotations

import math
import random
import resource
import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import Any

import attrs
import trio

from ..protocol import KST, encode
from ..protocol.layout import MINUTE_PREFIX, RealtimeCut, protocol_id, time_bytes
from ..protocol.layout import realtime as realtime_layout
from .engine import LoadEngine
from .session import CpuTime, Link, Stats, resolve
from .terminal import REALTIME, Policy, SimClock, Terminal
from .vehicle import KINDS, Identity, Vehicle, make_identity

DEFAULT_MIX = (("dtg", 70.0), ("obd", 20.0), ("mdt", 10.0))
Mix = tuple[tuple[str, float], ...]


def parse_mix(text: str) -> Mix:
    """`dtg=70,obd=20,mdt=10` → weights; ValueError saying what is wrong."""
    mix: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        name = name.strip().lower()
        if not sep or name not in KINDS:
            raise ValueError(f"{part.strip()!r}: expected KIND=WEIGHT with KIND one of {', '.join(KINDS)}")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"{part.strip()!r}: weight {value.strip()!r} is not a number") from None
        if not (weight >= 0 and math.isfinite(weight)):
            raise ValueError(f"{part.strip()!r}: weight must be a non-negative number")
        if name in mix:
            raise ValueError(f"{name} given twice")
        mix[name] = weight
    if not sum(mix.values()) > 0:
        raise ValueError("the weights add up to zero")
    return tuple(mix.items())


def apportion(mix: Mix, count: int) -> list[str]:
    """Exactly `count` kinds in the mix's proportions (largest remainder), in kind order."""
    total = sum(w for _, w in mix)
    shares = [(name, count * w / total) for name, w in mix]
    counts = {name: int(share) for name, share in shares}
    by_remainder = sorted(shares, key=lambda s: (s[1] - int(s[1])), reverse=True)
    for name, _ in by_remainder[: count - sum(counts.values())]:
        counts[name] += 1
    return [name for name, _ in mix for _ in range(counts[name])]


@attrs.frozen
class SimConfig:
    host: str = "127.0.0.1"
    port: int = 5000
    terminals: int = 10
    duration_s: float = 10.0  # real seconds
    mix: Mix = DEFAULT_MIX
    time_scale: float = 60.0  # simulated seconds per real second (cadence mode)
    seed: int | None = None
    max_rate: float | None = None  # open loop: sessions per second
    concurrency: int | None = None  # closed loop: sessions in flight
    answer_timeout_s: float = 5.0
    policy: Policy = attrs.field(factory=Policy)
    max_in_flight: int = 10_000  # open loop: beyond this, a due session is skipped and counted

    @property
    def mode(self) -> str:
        if self.max_rate is not None:
            return "open_loop"
        if self.concurrency is not None:
            return "closed_loop"
        return "cadence"


def make_identities(config: SimConfig, seed: int) -> list[Identity]:
    """The fleet: kinds in the mix's proportions, shuffled; modems 010 + consecutive numbers."""
    rng = random.Random(seed)
    kinds = apportion(config.mix, config.terminals)
    rng.shuffle(kinds)
    modem_base = rng.randrange(10_000_000, 90_000_000)
    return [make_identity(i, kind, random.Random(f"{seed}/{i}"), modem_base=modem_base)
            for i, kind in enumerate(kinds)]


# -- the load modes' packets ------------------------------------------------------------------


@attrs.frozen
class Template:
    """A realtime packet cut around what changes per session: modem, KEY ON time, body minutes."""

    cut: RealtimeCut
    kind: str
    body_count: int

    @classmethod
    def from_packet(cls, raw: bytes) -> Template:
        layout = realtime_layout(raw)
        if layout is None:
            raise ValueError(f"protocol ID 0x{protocol_id(raw):02X} is not a realtime packet")
        return cls(layout.cut(raw), layout.kind, layout.body_count(raw))

    def render(self, modem: bytes, key_on_time: bytes, minute: bytes) -> bytes:
        return self.cut.render(modem, key_on_time, minute)


def drive_templates(kind: str, rng: random.Random, start_minute_s: int, minutes: int,
                    body_count: int = 60) -> list[Template]:
    """`minutes` consecutive one-minute packets of one uninterrupted drive, as templates."""
    identity = make_identity(0, kind, rng)
    vehicle = Vehicle(identity, rng, start_minute_s)
    vehicle.start_trip(start_minute_s)
    templates = []
    for m in range(minutes):
        vehicle.trip_remaining_s = 10**9  # keep driving
        first = start_minute_s + m * 60
        bodies = [vehicle.step(first + i) for i in range(body_count)]
        record = REALTIME[kind](identity.modem, 1, datetime.fromtimestamp(start_minute_s, KST), bodies)
        templates.append(Template.from_packet(encode(record)))
    return templates


def _time_bytes(epoch_s: int) -> bytes:
    return time_bytes(datetime.fromtimestamp(epoch_s, KST))


class PacketPool:
    """Unique realtime packets, cheaply: each terminal replays a pre-rendered drive, minute after minute."""

    def __init__(self, identities: list[Identity], seed: int, *, start_s: float, drives_per_kind: int = 4,
                 minutes_per_drive: int = 15, body_count: int = 60):
        rng = random.Random(f"{seed}/pool")
        start_minute_s = int(start_s) // 60 * 60
        kinds = sorted({i.kind for i in identities})
        drives = {kind: [drive_templates(kind, rng, start_minute_s, minutes_per_drive, body_count)
                         for _ in range(drives_per_kind)] for kind in kinds}
        self.terminals = [(identity.modem.encode("ascii"), drives[identity.kind][i % drives_per_kind])
                          for i, identity in enumerate(identities)]
        self.start_minute_s = start_minute_s
        self.key_on_time = _time_bytes(start_minute_s)
        self.minutes = [0] * len(identities)
        self.next_terminal = 0
        self._minute_prefix: dict[int, bytes] = {}

    def next_packet(self) -> tuple[bytes, str, int]:
        """(packet, kind, body count) for the next terminal in turn: its next minute of driving."""
        index = self.next_terminal
        self.next_terminal = (index + 1) % len(self.terminals)
        modem, drive = self.terminals[index]
        minute = self.minutes[index]
        self.minutes[index] = minute + 1
        template = drive[minute % len(drive)]
        minute_s = self.start_minute_s + 60 * minute
        prefix = self._minute_prefix.get(minute_s)
        if prefix is None:
            prefix = self._minute_prefix[minute_s] = _time_bytes(minute_s)[:MINUTE_PREFIX]
        return template.render(modem, self.key_on_time, prefix), template.kind, template.body_count


# -- running --------------------------------------------------------------------------------------

Progress = Callable[[str], None]


async def run(config: SimConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run the simulation described by `config`; the summary (see docs/simulator.md)."""
    if config.max_rate is not None and config.concurrency is not None:
        raise ValueError("--max-rate (open loop) and --concurrency (closed loop) exclude each other")
    seed = config.seed if config.seed is not None else random.randrange(2**31)
    family, address = await resolve(config.host, config.port)
    link = Link(family, address, config.answer_timeout_s)
    _raise_file_limit()
    identities = make_identities(config, seed)
    stats = Stats()
    wall_start = time.time()
    backlog: int | None = None
    pool = None
    if config.mode != "cadence":  # pre-rendering is set-up, not load: before the clocks start
        pool = PacketPool(identities, seed, start_s=wall_start - 7 * 86_400)
    cpu_start = CpuTime.now()
    start = trio.current_time()
    stopper = Stopper()

    async with trio.open_nursery() as nursery:
        if progress is not None:
            nursery.start_soon(_report_progress, stats, start, progress)
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            nursery.start_soon(_stop_on_interrupt, stopper)
        if pool is None:
            # The simulated clock starts in the past and reaches the present as the run ends.
            start_s = wall_start - config.duration_s * config.time_scale
            policy = attrs.evolve(config.policy, answer_timeout_s=config.answer_timeout_s)
            backlog = await _cadence(config, identities, seed, start_s, policy, link, stats, stopper)
        else:
            await _load(config, pool, link, stats, stopper)
        nursery.cancel_scope.cancel()
    elapsed = trio.current_time() - start
    window = min(elapsed, config.duration_s)
    cpu = CpuTime.now() - cpu_start
    if progress is not None:
        progress("")
    run_info: dict[str, Any] = {
        "interrupted": stopper.stopped,
        "mode": config.mode, "host": config.host, "port": config.port, "terminals": config.terminals,
        "mix": dict(config.mix), "seed": seed, "duration_s": config.duration_s,
        "answer_timeout_s": config.answer_timeout_s,
    }
    if config.mode == "cadence":
        run_info.update(time_scale=config.time_scale, simulated_s=round(window * config.time_scale, 1))
    elif config.mode == "open_loop":
        run_info.update(max_rate=config.max_rate)
    else:
        run_info.update(concurrency=config.concurrency)
    summary = stats.summary(elapsed, window, cpu, **run_info)
    if backlog is not None:
        summary["backlog_packets"] = backlog
    return summary


class Stopper:
    """Ends a run early (Ctrl-C): calls what each mode registered, once."""

    def __init__(self) -> None:
        self.stopped = False
        self._callbacks: list[Callable[[], object]] = []

    def on_stop(self, callback: Callable[[], object]) -> None:
        self._callbacks.append(callback)
        if self.stopped:
            callback()

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            for callback in self._callbacks:
                callback()


async def _stop_on_interrupt(stopper: Stopper) -> None:
    """The first Ctrl-C ends the run with a report of what was done; a second one aborts."""
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        async for _ in signals:
            stopper.stop()
            return


async def _cadence(config: SimConfig, identities: list[Identity], seed: int, start_s: float, policy: Policy,
                   link: Link, stats: Stats, stopper: Stopper) -> int:
    """Run the fleet; the number of packets still in the terminals' backlogs at the end."""
    clock = SimClock(start_s, config.time_scale)
    terminals = [Terminal(identity, random.Random(f"{seed}/{i}/drive"), start_s, policy)
                 for i, identity in enumerate(identities)]
    until_s = start_s + config.duration_s * config.time_scale
    # Terminals stop starting sessions at the end; one that is mid-session gets its answer timeout.
    with trio.move_on_after(config.duration_s + config.answer_timeout_s + 1) as scope:
        stopper.on_stop(scope.cancel)
        async with trio.open_nursery() as nursery:
            for terminal in terminals:
                nursery.start_soon(terminal.run, clock, link, stats, until_s)
    return sum(len(t.backlog) for t in terminals)


async def _load(config: SimConfig, pool: PacketPool, link: Link, stats: Stats, stopper: Stopper) -> None:
    """Open or closed loop, on the cheap engine in a worker thread (the progress line stays live)."""
    engine = LoadEngine(link.family, link.address, config.answer_timeout_s, stats, pool.next_packet,
                        max_in_flight=config.max_in_flight)
    if config.max_rate is not None:
        work = partial(engine.run_open, config.max_rate, config.duration_s)
    else:
        assert config.concurrency is not None
        work = partial(engine.run_closed, config.concurrency, config.duration_s)
    stopper.on_stop(engine.stop)
    try:
        await trio.to_thread.run_sync(work, abandon_on_cancel=True)
    finally:
        engine.stop()


async def _report_progress(stats: Stats, start: float, progress: Progress) -> None:
    while True:
        await trio.sleep(0.5)
        progress(stats.progress_line(trio.current_time() - start))


def _raise_file_limit() -> None:
    """Many sessions in flight need many sockets: use the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass

