"""The relay between server processes, attacked by another local user (`nobody`).

The relay carries every packet of `--workers N` (to the worker of its terminal's shard) and of
`--writer-process` (to the writer), and the answer 0 comes back over it. Whoever can listen in
its place can answer 0 to packets it never stores; whoever can connect to it can have packets
stored in the name of any terminal. The sockets live in `DIR/.relay` (mode 0700, the server's
user) and both ends check the other's uid (SO_PEERCRED). Each attacker here is a child process
started as root that drops to `nobody` before doing anything else.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from serverproc import free_port, send
from test_workers import modem_of_shard, start_workers, stop, stored_modems, two_workers_in_process
from test_writer_process import finish, start_split

from dtgserver.server.app import DtgServer
from dtgserver.server.config import ServerConfig
from dtgserver.server.relay import REQUEST, RelayDir, RelayDirError
from dtgserver.testing import dtg_bytes

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")

OK, OVERLOADED = b"\x09\x00", b"\x09\x04"
NOBODY = 65534

# Every module is imported before the switch: `nobody` may not read this Python's library.
IMPORTS = "import errno, hashlib, json, os, select, socket, struct, sys, time\n"
DROP = IMPORTS + "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"

# Takes every name the relay could listen on before the server starts (the abstract names it
# used before: sha256 of DIR and the port), answers 0 to every request that reaches it, and
# meanwhile tries to connect to, or bind, every relay socket it can name under DIR.
ATTACKER = DROP + r'''
data_dir, port, shards = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
REQUEST, ANSWER = struct.Struct(">IdIH"), struct.Struct(">IB")
report = {"squatted": 0, "accepted": 0, "received": 0, "answered_0": 0, "connected": [], "bound": [], "refused": {}}
tag = hashlib.sha256(f"{os.path.realpath(data_dir)}:{port}".encode()).hexdigest()[:24]
listeners, links = [], {}
for shard in range(shards):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(f"\0dtgserver-{tag}-{shard}".encode())
    s.listen(64)
    listeners.append(s)
    report["squatted"] += 1
print("ready", flush=True)

def names():
    found = {os.path.join(data_dir, ".relay", f"{port}-{shard}") for shard in range(shards)}
    for root, dirs, files in os.walk(data_dir):
        found.update(os.path.join(root, f) for f in files)
    return sorted(found)

next_probe = 0.0
while True:
    readable, _, _ = select.select([sys.stdin, *listeners, *links], [], [], 0.05)
    for r in readable:
        if r is sys.stdin:
            print(json.dumps(report), flush=True)
            sys.exit(0)
        if r in listeners:
            link, _ = r.accept()
            report["accepted"] += 1
            links[link] = b""
            continue
        data = r.recv(65536)
        if not data:
            del links[r]
            r.close()
            continue
        report["received"] += len(data)
        buffer = links[r] + data
        while len(buffer) >= REQUEST.size:
            call, _, length, peer = REQUEST.unpack_from(buffer)
            if len(buffer) < REQUEST.size + peer + length:
                break
            buffer = buffer[REQUEST.size + peer + length:]
            r.sendall(ANSWER.pack(call, 0))
            report["answered_0"] += 1
        links[r] = buffer
    if time.monotonic() >= next_probe:
        next_probe = time.monotonic() + 0.2
        for path in names():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                report["connected"].append(path)
            except OSError as e:
                report["refused"][path] = errno.errorcode.get(e.errno, str(e.errno))
            finally:
                probe.close()
        for shard in range(shards):
            path = os.path.join(data_dir, ".relay", f"{port}-{shard}.new")
            taker = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                taker.bind(path)
                report["bound"].append(path)
            except OSError as e:
                report["refused"][path] = errno.errorcode.get(e.errno, str(e.errno))
            finally:
                taker.close()
'''


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A data directory every user may look into (tmp_path's parents are root's alone), as an
    attacker would find a real one: the relay must not depend on DIR being private."""
    path = Path(tempfile.mkdtemp(prefix="dtg-relay-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def as_nobody(script: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd="/", stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def report_of(attacker: subprocess.Popen[bytes]) -> dict[str, object]:
    out, err = attacker.communicate(timeout=20)  # closes its stdin: the attacker reports and exits
    assert attacker.returncode == 0, err.decode()
    return dict(json.loads(out.decode().splitlines()[-1]))


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--writer-process"], ["--workers", "2"]], ids=["writer-process", "workers-2"])
async def test_another_user_can_neither_take_nor_reach_the_relay(public_dir: Path, layout: list[str]) -> None:
    """Before: `nobody` took the abstract names first; 10 of 10 packets were answered 0 by it and
    not stored. Now the names it holds are no relay's, and DIR/.relay keeps it out."""
    port = free_port()
    attacker = as_nobody(ATTACKER, str(public_dir), str(port), "2")
    try:
        assert attacker.stdout is not None and attacker.stdout.readline() == b"ready\n"
        if layout[0] == "--writer-process":
            process = await start_split(public_dir, port, workers=2)
        else:
            process = await start_workers(public_dir, port, 2)
        packets = [dtg_bytes(modem_of_shard(shard), minute=n, bodies=2) for n in range(5) for shard in (0, 1)]
        try:
            with trio.fail_after(60):
                answers = [await send(port, raw) for raw in packets]
                await trio.sleep(0.5)  # the attacker probes again while the relay is in use
        finally:
            code = finish(process)[0] if layout[0] == "--writer-process" else stop(process)
    finally:
        report = report_of(attacker)
    assert code == 0
    assert answers == [OK] * len(packets)
    stored = [m for shard in (0, 1) for m in stored_modems(public_dir / f"store-{shard}.db")]
    assert sorted(stored) == sorted([modem_of_shard(0), modem_of_shard(1)] * 5)  # every packet answered 0
    assert report["squatted"] == 2  # it held the old names the whole time, and got nothing through them
    assert (report["accepted"], report["received"], report["answered_0"]) == (0, 0, 0)
    assert report["connected"] == [] and report["bound"] == []
    relay = public_dir / ".relay"
    refused = report["refused"]
    assert isinstance(refused, dict)
    assert refused[str(relay / f"{port}-0")] == "EACCES" and refused[str(relay / f"{port}-0.new")] == "EACCES"
    assert stat.S_IMODE(relay.stat().st_mode) == 0o700 and relay.stat().st_uid == 0


async def test_the_owner_refuses_a_link_from_another_user(public_dir: Path) -> None:
    """With the directory opened up on purpose, `nobody` reaches the socket: the owner checks the
    peer's uid and closes the link unanswered, storing nothing."""
    frame = dtg_bytes(modem_of_shard(1), minute=0, bodies=1)
    request = REQUEST.pack(1, time.time(), len(frame), 4) + b"test" + frame
    child = DROP + (
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
        "s.connect(sys.argv[1])\n"
        "s.settimeout(5)\n"
        "try:\n"
        "    s.sendall(bytes.fromhex(sys.argv[2]))\n"
        "    print(repr(s.recv(64)))\n"
        "except ConnectionError:\n"
        "    print(repr(b''))  # closed (a reset: the request was never read)\n"
    )
    async with two_workers_in_process(public_dir) as servers:
        port = servers[0].port
        name = public_dir / ".relay" / f"{port}-1"
        (public_dir / ".relay").chmod(0o711)
        name.chmod(0o777)
        with trio.fail_after(20):
            result = await trio.run_process([sys.executable, "-c", child, str(name), request.hex()],
                                            capture_stdout=True, capture_stderr=True, cwd="/")
        received = servers[1].relay.received if servers[1].relay else -1
    assert result.stdout.decode().strip() == "b''", result.stderr.decode()  # closed without an answer
    assert received == 0
    assert stored_modems(public_dir / "store-1.db") == []


async def test_a_relay_socket_held_by_another_user_gets_no_packet(public_dir: Path) -> None:
    """A socket of `nobody` put where worker 1's should be (root moves it there: `nobody` cannot):
    worker 0 checks who listens before it sends, answers 4, and the listener receives nothing."""
    holder = DROP + (
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
        "s.bind(sys.argv[1]); s.listen(8)\n"
        "print('ready', flush=True)\n"
        "s.settimeout(0.1)\n"
        "received = accepted = 0\n"
        "while True:\n"
        "    if select.select([sys.stdin], [], [], 0)[0]:\n"
        "        break\n"
        "    try:\n"
        "        link, _ = s.accept()\n"
        "    except TimeoutError:\n"
        "        continue\n"
        "    accepted += 1\n"
        "    link.settimeout(1)\n"
        "    try:\n"
        "        while data := link.recv(65536):\n"
        "            received += len(data)\n"
        "            link.sendall(b'\\0\\0\\0\\1\\0')\n"
        "    except OSError:\n"
        "        pass\n"
        "print(accepted, received)\n"
    )
    drop_box = public_dir / "box"
    drop_box.mkdir()
    drop_box.chmod(0o777)
    port = free_port()
    config = ServerConfig(host="127.0.0.1", port=port, data_dir=public_dir / "data", grace_period=1.0)
    survivor = DtgServer(config, shard=0, shards=2, reuse_port=True)  # worker 1's name is free
    attacker = as_nobody(holder, str(drop_box / "sock"))
    assert attacker.stdout is not None and attacker.stdout.readline() == b"ready\n"
    try:
        os.rename(drop_box / "sock", public_dir / "data" / ".relay" / f"{port}-1")
        async with trio.open_nursery() as nursery:
            await nursery.start(survivor.run)
            with trio.fail_after(10):
                answer = await send(port, dtg_bytes(modem_of_shard(1), minute=0, bodies=1))
            survivor.stop()
    finally:
        out, _ = attacker.communicate(timeout=20)
    accepted, received = map(int, out.decode().split())
    assert answer == OVERLOADED
    assert accepted >= 1, "worker 0 did try the socket"  # connected, checked, closed: nothing sent
    assert received == 0, "a packet went to another user's socket"


def test_the_relay_directory_is_the_servers_alone(tmp_path: Path) -> None:
    relay = RelayDir(tmp_path / "new")
    info = os.stat(tmp_path / "new" / ".relay")
    relay.close()
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.geteuid()

    (tmp_path / "loose" / ".relay").mkdir(parents=True)
    (tmp_path / "loose" / ".relay").chmod(0o777)
    RelayDir(tmp_path / "loose").close()  # tightened
    assert stat.S_IMODE((tmp_path / "loose" / ".relay").stat().st_mode) == 0o700

    (tmp_path / "theirs" / ".relay").mkdir(parents=True)
    os.chown(tmp_path / "theirs" / ".relay", NOBODY, NOBODY)
    with pytest.raises(RelayDirError, match="belongs to uid 65534"):
        RelayDir(tmp_path / "theirs")

    (tmp_path / "link").mkdir()
    (tmp_path / "link" / ".relay").symlink_to(tmp_path / "new" / ".relay")
    with pytest.raises(RelayDirError, match="not a symlink"):
        RelayDir(tmp_path / "link")


def test_serve_refuses_a_relay_directory_of_another_user(tmp_path: Path) -> None:
    (tmp_path / ".relay").mkdir()
    os.chown(tmp_path / ".relay", NOBODY, NOBODY)
    result = subprocess.run(
        [sys.executable, "-m", "dtgserver", "serve", "--host", "127.0.0.1", "--port", str(free_port()),
         "--data-dir", str(tmp_path), "--writer-process", "-q"],
        capture_output=True, timeout=60, check=False,
    )
    assert result.returncode == 1
    assert result.stderr.decode().strip() == (
        f"dtgserver: error: {tmp_path / '.relay'} belongs to uid 65534, not to this server's uid 0: "
        "remove it, the server makes its own")
    assert not list(tmp_path.glob("store-*.db"))


def test_one_process_makes_no_relay_directory(tmp_path: Path) -> None:
    server = DtgServer(ServerConfig(data_dir=tmp_path))
    server.control.close()
    for store in server.stores.values():
        store.close()
    assert server.relay_dir is None and not (tmp_path / ".relay").exists()
