"""`serve --workers N`: every packet stored by the one worker that owns its terminal's shard.

The kernel spreads connections over the workers (SO_REUSEPORT) by address, knowing nothing of
terminals; a terminal's packets, trip state and MQTT outbox live in one shard, chosen by its
modem number, and shard i has one writer, worker i. So the worker that accepted a connection
serves it whole (reads, frames, checks the registry, answers, closes), and a packet whose
terminal lives in another shard is relayed to that shard's worker: the frame goes over a Unix
stream socket, the owner queues it for its next group commit like a packet of its own, and sends
back the result once the commit has ended; only then does the accepting worker answer the
terminal. An answer of 0 thus still means "committed", in the owning shard.

Both directions are batched: the requests queued while the event loop ran go out in one write,
and the results of one commit come back in one write, so a relayed packet costs a copy of its
bytes and a share of two system calls, not a connection of its own. When the owner cannot be
reached (it is being restarted) or the link breaks before its result arrives, the packet is
answered 4: the terminal sends it again (spec §4.5), and the owner's digest check makes that
resend harmless if the first copy was committed after all.

Each worker listens on a Unix socket `DIR/.relay/<port>-<shard>`. The directory `DIR/.relay`
belongs to the server's user with mode 0700, so no other user can bind, replace or even reach a
socket in it (an abstract socket name, used before, has no permissions: another local user could
take the name first and answer 0 to packets it never stored). Both ends also check the other's
credentials (SO_PEERCRED): the owner takes links only from processes of its own user, and the
sender sends only to a socket a process of its own user listens on. Sockets are bound and
reached through the directory's open descriptor (`/proc/self/fd/N/<name>`, Linux), so a long
DIR does not run into the 108-byte limit of a socket path.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import math
import os
import socket
import stat
import struct
import time
from pathlib import Path

import attrs
import trio

from ..protocol import ProtocolError, Received, Result, received
from ..store import PacketStore
from ..store.packets import Pending, shard_of

log = logging.getLogger("dtgserver.server")

REQUEST = struct.Struct(">IdIH")  # call id, received at (Unix s), frame length, peer length; then peer, frame
ANSWER = struct.Struct(">IB")  # call id, result
MAX_FRAME = 1 << 24  # far above any frame the framer accepts: a link sending more is broken
RECEIVE_SIZE = 256 * 1024
RETRY_S = 0.5  # after a failed connect, the owner's packets are answered 4 at once for this long
PROBE_S = 1.0  # how often a sender asks each owner whether its shard takes packets (RemoteShard.healthy)
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


RELAY_DIR = ".relay"


class RelayDirError(OSError):
    """DIR/.relay cannot be made private to this server's user."""

    def __str__(self) -> str:
        return str(self.strerror)  # the sentence alone, without "[Errno N]"


class RelayDir:
    """`DIR/.relay`, the relay sockets' directory: created mode 0700, checked to be a directory (not
    a symlink) of this process's user, and held open; sockets are named through the descriptor."""

    def __init__(self, data_dir: Path):
        self.path = path = Path(data_dir) / RELAY_DIR
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise RelayDirError(e.errno, f"{path} must be a directory of this server's own (not a symlink): "
                                         f"{e.strerror}") from None
        info = os.fstat(fd)
        if info.st_uid != os.geteuid():
            os.close(fd)
            raise RelayDirError(errno.EPERM, f"{path} belongs to uid {info.st_uid}, not to this server's uid "
                                             f"{os.geteuid()}: remove it, the server makes its own")
        if info.st_mode & 0o077:
            os.fchmod(fd, 0o700)
            log.warning("%s was mode %o: made 0700 (only the server's user may reach the relay sockets)",
                        path, stat.S_IMODE(info.st_mode))
        self.fd = fd

    def socket_path(self, port: int, shard: int) -> str:
        """Where shard `shard`'s owner listens, for the server on `port`."""
        return f"/proc/self/fd/{self.fd}/{port}-{shard}"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _peer_uid(sock: trio.socket.SocketType) -> int:
    """The uid of the process at the other end of a connected Unix socket (-1 when unknown)."""
    try:
        _, uid, _ = _CREDENTIALS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size))
    except OSError as e:
        log.warning("relay link without credentials (%s)", e)
        return -1
    return int(uid)


