"""The Trio TCP server: one task per connection, the sans-io core for framing, the store for answers.

Data's way through: socket → Connection (framer + schema → record) → registry/maintenance →
PacketStore.submit (group commit) → answer `0x09 <result>`. With `--mqtt`, the bridge reads the
committed packets (store.sqlite_log) and publishes what it derives from them (bridge.service).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path
from typing import Any, Literal, cast

import attrs
import trio

from ..bridge.consumer import BridgeOptions, Consumer
from ..bridge.cursor import SqliteCursor
from ..bridge.service import Bridge, MqttOptions
from ..protocol import NEED_DATA, Connection, ProtocolError, Received, Result, Role, max_frame_length
from ..store import Control, ControlState, PacketStore, shard_paths
from ..store.packets import ShardCountMismatch, shard_of
from ..store.sqlite_log import SqlitePacketLog
from .backlog import ExternalBacklog
from .config import MIB, ServerConfig
from .memory import BufferBudget, trim
from .metrics import Metrics, serve_metrics
from .relay import RelayDir, RelayListener, RemoteShard
from .tcp import RECEIVE_SIZE, TcpStream, accept, listen_error, reuse_port_listener
from .timeouts import Timeouts

log = logging.getLogger("dtgserver.server")
session_log = logging.getLogger("dtgserver.session")

_ANSWER_TIMEOUT = "answer not read in time"
_BUDGET_SPENT = "buffer budget spent"
TRIM_CHECK_S = 1.0  # how often the memory given back is looked at
TRIM_AFTER = 8 * MIB  # bytes let go since the last trim that can make another worth it (memory.py)

ProcessRole = Literal["combined", "front", "writer"]


def printable(text: str) -> str:
    """Device-supplied text made safe for one log line: control characters escaped."""
    return "".join(c if c.isprintable() and c not in "\\" else c.encode("unicode_escape").decode("ascii")
                   for c in text)


@attrs.define
class Session:
    """What one connection did, for its one log line."""

    peer: str
    modem: str = "-"
    kinds: list[str] = attrs.field(factory=list)
    bodies: int = 0
    results: list[int] = attrs.field(factory=list)
    end: str = "closed"

    def line(self, duration_s: float) -> str:
        results = ",".join(map(str, self.results)) or "-"
        return (f"session peer={self.peer} modem={self.modem} kind={','.join(self.kinds) or '-'} "
                f"bodies={self.bodies} result={results} duration_ms={duration_s * 1000:.1f} end={printable(self.end)}")

    def fields(self, duration_s: float) -> dict[str, Any]:
        """The line's fields as JSON values (`--log-format json`): lists for kind and result, null for no modem."""
        return {"peer": self.peer, "modem": None if self.modem == "-" else self.modem, "kind": self.kinds,
                "bodies": self.bodies, "result": self.results, "duration_ms": round(duration_s * 1000, 1),
                "end": self.end}


