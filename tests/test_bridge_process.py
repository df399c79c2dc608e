"""The bridge under faults, as real processes: `serve --mqtt` and `dtgserver bridge` killed, a foreign
lock on their files, a full disk; a real Mosquitto and a real subscriber.

The promise under test: every packet answered 0 has its messages reach a subscriber, each
terminal's in order (first deliveries; QoS 1 may repeat a message, recognisable by its `id`),
and nothing but a signal ends the server.
"""

from __future__ import annotations

import json
import resource
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
from mosquitto import Mosquitto, Subscriber, broker_fixture  # noqa: F401  (the broker fixture)
from serverproc import free_port, send, start_server, stop

from dtgserver.bridge.cursor import read_position
from dtgserver.store import digest
from dtgserver.testing import dtg_bytes

pytestmark = pytest.mark.slow

OK = b"\x09\x00"
MODEMS = [f"0108888{n:04d}" for n in range(4)]


class Fleet:
    """Terminals sending one-minute DTG packets, each resending a packet until it is answered 0 (§4.5)."""

    def __init__(self, port: int, modems: list[str] = MODEMS) -> None:
        self.port = port
        self.modems = modems
        self.answered: dict[str, list[bytes]] = {m: [] for m in modems}  # answered 0, in order
        self.answers: list[bytes] = []
        self.minute = dict.fromkeys(modems, 0)

    @property
    def acknowledged(self) -> int:
        return sum(len(v) for v in self.answered.values())

    async def terminal(self, modem: str, packets: int, strict: bool = False) -> None:
        """Send `packets` more; strict: every answer must be 0 the first time."""
        for _ in range(packets):
            raw = dtg_bytes(modem, minute=self.minute[modem], bodies=10)
            while True:
                try:
                    answer = await send(self.port, raw)
                except (OSError, trio.BrokenResourceError, trio.TooSlowError):  # down (a reset), or slow: again
                    answer = b""
                self.answers.append(answer)
                if answer == OK:
                    break
                assert not strict, f"{modem} answered {answer!r}"
                await trio.sleep(0.1)
            self.answered[modem].append(raw)
            self.minute[modem] += 1
            await trio.sleep(0.01)

    async def run(self, packets: int, strict: bool = False) -> None:
        async with trio.open_nursery() as nursery:
            for modem in self.modems:
                nursery.start_soon(self.terminal, modem, packets, strict)

    async def until(self, acknowledged: int) -> None:
        with trio.fail_after(60):
            while self.acknowledged < acknowledged:
                await trio.sleep(0.01)

    def check_delivered(self, subscriber: Subscriber) -> None:
        """Each acknowledged packet's microtrip reached the subscriber; first deliveries in each terminal's order."""
        payloads = [json.loads(m.payload) for m in subscriber.messages]
        by_id: dict[str, dict[str, object]] = {}
        for p in payloads:
            assert by_id.setdefault(p["id"], p) == p  # a duplicate is the same message
        for modem, sent in self.answered.items():
            firsts = list(dict.fromkeys(p["id"] for m, p in zip(subscriber.messages, payloads, strict=True)
                                        if m.topic == f"v1/sensors/{modem}/tre"))
            assert [i.split(":")[0] for i in firsts] == [digest(raw).hex() for raw in sent], modem

    def packet_ids(self) -> set[str]:
        return {digest(raw).hex() for sent in self.answered.values() for raw in sent}


def delivered_ids(subscriber: Subscriber) -> set[str]:
    return {json.loads(m.payload)["id"].split(":")[0] for m in subscriber.messages}


async def all_delivered(subscriber: Subscriber, fleet: Fleet, data_dir: Path, timeout_s: float = 90) -> None:
    """Until every acknowledged packet's messages reached the subscriber; says what is missing if not."""
    try:
        await subscriber.wait_for(lambda s: delivered_ids(s) >= fleet.packet_ids(), timeout_s=timeout_s)
    except trio.TooSlowError:
        missing = fleet.packet_ids() - delivered_ids(subscriber)
        db = sqlite3.connect(data_dir / "store-0.db")
        try:
            positions = sorted(db.execute(f"SELECT id FROM packets WHERE hex(digest) IN "
                                          f"({','.join('?' * len(missing))})", [m.upper() for m in missing]))
        finally:
            db.close()
        raise AssertionError(f"{len(missing)} acknowledged packets not delivered, at positions {positions}; "
                             f"cursor {read_position(data_dir, 0)}, last {last_id(data_dir)}") from None


def last_id(data_dir: Path) -> int:
    db = sqlite3.connect(data_dir / "store-0.db")
    try:
        return int(db.execute("SELECT coalesce(max(id), 0) FROM packets").fetchone()[0])
    finally:
        db.close()


async def caught_up(data_dir: Path, timeout_s: float = 60) -> None:
    """Until the bridge's saved cursor is at the store's last packet."""
    with trio.fail_after(timeout_s):
        while read_position(data_dir, 0) != last_id(data_dir):
            await trio.sleep(0.05)


async def has_cursor(data_dir: Path) -> None:
    with trio.fail_after(30):
        while read_position(data_dir, 0) is None:
            await trio.sleep(0.05)


