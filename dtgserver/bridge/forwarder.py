"""Publishes the store's outbox to an MQTT broker: QoS 1, in id order, delivered only on PUBACK.

paho-mqtt speaks the protocol on its own network thread (`loop_start`), one fresh client per
connection. Its callbacks never block: they hand each event to Trio with `TrioToken.run_sync_soon`
(paho calls `on_publish` holding the lock `publish()` takes, so a blocking hand-off from that
thread could deadlock against our own `publish()` call). All bookkeeping happens on the Trio
thread.

No loss, no reordering:
- rows are published in id order (the store's commit order, so each terminal's order) and at
  most `window` of them are unacknowledged at any time;
- a row is marked delivered in the outbox only after its PUBACK; until then it stays `pending`;
- when the connection goes, paho's client is dropped with whatever it still held, and the next
  connection first republishes every pending row in id order, then continues after the highest
  id fetched. A row whose PUBACK was lost with the connection is therefore sent twice: the
  duplicates QoS 1 allows, recognisable by the message's `id`.
"""

from __future__ import annotations

import collections
import logging
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs
import paho.mqtt.client as mqtt
import trio
from paho.mqtt.enums import CallbackAPIVersion

from .outbox import Outbox, OutboxRow

log = logging.getLogger("dtgserver.bridge")

SECONDS = 1.0


class ConnectFailed(Exception):
    """The broker did not accept the connection (refused CONNACK, or none in time)."""