class DtgServer:
    """The whole service: listeners, sessions, the store's writer, control polling, metrics, forwarder."""

    def __init__(self, config: ServerConfig, *, shard: int = 0, shards: int = 1, reuse_port: bool = False,
                 role: ProcessRole = "combined"):
        """One process of the service; `role` says which parts it runs.

        - "combined" (`serve`, and each worker of `serve --workers N`): sessions and the writer.
          With shards > 1 and reuse_port it is worker `shard`: it writes and forwards its own
          shard only, and relays every packet whose terminal lives in another shard to that
          shard's worker (server/relay.py). Without reuse_port (one process, as in tests) it
          writes every shard itself.
        - "front" (`serve --writer-process`): sessions only. Every packet is relayed to the
          writer of its terminal's shard and answered with that writer's result.
        - "writer" (`serve --writer-process`): shard `shard`'s writer and MQTT forwarder, taking
          packets from the front processes' relay links; it listens on no TCP port.
        """
        if role == "writer" and config.port == 0:
            raise ValueError("a writer needs the front processes' port to name its relay socket, not port 0")
        self.config = config
        self.metrics = Metrics()
        self.timeouts = Timeouts()
        # the bytes every session of this process holds; a new connection needs one maximal frame of it left
        self.budget = BufferBudget(config.buffer_budget * MIB)
        self._frame_headroom = max_frame_length(role=Role.SERVER, max_body_count=config.max_body_count)
        self.control_failures = 0  # reloads of the control state that failed (the state before kept)
        self.commit_timeouts = 0  # packets answered 4 after waiting commit_timeout for their commit
        # stores whose commit was waited for too long → how many commits they had ended by then
        self._overdue: dict[PacketStore, int] = {}
        self._last_commit_timeout = -math.inf
        if config.store is not None:
            self._open_nats(config, shard, shards, reuse_port, role)
            return
        self.control = Control(config.data_dir)
        check_shard_count(self.control, config.data_dir, shards)
        self.control_state: ControlState = self.control.load()
        self.control.changed()
        self.shard, self.shards, self.reuse_port, self.role = shard, shards, reuse_port, role
        if role == "front":
            self.owned: list[int] = []
        elif reuse_port or role == "writer":
            self.owned = [shard]
        else:
            self.owned = list(range(shards))
        self.stores = {i: PacketStore(
            config.data_dir, shard=i, max_batch=config.max_batch, queue_high_water=config.queue_high_water,
        ) for i in self.owned}
        self.store: PacketStore | None = self.stores.get(shard)
        others = [i for i in range(shards) if i not in self.stores]  # the shards other processes write
        # the relay sockets' private directory, when packets go between processes
        self.relay_dir = RelayDir(config.data_dir) if others or role == "writer" else None
        self.remotes = {i: RemoteShard(self.relay_dir, config.port, i, commit_timeout=config.commit_timeout)
                        for i in others if self.relay_dir}
        self.destinations: dict[int, PacketStore | RemoteShard] = {**self.stores, **self.remotes}
        # the end of the links other processes relay this shard's packets over
        self.relay = RelayListener(self.relay_dir, shard, shards, self.store, max_body_count=config.max_body_count) \
            if self.store is not None and self.relay_dir is not None else None
        self._init_rest()

    def _open_nats(self, config: ServerConfig, shard: int, shards: int, reuse_port: bool, role: ProcessRole) -> None:
        """`--store nats://…`: one JetStream store for every terminal, control in the cluster's bucket."""
        from ..store.jetstream import NatsOptions, StoreUrl, open_server_store

        if role != "combined" or config.mqtt_url is not None:
            raise ValueError("with --store nats://, serve runs alone: no --writer-process, no --mqtt "
                             "(the bridge consumes the stream)")
        options = NatsOptions(StoreUrl.parse(config.store or "", tls_ca=config.store_tls_ca),
                              replicas=config.store_replicas, ack_timeout=config.store_ack_timeout,
                              duplicate_window=config.store_duplicate_window,
                              partitions=config.store_partitions)
        control, store = open_server_store(options, queue_high_water=config.queue_high_water)
        # the same session-facing interface as Control and PacketStore (store/jetstream/control.py, packets.py)
        self.control = cast(Any, control)
        self.control_state = control.load()
        self.shard, self.shards, self.reuse_port, self.role = shard, shards, reuse_port, role
        self.owned = [shard]
        self.stores = {shard: cast(Any, store)}
        self.store = cast(Any, store)
        self.remotes = {}
        self.destinations = {i: cast(Any, store) for i in range(max(shards, shard + 1))}
        self.relay_dir = None
        self.relay = None
        self._init_rest()
        # the bridges' backlog, from their consumers in the cluster (store/jetstream/backlog.py)
        store.backlog_high_water = config.backlog_high_water
        store.backlog.register_metrics(self.metrics.gauges)

    def _init_rest(self) -> None:
        self._stop = trio.Event()
        self._accepting = False
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.metrics.gauges.update({
            "commit_queue": lambda: sum(s.queued for s in self.stores.values()),
            "mqtt_backlog": lambda: 0,  # the bridge's own, with --mqtt
            "commits_total": lambda: sum(s.stats.commits for s in self.stores.values()),
            "commit_failures_total": lambda: sum(s.stats.failed_commits for s in self.stores.values()),
            "committed_packets_total": lambda: sum(s.stats.committed_packets for s in self.stores.values()),
            "duplicate_packets_total": lambda: sum(s.stats.duplicates for s in self.stores.values()),
            "commit_batch_size_last": lambda: self.store.stats.last_batch_size if self.store is not None else 0,
            "commit_batch_size_sum": lambda: sum(s.stats.batch_size_sum for s in self.stores.values()),
            "commit_seconds_last": lambda: self.store.stats.last_commit_seconds if self.store is not None else 0,
            "commit_seconds_sum": lambda: sum(s.stats.commit_seconds_sum for s in self.stores.values()),
            "maintenance": lambda: int(self.control_state.maintenance),
            "control_reload_failures_total": lambda: self.control_failures,
            "commit_timeouts_total": lambda: self.commit_timeouts,
            "healthy": lambda: int(self.healthy()),
            "relayed_packets_total": lambda: sum(r.relayed for r in self.remotes.values()),
            "relay_received_packets_total": lambda: self.relay.received if self.relay else 0,
            "buffered_bytes": lambda: self.budget.used,
            "buffer_budget_bytes": lambda: self.budget.limit,
            "buffer_budget_refusals_total": lambda: self.budget.refused,
            "memory_trims_total": lambda: self.budget.trims,
        })
        self.packet_log: SqlitePacketLog | None = None  # what the bridge reads, with --mqtt
        self.bridge: Bridge | None = self._bridge() if self.config.mqtt_url is not None and self.stores else None
        # the backlog of a `dtgserver bridge` beside this server, read from its cursor files
        self.external_backlog = ExternalBacklog(self.config.data_dir, self.stores, self.config.backlog_high_water) \
            if self.config.external_bridge and self.bridge is None and self.stores else None
        if self.external_backlog is not None:
            self.external_backlog.register_metrics(self.metrics.gauges)

    def _bridge(self) -> Bridge:
        """The MQTT bridge of the shards this process writes: it reads their commits in process."""
        cfg = self.config
        assert cfg.mqtt_url is not None
        packet_log = self.packet_log = SqlitePacketLog(cfg.data_dir, self.shards, writers=self.stores)
        bridge = Bridge(packet_log, self.stores, partial(SqliteCursor, cfg.data_dir),
                        MqttOptions(cfg.mqtt_url, cfg.mqtt_tls_ca, cfg.topic_prefix, cfg.client_id),
                        BridgeOptions(profile=cfg.profile, battery_warning_v=cfg.battery_warning_v,
                                      trip_cache=cfg.trip_cache, driving=cfg.driving(),
                                      trip_deadline_ms=cfg.trip_deadline_ms),
                        start_at={shard: store.last_id for shard, store in self.stores.items()})
        for shard, store in self.stores.items():
            consumer = bridge.consumers[shard]
            store.consumer_lag = partial(_lag, consumer, store)
            store.consumer_high_water = cfg.backlog_high_water
        bridge.register_metrics(self.metrics.gauges)
        return bridge

    def stop(self) -> None:
        """Stop accepting; in-flight sessions get the grace period, then queued commits finish."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def healthy(self) -> bool:
        """Whether a packet sent now would be committed: accepting, no store of this process stuck
        (a commit waited for past commit_timeout, and none ended since: a hung disk), none over a
        high-water mark, and every other shard's owner answering its probes (server/relay.py: a
        stopped, dead or overloaded writer)."""
        self._overdue = {store: ended for store, ended in self._overdue.items() if _commits_ended(store) <= ended}
        return (self._accepting and not self._overdue and all(s.overloaded() is None for s in self.stores.values())
                and all(r.healthy() for r in self.remotes.values()))

    # -- lifecycle ----------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until stop(); reports the bound TCP port through task_status."""
        cfg = self.config
        try:
            async with trio.open_nursery() as services:
                for store in self.stores.values():
                    await services.start(store.run)
                services.start_soon(self._poll_control)
                services.start_soon(self._give_memory_back)
                if cfg.metrics_port is not None:
                    self.metrics_port = await services.start(
                        serve_metrics, self.metrics, cfg.metrics_host, cfg.metrics_port, self.healthy)
                if self.bridge is not None:  # a front process writes nothing, so has nothing to forward
                    await services.start(self.bridge.run)
                if self.external_backlog is not None:
                    await services.start(self.external_backlog.run)
                listeners: list[trio.SocketListener]
                if self.role == "writer":
                    listeners = []  # its packets come over the relay links only
                elif self.reuse_port:
                    listeners = [await reuse_port_listener(cfg.host, cfg.port)]
                else:
                    try:
                        listeners = await trio.open_tcp_listeners(cfg.port, host=cfg.host or None)
                    except OSError as e:
                        raise listen_error(e, cfg.host, cfg.port, "--host, --port") from None
                self.port = listeners[0].socket.getsockname()[1] if listeners else cfg.port
                if self.relay is not None:
                    await self.relay.open(self.port)
                for remote in self.remotes.values():
                    remote.bind(self.port)
                    await services.start(remote.run)
                await self._serve(listeners, task_status)
                services.cancel_scope.cancel()  # the store's writer commits what is queued first
        finally:
            if self.packet_log is not None:
                self.packet_log.close()
            for store in self.stores.values():
                store.close()
            if self.relay is not None:
                self.relay.close()
            if self.relay_dir is not None:
                self.relay_dir.close()
            self.control.close()

    async def _serve(self, listeners: list[trio.SocketListener], task_status: trio.TaskStatus[int]) -> None:
        """Sessions until stop(), then the grace period; relay links until every session is done.

        Relay links are served apart from the sessions: they carry other processes' packets and
        stay open between packets. Once this process's own sessions have ended it takes no new
        link and closes its own links to the other shards' owners; the links into its shard end
        when their senders do the same. So processes stopping together each wait for the others'
        sessions, not for the grace period (with every session done, every link is closed).
        """
        async with trio.open_nursery() as links:
            if self.relay is not None:
                links.start_soon(self.relay.accept_loop, links)
            deadline = await self._serve_sessions(listeners, task_status)
            for remote in self.remotes.values():
                remote.close()
            if self.relay is not None:
                self.relay.stop_accepting()
            links.cancel_scope.deadline = deadline

    async def _serve_sessions(self, listeners: list[trio.SocketListener], task_status: trio.TaskStatus[int]) -> float:
        """Until stop() and then until the sessions end, at the grace deadline at the latest (returned)."""
        cfg = self.config
        async with trio.open_nursery() as sessions:
            try:
                async with trio.open_nursery() as acceptors:
                    for listener in listeners:
                        acceptors.start_soon(self._accept_loop, listener, sessions)
                    self._accepting = True
                    if self.role == "writer":
                        log.info("writer of shard %d: packets from the front processes of port %d, data in %s",
                                 self.shard, self.port, cfg.data_dir)
                    else:
                        log.info("listening on %s:%d, data in %s", cfg.host, self.port, cfg.data_dir)
                    assert self.port is not None
                    task_status.started(self.port)
                    await self._stop.wait()
                    self._accepting = False
                    acceptors.cancel_scope.cancel()
            finally:  # also when run() itself is cancelled: never leave a listening socket open
                self._accepting = False
                for listener in listeners:
                    await trio.aclose_forcefully(listener)
            if self.role == "writer":
                log.info("stopping: the open relay links get %.1f s to finish", cfg.grace_period)
            else:
                log.info("stopped accepting; %d sessions get %.1f s to finish", self.metrics.open_connections,
                         cfg.grace_period)
            deadline = sessions.cancel_scope.deadline = trio.current_time() + cfg.grace_period
        return deadline

    async def _accept_loop(self, listener: trio.SocketListener, sessions: trio.Nursery) -> None:
        while True:
            sessions.start_soon(self.handle, await accept(listener))

    async def _poll_control(self) -> None:
        """Reload the registry and the maintenance switch when another process changed them.

        A read that fails (a failing disk, a damaged or replaced control.db) keeps the last state
        loaded: it is logged (once per outage), counted, and tried again at the next poll.
        """
        failing_since: float | None = None
        where = getattr(self.control, "path", "the control state")
        while True:
            try:
                changed = await self.control.wait_changed(self.config.control_poll)
                # after a failure, reload whatever data_version says: the failed load changed nothing
                if not changed and failing_since is None:
                    continue
                state = await trio.to_thread.run_sync(self.control.load)
            except (sqlite3.Error, OSError) as e:
                self.control_failures += 1
                if failing_since is None:
                    failing_since = trio.current_time()
                    log.error("cannot read %s (%s): keeping the registry and maintenance switch loaded "
                              "before, retrying every %.1f s", where, e, self.config.control_poll)
                continue
            if failing_since is not None:
                log.info("%s read again after %.1f s", where, trio.current_time() - failing_since)
                failing_since = None
            self.control_state = state
            log.info("control reloaded: maintenance=%s registry=%s devices=%d",
                     state.maintenance, state.registry_enforced, len(state.active) + len(state.cancelled))

    async def _give_memory_back(self) -> None:
        """After a burst of large packets has passed (or their connections closed), hand the freed
        heap back to the OS (server/memory.py)."""
        budget = self.budget
        while True:
            await trio.sleep(TRIM_CHECK_S)
            if budget.worth_trimming(TRIM_AFTER):
                budget.trimmed(await trio.to_thread.run_sync(trim))

    # -- one connection ---------------------------------------------------------------------------
    async def handle(self, stream: trio.abc.Stream) -> None:
        """Own one connection: read packets, answer each, close; never raises for the peer's doing."""
        connected = trio.current_time()
        started = time.perf_counter()
        session = Session(_peer(stream))
        metrics = self.metrics
        budget_spent = self.budget.used + self._frame_headroom > self.budget.limit
        if metrics.open_connections >= self.config.max_connections or budget_spent:
            metrics.rejected_connections += 1
            if budget_spent:
                self.budget.refused += 1
            session.end = _BUDGET_SPENT if budget_spent else "too many connections"
            try:
                if await self._answer(stream, Result.OVERLOADED, session):
                    await _drain(stream)
                await trio.aclose_forcefully(stream)
            finally:  # cancelled at shutdown, the session still gets its line
                self._log_session(session, started)
            return
        metrics.open_connections += 1
        try:
            await self._session(stream, session, connected)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            session.end = f"connection lost: {e}"
        finally:
            metrics.open_connections -= 1
            try:
                await _close(stream)
            finally:  # a session cut by the grace deadline is cancelled here, and still gets its line
                self._log_session(session, started)

    def _log_session(self, session: Session, started: float) -> None:
        last = session.results[-1] if session.results else None
        self.metrics.sessions[Result(last).name.lower() if last is not None else "none"] += 1
        if session_log.isEnabledFor(logging.INFO):
            duration_s = time.perf_counter() - started
            session_log.info(session.line(duration_s), extra={"event": "session", "fields": session.fields(duration_s)})

    async def _session(self, stream: trio.abc.Stream, session: Session, connected: float) -> None:
        """Packets in, answers out, until the peer closes, a timeout, or a format error.

        One cancel scope for the whole session, its deadline (in `self.timeouts`, see
        server/timeouts.py) moved to whatever is awaited: the next byte (idle timeout; the packet
        timeout while a packet is partly in), nothing while the store commits (that wait has its
        own bound, commit_timeout, in `_accept`), the answer's send (send timeout).
        """
        cfg = self.config
        metrics = self.metrics
        timeouts = self.timeouts
        conn = Connection(Role.SERVER, max_body_count=cfg.max_body_count)
        budget = self.budget
        held = 0  # this session's bytes counted in the budget: conn.buffered
        last_byte = connected
        packet_started: float | None = None
        waiting = ""
        with trio.CancelScope() as scope:
            try:
                while True:
                    try:
                        event = conn.next_event()
                    except ProtocolError as e:
                        session.end = f"format error {e}"
                        budget.release(held)  # the framer let its buffer go at the error
                        held = 0
                        timeouts.discard(scope)
                        if await self._answer(stream, Result.FORMAT_ERROR, session):
                            await _drain(stream)
                        return
                    if event is NEED_DATA:
                        idle_deadline = last_byte + cfg.idle_timeout
                        if packet_started is None or idle_deadline <= packet_started + cfg.packet_timeout:
                            waiting = "idle timeout"
                            timeouts.set(scope, idle_deadline)
                        else:
                            waiting = "packet timeout"
                            timeouts.set(scope, packet_started + cfg.packet_timeout)
                        # no more than the packet still lacks: one frame buffered, never one and a read
                        wanted = conn.wanted
                        data = await stream.receive_some(RECEIVE_SIZE if wanted is None else min(wanted, RECEIVE_SIZE))
                        if scope.cancel_called:  # the bytes came in after the deadline had passed
                            break
                        last_byte = trio.current_time()
                        if packet_started is None:
                            packet_started = last_byte
                        metrics.bytes_received += len(data)
                        if not budget.charge(len(data)):
                            budget.refused += 1
                            session.end = f"{_BUDGET_SPENT}, {held + len(data)} bytes of a packet dropped"
                            timeouts.discard(scope)
                            if await self._answer(stream, Result.OVERLOADED, session):
                                await _drain(stream)
                            return
                        held += len(data)
                        conn.receive_data(data)
                        continue
                    if not isinstance(event, Received):  # CLOSED
                        return
                    budget.release(len(event.raw))  # handed to the store (bounded by --queue-high-water)
                    held -= len(event.raw)
                    timeouts.set(scope, math.inf)  # the commit's wait is bounded by commit_timeout (_accept)
                    result = await self._accept(event, session)
                    session.results.append(int(result))
                    metrics.results[int(result)] += 1
                    waiting = _ANSWER_TIMEOUT
                    timeouts.set(scope, trio.current_time() + cfg.send_timeout)
                    try:
                        await stream.send_all(Connection.send(result))
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        session.end = "peer closed before the answer"
                        return
                    packet_started = trio.current_time() if conn.buffered else None
            finally:
                timeouts.discard(scope)
                budget.release(held)
        if scope.cancel_called:
            partial = f", {conn.buffered} bytes of a packet dropped" if conn.buffered and waiting != _ANSWER_TIMEOUT \
                else ""
            session.end = f"{waiting}{partial}"

    async def _accept(self, event: Received, session: Session) -> Result:
        modem = event.modem
        session.modem = modem
        session.kinds.append(event.kind)
        bodies = event.body_count
        session.bodies += bodies
        self.metrics.packets[event.kind] += 1
        self.metrics.bodies += bodies
        state = self.control_state
        if state.maintenance:
            return Result.MAINTENANCE
        if modem in state.cancelled or (state.registry_enforced and modem not in state.active):
            return Result.UNKNOWN_SUBSCRIBER
        store = self.destinations[shard_of(modem, self.shards) if self.shards > 1 else 0]
        # Not committed within commit_timeout: 4, so the terminal does not wait without bound. The
        # commit goes on; should it succeed after all, the resend is answered 0 and not stored twice.
        timeout = self.config.commit_timeout
        with trio.move_on_after(timeout):
            return await store.submit(event, session.peer)
        if isinstance(store, PacketStore):  # unhealthy until this store ends a commit (others: probed)
            self._overdue[store] = _commits_ended(store)
        self.commit_timeouts += 1
        now = trio.current_time()
        if now - self._last_commit_timeout > timeout:  # once per stall, not once per packet
            log.warning("a packet of %s was not committed within %g s (--commit-timeout): answered 4", modem,
                        timeout)
        self._last_commit_timeout = now
        return Result.OVERLOADED

    async def _answer(self, stream: trio.abc.Stream, result: Result, session: Session) -> bool:
        session.results.append(int(result))
        self.metrics.results[int(result)] += 1
        with trio.move_on_after(self.config.send_timeout):
            try:
                await stream.send_all(Connection.send(result))
                return True
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                session.end = "peer closed before the answer"
                return False
        session.end = _ANSWER_TIMEOUT
        return False