@contextmanager
def bridge_process(data_dir: Path, broker: Mosquitto, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`dtgserver bridge` beside a `serve` on the same data dir; its log in a file."""
    with log.open("ab") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "dtgserver", "bridge", "--data-dir", str(data_dir), "--mqtt", broker.url,
             "--client-id", "dtg-bridge-process", "-q"], stdout=subprocess.DEVNULL, stderr=err)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def test_serve_killed_while_forwarding_loses_no_acknowledged_packets_messages(
        tmp_path: Path, broker: Mosquitto) -> None:
    data, port = tmp_path / "data", free_port()
    fleet = Fleet(port)
    args = ("--mqtt", broker.url, "--client-id", "dtg-killed")
    with Subscriber(broker, "v1/sensors/#") as subscriber:
        process = await start_server(data, port, *args)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fleet.run, 15)
                await fleet.until(20)
                await subscriber.wait_count(5)  # forwarding is under way
                stop(process, signal.SIGKILL)
                await trio.sleep(0.3)  # terminals meanwhile get no answer and retry
                process = await start_server(data, port, *args)
            await all_delivered(subscriber, fleet, data)
            await caught_up(data)
        finally:
            code, log = stop(process)
            print(log)  # shown when the test fails
    assert code == 0, log
    fleet.check_delivered(subscriber)


async def test_the_bridge_process_killed_and_restarted_alone_while_serve_answers_0(
        tmp_path: Path, broker: Mosquitto) -> None:
    data, port = tmp_path / "data", free_port()
    fleet = Fleet(port)
    server = await start_server(data, port)  # stores only: the bridge is its own process
    try:
        with Subscriber(broker, "v1/sensors/#") as subscriber:
            with bridge_process(data, broker, tmp_path / "bridge.log") as bridge:
                await has_cursor(data)  # a first start skips what is already stored: start it first
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(fleet.run, 6, True)  # strict: every answer 0
                    await subscriber.wait_count(5)
                    bridge.send_signal(signal.SIGKILL)
                    bridge.wait(timeout=10)
            await fleet.run(4, strict=True)  # no bridge at all: serve answers 0 all the same
            assert fleet.answers == [OK] * len(fleet.answers)
            with bridge_process(data, broker, tmp_path / "bridge.log"):
                await all_delivered(subscriber, fleet, data)
                await caught_up(data)
    finally:
        code, log = stop(server)
    assert code == 0, log
    fleet.check_delivered(subscriber)
    assert read_position(data, 0) == fleet.acknowledged


async def test_foreign_locks_on_the_bridge_file_and_the_store_while_forwarding(
        tmp_path: Path, broker: Mosquitto) -> None:
    """`sqlite3 bridge-0.db 'BEGIN EXCLUSIVE'`, then `sqlite3 store-0.db 'BEGIN EXCLUSIVE'` for 12 s,
    each while PUBACKs arrive: the server stays up and catches up."""
    data, port = tmp_path / "data", free_port()
    fleet = Fleet(port)
    with Subscriber(broker, "v1/sensors/#") as subscriber:
        process = await start_server(data, port, "--mqtt", broker.url, "--client-id", "dtg-locked")
        try:
            await fleet.run(2, strict=True)
            await caught_up(data)
            for name, seconds in (("bridge-0.db", 4), ("store-0.db", 12)):
                async with trio.open_nursery() as nursery:
                    foreign = sqlite3.connect(data / name, isolation_level=None)
                    foreign.execute("BEGIN EXCLUSIVE")
                    try:
                        # the bridge's lock blocks nothing on the answers' way; the store's holds the
                        # commits (answered 4 after the writer's 10 s wait, then resent)
                        nursery.start_soon(fleet.run, 2, name == "bridge-0.db")  # strict for the bridge's file
                        await trio.sleep(seconds)
                        assert process.poll() is None, f"the server died of a lock on {name}"
                    finally:
                        foreign.execute("ROLLBACK")
                        foreign.close()
                await fleet.run(1)
            await all_delivered(subscriber, fleet, data)
            await caught_up(data)
        finally:
            code, log = stop(process)
            print(log)  # shown when the test fails
    assert code == 0, log
    assert "saving the bridge's cursor" in log  # the blocked save: logged, retried
    fleet.check_delivered(subscriber)


async def test_a_full_disk_while_forwarding_the_server_stays_up_and_catches_up(
        tmp_path: Path, broker: Mosquitto) -> None:
    """Writes fail (RLIMIT_FSIZE 1 byte, as tests/test_faults.py does) while the broker acknowledges:
    the bridge's cursor saves fail and are retried, new packets are answered 4; space again: all caught up."""
    data, port = tmp_path / "data", free_port()
    fleet = Fleet(port)
    with Subscriber(broker, "v1/sensors/#") as subscriber:
        process = await start_server(data, port, "--mqtt", broker.url, "--client-id", "dtg-full")
        try:
            await fleet.run(1, strict=True)
            await caught_up(data)
            broker.pause()  # acknowledgements held back: they arrive once the disk is full
            try:
                await fleet.run(2, strict=True)
            finally:
                _, hard = resource.prlimit(process.pid, resource.RLIMIT_FSIZE)
                resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (1, hard))
                broker.resume()
            try:
                await all_delivered(subscriber, fleet, data)
                assert await send(port, dtg_bytes(MODEMS[0], minute=99, bodies=10)) == b"\x09\x04"  # not 0
                await trio.sleep(1.5)  # the saves fail meanwhile
                assert process.poll() is None, "the server died of a full disk"
                assert read_position(data, 0) != last_id(data)
            finally:
                resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (hard, hard))
            await fleet.run(2, strict=True)
            await all_delivered(subscriber, fleet, data)
            await caught_up(data)
        finally:
            code, log = stop(process)
            print(log)  # shown when the test fails
    assert code == 0, log
    assert "saving the bridge's cursor" in log
    fleet.check_delivered(subscriber)
