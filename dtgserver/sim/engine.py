"""The load modes' engine: sessions on non-blocking sockets around one selector, no framework.

A Trio session costs the generator about 150 µs of Python per session (a task, a cancel scope
and a scheduler round trip per await); a server benchmark needs a generator several times cheaper
than the server. Here a session is a small object moved along by readiness events: a few tens of
µs of Python, the rest is the kernel's TCP work any client pays. Answers are still read with the
protocol core's `Connection(Role.CLIENT)`, and every session ends in exactly one `Stats.record`.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..protocol import Connection, ProtocolError, Received, Response, Role
from ..protocol.framing import CLOSED
from .session import RESULT_NAMES, Answer, Outcome, Stats

NextPacket = Callable[[], tuple[bytes, str, int]]
REFUSED_PAUSE_S = 0.01  # closed loop: after a refused connection, do not spin on it
MAX_POLL_S = 0.1  # how soon a loop sees stop()


class _Session:
    __slots__ = ("body_count", "conn", "connected", "deadline", "done", "kind", "sock", "start", "view")

    def __init__(self, sock: socket.socket, packet: bytes, kind: str, body_count: int, start: float,
                 deadline: float):
        self.sock = sock
        self.view = memoryview(packet)
        self.kind = kind
        self.body_count = body_count
        self.start = start
        self.deadline = deadline
        self.conn = Connection(Role.CLIENT)
        self.connected = False
        self.done = False


class LoadEngine:
    """Open- and closed-loop sessions against one address; results go to `stats`."""

    def __init__(self, family: int, address: Any, answer_timeout_s: float, stats: Stats, next_packet: NextPacket,
                 *, max_in_flight: int = 10_000):
        self.family = family
        self.address = address
        self.answer_timeout_s = answer_timeout_s
        self.stats = stats
        self.next_packet = next_packet
        self.max_in_flight = max_in_flight
        self.selector = selectors.DefaultSelector()
        self.by_deadline: deque[_Session] = deque()  # one timeout for all: start order is deadline order
        self.in_flight = 0
        self.stopping = False
        self.restarts: deque[float] = deque()  # closed loop: times to start a session again

    def stop(self) -> None:
        """Ask a running loop to end now (from another thread); sessions in flight are abandoned."""
        self.stopping = True

    # -- the two loops ----------------------------------------------------------------------
    def run_closed(self, concurrency: int, duration_s: float) -> None:
        """Keep `concurrency` sessions in flight for `duration_s`, then wait for the last answers."""
        now = time.monotonic()
        end = now + duration_s
        ready = 0
        delayed: deque[float] = deque()  # after a connection error: when to try again

        def finished(answer: Answer) -> None:
            nonlocal ready
            if answer.outcome is Outcome.CONNECTION_ERROR:
                delayed.append(time.monotonic() + REFUSED_PAUSE_S)
            else:
                ready += 1

        self._on_finished = finished
        for _ in range(concurrency):
            self._start(now)
        while not self.stopping:
            now = time.monotonic()
            if now < end:
                while ready:
                    ready -= 1
                    self._start(now)
                while delayed and delayed[0] <= now:
                    delayed.popleft()
                    self._start(now)
                wake = min(self._next_deadline(), delayed[0] if delayed else end, end)
            elif self.in_flight:
                wake = self._next_deadline()
            else:
                break
            self._poll(max(0.0, wake - now))
            self._expire(time.monotonic())
        self._on_finished = None
        self._abandon()

    def run_open(self, rate: float, duration_s: float) -> None:
        """Start `rate` sessions a second for `duration_s` whatever the answers; then wait for them."""
        t0 = now = time.monotonic()
        end = t0 + duration_s
        started = 0
        while not self.stopping and (now < end or self.in_flight):
            if now < end:
                due = int((now - t0) * rate) + 1
                while started < due:  # catch up after a late wake-up: the rate is kept, not the spacing
                    started += 1
                    if self.in_flight >= self.max_in_flight:
                        self.stats.skipped_sessions += 1
                    else:
                        self._start(now)
                next_start = min(end, t0 + started / rate)
            else:
                next_start = float("inf")
            self._poll(max(0.0, min(next_start, self._next_deadline()) - now))
            now = time.monotonic()
            self._expire(now)
        self._abandon()

    # -- one session ------------------------------------------------------------------------
    def _start(self, now: float) -> None:
        packet, kind, body_count = self.next_packet()
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.setblocking(False)
        session = _Session(sock, packet, kind, body_count, now, now + self.answer_timeout_s)
        self.in_flight += 1
        try:
            code = sock.connect_ex(self.address)
        except OSError as error:
            code = error.errno or errno.EIO
        if code not in (0, errno.EINPROGRESS):
            self._finish(session, Answer(Outcome.CONNECTION_ERROR, None, 0.0, os.strerror(code)), registered=False)
            return
        self.selector.register(sock, selectors.EVENT_WRITE, session)
        self.by_deadline.append(session)

    def _poll(self, timeout: float) -> None:
        for key, events in self.selector.select(min(timeout, MAX_POLL_S)):
            session: _Session = key.data
            if session.done:
                continue
            if events & selectors.EVENT_WRITE:
                self._writable(session)
            elif events & selectors.EVENT_READ:
                self._readable(session)

    def _writable(self, s: _Session) -> None:
        if not s.connected:
            code = s.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self._fail(s, Outcome.CONNECTION_ERROR, os.strerror(code))
                return
            s.connected = True
        try:
            sent = s.sock.send(s.view)
        except BlockingIOError:
            return
        except OSError as error:
            self._fail(s, Outcome.CONNECTION_ERROR, error.strerror or str(error))
            return
        s.view = s.view[sent:]
        if not s.view:
            self.selector.modify(s.sock, selectors.EVENT_READ, s)

    def _readable(self, s: _Session) -> None:
        try:
            data = s.sock.recv(64)
        except BlockingIOError:
            return
        except OSError as error:
            self._fail(s, Outcome.CONNECTION_ERROR, error.strerror or str(error))
            return
        try:
            s.conn.receive_data(data)
            event = s.conn.next_event()
        except ProtocolError as error:
            self._fail(s, Outcome.BAD_ANSWER, str(error))
            return
        if isinstance(event, Received):
            latency = time.monotonic() - s.start
            assert isinstance(event.record, Response)
            result = event.record.result
            if result in RESULT_NAMES:
                self._finish(s, Answer(Outcome.ANSWERED, result, latency))
            else:
                self._finish(s, Answer(Outcome.BAD_ANSWER, None, latency, f"unknown result code {result}"))
        elif event is CLOSED:
            self._fail(s, Outcome.CONNECTION_ERROR, "closed without answering")

    def _fail(self, s: _Session, outcome: Outcome, detail: str) -> None:
        self._finish(s, Answer(outcome, None, time.monotonic() - s.start, detail))

    def _finish(self, s: _Session, answer: Answer, *, registered: bool = True) -> None:
        s.done = True
        if registered:
            self.selector.unregister(s.sock)
        s.sock.close()
        self.in_flight -= 1
        self.stats.record(s.kind, s.body_count, answer)
        if self._on_finished is not None:
            self._on_finished(answer)

    _on_finished: Callable[[Answer], None] | None = None

    def _next_deadline(self) -> float:
        while self.by_deadline and self.by_deadline[0].done:
            self.by_deadline.popleft()
        return self.by_deadline[0].deadline if self.by_deadline else float("inf")

    def _expire(self, now: float) -> None:
        while self.by_deadline and (self.by_deadline[0].done or self.by_deadline[0].deadline <= now):
            s = self.by_deadline.popleft()
            if not s.done:
                if s.connected:
                    self._fail(s, Outcome.TIMEOUT, "no answer")
                else:
                    self._fail(s, Outcome.CONNECTION_ERROR, "connect timed out")

    def _abandon(self) -> None:
        """Close what is still open (only after stop())."""
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.selector.close()