async def _drain(stream: trio.abc.Stream, seconds: float = 1.0, limit: int = 1 << 16) -> None:
    """Before closing on a final answer: read (and drop) what the peer still sends, briefly.

    Closing a socket with unread input makes the kernel send a reset, which can destroy the
    answer before the terminal reads it.
    """
    with trio.move_on_after(seconds):
        try:
            if isinstance(stream, TcpStream):
                await stream.send_eof()
            received = 0
            while received < limit and (chunk := await stream.receive_some(RECEIVE_SIZE)):
                received += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def _close(stream: trio.abc.Stream) -> None:
    """Close a session's stream at once (no graceful shutdown: every answer has been sent).

    A socket is closed directly: `trio.aclose_forcefully` closes it the same way and then runs a
    checkpoint in a cancelled scope, whose Cancelled exception costs more than the close itself
    (about half of a bare session's CPU, docs/performance.md). Other streams (tests' memory
    streams) go through aclose_forcefully.
    """
    if isinstance(stream, TcpStream):
        stream.socket.close()
    else:
        await trio.aclose_forcefully(stream)


def _commits_ended(store: PacketStore) -> int:
    return store.stats.commits + store.stats.failed_commits


def _lag(consumer: Consumer, store: PacketStore) -> int:
    """Committed packets the shard's bridge has not yet had acknowledged and saved."""
    return consumer.lag(store.last_id)


