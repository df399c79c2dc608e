"""The real DtgServer under a hypothesis state machine: many memory-stream connections at once, virtual time.

Each step opens a connection, sends a valid packet in random chunks, garbage, a truncated packet, a
header with an oversized body count or log size, closes early, or lets virtual time pass. After
every step the server is let run until nothing can move (every task blocked, no commit in flight),
and the invariants are checked against what the protocol core says the bytes on each connection
are (the framer is the definition of a valid packet; it has its own tests and fuzzing):

- the server never crashes and, at the end, has no session task left;
- on a connection the terminal still reads, the answers are exactly one 0 per complete valid
  packet, then one 1 if the bytes went wrong, nothing else;
- stored ⊆ complete valid packets sent (on accepted connections); each stored once, however often
  resent; answered 0 ⊆ stored. (A packet can be committed and its connection closed before the
  answer is read: that packet is stored and unanswered, which a resend makes good.)
- the server closes a connection exactly when its idle or packet timeout has passed, or after
  the final answer of an error / a rejection (0x09 04 above max_connections).

Time only moves in the `stall` rule (MockClock, rate 0, no autojump): the trio loop runs in its
own thread and each rule calls into it with trio.from_thread.run.
"""

from __future__ import annotations

import collections
import math
import shutil
import sqlite3
import tempfile
import threading
from pathlib import Path
from typing import Any

import attrs
import trio
import trio.testing
from conftest import VALID_SAMPLES, store_of
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from dtgserver.protocol import NEED_DATA, Connection, ProtocolError, Received, Role, encode
from dtgserver.server.app import DtgServer
from dtgserver.server.config import ServerConfig
from dtgserver.testing import basic_info, dtg_bytes, key_off, status_log

IDLE_TIMEOUT_S = 3.0
PACKET_TIMEOUT_S = 30.0
DRAIN_S = 1.0  # app._drain: how long a final answer waits for the peer before closing
MAX_CONNECTIONS = 5
MAX_BODY_COUNT = 100

# A pool small enough that resends happen: fixtures (no 0x09 answers: a server rejects those) and factories.
PACKETS = [s.data for s in VALID_SAMPLES if s.data[0] != 0x09 and len(s.data) < 5000] + [
    dtg_bytes("01000000001", bodies=3), dtg_bytes("01000000002", minute=1, bodies=1), encode(basic_info("0161234")),
    encode(key_off("01000000003")), encode(status_log("01000000004", "line\x00\x1b[2J ../../etc")),
]
MODEM = bytes.fromhex("0001003939393938383838")  # "01099998888", 11 bytes
KEY_ON = bytes.fromhex("0C0A190F1E2D00")
TOO_MANY_BODIES = b"\x03" + MODEM + b"\x00\x01" + (MAX_BODY_COUNT + 1).to_bytes(2, "big")
HUGE_LOG = b"\x63" + MODEM + KEY_ON + (32767).to_bytes(2, "big")  # a valid header: 32767 bytes of log to come
# Headers a hostile terminal sends: over the body limit, a huge declared log, an answer packet, negative sizes.
HOSTILE = [TOO_MANY_BODIES, HUGE_LOG, b"\x09\x00", b"\x03" + bytes(13) + b"\x80\x00", b"\x63" + bytes(18) + b"\xff\xff"]
SEND_LIMIT = 30_000  # bytes per connection: below the 64 KiB a final answer drains before closing
# What the runs checked, for docs/reliability.md (read by a script that runs the machine).
TOTALS: collections.Counter[str] = collections.Counter()


@attrs.define
class Client:
    """The terminal's end of one connection, and what it sent and saw."""

    n: int
    stream: trio.abc.Stream = attrs.field(repr=False)
    opened_at: float
    rejected: bool  # the server was at max_connections when it was opened
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope, repr=False)
    sent: bytearray = attrs.field(factory=bytearray, repr=lambda b: f"<{len(b)} bytes>")
    received: bytearray = attrs.field(factory=bytearray, repr=lambda b: b.hex())
    eof: bool = False  # the server closed it
    closed: bool = False  # the terminal closed it
    last_sent_at: float = 0.0
    partial_since: float | None = None  # when the first byte of the unfinished packet was sent
    final_at: float | None = None  # when the server sent its final answer (1 or 4)

    def __str__(self) -> str:
        return f"client {self.n}"


@attrs.frozen
class Expected:
    frames: list[bytes]
    error: bool
    partial: bool


def expected(sent: bytes | bytearray) -> Expected:
    """What the protocol core makes of the bytes: complete frames, then an error or a partial frame."""
    conn = Connection(Role.SERVER, max_body_count=MAX_BODY_COUNT)
    if sent:  # b"" would mean the end of the stream
        conn.receive_data(bytes(sent))
    frames = []
    try:
        while isinstance(event := conn.next_event(), Received):
            frames.append(event.raw)
    except ProtocolError:
        return Expected(frames, True, False)
    assert event is NEED_DATA
    return Expected(frames, False, conn.buffered > 0)


