"""One session on the wire as a terminal sees it (connect, send, read the 2-byte answer), and
the counters every session adds to."""

from __future__ import annotations

import enum
import math
import resource
import socket
from array import array
from collections import Counter
from typing import Any

import attrs
import trio

from ..protocol import Connection, ProtocolError, Received, Response, Result, Role
from ..protocol.framing import CLOSED

RESULT_NAMES = {int(r): r.name.lower() for r in Result}


class Outcome(enum.Enum):
    ANSWERED = "answered"  # a well-formed 0x09 answer with a known result code
    TIMEOUT = "timeout"  # connected, sent, no answer within the answer timeout
    CONNECTION_ERROR = "connection_error"  # refused, reset, connect timed out, or closed before answering
    BAD_ANSWER = "bad_answer"  # bytes that are not 0x09 + a known result code


@attrs.frozen
class Answer:
    outcome: Outcome
    result: int | None = None  # the result code when ANSWERED
    latency_s: float = 0.0  # from starting to connect to the answer's last byte
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.result == Result.OK


async def resolve(host: str, port: int) -> tuple[int, Any]:
    """(address family, socket address) for host:port; OSError with a readable message if unknown."""
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise OSError(f"cannot resolve {host!r}: {error.strerror}") from None
    family, _, _, _, address = infos[0]
    return int(family), address


@attrs.define
class Link:
    """Where a terminal sends its packets, and how long it waits for an answer (real seconds)."""

    family: int
    address: Any
    answer_timeout_s: float = 5.0

    async def exchange(self, packet: bytes) -> Answer:
        """One session: connect, send `packet`, read the answer, close. Never raises (but Cancelled)."""
        start = trio.current_time()
        sock = trio.socket.socket(self.family, socket.SOCK_STREAM)
        connected = False
        try:
            with trio.move_on_after(self.answer_timeout_s):
                await sock.connect(self.address)
                connected = True
                view = memoryview(packet)
                while view:
                    sent = await sock.send(view)
                    view = view[sent:]
                conn = Connection(Role.CLIENT)
                while True:
                    event = conn.next_event()
                    if isinstance(event, Received):
                        latency = trio.current_time() - start
                        assert isinstance(event.record, Response)
                        result = event.record.result
                        if result not in RESULT_NAMES:
                            return Answer(Outcome.BAD_ANSWER, None, latency, f"unknown result code {result}")
                        return Answer(Outcome.ANSWERED, result, latency)
                    if event is CLOSED:
                        return Answer(Outcome.CONNECTION_ERROR, None, trio.current_time() - start,
                                      "closed without answering")
                    conn.receive_data(await sock.recv(64))
            if connected:
                return Answer(Outcome.TIMEOUT, None, trio.current_time() - start, "no answer")
            return Answer(Outcome.CONNECTION_ERROR, None, trio.current_time() - start, "connect timed out")
        except ProtocolError as error:
            return Answer(Outcome.BAD_ANSWER, None, trio.current_time() - start, str(error))
        except OSError as error:
            return Answer(Outcome.CONNECTION_ERROR, None, trio.current_time() - start,
                          error.strerror or str(error))
        finally:
            sock.close()


