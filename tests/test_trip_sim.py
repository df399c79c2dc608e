"""The simulator's terminals deliver as §4.5 says (realtime data only while the key is on, so a
trip's last minute comes at the next KEY ON); through the bridge's messages every trip gets one
Trip, after all of its microtrips, covering all of its bodies."""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import datetime
from typing import Any

import trio

from dtgserver.bridge.messages import build
from dtgserver.protocol import DtgRealtime, KeyOff, Result, decode
from dtgserver.sim.session import Answer, Outcome, Stats
from dtgserver.sim.terminal import Terminal
from dtgserver.sim.vehicle import make_identity

START_S = 1_795_215_600.0  # 2026-11-21 08:00 KST
DAYS = 1


class Recorder:
    """A link whose every session is answered 0 at once, and a clock standing at `now_s` while the
    terminal delivers: the log of what was sent when, as a server would have received it."""

    def __init__(self) -> None:
        self.now = START_S
        self.sent: list[tuple[bytes, float]] = []

    def now_s(self) -> float:
        return self.now

    async def sleep(self, sim_seconds: float) -> None:  # only for resends, which never happen here
        raise AssertionError("no resend: every packet is answered 0")

    async def exchange(self, packet: bytes) -> Answer:
        self.sent.append((packet, self.now))
        await trio.lowlevel.checkpoint()
        return Answer(Outcome.ANSWERED, Result.OK)


async def test_every_simulated_trip_gets_one_complete_trip() -> None:
    link = Recorder()
    terminals = [Terminal(make_identity(seed, "dtg", random.Random(seed)), random.Random(f"{seed}/drive"),
                          START_S, driving=True) for seed in range(3)]
    for terminal in terminals:  # one terminal's life at a time: each modem's packets stay in order
        link.now = START_S
        while link.now < START_S + DAYS * 86_400:
            terminal.generate_until(link.now)
            await terminal.flush(link, link.exchange, Stats())  # type: ignore[arg-type]
            link.now = max(link.now + 1, terminal.next_due_s())

    states: dict[str, Any] = {}
    order: list[tuple[str, int, str]] = []  # (modem, tid, "micro" | "trip") in publish order
    trips: dict[tuple[str, int], dict[str, Any]] = {}
    bodies: dict[tuple[str, int], list[Any]] = defaultdict(list)
    key_offs: dict[tuple[str, int], int] = {}
    late = 0
    for n, (raw, at) in enumerate(link.sent):
        record = decode(raw)
        modem = record.modem
        if isinstance(record, DtgRealtime):
            assert isinstance(record.key_on_time, datetime)  # the simulator's clock is a calendar
            tid = int(record.key_on_time.timestamp())
            bodies[(modem, tid)] += record.bodies
            late += any(k[0] == modem and k[1] == tid for k in key_offs)
        elif isinstance(record, KeyOff) and states.get(modem) is not None and states[modem].tid is not None:
            assert isinstance(record.key_off_time, datetime)
            key_offs.setdefault((modem, states[modem].tid), int(record.key_off_time.timestamp() * 1000))
        messages, states[modem] = build(raw, states.get(modem), packet_id=f"p{n}", received_ms=int(at * 1000))
        for m in messages:
            if m.payload.get("ty") == 1:
                key = (modem, m.payload["pld"]["tid"])
                assert key not in trips, "a second Trip for one tid"
                trips[key] = m.payload["pld"]
                order.append((modem, key[1], "trip"))
            elif m.payload.get("ty") == 2 and isinstance(m.payload["pld"], list):
                order.append((modem, m.payload["pld"][0]["tid"], "micro"))

    assert late >= 2  # the simulator did send last minutes after their KEY OFF
    # every trip with a KEY OFF and a later trip of its terminal: the last trip of a terminal may
    # still wait for its last minute, which the terminal sends at its next KEY ON
    complete = [key for key in bodies if key in key_offs and any(m == key[0] and t > key[1] for m, t in bodies)]
    assert len(complete) >= 6
    for key in complete:
        trip = trips[key]
        # the Trip after every microtrip of its trip, and it covers every body
        position = order.index((key[0], key[1], "trip"))
        assert (key[0], key[1], "micro") not in order[position:]
        assert "xpartial" not in trip
        assert trip["edt"] == key_offs[key]
        assert trip["dtvt"] == sum(1 for b in bodies[key] if b.speed_kmh)
        assert trip["dis"] >= round(sum(b.speed_kmh for b in bodies[key]) / 3.6) - 1000  # within the odometer's km
        last = bodies[key][-1]
        assert trip["hsts"] == max(b.speed_kmh for b in bodies[key]) and last.speed_kmh == 0
