"""`serve --workers N`: every connection served by the worker that owns its terminal's shard.

The kernel spreads connections over the workers (SO_REUSEPORT) by address, knowing nothing of
terminals; a terminal's packets, trip state and MQTT outbox live in one shard, chosen by its
modem number. So a worker peeks at a new connection's first 12 bytes (protocol ID and modem,
MSG_PEEK: nothing is consumed) and, when the terminal belongs to another worker, passes the
connection's file descriptor to it over a Unix datagram socket (SCM_RIGHTS) and closes its own
copy. The owner reads the packet from the socket as if it had accepted it. Each shard thus has
one writer, which keeps its trip states cached and stages its commits on its event loop; before
this, every worker wrote every shard and waited for the others' write locks.

Each worker binds an abstract Unix socket (Linux; no file to clean up) named after the data
directory, the port and its shard.
"""

from __future__ import annotations

import array
import hashlib
import logging
import os
import socket
from pathlib import Path

import trio

from ..protocol import FRAME_LENGTHS, ProtocolError
from ..protocol.fields import Modem

log = logging.getLogger("dtgserver.server")

HEADER = 12  # protocol ID + modem: all a worker needs to know whose connection it is
_MODEM = Modem()
_FD = array.array("i", [0]).itemsize


def address(data_dir: Path, port: int, shard: int) -> bytes:
    """The abstract socket name of `shard`'s worker for this data directory and port."""
    tag = hashlib.sha256(f"{os.path.realpath(data_dir)}:{port}".encode()).hexdigest()[:24]
    return f"\0dtgserver-{tag}-{shard}".encode()


def terminal_of(head: bytes) -> str | None:
    """The modem of a connection's first packet from its first 12 bytes; None if it has none
    (not a terminal's packet, or a modem that is not digits: the framer will answer 1)."""
    if len(head) < HEADER or head[0] not in FRAME_LENGTHS or head[0] == 0x09:
        return None
    try:
        return _MODEM.decode(head[1:HEADER])
    except ProtocolError:
        return None


class Handoff:
    """One worker's end: receives connections for its shard, sends others to their owners."""

    def __init__(self, data_dir: Path, port: int, shard: int):
        self.data_dir, self.port, self.shard = Path(data_dir), port, shard
        self.sent = 0
        self.received = 0
        self._addresses: dict[int, bytes] = {}
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sending = trio.Lock()

    async def bind(self, port: int) -> None:
        """Bind once the listening port is known (`--port 0` picks one)."""
        self.port = port
        self._addresses.clear()
        await self.sock.bind(self._address(self.shard))

    def _address(self, shard: int) -> bytes:
        if shard not in self._addresses:
            self._addresses[shard] = address(self.data_dir, self.port, shard)
        return self._addresses[shard]

    def close(self) -> None:
        self.sock.close()

    async def send(self, stream: trio.SocketStream, shard: int) -> bool:
        """Pass the connection to `shard`'s worker; False (and the connection is still ours) if it
        cannot take it now, e.g. while the supervisor restarts it."""
        fds = array.array("i", [stream.socket.fileno()])
        try:
            async with self._sending:  # one sender at a time: Trio allows one waiter per socket direction
                await self.sock.sendmsg([b"c"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())],
                                       0, self._address(shard))
        except OSError as e:
            log.warning("could not hand a connection to worker %d (%s); serving it here", shard, e)
            return False
        self.sent += 1
        return True

    async def receive(self) -> list[trio.SocketStream]:
        """The next connection(s) another worker passed to this one."""
        _, ancdata, _, _ = await self.sock.recvmsg(1, socket.CMSG_SPACE(16 * _FD))
        streams = []
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[:len(data) - len(data) % _FD])
                for fd in fds:
                    streams.append(trio.SocketStream(trio.socket.from_stdlib_socket(socket.socket(fileno=fd))))
        self.received += len(streams)
        return streams


async def peek_terminal(stream: trio.SocketStream, deadline: float) -> str | None:
    """The modem of the connection's first packet without consuming a byte, waiting for its first
    12 bytes until `deadline`; None when they do not come or name no terminal."""
    with trio.move_on_at(deadline):
        while True:
            head = await stream.socket.recv(HEADER, socket.MSG_PEEK)
            if len(head) >= HEADER or not head:
                return terminal_of(head)
            await trio.sleep(0.005)  # a header split over segments: rare, and peeking again at once would spin
    return None