@attrs.define
class Stats:
    """What the sessions of one run added up to; `summary()` is the report."""

    sessions: int = 0
    bodies: int = 0
    delivered_packets: int = 0
    delivered_bodies: int = 0
    results: Counter[int] = attrs.Factory(Counter)
    timeouts: int = 0
    connection_errors: int = 0
    bad_answers: int = 0
    resends: int = 0
    probes: int = 0
    backoffs: int = 0
    dropped_packets: int = 0
    stopped_terminals: int = 0
    skipped_sessions: int = 0  # open loop: a session was due but the in-flight limit was reached
    packets_by_kind: Counter[str] = attrs.Factory(Counter)
    errors_seen: Counter[str] = attrs.Factory(Counter)
    latencies_s: array[float] = attrs.Factory(lambda: array("d"))

    def record(self, kind: str, body_count: int, answer: Answer) -> None:
        self.sessions += 1
        self.bodies += body_count
        self.packets_by_kind[kind] += 1
        outcome = answer.outcome
        if outcome is Outcome.ANSWERED:
            assert answer.result is not None
            self.results[answer.result] += 1
            self.latencies_s.append(answer.latency_s)
            if answer.result == Result.OK:
                self.delivered_packets += 1
                self.delivered_bodies += body_count
        elif outcome is Outcome.TIMEOUT:
            self.timeouts += 1
        elif outcome is Outcome.CONNECTION_ERROR:
            self.connection_errors += 1
            self.errors_seen[answer.detail] += 1
        else:
            self.bad_answers += 1
            self.errors_seen[answer.detail] += 1

    def latency_ms(self) -> dict[str, float | None]:
        ordered = sorted(self.latencies_s)
        return {name: _rank(ordered, q) for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99), ("max", 1.0))}

    def progress_line(self, elapsed_s: float) -> str:
        rate = self.sessions / elapsed_s if elapsed_s > 0 else 0.0
        recent = sorted(self.latencies_s[-2000:])
        p50 = _rank(recent, 0.5)
        p50_text = "-" if p50 is None else f"{p50:.1f} ms"
        return (f"{elapsed_s:6.1f}s  sessions {self.sessions} ({rate:.0f}/s)  ok {self.results[0]}  "
                f"other results {sum(self.results.values()) - self.results[0]}  p50 {p50_text}  "
                f"timeouts {self.timeouts}  errors {self.connection_errors + self.bad_answers}")

    def summary(self, elapsed_s: float, window_s: float, cpu: CpuTime, **run: Any) -> dict[str, Any]:
        """The report. Rates are over `window_s`, the time sessions were being started; `elapsed_s`
        also counts the wait for the last answers (and is what the CPU share is of)."""
        per_s = (lambda n: round(n / window_s, 1)) if window_s > 0 else (lambda n: 0.0)
        cpu_s = cpu.user_s + cpu.system_s
        return {
            **run,
            "elapsed_s": round(elapsed_s, 3),
            "window_s": round(window_s, 3),
            "sessions": self.sessions,
            "sessions_per_s": per_s(self.sessions),
            "packets": self.sessions,
            "packets_per_s": per_s(self.sessions),
            "bodies": self.bodies,
            "bodies_per_s": per_s(self.bodies),
            "packets_by_kind": dict(sorted(self.packets_by_kind.items())),
            "delivered_packets": self.delivered_packets,
            "delivered_bodies": self.delivered_bodies,
            "results": {name: self.results[code] for code, name in RESULT_NAMES.items()},
            "latency_ms": self.latency_ms(),
            "timeouts": self.timeouts,
            "connection_errors": self.connection_errors,
            "bad_answers": self.bad_answers,
            "errors_seen": dict(self.errors_seen.most_common(5)),
            "resends": self.resends,
            "probes": self.probes,
            "backoffs": self.backoffs,
            "dropped_packets": self.dropped_packets,
            "stopped_terminals": self.stopped_terminals,
            "skipped_sessions": self.skipped_sessions,
            "generator": {
                "cpu_s": round(cpu_s, 3),
                "cpu_user_s": round(cpu.user_s, 3),
                "cpu_system_s": round(cpu.system_s, 3),
                "cpu_pct_of_one_core": round(100 * cpu_s / elapsed_s, 1) if elapsed_s > 0 else 0.0,
                "cpu_us_per_session": round(1e6 * cpu_s / self.sessions, 1) if self.sessions else None,
                "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            },
        }


def _rank(ordered: Any, q: float) -> float | None:
    """The q-quantile of sorted seconds, in ms (nearest rank)."""
    if not len(ordered):
        return None
    index = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
    return round(float(ordered[index]) * 1000, 3)


@attrs.frozen
class CpuTime:
    """This process's CPU time: user (Python, packet building) and system (the kernel's TCP work)."""

    user_s: float
    system_s: float

    @classmethod
    def now(cls) -> CpuTime:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return cls(usage.ru_utime, usage.ru_stime)

    def __sub__(self, other: CpuTime) -> CpuTime:
        return CpuTime(self.user_s - other.user_s, self.system_s - other.system_s)
