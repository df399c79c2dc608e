"""Helpers shared by the tests that talk to a server over loopback TCP or run it as a process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import trio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(count: int) -> int:
    """The first of `count` consecutive free ports (the metrics endpoints of several processes)."""
    while True:
        first = free_port()
        held: list[socket.socket] = []
        try:
            for port in range(first + 1, first + count):
                held.append(socket.socket())
                held[-1].bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in held:
                s.close()


async def send(port: int, packet: bytes, timeout_s: float = 10) -> bytes:
    """One packet on its own connection: the 2-byte answer, or less if the server closed first."""
    with trio.fail_after(timeout_s):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(packet)
            answer = b""
            while len(answer) < 2 and (chunk := await stream.receive_some(2)):
                answer += chunk
            return answer


async def start_server(data_dir: Path, port: int, *args: str) -> subprocess.Popen[bytes]:
    """`dtgserver serve -q` as a process on 127.0.0.1:port, returned once it accepts connections."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dtgserver", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(data_dir), "-q", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    with trio.fail_after(20):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return process


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> tuple[int, str]:
    """Signal the server; its exit code and what it logged."""
    if process.poll() is None:
        process.send_signal(sig)
    try:
        code = process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    assert process.stderr
    log = process.stderr.read().decode("utf-8", "replace")
    process.stderr.close()
    return code, log


# -- processes of `serve --workers N` / `--writer-process`, from /proc ------------------------------


def children(pid: int) -> list[int]:
    """The worker processes: listed under the thread that started them (trio starts processes from threads)."""
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found.extend(int(p) for p in f.read().split())
        except FileNotFoundError:  # the thread ended
            pass
    return sorted(found)


def listening(pid: int, port: int) -> bool:
    """Whether process `pid` holds a socket listening on 127.0.0.1:port (from /proc, no connection made)."""
    try:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    except OSError:
        return False
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.split(":")[1], 16) == port and f"socket:[{inode}]" in inodes:
                return True
    return False


def alive(pid: int) -> bool:
    """Running (a zombie has exited: it only waits for its parent to collect it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
