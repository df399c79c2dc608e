"""Hostile clients: slow drips, idle hordes, floods, huge declared sizes, modems that look like paths.

Each is bounded in time (a timeout cuts it) and in memory (a limit holds it), and nothing a
device sends reaches a file name or a log line unsanitized. Virtual time where the socket is not
the point; real TCP on 127.0.0.1 where it is (thousands of connections, floods, memory).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import math
import os
import re
import resource
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import trio
import trio.testing
from conftest import VALID_SAMPLES, store_of
from hypothesis import given, settings
from hypothesis import strategies as st
from serverproc import free_port, start_server, stop
from test_server import exchange, memory_session, read_until_closed, running, stored

from dtgserver.cli.server_cmds import serve
from dtgserver.protocol import encode
from dtgserver.server.app import DtgServer
from dtgserver.server.config import ServerConfig
from dtgserver.testing import dtg_bytes, status_log

OK, FORMAT_ERROR, OVERLOADED = b"\x09\x00", b"\x09\x01", b"\x09\x04"
MODEM = bytes.fromhex("0001003939393938383838")  # "01099998888"


def status_log_frame(modem: bytes, log: bytes) -> bytes:
    """A status log with any 11 modem bytes (the encoder would refuse the hostile ones)."""
    assert len(modem) == 11
    sent_time = encode(status_log("01099998888", ""))[12:19]
    return b"\x63" + modem + sent_time + len(log).to_bytes(2, "big") + log


def realtime_header(body_count: int) -> bytes:
    """The first 16 bytes of a DTG realtime packet: protocol ID, modem, vehicle kind, body count."""
    return b"\x03" + MODEM + b"\x00\x01" + body_count.to_bytes(2, "big", signed=True)


@contextlib.contextmanager
def open_files_limit(wanted: int) -> Iterator[int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, limit), hard))
    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextlib.contextmanager
def traced() -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


def _load_oracle() -> ModuleType:
    spec = importlib.util.spec_from_file_location("framer_oracle", FUZZ / "framer_oracle.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
oracle = _load_oracle()


# -- the fuzz target's checks, in the suite ------------------------------------------------------


def test_fuzz_seeds_and_kept_crashers_pass_the_framer_oracle() -> None:
    """The atheris target's oracle (fuzz/framer_oracle.py) over its seeds and every crasher kept in fuzz/crashers/."""
    seeds = oracle.seeds()
    assert len(seeds) >= 2 * 20
    # Valid packets a terminal sends (a 0x09 answer is a format error from a terminal).
    valid = {f"seed-{s.name}-{how}" for s in VALID_SAMPLES if s.data[0] != 0x09 for how in ("whole", "drip")}
    for name, data in seeds.items():
        events = oracle.check_input(data)
        if name in valid:  # whole packets, then the end of the stream
            assert len(events) >= 2 and events[-1] is oracle.CLOSED, (name, events)
        else:  # a malformed sample ends in a format error (message, offset)
            assert isinstance(events[-1], tuple) and isinstance(events[-1][0], str), (name, events)
    for crasher in sorted((FUZZ / "crashers").glob("*")):
        oracle.check_input(crasher.read_bytes())


@st.composite
def mangled_streams(draw: st.DrawFn) -> bytes:
    """Valid fixture packets back to back, then a few bytes flipped, cut or inserted: near-valid input."""
    stream = bytearray(b"".join(draw(st.lists(st.sampled_from([s.data for s in VALID_SAMPLES]), min_size=1,
                                              max_size=3))))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(stream)))
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip" and at < len(stream):
            stream[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "cut":
            del stream[at:at + draw(st.integers(1, 40))]
        else:
            stream[at:at] = draw(st.binary(min_size=1, max_size=8))
    return draw(st.binary(min_size=2, max_size=2)) + bytes(stream)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), mangled_streams()))
def test_random_and_mangled_streams_pass_the_framer_oracle(data: bytes) -> None:
    oracle.check_input(data)


# -- slow drip --------------------------------------------------------------------------------


