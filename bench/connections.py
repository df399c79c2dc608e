"""Memory per idle connection: hold 10,000 connections to `dtgserver serve`, then have each send a packet.

Steps, each bounded in time, loopback only:
1. start the server (`--idle-timeout 3600`, so that idle connections stay; MQTT off), warm it up
   with a few sessions, read its RSS (VmRSS in /proc/<pid>/status);
2. open N connections that send nothing; when the server's /metrics shows all N open, read its
   RSS again: (after − before) / N is the memory one idle connection costs in the server process
   (kernel socket buffers are not in RSS: see the note printed);
3. every connection sends one 60-body DTG packet (each a different terminal) and reads its
   answer; report how many were answered 0, the time, and the RSS at the end.

    .venv/bin/python bench/connections.py                  # 10,000 connections
    .venv/bin/python bench/connections.py --connections 2000
"""

from __future__ import annotations

import argparse
import errno
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dtgserver.sim.load import PacketPool, SimConfig, make_identities  # noqa: E402

TIME_LIMIT_S = 120.0  # each phase
RESEND_GAP_S = 5.0  # a terminal's wait before resending (dtgserver.sim.terminal.Policy.resend_gap_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def open_connections(metrics_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("dtg_open_connections "):
                return int(float(line.split()[1]))
    raise RuntimeError("no dtg_open_connections in /metrics")


def session(port: int, packet: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(packet)
        return sock.recv(2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=10_000)
    args = parser.parse_args()
    count = args.connections

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < count + 100:
        print(f"the file limit ({hard}) is below {count} connections", file=sys.stderr)
        return 1

    identities = make_identities(SimConfig(terminals=count, mix=(("dtg", 100.0),)), seed=7)
    pool = PacketPool(identities, 7, start_s=time.time() - 7 * 86_400)
    packets = [pool.next_packet()[0] for _ in range(count)]  # one per terminal: all new data

    workdir = Path(tempfile.mkdtemp(prefix="dtg-conn-"))
    port, metrics_port = free_port(), free_port()
    # The server's own limit is inherited from this process (raised above).
    server = subprocess.Popen(
        [sys.executable, "-m", "dtgserver", "serve", "-q", "--host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(workdir / "data"), "--idle-timeout", "3600", "--packet-timeout", "3600",
         "--max-connections", str(count + 1000), "--metrics-port", str(metrics_port)],
        cwd=ROOT, stdout=subprocess.DEVNULL)
    sockets: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                assert session(port, pool.next_packet()[0]) == b"\x09\x00"
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.1)
        for _ in range(50):  # warm up: first sessions, first commits
            assert session(port, pool.next_packet()[0]) == b"\x09\x00"
        time.sleep(1.0)

        def server_rss_kb() -> int:
            return rss_kb(server.pid)

        rss_before = server_rss_kb()

        # -- phase 1: open and hold ------------------------------------------------------------
        started = time.monotonic()
        sel = selectors.EpollSelector()
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            code = sock.connect_ex(("127.0.0.1", port))
            if code not in (0, errno.EINPROGRESS):
                raise OSError(code, f"connect: {errno.errorcode.get(code, code)}")
            sockets.append(sock)
            if len(sockets) % 500 == 0:  # let the server's accept loop keep up with the backlog
                time.sleep(0.02)
        held = 0
        deadline = time.monotonic() + TIME_LIMIT_S
        while (held := open_connections(metrics_port)) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {held} of {count} connections accepted in {TIME_LIMIT_S:.0f} s")
            time.sleep(0.2)
        open_s = time.monotonic() - started
        time.sleep(1.0)
        rss_held = server_rss_kb()
        per_connection_kb = (rss_held - rss_before) / count

        # -- phase 2: every connection sends a packet and reads its answer -----------------------
        # As a terminal does (spec §4.5): an answer of 4 (overloaded: the server's commit queue is
        # at --queue-high-water) means send the packet again, on the same connection, a bit later.
        started = time.monotonic()
        results: Counter[int] = Counter()
        first_answers: Counter[int] = Counter()
        retry: list[tuple[float, socket.socket, bytes]] = []
        for sock, packet in zip(sockets, packets, strict=True):
            sel.register(sock, selectors.EVENT_WRITE, [memoryview(packet), packet, b"", 0])
        deadline = time.monotonic() + TIME_LIMIT_S
        pending = count
        while pending and time.monotonic() < deadline:
            now = time.monotonic()
            while retry and retry[0][0] <= now:
                _, sock, packet = retry.pop(0)
                key = sel.get_key(sock)
                key.data[0], key.data[2] = memoryview(packet), b""
                sel.modify(sock, selectors.EVENT_WRITE, key.data)
            for key, events in sel.select(timeout=0.05):
                sock = key.fileobj  # type: ignore[assignment]
                assert isinstance(sock, socket.socket)
                state = key.data
                if events & selectors.EVENT_WRITE:
                    try:
                        sent = sock.send(state[0])
                    except BlockingIOError:
                        continue
                    state[0] = state[0][sent:]
                    if not state[0]:
                        sel.modify(sock, selectors.EVENT_READ, state)
                    continue
                chunk = sock.recv(2 - len(state[2]))
                state[2] += chunk
                if chunk and len(state[2]) < 2:
                    continue
                result = state[2][1] if len(state[2]) == 2 else -1  # -1: closed without an answer
                if state[3] == 0:
                    first_answers[result] += 1
                state[3] += 1
                if result == 4:
                    sel.modify(sock, 0 or selectors.EVENT_READ, state)  # parked until its retry
                    retry.append((time.monotonic() + RESEND_GAP_S, sock, state[1]))
                    continue
                results[result] += 1
                sel.unregister(sock)
                pending -= 1
        answer_s = time.monotonic() - started
        ok = results[0]
        rss_after = server_rss_kb()

        print(f"server RSS before          {rss_before / 1024:8.1f} MiB")
        print(f"{count} idle connections held ({open_s:.1f} s to open): RSS {rss_held / 1024:8.1f} MiB "
              f"→ {per_connection_kb:.2f} KiB per connection (target ≤ 8 KB)")
        print(f"all sent a 60-body packet at once: first answers {dict(sorted(first_answers.items()))} "
              f"(4 = commit queue full: resent after {RESEND_GAP_S:.0f} s, as terminals do)")
        print(f"  {ok} of {count} answered 0 in {answer_s:.1f} s ({ok / answer_s:.0f} packets/s), final answers "
              f"{dict(sorted(results.items()))}; RSS {rss_after / 1024:.1f} MiB")
        print("(RSS is the server process's memory; each socket's kernel buffers come on top, outside RSS)")
        return 0 if ok == count and per_connection_kb <= 8 else 1
    finally:
        for sock in sockets:
            sock.close()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
