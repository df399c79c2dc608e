"""The structured session log: one line per connection on "dtgserver.session", over real TCP.

A line reads `session peer=… modem=… kind=… bodies=… result=… duration_ms=… end=…`; whatever
came from the device is escaped so that one session is always one printable line.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from test_server import memory_session, read_until_closed, running

from dtgserver import logs
from dtgserver.protocol import encode
from dtgserver.server.app import Session, printable
from dtgserver.testing import basic_info, dtg_bytes, key_off

FIELDS = ["peer", "modem", "kind", "bodies", "result", "duration_ms", "end"]


@pytest.fixture(autouse=True)
def session_records(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Session lines reach caplog whatever an earlier logs.configure() left behind; restored after."""
    logger = logging.getLogger("dtgserver")
    saved = logger.level, list(logger.handlers), logger.propagate
    logger.setLevel(logging.NOTSET)
    logger.handlers[:] = []
    logger.propagate = True
    caplog.set_level(logging.INFO, logger="dtgserver.session")
    yield
    logger.setLevel(saved[0])
    logger.handlers[:] = saved[1]
    logger.propagate = saved[2]


def parse(line: str) -> dict[str, str]:
    """`session k=v k=v ... end=<rest of the line>` → {k: v}, the keys in the documented order."""
    head, _, end = line.partition(" end=")
    words = head.split(" ")
    assert words[0] == "session"
    fields = dict(word.split("=", 1) for word in words[1:])
    fields["end"] = end
    assert list(fields) == FIELDS, line
    return fields


def session_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, str]]:
    records = [r for r in caplog.records if r.name == "dtgserver.session"]
    assert all(r.levelno == logging.INFO for r in records)
    return [parse(r.getMessage()) for r in records]


async def connect(port: int) -> tuple[trio.SocketStream, str]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    host, local_port = stream.socket.getsockname()[:2]
    return stream, f"{host}:{local_port}"


async def read_all(stream: trio.SocketStream, size: int) -> bytes:
    data = b""
    while len(data) < size and (chunk := await stream.receive_some(size)):
        data += chunk
    return data