def check_shard_count(control: Control, data_dir: Path, shards: int) -> None:
    """Record DIR's shard count, or raise ShardCountMismatch when DIR was written with another one."""
    before = control.claim_shard_count(shards, len(shard_paths(data_dir)))
    if before is not None:
        control.close()
        raise ShardCountMismatch(
            f"{data_dir} holds packets in {before} shard(s) but {shards} were asked for (--workers {shards}): "
            f"a terminal's data lives in one shard chosen by its modem number, and moving it is not supported. "
            f"Serve this directory with --workers {before}, or use a new --data-dir.")


def _peer(stream: trio.abc.Stream) -> str:
    """The session log's peer: accept's address for a connection, "memory:0" for tests' streams."""
    return stream.peer if isinstance(stream, TcpStream) else "memory:0"


@contextlib.contextmanager
def _tuned_gc() -> Iterator[None]:
    """Fewer, cheaper collections while serving: ~120 short-lived objects are made per packet.

    Everything alive after start-up (modules, schemas, codecs) is frozen out of the collector's
    scans, and generation 0 is collected every 20,000 allocations instead of 700: measured
    ~5 % less CPU per session (bench/server.py, docs/performance.md). Restored on the way out,
    so a program that runs `serve` in process keeps its own settings afterwards.
    """
    thresholds = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 50)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