_LINK_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@attrs.define(slots=True)
class _Call:
    done: trio.Event = attrs.field(factory=trio.Event)
    result: Result = Result.OVERLOADED


class RemoteShard:
    """Another worker's shard, seen from this worker: `submit` relays a packet to its owner and
    returns the owner's answer (OK once committed there), like `PacketStore.submit`.

    Start `run()` in a nursery: it connects when there is something to send and keeps the link.
    """

    def __init__(self, relay_dir: RelayDir, port: int, shard: int, *, commit_timeout: float = 10.0):
        self.relay_dir, self.shard = relay_dir, shard
        self.address = relay_dir.socket_path(port, shard)
        self.commit_timeout = commit_timeout
        self.relayed = 0  # packets sent to the owner
        self.answered_at = -math.inf  # when the owner last answered a probe: its shard can commit
        self._calls: dict[int, _Call] = {}
        self._outgoing: list[bytes] = []
        self._outgoing_packets = 0  # of _outgoing, the packets (not probes)
        self._next_id = 0
        self._wake = trio.Event()
        self._down_until = -math.inf
        self._down_since: float | None = None  # the outage being logged, if any
        self._scope = trio.CancelScope()

    def bind(self, port: int) -> None:
        """The port is known once listening (`--port 0` picks one)."""
        self.address = self.relay_dir.socket_path(port, self.shard)

    def close(self) -> None:
        """No packet will be relayed any more (this process's sessions have ended): drop the link,
        so that the owner, which waits for its links to close, can stop."""
        self._scope.cancel()

    def healthy(self) -> bool:
        """The owner answered a probe recently: it runs, its link works and its shard is not over a
        high-water mark. A stopped, dead or restarting owner fails this within PROBE_S + commit_timeout."""
        return trio.current_time() - self.answered_at <= PROBE_S + self.commit_timeout

    async def submit(self, packet: Received, peer: str) -> Result:
        return await self._call(packet.raw, peer)

    async def _probe_loop(self) -> None:
        """Every PROBE_S, an empty request: the owner answers it after the requests before it, with
        0 while its shard takes packets. So a stopped owner is noticed with no packet waiting."""
        while True:
            with trio.move_on_after(self.commit_timeout):
                if await self._call(b"", "") == Result.OK:
                    self.answered_at = trio.current_time()
            await trio.sleep(PROBE_S)

    async def _call(self, raw: bytes, peer: str) -> Result:
        if (raw and trio.current_time() < self._down_until) or self._scope.cancel_called:
            return Result.OVERLOADED
        self._next_id = call_id = (self._next_id + 1) & 0xFFFFFFFF
        call = self._calls[call_id] = _Call()
        peer_bytes = peer.encode("utf-8", "replace")[:0xFFFF]
        self._outgoing.append(REQUEST.pack(call_id, time.time(), len(raw), len(peer_bytes)) + peer_bytes + raw)
        self._outgoing_packets += bool(raw)
        self._wake.set()
        try:
            await call.done.wait()
        finally:
            self._calls.pop(call_id, None)  # cancelled: a result that comes later is dropped
        return call.result

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        with self._scope:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._probe_loop)
                    await self._keep_linked()
            finally:
                self._fail_all()

    async def _keep_linked(self) -> None:
        while True:
            await self._wake.wait()
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await sock.connect(self.address)
                if (uid := _peer_uid(sock)) != os.geteuid():  # never hand a packet to another user
                    raise PermissionError(errno.EPERM, f"the relay socket is held by uid {uid}, not by "
                                                       f"this server's uid {os.geteuid()}: refused")
            except BaseException as e:
                sock.close()
                if not isinstance(e, OSError):
                    raise  # cancelled while connecting: shutting down
                if self._down_since is None:  # once per outage, not once per retry
                    self._down_since = trio.current_time()
                    log.warning("worker %d cannot be reached (%s): its terminals' packets are answered 4 "
                                "until it can", self.shard, e)
                if self._outgoing_packets:  # packets, not only a probe (which must not hold packets back)
                    self._down_until = trio.current_time() + RETRY_S
                self._fail_all()
                continue
            if self._down_since is not None:
                log.info("worker %d reached again after %.1f s", self.shard, trio.current_time() - self._down_since)
                self._down_since = None
            stream = trio.SocketStream(sock)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._send_loop, stream, nursery.cancel_scope)
                    await self._receive_loop(stream)
                    nursery.cancel_scope.cancel()
            finally:
                sock.close()
                self._fail_all()

    def _fail_all(self) -> None:
        """The link is down: every call still waiting is answered 4 (its packet may or may not
        have been committed by the owner; the terminal's resend is deduplicated there)."""
        self._outgoing.clear()
        self._outgoing_packets = 0
        calls, self._calls = self._calls, {}
        for call in calls.values():
            call.done.set()
        self._wake = trio.Event()

    async def _send_loop(self, stream: trio.SocketStream, link: trio.CancelScope) -> None:
        try:
            while True:
                if not self._outgoing:
                    self._wake = trio.Event()
                    await self._wake.wait()
                    continue
                data = b"".join(self._outgoing)
                self.relayed += self._outgoing_packets
                self._outgoing.clear()
                self._outgoing_packets = 0
                await stream.send_all(data)
        except _LINK_ERRORS as e:
            log.warning("relay link to worker %d broke while sending: %s", self.shard, e)
            link.cancel()

    async def _receive_loop(self, stream: trio.SocketStream) -> None:
        buffer = bytearray()
        try:
            while True:
                data = await stream.receive_some(RECEIVE_SIZE)
                if not data:
                    log.info("worker %d closed the relay link (it stopped or restarts)", self.shard)
                    return
                buffer += data
                whole = len(buffer) - len(buffer) % ANSWER.size
                chunk = bytes(buffer[:whole])
                del buffer[:whole]
                for call_id, result in ANSWER.iter_unpack(chunk):
                    call = self._calls.pop(call_id, None)
                    if call is not None:
                        call.result = Result(result)
                        call.done.set()
        except (*_LINK_ERRORS, ValueError) as e:
            log.warning("relay link to worker %d broke: %s", self.shard, e)


