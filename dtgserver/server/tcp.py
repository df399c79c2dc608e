"""Terminal connections: accepted from the listening socket and wrapped in a lean Trio stream.

`trio.SocketListener` and `trio.SocketStream` cost about a fifth of a bare session's CPU that a
terminal session does not need (docs/performance.md, measured with the bare server's handler):
per connection a `getpeername` for the log line (accept already returned the address), two
`setsockopt` calls, and per call a conflict detector and, for `send_all`, a memoryview loop with
its context managers. `TcpStream` is the same `HalfCloseableStream` contract on the same Trio
socket, with socket errors translated the same way (EBADF: ClosedResourceError, any other:
BrokenResourceError).

It does not set `TCP_NODELAY`. Nagle's algorithm holds back a small segment only while data sent
earlier is unacknowledged, and the server sends one 2-byte answer per received packet: the
terminal waits for each answer before it sends its next packet, whose segments acknowledge the
answer, so the next answer never waits. (A terminal that sent its next packet without waiting
would see that answer wait for its delayed ACK: slower, never wrong.) `TCP_NOTSENT_LOWAT` bounds
a large unsent backlog, which 2-byte answers never build.
"""

from __future__ import annotations

import errno
import logging
import socket
from typing import Any

import trio

log = logging.getLogger("dtgserver.server")

RECEIVE_SIZE = 65536


class ListenError(OSError):
    """An address the server cannot listen on, named with the options that set it."""

    def __str__(self) -> str:
        return str(self.strerror)


def listen_error(error: OSError, host: str | None, port: int, options: str) -> ListenError:
    """`cannot listen on 127.0.0.1:9320 (--host, --port): Address already in use`."""
    where = f"[{host}]" if host and ":" in host else host or "*"
    return ListenError(error.errno, f"cannot listen on {where}:{port} ({options}): {error.strerror or error}")
_CLOSED_ERRNOS = {errno.EBADF, errno.ENOTSOCK}
# accept() failures that concern only the connection being accepted (as trio.SocketListener)
_IGNORED_ACCEPT_ERRNOS = {getattr(errno, name) for name in (
    "EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET", "EHOSTUNREACH",
    "EOPNOTSUPP", "ENETUNREACH", "ENOSR", "ESOCKTNOSUPPORT", "EPROTONOSUPPORT", "ETIMEDOUT", "ECONNRESET",
) if hasattr(errno, name)}
# accept() failures for want of a resource: wait a little and go on accepting
_RETRY_ACCEPT_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


def _stream_error(e: OSError) -> trio.ClosedResourceError | trio.BrokenResourceError:
    if e.errno in _CLOSED_ERRNOS:
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {e}")


class TcpStream(trio.abc.HalfCloseableStream):
    """One accepted TCP connection; `peer` is "host:port" as accept() reported it."""

    def __init__(self, sock: trio.socket.SocketType, peer: str):
        self.socket = sock
        self.peer = peer

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        try:
            return await self.socket.recv(RECEIVE_SIZE if max_bytes is None else max_bytes)
        except OSError as e:
            raise _stream_error(e) from e

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.socket.did_shutdown_SHUT_WR:
            raise trio.ClosedResourceError("can't send data after sending EOF")
        view = memoryview(data)
        try:
            if not view:
                if self.socket.fileno() == -1:
                    raise trio.ClosedResourceError("socket was already closed")
                await trio.lowlevel.checkpoint()
                return
            while view:
                view = view[await self.socket.send(view):]
        except OSError as e:
            raise _stream_error(e) from e

    async def wait_send_all_might_not_block(self) -> None:
        if self.socket.fileno() == -1:
            raise trio.ClosedResourceError
        try:
            await self.socket.wait_writable()
        except OSError as e:
            raise _stream_error(e) from e

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        if self.socket.did_shutdown_SHUT_WR:
            return
        try:
            self.socket.shutdown(trio.socket.SHUT_WR)
        except OSError as e:
            raise _stream_error(e) from e

    async def aclose(self) -> None:
        self.socket.close()
        await trio.lowlevel.checkpoint()


def peer_text(address: Any) -> str:
    """"host:port" of an accepted socket's address (IPv4 or IPv6 tuple)."""
    try:
        return f"{address[0]}:{address[1]}"
    except (TypeError, IndexError):
        return "unknown"


async def accept(listener: trio.SocketListener) -> TcpStream:
    """The next connection on listener's socket; failures that concern only that connection are
    skipped, a lack of descriptors or memory is logged and retried after 100 ms."""
    sock = listener.socket
    while True:
        try:
            conn, address = await sock.accept()
        except OSError as e:
            if e.errno in _IGNORED_ACCEPT_ERRNOS:
                continue
            if e.errno in _RETRY_ACCEPT_ERRNOS:
                log.error("accept failed (%s); retrying in 100 ms", errno.errorcode.get(e.errno or 0, e))
                await trio.sleep(0.1)
                continue
            raise
        return TcpStream(conn, peer_text(address))

LISTEN_BACKLOG = 65535  # the kernel clips it to net.core.somaxconn


def bound_address(host: str, port: int) -> tuple[int, Any]:
    """The family and address to bind for host and port (the first that getaddrinfo gives)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    return int(family), address


async def reuse_port_listener(host: str, port: int) -> trio.SocketListener:
    """A listening socket that other processes may bind to the same address too (SO_REUSEPORT).

    trio.open_tcp_listeners does not set SO_REUSEPORT, hence the socket made by hand.
    """
    family, address = bound_address(host, port)
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        await sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError as e:
        sock.close()
        raise listen_error(e, host, port, "--host, --port") from None
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


def reserve_port(host: str, port: int) -> socket.socket:
    """Bound, not listening: fixes the port number (port 0 → a free one) for the workers to share.

    A socket that does not listen gets no connections, so holding it costs the workers nothing.
    """
    family, address = bound_address(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise listen_error(e, host, port, "--host, --port") from None
    except BaseException:
        sock.close()
        raise
    return sock
