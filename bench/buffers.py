"""Memory of partial frames: N connections each holding all but the last byte of a maximum-size packet.

Steps, each bounded in time, loopback only:
1. start `dtgserver serve -q` (MQTT off, `--idle-timeout` and `--packet-timeout` 3600 so that the
   partial frames stay; extra options after `--`), warm it up with a few sessions, read its RSS
   (VmRSS in /proc/<pid>/status): "before";
2. open N connections; each sends a DTG packet of `--max-body-count` bodies (3,600: 183,623
   bytes) but its last byte; when the server's /metrics shows every byte received (or the
   connections it refused closed), read the RSS again: "during"; count the connections the server
   answered 4 and closed (its buffer budget spent);
3. close every connection; when /metrics shows 0 open, wait 3 s and read the RSS: "after"; then a
   session that sends a whole packet still gets 0.

    .venv/bin/python bench/buffers.py                         # 1,000 connections
    .venv/bin/python bench/buffers.py --connections 300
    .venv/bin/python bench/buffers.py -- --buffer-budget 512   # options for serve after --
"""

from __future__ import annotations

import argparse
import datetime
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dtgserver.protocol import DtgBody, DtgRealtime, encode  # noqa: E402

TIME_LIMIT_S = 120.0  # each phase


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    """The process's resident memory now (VmRSS), or at its highest so far (VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field}")


def metric(metrics_port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise RuntimeError(f"no {name} in /metrics")


def packet(modem: str, bodies: int) -> bytes:
    start = datetime.datetime(2026, 11, 21, 8, 0, 0)
    return encode(DtgRealtime(modem, 1, start, [DtgBody(
        daily_distance_km=12, total_distance_km=123_456, time=start + datetime.timedelta(seconds=s), speed_kmh=40,
        rpm=1900, brake=False, lon=127.0, lat=37.5, azimuth_deg=45, accel_x_ms2=0.5, accel_y_ms2=-0.2, status_code=0,
        daily_fuel_l=3.5, total_fuel_l=45_678.9, fuel_level_pct=55.5, temp_a_c=4.5, temp_b_c=4.5, battery_v=24.5,
        fuel_efficiency_kmpl=5.2, work_status=5) for s in range(bodies)]))


def session(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        return sock.recv(2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--max-body-count", type=int, default=3600)
    parser.add_argument("serve_options", nargs="*", help="more options for `dtgserver serve` (after --)")
    args = parser.parse_args()
    count = args.connections

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < count + 100:
        print(f"the file limit ({hard}) is below {count} connections", file=sys.stderr)
        return 1
    big = packet("01000000000", args.max_body_count)
    workdir = Path(tempfile.mkdtemp(prefix="dtg-buffers-"))
    port, metrics_port = free_port(), free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "dtgserver", "serve", "-q", "--host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(workdir / "data"), "--idle-timeout", "3600", "--packet-timeout", "3600",
         "--max-connections", str(count + 1000), "--max-body-count", str(args.max_body_count),
         "--metrics-port", str(metrics_port), *args.serve_options],
        cwd=ROOT, stdout=subprocess.DEVNULL)
    sockets: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                assert session(port, packet("01000000001", 60)) == b"\x09\x00"
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.1)
        for i in range(20):  # warm up: first sessions, first commits, a few whole maximal frames
            assert session(port, packet(f"010000001{i:02d}", 60 if i % 2 else args.max_body_count)) == b"\x09\x00"
        time.sleep(1.0)
        rss_before = rss_kb(server.pid)

        # -- during: every connection holds all but the last byte of a maximal frame -------------
        started = time.monotonic()
        partial = big[:-1]
        sel = selectors.EpollSelector()
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.setblocking(False)
            sockets.append(sock)
            sel.register(sock, selectors.EVENT_WRITE | selectors.EVENT_READ, [memoryview(partial), b""])
        refused: set[socket.socket] = set()  # answered 4 (or closed) by the server
        deadline = time.monotonic() + TIME_LIMIT_S
        sending = count
        while sending:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{sending} connections still sending after {TIME_LIMIT_S:.0f} s")
            for key, events in sel.select(timeout=1.0):
                fileobj, state = key.fileobj, key.data
                assert isinstance(fileobj, socket.socket)
                sock = fileobj
                if events & selectors.EVENT_READ:  # the server answered (4) and closes
                    try:
                        answer = sock.recv(16)
                    except ConnectionError:
                        answer = b""
                    if not answer or len(state[1] + answer) >= 2:
                        refused.add(sock)
                        sel.unregister(sock)
                        sending -= bool(state[0])
                        continue
                    state[1] += answer
                if events & selectors.EVENT_WRITE and state[0]:
                    try:
                        state[0] = state[0][sock.send(state[0][:65536]):]
                    except (BlockingIOError, ConnectionError):
                        continue
                    if not state[0]:
                        sel.modify(sock, selectors.EVENT_READ, state)
                        sending -= 1
        received = -1.0
        while received != (received := metric(metrics_port, "dtg_received_bytes_total")):  # until it stops
            if time.monotonic() > deadline:
                raise RuntimeError("the server is still reading")
            time.sleep(1.0)
        for key, _ in sel.select(timeout=0.5):  # answers that came after the sending
            refused.add(key.fileobj)  # type: ignore[arg-type]
        during_s = time.monotonic() - started
        rss_during, rss_peak = rss_kb(server.pid), rss_kb(server.pid, "VmHWM")
        buffered = metric(metrics_port, "dtg_buffered_bytes")

        # -- after: all closed ------------------------------------------------------------------
        for sock in sockets:
            sock.close()
        sockets.clear()
        deadline = time.monotonic() + TIME_LIMIT_S
        while metric(metrics_port, "dtg_open_connections") > 0:
            if time.monotonic() > deadline:
                raise RuntimeError("connections still open on the server")
            time.sleep(0.2)
        time.sleep(3.0)  # the server looks at its buffers once a second
        rss_after = rss_kb(server.pid)
        trims = metric(metrics_port, "dtg_memory_trims_total")
        assert session(port, big) == b"\x09\x00", "a whole maximal packet after the burst"

        held = count - len(refused)
        print(f"{count} connections, each sending {len(partial):,} of a {len(big):,}-byte packet "
              f"({args.max_body_count} bodies); serve {' '.join(args.serve_options) or '(defaults)'}")
        print(f"  held by the server: {held} ({buffered / 2**20:.1f} MiB buffered), answered 4 and closed: "
              f"{len(refused)} ({during_s:.1f} s); memory trims: {trims:.0f}")
        print(f"  server RSS before: {rss_before / 1024:8.1f} MiB")
        print(f"  server RSS during: {rss_during / 1024:8.1f} MiB  (+{(rss_during - rss_before) / 1024:.1f} MiB, "
              f"{(rss_during - rss_before) / max(held, 1):.1f} KiB per connection held)")
        print(f"  server RSS peak:   {rss_peak / 1024:8.1f} MiB  (VmHWM)")
        print(f"  server RSS after:  {rss_after / 1024:8.1f} MiB  (+{(rss_after - rss_before) / 1024:.1f} MiB "
              f"kept of the +{(rss_during - rss_before) / 1024:.1f})")
        return 0
    finally:
        for sock in sockets:
            sock.close()
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