class _Link:
    """One other worker's link to this one, from the owner's side."""

    def __init__(self) -> None:
        self.calls: collections.deque[tuple[int, Pending | Result]] = collections.deque()
        self.wake = trio.Event()


class RelayListener:
    """The owner's end: takes the packets other workers relay for this worker's shard."""

    def __init__(self, relay_dir: RelayDir, shard: int, shards: int, store: PacketStore, *, max_body_count: int):
        self.relay_dir, self.shard, self.shards = relay_dir, shard, shards
        self.store = store
        self.max_body_count = max_body_count
        self.received = 0  # packets other workers relayed here, queued for this shard's commits
        self._sock: trio.socket.SocketType | None = None
        self._name = ""
        self._inode = -1
        self._accepting = trio.CancelScope()

    async def open(self, port: int) -> None:
        """Listen on the shard's socket; one left by a process of this shard that died is replaced."""
        self._name = f"{port}-{self.shard}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._name, dir_fd=self.relay_dir.fd)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(self.relay_dir.socket_path(port, self.shard))
            self._inode = os.stat(self._name, dir_fd=self.relay_dir.fd, follow_symlinks=False).st_ino
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            with contextlib.suppress(OSError):  # our own socket file only, not a successor's
                if os.stat(self._name, dir_fd=self.relay_dir.fd, follow_symlinks=False).st_ino == self._inode:
                    os.unlink(self._name, dir_fd=self.relay_dir.fd)

    def stop_accepting(self) -> None:
        """This process's sessions have ended: take no new link (a connect is refused, and its
        packet answered 4 by the sender). The open links are served until their senders close
        them, which they do once their own sessions have ended."""
        self._accepting.cancel()  # the accept loop then closes the listening socket

    async def accept_loop(self, links: trio.Nursery) -> None:
        """Until stop_accepting() or cancelled; each link is served in `links`."""
        try:
            with self._accepting:
                await self._accept_into(links)
        finally:
            self.close()  # a late connect is refused at once, not left in the backlog

    async def _accept_into(self, links: trio.Nursery) -> None:
        assert self._sock is not None
        listener = trio.SocketListener(self._sock)
        while True:
            try:
                stream = await listener.accept()
            except OSError as e:
                log.error("relay accept failed (%s); retrying in 100 ms", e)
                await trio.sleep(0.1)
                continue
            if (uid := _peer_uid(stream.socket)) != os.geteuid():
                log.warning("refused a relay link from uid %d", uid)
                stream.socket.close()
                continue
            links.start_soon(self._serve_link, stream)

    async def _serve_link(self, stream: trio.SocketStream) -> None:
        link = _Link()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._answer_loop, stream, link, nursery.cancel_scope)
                await self._request_loop(stream, link)
                nursery.cancel_scope.cancel()
        finally:
            stream.socket.close()

    async def _request_loop(self, stream: trio.SocketStream, link: _Link) -> None:
        buffer = bytearray()
        head = REQUEST.size
        try:
            while True:
                data = await stream.receive_some(RECEIVE_SIZE)
                if not data:
                    return
                buffer += data
                at = 0
                while len(buffer) - at >= head:
                    call_id, received_at, length, peer_length = REQUEST.unpack_from(buffer, at)
                    if length > MAX_FRAME:
                        log.error("relay link sent a %d-byte frame: closing it", length)
                        return
                    end = at + head + peer_length + length
                    if len(buffer) < end:
                        break
                    peer = buffer[at + head:at + head + peer_length].decode("utf-8", "replace")
                    frame = bytes(buffer[at + head + peer_length:end])
                    at = end
                    link.calls.append((call_id, self._enqueue(frame, peer, received_at)))
                del buffer[:at]
                link.wake.set()
        except _LINK_ERRORS as e:
            log.warning("relay link broke while reading: %s", e)

    def _enqueue(self, frame: bytes, peer: str, received_at: float) -> Pending | Result:
        if not frame:  # a probe (RemoteShard._probe_loop): answered in turn, 0 while packets are taken
            return Result.OK if self.store.overloaded() is None else Result.OVERLOADED
        try:
            packet = received(frame, max_body_count=self.max_body_count)
        except ProtocolError as e:  # the sender framed it: a bug, not a terminal's doing
            log.error("relayed frame refused: %s", e)
            return Result.FORMAT_ERROR
        if shard_of(packet.modem, self.shards) != self.shard:
            log.error("relayed packet of modem %s belongs to shard %d, not %d", packet.modem,
                      shard_of(packet.modem, self.shards), self.shard)
            return Result.OVERLOADED
        item = self.store.enqueue(packet, peer, received_at)
        if item is None:
            return Result.OVERLOADED
        self.received += 1
        return item

    @staticmethod
    async def _answer_loop(stream: trio.SocketStream, link: _Link, scope: trio.CancelScope) -> None:
        """Results in request order, those ready sent together (a commit ends many at once)."""
        calls = link.calls
        try:
            while True:
                if not calls:
                    link.wake = trio.Event()
                    await link.wake.wait()
                    continue
                out: list[bytes] = []
                while calls:
                    call_id, item = calls[0]
                    if isinstance(item, Pending):
                        if not item.done.is_set():
                            if out:
                                break  # send the ready ones before waiting for the next commit
                            await item.done.wait()
                        result = item.result
                    else:
                        result = item
                    calls.popleft()
                    out.append(ANSWER.pack(call_id, result))
                await stream.send_all(b"".join(out))
        except _LINK_ERRORS as e:
            log.warning("relay link broke while answering: %s", e)
            scope.cancel()