class ServerMachine(RuleBasedStateMachine):
    clients = Bundle("clients")

    def __init__(self) -> None:
        super().__init__()
        self.data_dir = Path(tempfile.mkdtemp(prefix="dtg-stateful-"))
        # no commit timeout: in virtual time the clock jumps while a commit runs in its thread
        self.config = ServerConfig(data_dir=self.data_dir, idle_timeout=IDLE_TIMEOUT_S, packet_timeout=PACKET_TIMEOUT_S,
                                   max_connections=MAX_CONNECTIONS, max_body_count=MAX_BODY_COUNT,
                                   commit_timeout=math.inf)
        self.server = DtgServer(self.config)
        self.all_clients: list[Client] = []
        self.answered_ok: set[bytes] = set()  # every packet seen answered 0, over the whole run
        self.stored_count = 0
        self.in_flight = 0  # sessions waiting in store.submit: a commit in a worker thread
        self.submitted = trio.Event()
        self.crash: BaseException | None = None
        ready = threading.Event()
        self.thread = threading.Thread(target=self._trio_main, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait()
        assert self.crash is None, self.crash

    # -- the trio side --------------------------------------------------------------------------
    def _trio_main(self, ready: threading.Event) -> None:
        async def main() -> None:
            self.token = trio.lowlevel.current_trio_token()
            store = store_of(self.server)
            submit = store.submit

            async def counted_submit(received: Received, peer: str) -> Any:
                self.in_flight += 1
                try:
                    return await submit(received, peer)
                finally:
                    self.in_flight -= 1
                    self.submitted.set()

            store.submit = counted_submit  # type: ignore[method-assign]
            async with trio.open_nursery() as services:
                await services.start(store.run)
                async with trio.open_nursery() as sessions, trio.open_nursery() as readers:
                    self.sessions, self.readers = sessions, readers
                    self.done = trio.Event()
                    ready.set()
                    await self.done.wait()
                    readers.cancel_scope.cancel()
                services.cancel_scope.cancel()

        try:
            trio.run(main, clock=trio.testing.MockClock(rate=0))
        except BaseException as e:  # reported to the test thread as the crash
            self.crash = e
        finally:
            store_of(self.server).close()
            self.server.control.close()
            ready.set()

    def call(self, afn: Any, *args: Any) -> Any:
        assert self.crash is None, f"the server crashed: {self.crash!r}"
        return trio.from_thread.run(afn, *args, trio_token=self.token)

    async def settle(self) -> None:
        """Run until every task is blocked and no session waits for a commit."""
        while True:
            await trio.testing.wait_all_tasks_blocked()
            if self.in_flight == 0:
                return
            self.submitted = trio.Event()
            if self.in_flight:
                await self.submitted.wait()

    async def _read(self, client: Client) -> None:
        with client.scope:
            try:
                while chunk := await client.stream.receive_some(4096):
                    client.received += chunk
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            client.eof = True

    async def _open(self, n: int) -> Client:
        client_side, server_side = trio.testing.memory_stream_pair()
        rejected = self.server.metrics.open_connections >= MAX_CONNECTIONS
        client = Client(n, client_side, trio.current_time(), rejected)
        client.last_sent_at = client.opened_at
        if rejected:
            client.final_at = client.opened_at
        self.sessions.start_soon(self.server.handle, server_side)
        self.readers.start_soon(self._read, client)
        await self.settle()
        return client

    async def _send(self, client: Client, chunks: list[bytes], close: bool) -> None:
        for chunk in chunks:
            if client.eof:
                break
            before = expected(client.sent)
            await client.stream.send_all(chunk)
            now = trio.current_time()
            client.sent += chunk
            after = expected(client.sent)
            client.last_sent_at = now
            if after.error and not before.error and not client.rejected:  # a rejected one had its final answer
                client.final_at = now
            if not after.partial:
                client.partial_since = None
            elif len(after.frames) > len(before.frames) or client.partial_since is None:
                client.partial_since = now
            if not close:
                await self.settle()
        if close:
            await self._close(client)

    async def _close(self, client: Client) -> None:
        client.scope.cancel()
        client.closed = True
        await client.stream.aclose()
        await self.settle()

    async def _stall(self, seconds: float) -> None:
        clock = trio.lowlevel.current_clock()
        assert isinstance(clock, trio.testing.MockClock)
        clock.jump(seconds)
        await self.settle()

    async def _finish(self) -> None:
        for client in self.all_clients:
            if not client.closed:
                await self._close(client)
        await self._stall(PACKET_TIMEOUT_S + DRAIN_S)
        assert self.server.metrics.open_connections == 0
        assert not self.sessions.child_tasks, f"{len(self.sessions.child_tasks)} session tasks left"
        self.done.set()

    # -- rules ----------------------------------------------------------------------------------
    @rule(target=clients)
    def open_connection(self) -> Client:
        client: Client = self.call(self._open, len(self.all_clients))
        self.all_clients.append(client)
        return client

    @rule(client=clients, packets=st.lists(st.sampled_from(PACKETS), min_size=1, max_size=3), data=st.data(),
          close=st.booleans())
    def send_packets(self, client: Client, packets: list[bytes], data: st.DataObject, close: bool) -> None:
        """Valid packets back to back in random chunks; with close, the terminal hangs up without reading."""
        if not can_send(client):
            return
        stream = b"".join(packets)
        cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=5), label="cuts"))
        chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        self.call(self._send, client, chunks, close)

    @rule(client=clients, packet=st.sampled_from(PACKETS), data=st.data())
    def send_truncated(self, client: Client, packet: bytes, data: st.DataObject) -> None:
        if can_send(client):
            self.call(self._send, client, [packet[: data.draw(st.integers(1, len(packet) - 1), label="length")]], False)

    @rule(client=clients, garbage=st.one_of(st.binary(min_size=1, max_size=64), st.sampled_from(HOSTILE)))
    def send_garbage(self, client: Client, garbage: bytes) -> None:
        if can_send(client):
            self.call(self._send, client, [garbage], False)

    @rule(client=consumes(clients))
    def close_early(self, client: Client) -> None:
        if not client.closed:
            self.call(self._close, client)

    @rule(seconds=st.sampled_from([0.5, 0.5, 1.0, 1.0, 2.5, 3.0, 4.0, 12.5, 31.0]))
    def stall(self, seconds: float) -> None:
        self.call(self._stall, seconds)

    # -- invariants -----------------------------------------------------------------------------
    def stored(self) -> list[bytes]:
        db = sqlite3.connect(f"file:{self.data_dir / 'store-0.db'}?mode=ro", uri=True)
        try:
            return [bytes(raw) for (raw,) in db.execute("SELECT raw FROM packets")]
        finally:
            db.close()

    @invariant()
    def answers_and_store_agree(self) -> None:
        assert self.crash is None, f"the server crashed: {self.crash!r}"
        stored = self.stored()
        assert len(stored) == len(set(stored)), "a packet stored twice"
        sent_valid: set[bytes] = set()
        answered_ok: set[bytes] = set()
        now = self.call(_now)
        for client in self.all_clients:
            got = bytes(client.received)
            if client.rejected:
                assert got in (b"", b"\x09\x04"[: len(got)]) and (client.closed or got == b"\x09\x04"), (client, got)
                if not client.closed:
                    assert client.final_at is not None
                    assert client.eof == (now >= client.final_at + DRAIN_S), (client, now)
                continue
            exp = expected(client.sent)
            sent_valid.update(exp.frames)
            if client.closed:
                continue
            answers = b"\x09\x00" * len(exp.frames) + (b"\x09\x01" if exp.error else b"")
            assert got == answers, (client, got.hex(), answers.hex())
            answered_ok.update(exp.frames)
            if exp.error:
                assert client.final_at is not None
                should_close = now >= client.final_at + DRAIN_S
            else:
                should_close = now >= client.last_sent_at + IDLE_TIMEOUT_S or (
                    client.partial_since is not None and now >= client.partial_since + PACKET_TIMEOUT_S)
            assert client.eof == should_close, (client, now, should_close)
        assert set(stored) <= sent_valid, "stored a packet nobody sent whole"
        assert answered_ok <= set(stored), "answered 0 and not stored"
        self.answered_ok |= answered_ok
        self.stored_count = len(stored)

    def teardown(self) -> None:
        try:
            if self.crash is None and self.thread.is_alive():
                self.call(self._finish)
                TOTALS.update(examples=1, connections=len(self.all_clients), answered_ok=len(self.answered_ok),
                              stored=self.stored_count, bytes_sent=sum(len(c.sent) for c in self.all_clients),
                              format_errors=sum(expected(c.sent).error for c in self.all_clients if not c.rejected),
                              rejected=sum(c.rejected for c in self.all_clients))
            self.thread.join(30)
            assert not self.thread.is_alive(), "the trio loop did not finish"
            assert self.crash is None, f"the server crashed: {self.crash!r}"
        finally:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def can_send(client: Client) -> bool:
    return not client.closed and not client.eof and len(client.sent) < SEND_LIMIT


async def _now() -> float:
    return trio.current_time()


ServerMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestServerMachine = ServerMachine.TestCase