@attrs.frozen
class BrokerUrl:
    """`mqtt://[user:pass@]host[:port]` or `mqtts://…` (TLS, default port 8883)."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerUrl:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"broker URL must start with mqtt:// or mqtts://, got {url!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"broker URL takes no path or query: {url!r} (the topic prefix is its own option)")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"broker URL has a bad port: {url!r}") from None
        if not parts.hostname:
            raise ValueError(f"broker URL has no host: {url!r}")
        tls = parts.scheme == "mqtts"
        return cls(
            host=parts.hostname,
            port=port if port is not None else (8883 if tls else 1883),
            tls=tls,
            username=unquote(parts.username) if parts.username is not None else None,
            password=unquote(parts.password) if parts.password is not None else None,
        )

    def __str__(self) -> str:  # for logs: never the password
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def _release_sockets(client: mqtt.Client) -> None:
    """Close what paho would close only in `Client.__del__` (its wake-up socket pair, paho 2.2).

    Our callbacks make the client part of a reference cycle; when the garbage collector breaks it,
    the sockets may be finalised before the client and warn (ResourceWarning). Called after
    paho's thread has ended, so nothing uses them any more.
    """
    reset_sockets = getattr(client, "_reset_sockets", None)
    if reset_sockets is not None:
        reset_sockets()


def topic_with_prefix(prefix: str, topic: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{topic}" if prefix else topic


@attrs.define
class _Session:
    """One broker connection: its paho client and the events its callbacks report."""

    client: mqtt.Client = attrs.field(default=None)
    tls_sockets: list[ssl.SSLSocket] = attrs.Factory(list)
    connack: trio.Event = attrs.Factory(trio.Event)
    lost: trio.Event = attrs.Factory(trio.Event)
    refused: str | None = None
    by_mid: dict[int, OutboxRow] = attrs.Factory(dict)


class Forwarder:
    """Reads the outbox, publishes to the broker, marks rows delivered on PUBACK; reconnects forever.

    Metrics are plain attributes: published (PUBLISH sent, republishes included), acknowledged
    (rows PUBACKed), reconnects (connection attempts after the first), connected, backlog.
    """

    def __init__(
        self,
        outbox: Outbox,
        url: str,
        *,
        tls_ca: Path | str | None = None,
        topic_prefix: str = "",
        client_id: str | None = None,
        window: int = 100,
        keepalive_s: int = 30,
        connect_timeout_s: float = 10 * SECONDS,
        backoff_initial_s: float = 0.5 * SECONDS,
        backoff_max_s: float = 30 * SECONDS,
        close_timeout_s: float = 2 * SECONDS,
    ):
        self.outbox = outbox
        self.broker = BrokerUrl.parse(url)
        if tls_ca is not None and not self.broker.tls:
            raise ValueError("a TLS CA file needs an mqtts:// broker URL")
        if tls_ca is not None and not Path(tls_ca).is_file():
            raise ValueError(f"TLS CA file {str(tls_ca)!r} does not exist")
        if "+" in topic_prefix or "#" in topic_prefix:
            raise ValueError(f"topic prefix {topic_prefix!r} must not contain MQTT wildcards + or #")
        if window < 1:
            raise ValueError("window must be at least 1")
        self.tls_ca = None if tls_ca is None else str(tls_ca)
        self.topic_prefix = topic_prefix
        self.client_id = client_id or f"dtgserver-{socket.gethostname()}"
        self.window = window
        self.keepalive_s = keepalive_s
        self.connect_timeout_s = connect_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.close_timeout_s = close_timeout_s
        # metrics
        self.published = 0
        self.acknowledged = 0
        self.reconnects = 0
        self.connected = False
        # delivery state (Trio thread only)
        self._pending: dict[int, OutboxRow] = {}  # published, not yet acked; insertion order = id order
        self._cursor = 0  # highest id fetched
        self._acked_ids: list[int] = []  # acked, not yet marked delivered in the outbox
        self._ack_wake = trio.Event()
        self._space = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None

    @property
    def backlog(self) -> int:
        return self.outbox.backlog()

    @property
    def pending(self) -> int:
        """Rows published and not yet acknowledged."""
        return len(self._pending)

    # -- lifecycle ----------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Forward until cancelled; on cancellation the paho thread is stopped and acks are saved."""
        self._token = trio.lowlevel.current_trio_token()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._mark_delivered_loop)
                task_status.started()
                await self._connect_loop()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5 * SECONDS):
                await self._flush_acked()

    async def _connect_loop(self) -> None:
        delay = self.backoff_initial_s
        first = True
        while True:
            if not first:
                self.reconnects += 1
            first = False
            try:
                await self._session()
                delay = self.backoff_initial_s  # it was up: start over with a short wait
                log.warning("connection to %s lost; %d rows unacknowledged", self.broker, len(self._pending))
            except (OSError, ConnectFailed) as exc:
                log.warning("cannot connect to %s: %s; retrying in %.1f s", self.broker, exc, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, self.backoff_max_s)

    async def _session(self) -> None:
        """One connection, from CONNECT until it is lost (returns) or refused (raises)."""
        session = _Session()
        session.client = self._new_client(session)
        session.client.on_connect = self._callback(self._on_connect, session)
        session.client.on_disconnect = self._callback(self._on_disconnect, session)
        session.client.on_publish = self._publish_callback(session)
        started = False
        try:
            try:
                await trio.to_thread.run_sync(session.client.connect, self.broker.host, self.broker.port,
                                              self.keepalive_s)
            except BaseException:
                for sock in session.tls_sockets:
                    sock.close()
                raise
            session.client.loop_start()
            started = True
            with trio.move_on_after(self.connect_timeout_s):
                await session.connack.wait()
            if session.refused is not None:
                raise ConnectFailed(session.refused)
            if not session.connack.is_set() or session.lost.is_set():
                raise ConnectFailed("no CONNACK" if not session.connack.is_set() else "closed during CONNECT")
            self.connected = True
            log.info("connected to %s as %s; republishing %d unacknowledged rows", self.broker, self.client_id,
                     len(self._pending))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._publish_loop, session)
                await session.lost.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.connected = False
            if started:
                with trio.CancelScope(shield=True):
                    await self._close(session)
            else:
                session.client.disconnect()  # closes the socket of a connect that came back late
            _release_sockets(session.client)

    async def _close(self, session: _Session) -> None:
        """Disconnect and join paho's thread, promptly even when the broker has stopped reading."""
        session.client.disconnect()  # queues DISCONNECT; paho's thread closes the socket once it is written
        with trio.move_on_after(self.close_timeout_s):
            await session.lost.wait()
        sock = session.client.socket()
        if not session.lost.is_set() and sock is not None:
            # A stalled broker with a full send buffer: DISCONNECT cannot be written, and paho would
            # wait for its keepalive. Shutting the descriptor down wakes its select with EOF. The
            # plain socket's method, so an SSL wrapper's state is left to the thread that uses it.
            log.warning("broker %s does not take our DISCONNECT; closing the connection", self.broker)
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # type: ignore[arg-type]
            except OSError:
                pass  # already closed by paho meanwhile
        await trio.to_thread.run_sync(session.client.loop_stop)

    def _new_client(self, session: _Session) -> mqtt.Client:
        # A clean session per connection: what the broker had not acked is ours to resend, in order.
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=True,
                             protocol=mqtt.MQTTv311, reconnect_on_failure=False)
        client.max_inflight_messages_set(self.window)
        client.max_queued_messages_set(0)
        client.connect_timeout = self.connect_timeout_s
        if self.broker.username is not None:
            client.username_pw_set(self.broker.username, self.broker.password)
        if self.broker.tls:
            client.tls_set_context(self._tls_context(session))
        return client

    def _tls_context(self, session: _Session) -> ssl.SSLContext:
        """Verifies the broker's certificate and host name (system CAs, or the given CA file).

        paho 2.2 leaves the TLS socket open when the handshake fails (a ResourceWarning, and a
        descriptor held until garbage collection); remembering what it wraps lets us close it.
        """
        context = ssl.create_default_context(cafile=self.tls_ca)
        wrap_socket = context.wrap_socket

        def wrap_and_remember(*args: Any, **kwargs: Any) -> ssl.SSLSocket:
            sock = wrap_socket(*args, **kwargs)
            session.tls_sockets.append(sock)
            return sock

        context.wrap_socket = wrap_and_remember  # type: ignore[method-assign]
        return context

    # -- paho's thread → Trio -----------------------------------------------------------------
    def _callback(self, handler: Callable[..., None], session: _Session) -> Callable[..., None]:
        token = self._token
        assert token is not None

        def from_paho_thread(client: mqtt.Client, userdata: Any, *args: Any) -> None:
            try:
                token.run_sync_soon(handler, session, *args)
            except trio.RunFinishedError:
                pass

        return from_paho_thread

    def _publish_callback(self, session: _Session) -> Callable[..., None]:
        """`on_publish` for paho's thread: PUBACKs queue up, and Trio is woken once per burst of
        them, not once per message (each `run_sync_soon` is a write to Trio's wake-up socket)."""
        token = self._token
        assert token is not None
        acks: collections.deque[int] = collections.deque()
        scheduled = [False]

        def drain() -> None:
            scheduled[0] = False  # before taking any: a PUBACK queued from here on schedules another drain
            while acks:
                self._on_publish(session, acks.popleft())

        def from_paho_thread(client: mqtt.Client, userdata: Any, mid: int, *args: Any) -> None:
            acks.append(mid)
            if not scheduled[0]:
                scheduled[0] = True
                try:
                    token.run_sync_soon(drain)
                except trio.RunFinishedError:
                    pass

        return from_paho_thread

    def _on_connect(self, session: _Session, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            session.refused = f"broker refused the connection: {reason_code}"
        session.connack.set()

    def _on_disconnect(self, session: _Session, flags: Any, reason_code: Any, properties: Any) -> None:
        session.lost.set()
        session.connack.set()

    def _on_publish(self, session: _Session, mid: int) -> None:
        row = session.by_mid.pop(mid, None)
        # a PUBACK is the broker's promise even when it arrives after its connection was given up
        if row is None or self._pending.pop(row.id, None) is None:
            return
        self.acknowledged += 1
        self._acked_ids.append(row.id)
        self._ack_wake.set()
        self._space.set()

    # -- publishing ---------------------------------------------------------------------------
    async def _publish_loop(self, session: _Session) -> None:
        for row in list(self._pending.values()):  # what the last connection left unacked, in id order
            self._publish(session, row)
        while True:
            while len(self._pending) >= self.window:
                self._space = trio.Event()
                await self._space.wait()
            rows = await self.outbox.fetch(self._cursor, self.window - len(self._pending))
            for row in rows:
                if row.id <= self._cursor:
                    continue  # not ours to resend from here: it is pending or delivered already
                self._pending[row.id] = row
                self._cursor = row.id
                self._publish(session, row)

    def _publish(self, session: _Session, row: OutboxRow) -> None:
        info = session.client.publish(topic_with_prefix(self.topic_prefix, row.topic), row.payload, qos=1,
                                      retain=row.retain)
        # Recorded before Trio can run the on_publish hand-off for this mid, so none is missed.
        session.by_mid[info.mid] = row
        self.published += 1

    # -- acks → outbox ------------------------------------------------------------------------
    async def _mark_delivered_loop(self) -> None:
        while True:
            await self._ack_wake.wait()
            self._ack_wake = trio.Event()
            await self._flush_acked()

    async def _flush_acked(self) -> None:
        ids, self._acked_ids = self._acked_ids, []
        if not ids:
            return
        try:
            await self.outbox.mark_delivered(ids)
        except BaseException:
            self._acked_ids = ids + self._acked_ids  # saved by the final flush, or sent again (a duplicate)
            raise