async def test_slow_drip_one_byte_a_second_cut_at_packet_timeout(tmp_path: Path, autojump_clock: trio.abc.Clock,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    packet = dtg_bytes()
    caplog.set_level(logging.INFO, "dtgserver.session")
    async with memory_session(tmp_path) as (_server, client):  # defaults: idle 3 s, packet 30 s
        start = trio.current_time()
        dripped = 0
        with trio.move_on_after(600):
            for byte in packet:  # never idle for 3 s, never done
                try:
                    await client.send_all(bytes([byte]))
                except trio.BrokenResourceError:
                    break
                dripped += 1
                await trio.sleep(1)
        assert await read_until_closed(client) == b""  # no answer: the packet never arrived
        assert 29 <= trio.current_time() - start <= 31
        assert dripped <= 31
    assert stored(tmp_path) == []
    [line] = [r.getMessage() for r in caplog.records if r.name == "dtgserver.session"]
    # byte 31 is sent at the 30 s deadline itself: whether it is in depends on the timeout tick
    assert re.search(r"end=packet timeout, 3[01] bytes of a packet dropped", line)


async def test_terminal_that_never_reads_its_answer_is_cut_by_the_send_timeout(
        tmp_path: Path, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture) -> None:
    """A lockstep stream: the answer's send waits until the peer reads, which it never does."""
    caplog.set_level(logging.INFO, "dtgserver.session")
    server = DtgServer(ServerConfig(data_dir=tmp_path, commit_timeout=math.inf))  # virtual time: see memory_session
    client, server_side = trio.testing.lockstep_stream_pair()
    packet = dtg_bytes()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store_of(server).run)
            nursery.start_soon(server.handle, server_side)
            await client.send_all(packet)
            while not store_of(server).stats.committed_packets:  # the commit runs in a thread: real time
                await trio.sleep(0.01)
            start = trio.current_time()  # from here on only virtual time passes
            while server.metrics.open_connections:
                await trio.sleep(0.5)
            assert trio.current_time() - start == pytest.approx(10.0, abs=0.6)  # send_timeout
            nursery.cancel_scope.cancel()
    finally:
        store_of(server).close()
        server.control.close()
        await client.aclose()
    assert stored(tmp_path) == [("01012345678", "dtg", packet)]  # committed before the answer was offered
    [line] = [r.getMessage() for r in caplog.records if r.name == "dtgserver.session"]
    assert "end=answer not read in time" in line


# -- huge declared sizes ------------------------------------------------------------------------


async def test_body_count_32767_answered_1_from_the_header_alone(tmp_path: Path,
                                                                  autojump_clock: trio.abc.Clock) -> None:
    async with memory_session(tmp_path) as (_server, client):  # max_body_count 3600
        await client.send_all(realtime_header(32767))  # 16 bytes announcing 1.67 MB
        assert await read_until_closed(client) == FORMAT_ERROR
    assert stored(tmp_path) == []


async def test_body_count_32767_allowed_buffers_one_frame_then_times_out(tmp_path: Path,
                                                                         autojump_clock: trio.abc.Clock) -> None:
    """With the limit raised to the wire's maximum, the bytes wait for their frame, and the timeouts still cut."""
    async with memory_session(tmp_path, max_body_count=32767) as (_server, client):
        await client.send_all(realtime_header(32767) + bytes(1000))
        assert await read_until_closed(client) == b""  # idle timeout: no answer, nothing kept
    assert stored(tmp_path) == []


