"""nats-py beside Trio: the NATS client runs on its own thread with its own asyncio loop.

nats-py is an asyncio library and dtgserver is a Trio program. As with paho-mqtt in the MQTT
forwarder, the foreign client gets a thread of its own, and work crosses between the two loops
by hand-off only: Trio → asyncio with `loop.call_soon_threadsafe` (or
`asyncio.run_coroutine_threadsafe`), asyncio → Trio with `TrioToken.run_sync_soon`. Neither side
ever blocks the other. Chosen over trio-asyncio (one loop running both) because it keeps
nats-py on the stock asyncio loop it is tested with, adds no dependency, and costs little: one
hand-off each way per batch of packets, not per packet (bench/nats.py measures a round trip;
docs/performance.md has the figure).

The connection string (`StoreUrl`) may carry a user and password or a token; `str()` of it, which
is what logs print, never does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import ssl
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import attrs
import nats
import nats.errors
import trio
from nats.aio.client import Client

log = logging.getLogger("dtgserver.store.jetstream")

T = TypeVar("T")
DEFAULT_PORT = 4222
CONNECT_TIMEOUT_S = 2.0
RECONNECT_WAIT_S = 0.5
COMMAND_ATTEMPTS = 2  # a command's tries of each server before it says the cluster is unreachable
COMMAND_CONNECT_S = 8.0  # and how long it tries in all
CALL_TIMEOUT_S = 10.0  # a blocking call from sync code (the CLI): connect and one request, at most
UNREACHABLE_WARNING_S = 30.0  # while no server of the cluster answers: a warning this often, not per attempt


@attrs.frozen
class StoreUrl:
    """`nats://[user:password@|token@]host[:port][,host[:port]...]`, or `tls://…` for TLS.

    The credentials may also come from the environment (DTGSERVER_STORE_USER and
    DTGSERVER_STORE_PASSWORD, or DTGSERVER_STORE_TOKEN), which keeps them off the command line.
    """

    hosts: tuple[tuple[str, int], ...]
    tls: bool = False
    user: str | None = attrs.field(default=None, repr=False)
    password: str | None = attrs.field(default=None, repr=False)
    token: str | None = attrs.field(default=None, repr=False)
    tls_ca: Path | None = None

    @classmethod
    def parse(cls, url: str, *, tls_ca: Path | None = None, env: dict[str, str] | None = None) -> StoreUrl:
        from urllib.parse import unquote

        env = dict(os.environ) if env is None else env
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in ("nats", "tls"):
            raise ValueError(f"store URL must start with nats:// or tls:// (got {_redact(url)!r})")
        if "/" in rest or "?" in rest or "#" in rest:
            raise ValueError(f"store URL takes no path or query: {_redact(url)!r}")
        userinfo, at, hostlist = rest.rpartition("@")
        user = password = token = None
        if at:
            name, colon, secret = userinfo.partition(":")
            if colon:
                user, password = unquote(name), unquote(secret)
            else:
                token = unquote(name)
        user = user or env.get("DTGSERVER_STORE_USER") or None
        password = password or env.get("DTGSERVER_STORE_PASSWORD") or None
        token = token or env.get("DTGSERVER_STORE_TOKEN") or None
        hosts = []
        for item in hostlist.split(","):
            host, port = _host_port(item, url)
            hosts.append((host, port))
        return cls(tuple(hosts), scheme == "tls", user, password, token, tls_ca)

    @property
    def servers(self) -> list[str]:
        scheme = "tls" if self.tls else "nats"
        return [f"{scheme}://{f'[{h}]' if ':' in h else h}:{p}" for h, p in self.hosts]

    def __str__(self) -> str:  # for logs: never a password or a token
        who = f"{self.user}@" if self.user else "***@" if self.token else ""
        scheme = "tls" if self.tls else "nats"
        return f"{scheme}://{who}" + ",".join(f"{f'[{h}]' if ':' in h else h}:{p}" for h, p in self.hosts)

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=str(self.tls_ca) if self.tls_ca else None)
        return context


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    _, at, hosts = rest.rpartition("@")
    return f"{scheme}{sep}***@{hosts}" if at else url


def _host_port(item: str, url: str) -> tuple[str, int]:
    item = item.strip()
    if item.startswith("["):
        host, _, tail = item[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port_text = item.partition(":")
    if not host:
        raise ValueError(f"store URL has an empty host: {_redact(url)!r}")
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"store URL has a bad port {port_text!r}: {_redact(url)!r}")
    return host, int(port_text)


class NatsLink:
    """One NATS connection on a thread of its own; connects (and reconnects) forever in the background.

    From Trio: `await link.call(coro)`. From plain code (the CLI): `link.call_blocking(coro)`.
    `connected` is True while the client has a live connection to a server of the cluster.
    """

    def __init__(self, url: StoreUrl, *, name: str = "dtgserver"):
        self.url = url
        self.name = name
        self.loop = asyncio.new_event_loop()
        self.nc: Client | None = None
        self.connected = False
        self._down_since: float | None = None  # time.monotonic() when the connection was lost
        self.connects = 0  # successful connections, reconnections included
        self.last_error: Exception | None = None  # what nats-py last reported (a refused password, a bad certificate)
        self.failed_attempts = 0  # connection attempts failed since the last connection
        self._warned_at: float | None = None  # time.monotonic() of the last "unreachable" warning
        self._retrying = False  # connecting until it works (a server), not once (a command: it says why)
        self._connected = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run_loop, name="nats", daemon=True)
        self._thread.start()

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    # -- hand-offs ---------------------------------------------------------------------------------
    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call_soon(self, fn: Any, *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the NATS loop and wait for it in Trio (cancelling it if Trio cancels)."""
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        future = self.submit(coro)

        def wake(_: object) -> None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        future.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            future.cancel()
            raise
        return future.result()

    def call_blocking(self, coro: Coroutine[Any, Any, T], timeout: float = CALL_TIMEOUT_S) -> T:
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no answer from the NATS cluster {self.url} within {timeout:.0f} s") from None

    # -- the connection (on the NATS loop) ---------------------------------------------------------
    async def connect(self, *, retry: bool = True) -> Client:
        """Connect once (retry=False raises when no server answers) or until it works."""
        self._retrying = retry
        while True:
            try:
                nc = await asyncio.wait_for(nats.connect(
                    servers=self.url.servers, name=self.name, user=self.url.user, password=self.url.password,
                    token=self.url.token, tls=self.url.ssl_context(), connect_timeout=int(CONNECT_TIMEOUT_S),
                    allow_reconnect=True, max_reconnect_attempts=-1 if retry else COMMAND_ATTEMPTS,
                    reconnect_time_wait=RECONNECT_WAIT_S,
                    ping_interval=5, max_outstanding_pings=2,
                    disconnected_cb=self._disconnected, reconnected_cb=self._reconnected,
                    error_cb=self._error, closed_cb=self._disconnected), None if retry else COMMAND_CONNECT_S)
            except (TimeoutError, OSError, nats.errors.Error) as e:
                if not retry:
                    why = self.last_error or e
                    raise ConnectionError(f"cannot connect to the NATS cluster {self.url}: "
                                          f"{why or type(why).__name__}") from None
                log.warning("NATS cluster %s unreachable (%s); retrying", self.url, e or type(e).__name__)
                await asyncio.sleep(RECONNECT_WAIT_S)
                continue
            self.nc = nc
            self.connects += 1
            self.connected = True
            self.failed_attempts, self._warned_at = 0, None
            self._connected.set()
            log.info("connected to the NATS cluster %s", self.url)
            return nc

    async def _disconnected(self) -> None:
        if self.connected and not self._closed:
            log.warning("lost the NATS connection to %s; reconnecting", self.url)
            self._down_since = time.monotonic()
        self.connected = False
        self._connected.clear()

    async def _reconnected(self) -> None:
        self.connects += 1
        self.connected = True
        self.failed_attempts, self._warned_at = 0, None
        self._down_since = None
        self._connected.set()
        log.info("reconnected to the NATS cluster %s", self.url)

    def down_for(self) -> float:
        """Seconds since the connection was lost (0 while connected; infinite before the first connection)."""
        if self.connected:
            return 0.0
        return math.inf if self._down_since is None else time.monotonic() - self._down_since

    async def _error(self, error: Exception) -> None:
        """nats-py's report of each failed attempt (it retries by itself: a server's first connection
        and every reconnection retry until one works). While none works, a warning at the first
        failure and then every UNREACHABLE_WARNING_S, so an operator sees at the default verbosity
        why the terminals are answered 4; each attempt is logged at debug level."""
        self.last_error = error
        log.debug("NATS client: %s", error)
        if self.connected:
            return
        self.failed_attempts += 1
        if not self._retrying:
            return
        now = time.monotonic()
        if self._warned_at is None or now - self._warned_at >= UNREACHABLE_WARNING_S:
            self._warned_at = now
            log.warning("NATS cluster %s unreachable (%s; %d failed attempt%s); retrying", self.url,
                        error or type(error).__name__, self.failed_attempts, "" if self.failed_attempts == 1 else "s")

    async def _close(self) -> None:
        """Cancel whatever still runs on the loop (watches, publishes), then close the connection."""
        me = asyncio.current_task()
        others = [task for task in asyncio.all_tasks() if task is not me]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        if self.nc is not None and not self.nc.is_closed:
            try:
                await asyncio.wait_for(self.nc.close(), 5)
            except (TimeoutError, nats.errors.Error, OSError):
                pass
        leftovers = [task for task in asyncio.all_tasks() if task is not me]  # nats-py's own, after close
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)

    def close(self) -> None:
        """Close the connection and end the thread (from any thread but the NATS loop's own)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.submit(self._close()).result(10)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()