@contextlib.contextmanager
def held_stop_signals() -> Iterator[None]:
    """SIGINT and SIGTERM blocked until `stop_signals()` takes them: one that arrives during
    start-up waits (pending) and is then acted on, instead of killing a process that has not
    installed its handler yet. (Worker processes start with them blocked: the mask is inherited
    across exec.) Unblocked on the way out, whatever happened."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def stop_signals() -> Iterator[AsyncIterator[int]]:
    """SIGINT and SIGTERM as a channel, unblocked once it is in place (a pending one arrives now)."""
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        yield signals


async def serve(config: ServerConfig, *, shard: int = 0, shards: int = 1, reuse_port: bool = False,
                role: ProcessRole = "combined", task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Run a server until SIGINT or SIGTERM, then shut down gracefully.

    A signal is acted on whenever it comes, during start-up too (the server then stops as soon
    as it has started). The signals stay caught until the end: a second one (Ctrl-C pressed
    again, or a supervisor's SIGTERM after the terminal's SIGINT) is logged and does not cut the
    grace period short or interrupt the final commits; the grace period already bounds the wait.
    """
    server = DtgServer(config, shard=shard, shards=shards, reuse_port=reuse_port, role=role)
    with _tuned_gc(), stop_signals() as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signals() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if server.stopping:
                        log.info("%s again: already shutting down (at most %.1f s for sessions)", name,
                                 config.grace_period)
                    else:
                        log.info("%s: shutting down", name)
                        server.stop()

            async def run_then_stop_watching(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
                await server.run(task_status=task_status)
                nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signals)
            task_status.started(await nursery.start(run_then_stop_watching))