async def test_log_size_32767_whole_is_stored_part_is_dropped(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    log = b"A" * 32766 + b"\n"
    async with memory_session(tmp_path) as (_server, client):
        await client.send_all(status_log_frame(MODEM, log))
        assert await client.receive_some(2) == OK
    files = list((tmp_path / "logs" / "01099998888").iterdir())
    assert [f.stat().st_size for f in files] == [32767]

    async with memory_session(tmp_path / "part") as (_server, client):
        await client.send_all(status_log_frame(MODEM, log)[:20000])
        assert await read_until_closed(client) == b""
    assert stored(tmp_path / "part") == []
    assert not (tmp_path / "part" / "logs").exists()


async def test_memory_bounded_by_the_frame_not_the_stream(tmp_path: Path) -> None:
    """The biggest frame the defaults allow (3600 bodies, 184 kB), sent 2 and 8 times on one connection:
    the peak of traced memory does not grow with the stream."""
    packet = dtg_bytes(bodies=3600)
    assert len(packet) == 23 + 3600 * 51
    peaks = {}
    async with running(tmp_path) as server:
        assert server.port
        assert await exchange(server.port, packet) == OK  # warm-up: first commit, caches
        with traced(), trio.fail_after(120):
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                for times in (2, 8):
                    tracemalloc.reset_peak()
                    base = tracemalloc.get_traced_memory()[0]
                    for _ in range(times):
                        await stream.send_all(packet)
                        assert await stream.receive_some(2) == OK
                    peaks[times] = tracemalloc.get_traced_memory()[1] - base
    assert len(stored(tmp_path)) == 1
    assert peaks[8] < 1.5 * peaks[2] + 1_000_000, peaks
    assert peaks[8] < 64 * len(packet), peaks  # one decoded frame at a time, not the stream


# -- hostile modems -------------------------------------------------------------------------------

HOSTILE_MODEMS = [
    b"../../../tm", b"..\x00..\x00etc\x00\x00", b"0101234/../", b"/etc/passwd", b"\x00" * 11, b"0101234567\x00",
    b"\n\x1b[31m12345", b"#####../../", b"\xbc\xad\xbf\xef..\\..\\x", b"01012345678",
]


async def test_modem_with_path_or_nul_never_names_a_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    answers = {}
    async with running(data_dir) as server:
        assert server.port
        for modem in HOSTILE_MODEMS:
            answers[modem] = await exchange(server.port, status_log_frame(modem, b"hello"))
    assert set(answers.values()) <= {OK, FORMAT_ERROR}, answers
    assert answers[b"../../../tm"] == answers[b"/etc/passwd"] == answers[b"\n\x1b[31m12345"] == FORMAT_ERROR
    # NULs are the spec's raw digit 0 (0x00-0x09 are digits), so an all-NUL modem is the number 00000000000.
    assert answers[b"\x00" * 11] == answers[b"0101234567\x00"] == OK
    stored_modems = {m for m, _, _ in stored(data_dir)}
    assert stored_modems == {"00000000000", "01012345670", "01012345678"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # nothing beside the data dir
    for path in data_dir.rglob("*"):
        relative = path.relative_to(data_dir).parts
        if relative[0] == "logs":
            assert all(re.fullmatch(r"[0-9]+(_[0-9a-f]{16}\.log|\.log)?", part) for part in relative[1:]), path
            assert len(relative) < 3 or relative[1] in stored_modems
        else:
            assert len(relative) == 1 and relative[0].split(".")[0] in {"store-0", "control"}, path


async def test_session_log_is_one_printable_line_per_session(tmp_path: Path, autojump_clock: trio.abc.Clock,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "dtgserver.session")
    frames = [status_log_frame(m, b"x\n\x1b") for m in HOSTILE_MODEMS] + [
        realtime_header(-1), realtime_header(32767), b"\x00\n\r\x1b\x7f", "ㄱ\u2028\u0085".encode("utf-8")]
    for n, frame in enumerate(frames):
        async with memory_session(tmp_path / str(n)) as (_server, client):
            await client.send_all(frame)
            await read_until_closed(client)
    lines = [r.getMessage() for r in caplog.records if r.name == "dtgserver.session"]
    assert len(lines) == len(frames)
    for line in lines:
        assert line.isprintable() and "\n" not in line, repr(line)


async def test_sessions_cut_by_shutdown_still_log_their_line(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "dtgserver.session")
    async with running(tmp_path, grace_period=0.2) as server:
        assert server.port
        streams = [await trio.open_tcp_stream("127.0.0.1", server.port) for _ in range(3)]
        with trio.fail_after(5):
            while server.metrics.open_connections < 3:
                await trio.sleep(0.01)
    for stream in streams:
        await stream.aclose()
    lines = [r.getMessage() for r in caplog.records if r.name == "dtgserver.session"]
    assert len(lines) == 3, lines
    assert sum(server.metrics.sessions.values()) == 3


# -- many connections -----------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib * 1024


async def test_two_thousand_idle_connections_all_closed_by_the_idle_timeout(tmp_path: Path) -> None:
    """2000 connections that never send, opened at once over real TCP: all held, all closed by the idle
    timeout, and the memory they cost (RSS: tracing would slow the opening past the timeout) is bounded."""
    count = 2000
    with open_files_limit(4 * count + 256) as limit:
        assert limit >= 2 * count + 256, f"RLIMIT_NOFILE hard limit {limit} too low for {count} connections"
        # A longer idle timeout than the default 3 s: all 2000 must be open at once on a busy 2-core machine.
        async with running(tmp_path, idle_timeout=6.0) as server:
            port = server.port
            assert port
            streams: list[trio.SocketStream] = []

            async def connect() -> None:
                streams.append(await trio.open_tcp_stream("127.0.0.1", port))

            before = rss_bytes()
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    for _ in range(count):
                        nursery.start_soon(connect)
                while server.metrics.open_connections < count:
                    await trio.sleep(0.05)
            per_connection = (rss_bytes() - before) / count
            closed = 0

            async def wait_closed(stream: trio.SocketStream) -> None:
                nonlocal closed
                assert await stream.receive_some(16) == b""
                closed += 1

            with trio.fail_after(30):  # the idle timeout closes all long before
                async with trio.open_nursery() as nursery:
                    for stream in streams:
                        nursery.start_soon(wait_closed, stream)
            for stream in streams:
                await stream.aclose()
            assert server.metrics.open_connections == 0
            assert closed == count
    assert per_connection < 64_000, per_connection  # both ends of a connection, in this one process
    assert server.metrics.sessions["none"] == count
    assert server.metrics.rejected_connections == 0


async def test_connection_flood_answered_4_and_a_good_terminal_still_served(tmp_path: Path) -> None:
    held, flood = 100, 300
    with open_files_limit(4 * (held + flood) + 256):
        async with running(tmp_path, max_connections=held, idle_timeout=30.0) as server:
            port = server.port
            assert port
            holders = []
            with trio.fail_after(20):
                for _ in range(held):
                    holders.append(await trio.open_tcp_stream("127.0.0.1", port))
                while server.metrics.open_connections < held:
                    await trio.sleep(0.01)
            answers: list[bytes] = []

            async def flooder() -> None:
                answers.append(await exchange(port, read=-1))

            with trio.fail_after(20):  # each rejection is immediate; the flood never hangs
                async with trio.open_nursery() as nursery:
                    for _ in range(flood):
                        nursery.start_soon(flooder)
                    assert await exchange(port, dtg_bytes()) == OVERLOADED  # a terminal during the flood: told to retry
            assert answers == [OVERLOADED] * flood
            assert server.metrics.rejected_connections == flood + 1
            for stream in holders:
                await stream.aclose()
            with trio.fail_after(10):
                while server.metrics.open_connections:
                    await trio.sleep(0.01)
                assert await exchange(port, dtg_bytes()) == OK  # and served once the flood is gone
    assert len(stored(tmp_path)) == 1


async def test_file_descriptors_exhausted_the_server_waits_and_recovers(tmp_path: Path) -> None:
    """A server process with 20 spare file descriptors and 60 connections at once: accept() fails with
    EMFILE, the server retries instead of dying, every connection is served (closed by the idle
    timeout) as descriptors free up, and a terminal is answered 0 afterwards."""
    port = free_port()
    process = await start_server(tmp_path, port, "--idle-timeout", "0.5")
    try:
        in_use = len(os.listdir(f"/proc/{process.pid}/fd"))
        _, hard = resource.prlimit(process.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(process.pid, resource.RLIMIT_NOFILE, (in_use + 20, hard))
        streams = []
        with trio.fail_after(30):
            for _ in range(60):
                streams.append(await trio.open_tcp_stream("127.0.0.1", port))  # the kernel's backlog accepts
            for stream in streams:
                assert await stream.receive_some(16) == b""  # each one reached a session and was timed out
                await stream.aclose()
        assert await exchange(port, dtg_bytes()) == OK
    finally:
        code, log = stop(process)
    assert code == 0, log
    assert "accept failed (EMFILE); retrying in 100 ms" in log
    assert len(stored(tmp_path)) == 1


async def test_memory_flat_under_repeated_hostile_rounds(tmp_path: Path) -> None:
    """Rounds of every hostile input over real TCP; traced memory after round 6 is where it was after round 2."""
    inputs = [realtime_header(32767), realtime_header(-5), b"\xff" * 64, status_log_frame(b"../../../tm", b"x"),
              dtg_bytes(bodies=5), dtg_bytes(bodies=60)[:500], status_log_frame(MODEM, b"y" * 1000)]
    sizes = []
    async with running(tmp_path, idle_timeout=0.2) as server:
        port = server.port
        assert port
        with traced():
            for _ in range(6):
                with trio.fail_after(30):
                    async with trio.open_nursery() as nursery:
                        for _ in range(10):
                            for frame in inputs:
                                nursery.start_soon(functools.partial(exchange, port, frame, read=-1))
                    while server.metrics.open_connections:
                        await trio.sleep(0.01)
                sizes.append(tracemalloc.get_traced_memory()[0])
    # What still grows is trio's: a finished scope's deadline entry (the 10 s send and test timeouts)
    # stays in its heap until the deadline passes, ~50 kB a round here; it levels off after 10 s.
    assert sizes[5] - sizes[1] < 500_000, sizes


# -- where the server listens -----------------------------------------------------------------------


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on `port`, from /proc/net/tcp and tcp6."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for row in list(f)[1:]:
                local, state = row.split()[1], row.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.add(address)
    return found


async def test_metrics_endpoint_listens_on_loopback_by_default(tmp_path: Path) -> None:
    assert ServerConfig().metrics_host == "127.0.0.1"
    [host_option] = [p for p in serve.params if p.name == "metrics_host"]
    assert host_option.default == "127.0.0.1"
    async with running(tmp_path, host="0.0.0.0", metrics_port=0) as server:  # the terminal port: all interfaces
        assert server.metrics_port and server.port
        assert listening_addresses(server.metrics_port) == {"0100007F"}  # 127.0.0.1, little-endian hex
        assert listening_addresses(server.port) == {"00000000"}
    assert os.path.exists(tmp_path / "store-0.db")