async def test_one_line_per_session_with_every_field(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with running(tmp_path) as server:
        assert server.port
        with trio.fail_after(10):
            stream, peer = await connect(server.port)
            async with stream:
                await stream.send_all(encode(basic_info()) + dtg_bytes(bodies=60) + encode(key_off()))
                assert await read_all(stream, 6) == b"\x09\x00" * 3
                await trio.sleep(0.1)  # the session lasts at least this long
    (line,) = session_lines(caplog)
    assert line["peer"] == peer
    assert line["modem"] == "01012345678"
    assert line["kind"] == "basic_info,dtg,key_off"
    assert line["bodies"] == "60"
    assert line["result"] == "0,0,0"
    assert float(line["duration_ms"]) >= 100.0
    assert line["end"] == "closed"


async def test_each_connection_its_own_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    peers = []
    async with running(tmp_path) as server:
        assert server.port
        with trio.fail_after(10):
            for minute in range(3):
                stream, peer = await connect(server.port)
                peers.append(peer)
                async with stream:
                    await stream.send_all(dtg_bytes(f"0101234567{minute}", minute=minute, bodies=2))
                    assert await read_all(stream, 2) == b"\x09\x00"
    lines = session_lines(caplog)
    assert sorted(line["peer"] for line in lines) == sorted(peers)
    assert sorted(line["modem"] for line in lines) == ["01012345670", "01012345671", "01012345672"]
    assert {(line["kind"], line["bodies"], line["result"]) for line in lines} == {("dtg", "2", "0")}


async def test_format_error_session(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with running(tmp_path) as server:
        assert server.port
        with trio.fail_after(10):
            stream, peer = await connect(server.port)
            async with stream:
                await stream.send_all(dtg_bytes(bodies=1) + b"\x05" + bytes(40))
                assert await read_all(stream, 10) == b"\x09\x00\x09\x01"  # then closed
    (line,) = session_lines(caplog)
    assert (line["peer"], line["modem"], line["kind"], line["bodies"]) == (peer, "01012345678", "dtg", "1")
    assert line["result"] == "0,1"
    offset = len(dtg_bytes(bodies=1))  # counted from the start of the connection's stream
    assert line["end"] == f"format error at byte {offset}: unknown protocol ID 0x05"


async def test_half_a_packet_then_idle(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                      autojump_clock: trio.abc.Clock) -> None:
    async with memory_session(tmp_path) as (_server, client):
        await client.send_all(dtg_bytes()[:100])
        assert await read_until_closed(client) == b""  # closed, unanswered
        await trio.testing.wait_all_tasks_blocked()
    (line,) = session_lines(caplog)
    assert [line[k] for k in ("peer", "modem", "kind", "bodies", "result")] == ["memory:0", "-", "-", "0", "-"]
    assert line["end"] == "idle timeout, 100 bytes of a packet dropped"


async def test_slow_drip_session(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                 autojump_clock: trio.abc.Clock) -> None:
    packet = dtg_bytes()
    async with memory_session(tmp_path, packet_timeout=30.0) as (_server, client):
        with trio.move_on_after(60):
            for byte in packet:  # a byte every 2 s: never idle, never whole
                try:
                    await client.send_all(bytes([byte]))
                except trio.BrokenResourceError:
                    break
                await trio.sleep(2)
        await trio.testing.wait_all_tasks_blocked()
    (line,) = session_lines(caplog)
    assert line["result"] == "-"
    # byte 16 is sent at the 30 s deadline itself: whether it is in depends on the timeout tick
    assert line["end"] in (f"packet timeout, {n} bytes of a packet dropped" for n in (15, 16))


async def test_device_bytes_cannot_break_the_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    packet = bytearray(dtg_bytes(bodies=1))
    packet[1:12] = b"\x1b[2J\n\r\x00\x85\\ab"  # a modem number made of terminal escapes and line breaks
    async with running(tmp_path) as server:
        assert server.port
        with trio.fail_after(10):
            stream, _ = await connect(server.port)
            async with stream:
                await stream.send_all(bytes(packet))
                assert await read_all(stream, 4) == b"\x09\x01"
    (record,) = [r for r in caplog.records if r.name == "dtgserver.session"]
    message = record.getMessage()
    assert message.isprintable() and "\x1b" not in message and "\n" not in message
    line = parse(message)
    assert line["result"] == "1" and line["modem"] == "-"
    # The error quotes the bytes (repr), and the log escapes that once more (a backslash is \\):
    # unescaped once, the line gives back the error message exactly.
    expected = "format error at byte 1: modem number b'\\x1b[2J\\n\\r\\x00\\x85\\\\ab' is not digits"
    assert line["end"].encode("ascii").decode("unicode_escape") == expected


@pytest.mark.parametrize(("text", "shown"), [
    ("closed", "closed"),
    ("차량 로그 ok", "차량 로그 ok"),  # printable text stays readable, Hangul included
    ("a\nb", r"a\nb"),
    ("\x1b[31mred", r"\x1b[31mred"),
    ("nul\x00", r"nul\x00"),
    ("c1\x85 del\x7f", r"c1\x85 del\x7f"),
    ("line\u2028sep", r"line\u2028sep"),
    ("back\\slash", r"back\\slash"),  # escaped too, so an escape in the line is never ambiguous
])
def test_printable_escapes_control_characters(text: str, shown: str) -> None:
    assert printable(text) == shown
    assert printable(text).isprintable()


def test_session_line_escapes_its_end() -> None:
    session = Session("127.0.0.1:5000", "01012345678", ["dtg"], 3, [0, 1], "format error \x1b]0;pwned\x07\n")
    line = session.line(0.0125)
    assert line == (r"session peer=127.0.0.1:5000 modem=01012345678 kind=dtg bodies=3 result=0,1 duration_ms=12.5 "
                    r"end=format error \x1b]0;pwned\x07\n")
    assert parse(line)["duration_ms"] == "12.5"


async def one_session(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        assert server.port
        with trio.fail_after(10):
            stream, _ = await connect(server.port)
            async with stream:
                await stream.send_all(dtg_bytes(bodies=1))
                assert await read_all(stream, 2) == b"\x09\x00"


@pytest.mark.parametrize(("verbosity", "level", "lines"), [(-1, logging.WARNING, 0), (0, logging.INFO, 1),
                                                           (1, logging.DEBUG, 1), (2, logging.DEBUG, 1)])
async def test_quiet_suppresses_session_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture, verbosity: int,
                                              level: int, lines: int) -> None:
    logs.configure(verbosity)  # what `serve -q` / `serve` / `serve -v` do
    logger = logging.getLogger("dtgserver")
    assert logger.level == level and logger.propagate is False
    logger.addHandler(caplog.handler)  # the configured logger no longer propagates to caplog's
    caplog.handler.setLevel(logging.NOTSET)
    await one_session(tmp_path)
    assert len([r for r in caplog.records if r.name == "dtgserver.session"]) == lines
    assert logging.getLogger("dtgserver.session").isEnabledFor(logging.INFO) == (lines == 1)


# -- metrics: the other half of observability ----------------------------------------------------


def test_metrics_keep_every_digit() -> None:
    """A counter must keep moving: every value reads back exactly through prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    from dtgserver.server.metrics import Metrics

    metrics = Metrics(gauges={"committed_packets_total": lambda: 1_234_567, "commit_seconds_sum": lambda: 1234.000125,
                              "commits_total": lambda: 2**53 - 1, "mqtt_connected": lambda: True})
    metrics.packets["dtg"] = 10_000_001
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(metrics.render()) for s in family.samples}
    assert samples[("dtg_committed_packets_total", ())] == 1_234_567
    assert samples[("dtg_commit_seconds_sum", ())] == 1234.000125
    assert samples[("dtg_commits_total", ())] == 2**53 - 1 == samples[("dtg_commit_seconds_count", ())]
    assert samples[("dtg_mqtt_connected", ())] == 1
    assert samples[("dtg_packets_total", (("kind", "dtg"),))] == 10_000_001


# -- the real command: `dtgserver serve` with and without -q --------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("args", "env", "session_lines"), [([], {}, True), (["-q"], {}, False),
                                                             ([], {"DTGSERVER_QUIET": "1"}, False)])
async def test_serve_logs_sessions_to_stderr_unless_quiet(tmp_path: Path, args: list[str], env: dict[str, str],
                                                          session_lines: bool) -> None:
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stderr_path = tmp_path / "stderr.txt"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DTGSERVER_")} | env
    with open(stderr_path, "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "dtgserver", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--data-dir", str(tmp_path / "data"), *args], stdout=subprocess.DEVNULL, stderr=stderr, env=environment)
    try:
        with trio.fail_after(20):
            while True:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                    break
                except OSError:
                    assert process.poll() is None, stderr_path.read_text()
                    await trio.sleep(0.05)
            async with stream:
                await stream.send_all(dtg_bytes(bodies=1))
                assert await read_all(stream, 2) == b"\x09\x00"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    text = stderr_path.read_text("utf-8")
    found = [line for line in text.splitlines() if " INFO dtgserver.session session " in line]
    if session_lines:
        (mine,) = [parse(line.split(" INFO dtgserver.session ", 1)[1]) for line in found if "modem=0101" in line]
        assert (mine["kind"], mine["bodies"], mine["result"], mine["end"]) == ("dtg", "1", "0", "closed")
        assert "SIGTERM: shutting down" in text
    else:
        assert found == [] and " INFO " not in text, text


@pytest.mark.slow
@pytest.mark.parametrize("processes", [[], ["--workers", "2"], ["--writer-process"]])
async def test_serve_log_format_json_gives_a_session_its_fields(tmp_path: Path, processes: list[str]) -> None:
    """--log-format json: every stderr line one JSON object, in every process; a session's fields as JSON values."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from mosquitto import free_port

    port = free_port()
    stderr_path = tmp_path / "stderr.txt"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DTGSERVER_")}
    with open(stderr_path, "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "dtgserver", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--data-dir", str(tmp_path / "data"), "--log-format", "json", *processes],
            stdout=subprocess.DEVNULL, stderr=stderr, env=environment)
    try:
        with trio.fail_after(60):
            while True:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                    async with stream:
                        await stream.send_all(dtg_bytes(bodies=1))
                        if await read_all(stream, 2) == b"\x09\x00":
                            break
                except OSError:
                    pass
                assert process.poll() is None, stderr_path.read_text()
                await trio.sleep(0.1)
            ready = 1 if not processes else 2  # every process up (a stop before then is another matter)
            while ('"message": "session"' not in stderr_path.read_text("utf-8")
                   or len(re.findall(r'"message": "(listening on|writer of shard)', stderr_path.read_text())) < ready):
                await trio.sleep(0.05)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, stderr_path.read_text("utf-8")
    lines = [json.loads(line) for line in stderr_path.read_text("utf-8").splitlines()]  # each line JSON
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    sessions = [line for line in lines if line["message"] == "session" and line["result"] == [0]]
    assert sessions, lines
    mine = sessions[0]
    assert mine["logger"] == "dtgserver.session" and mine["level"] == "INFO"
    assert (mine["modem"], mine["kind"], mine["bodies"], mine["end"]) == ("01012345678", ["dtg"], 1, "closed")
    assert mine["peer"].startswith("127.0.0.1:") and isinstance(mine["duration_ms"], float)
    assert any(line["message"] == "SIGTERM: shutting down" for line in lines) or processes


def test_the_json_session_fields_are_the_text_line_fields() -> None:
    from dtgserver.server.app import Session

    session = Session("10.0.0.1:5000", "01012345678", ["dtg", "key_off"], 60, [0, 0], "format error at byte 3: \x1b")
    text = parse(session.line(0.0123))
    fields = session.fields(0.0123)
    assert set(fields) == set(text)
    assert fields == {"peer": "10.0.0.1:5000", "modem": "01012345678", "kind": ["dtg", "key_off"], "bodies": 60,
                      "result": [0, 0], "duration_ms": 12.3, "end": "format error at byte 3: \x1b"}
    assert Session("x:1").fields(0)["modem"] is None
