"""Sessions per second of the whole server against a bare Trio server, under one cheap load generator.

A session is what a terminal does once a minute: connect, send one 60-body DTG realtime packet
(3,083 bytes), read the 2-byte answer, close. Contenders, each a separate process on 127.0.0.1:

- bare: a Trio server that frames the packet by its length (body count × 51 + 23 bytes) and
  answers 0x09 0x00 with no other work: the floor of Python + Trio + the kernel.
- full: `dtgserver serve -q` (decode, registry check, group commit to SQLite with
  synchronous=FULL, answer only after the commit); MQTT off.
- full+mqtt: the same with `--mqtt` to a Mosquitto started here on a free port (the bridge reads
  the committed packets, derives their messages, publishes QoS 1 and saves its cursor on PUBACK).
- full+bridge: `serve --external-bridge` and, in a process of its own, `dtgserver bridge` on the same
  data dir, to the Mosquitto (both processes' CPU counted as the server's; the broker's apart).
- workers=1 / workers=2: `serve --workers N`, MQTT off.
- full+nats, workers=N+nats: `serve --store nats://…` against a 3-node JetStream cluster started here
  (R3, file storage, on this machine's disk and cores): answered 0 after the stream's PubAck. The
  nats-server processes' CPU is reported apart (`JetStream nodes`), not in the server's.
- full+writer, workers=N+writer, full+writer+mqtt: the same with `--writer-process` (the sessions
  in one process per worker, each shard's commits and forwarder in a writer process of its own).

The load generator is several processes (`--generators`), closed loop: K connections in flight in
all, each starting the next session as soon as its answer is read. By default each process is
bench/loadgen.c, compiled here at start with `gcc -O2` ($CC if set): one thread, non-blocking
sockets on edge-triggered epoll. It costs about half the CPU per session of the Python generator
(~50 against ~100 µs on a 2-core VM), CPU the servers under test need on a small machine; what is
left is the kernel's TCP work (a few µs are user time), part of it the server's side of loopback,
which the sending process is charged for. `--generator python` runs the Python one instead
(`generate()` below: plain non-blocking sockets on epoll, no Trio). Every packet is new data to the
server (each terminal sends its next minute; the pool re-addresses pre-encoded pieces, see
dtgserver.sim.load.PacketPool). The C program renders the same packets from a plan file written
from a PacketPool (`write_plan`); before any measuring, its first packets are checked byte for byte
against the pool's own (`check_loadgen`). Every run is bounded in time; the CPU of the server (from
/proc/<pid>/stat, all its processes) and of the generator (getrusage in each generator process) is
measured over the same window.

    .venv/bin/python bench/server.py                       # every contender, 8 s each
    .venv/bin/python bench/server.py --only bare,full --duration 5 --rounds 3
    .venv/bin/python bench/server.py --only bare,full --generator python
"""

from __future__ import annotations

import argparse
import errno
import json
import multiprocessing
import os
import random
import resource
import selectors
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BODY_COUNT = 60
HEADER_SIZE, DTG_BODY_SIZE = 23, 51
ANSWER_TIMEOUT_S = 5.0
TERMINALS = 2000  # per generator process
LOADGEN_SOURCE = Path(__file__).resolve().parent / "loadgen.c"


# -- the bare server -----------------------------------------------------------------------------


async def bare_server(port: int, direct_close: bool = False, reuse_port: bool = False) -> None:
    """Read one length-framed packet, answer 2 bytes, wait for the peer to close: nothing else.

    Plain idiomatic Trio: `serve_listeners` runs the handler and then closes the stream with
    `aclose_forcefully`. With direct_close (contender `bare-close`) the server has its own accept
    loop and the handler closes the socket itself, as dtgserver does: aclose_forcefully's cancelled
    checkpoint costs more than the close (docs/performance.md), and this contender shows how much
    of the gap between bare and full that one difference is. With reuse_port (contender
    `bare-close-x2`, two such processes on one port, as `serve --workers 2` runs) the listening
    socket is made by hand with SO_REUSEPORT.
    """
    import trio

    answer = b"\x09\x00"

    async def handle(stream: trio.SocketStream) -> None:
        try:
            buf = bytearray()
            need = 16
            while len(buf) < need:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                buf += chunk
                if need == 16 and len(buf) >= 16:
                    need = HEADER_SIZE + DTG_BODY_SIZE * int.from_bytes(buf[14:16], "big")
            await stream.send_all(answer)
            while await stream.receive_some(65536):  # as the real server: read on until EOF
                pass
        except trio.BrokenResourceError:
            pass

    async def handle_and_close(stream: trio.SocketStream) -> None:
        try:
            await handle(stream)
        finally:
            stream.socket.close()

    async def serve_direct(listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            nursery.start_soon(handle_and_close, await listener.accept())

    if reuse_port:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        await sock.bind(("127.0.0.1", port))
        sock.listen(4096)
        listeners = [trio.SocketListener(sock)]
    else:
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            if direct_close:
                for listener in listeners:
                    nursery.start_soon(serve_direct, listener, nursery)
            else:
                nursery.start_soon(trio.serve_listeners, handle, listeners)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


# -- the load generator ----------------------------------------------------------------------------


def make_pool(seed: int, terminals: int, start_s: float | None = None) -> Any:
    sys.path.insert(0, str(ROOT))
    from dtgserver.sim.load import PacketPool, SimConfig, make_identities

    identities = make_identities(SimConfig(terminals=terminals, mix=(("dtg", 100.0),)), seed)
    start_s = time.time() - 7 * 86_400 if start_s is None else start_s
    return PacketPool(identities, seed, start_s=start_s, body_count=BODY_COUNT)


def write_plan(pool: Any, path: Path) -> Path:
    """What loadgen.c needs to render the pool's packets, in the layout its load_plan() reads.

    Templates are rendered with zero modem, KEY ON time and minutes: loadgen patches all three, so
    the exactness check (`check_loadgen`) sees its patching, not a copy of Python's.
    """
    from dtgserver.protocol.layout import REALTIME_BY_KIND

    assert pool.next_terminal == 0 and not any(pool.minutes), "a used pool: loadgen starts at minute 0"
    templates: list[bytes] = []
    template_index: dict[int, int] = {}  # id(Template) → index
    drives: list[bytes] = []
    drive_index: dict[int, int] = {}  # id(drive list) → index: terminals share their kind's drives
    terminals: list[bytes] = []
    for modem, drive in pool.terminals:
        if id(drive) not in drive_index:
            indices = []
            for template in drive:
                if id(template) not in template_index:
                    template_index[id(template)] = len(templates)
                    raw = template.render(bytes(11), bytes(7), bytes(5))
                    body_size = REALTIME_BY_KIND[template.kind].body_size
                    templates.append(struct.pack("<III", len(raw), body_size, template.body_count) + raw)
                indices.append(template_index[id(template)])
            drive_index[id(drive)] = len(drives)
            drives.append(struct.pack(f"<I{len(indices)}I", len(indices), *indices))
        assert len(modem) == 11, modem
        terminals.append(modem + struct.pack("<I", drive_index[id(drive)]))
    assert len(pool.key_on_time) == 7
    header = struct.pack("<8sIIIq7s", b"DTGLOAD1", len(templates), len(drives), len(terminals),
                         pool.start_minute_s, pool.key_on_time)
    path.write_bytes(header + b"".join(templates) + b"".join(drives) + b"".join(terminals))
    return path


def build_loadgen(workdir: Path) -> Path:
    """Compile loadgen.c into workdir with `gcc -O2` ($CC if set); exit 2 if that cannot be done."""
    binary = workdir / "loadgen"
    command = [*shlex.split(os.environ.get("CC") or "gcc"), "-O2", "-std=gnu11", "-Wall", "-o", str(binary),
               str(LOADGEN_SOURCE)]
    try:
        built = subprocess.run(command, capture_output=True, text=True, timeout=120)
        error = (built.stderr.strip() or f"exit status {built.returncode}") if built.returncode else None
    except (OSError, subprocess.TimeoutExpired) as e:
        error = str(e)
    if error is not None:
        print(f"bench: cannot compile {LOADGEN_SOURCE.name} with `{shlex.join(command)}`:\n{error}\n"
              "Install gcc (or set CC to a C compiler), or use --generator python.", file=sys.stderr)
        raise SystemExit(2)
    return binary


def check_loadgen(loadgen: Path, workdir: Path, terminals: int = 24) -> int:
    """Exit 1 unless loadgen's first packets are byte for byte PacketPool.next_packet()'s; how many were checked.

    A small pool, so that the check is quick yet every terminal goes past the end of its drive
    (minute 15 replays minute 0's template); once from the bench's start time, once across a KST new
    year (the minute prefix's minute, hour, day, month and year all roll over).
    """
    from dtgserver.protocol import KST

    def fail(problem: str) -> NoReturn:
        print(f"bench: loadgen.c does not send what PacketPool sends: {problem}; "
              "fix loadgen.c or use --generator python", file=sys.stderr)
        raise SystemExit(1)

    checked = 0
    for start_s in (None, datetime(2027, 12, 31, 23, 55, tzinfo=KST).timestamp()):
        pool = make_pool(random.randrange(2**31), terminals, start_s)
        count = terminals * (len(pool.terminals[0][1]) + 2)
        plan = write_plan(pool, workdir / "plan-check.bin")
        dumped = subprocess.run([str(loadgen), "--plan", str(plan), "--dump", str(count)], capture_output=True,
                                timeout=60)
        if dumped.returncode:
            fail(f"`loadgen --dump` exited with {dumped.returncode}: {dumped.stderr.decode(errors='replace')}")
        offset = 0
        for i in range(count):
            expected = pool.next_packet()[0]
            got = dumped.stdout[offset:offset + len(expected)]
            if got != expected:
                at = next((j for j, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
                          min(len(got), len(expected)))
                fail(f"packet {i} (terminal {i % terminals}, minute {i // terminals} after "
                     f"{datetime.fromtimestamp(pool.start_minute_s, KST):%Y-%m-%d %H:%M} KST) differs at byte "
                     f"{at}: {got[at:at + 8].hex()} instead of {expected[at:at + 8].hex()}")
            offset += len(expected)
        if offset != len(dumped.stdout):
            fail(f"{len(dumped.stdout) - offset} bytes more than {count} packets")
        checked += count
    return checked


def generate(port: int, connections: int, seed: int, measure_from: float, measure_until: float,
             results: Any) -> None:
    """One generator process: `connections` sessions in flight until measure_until; reports on `results`."""
    pool = make_pool(seed, TERMINALS)
    address = ("127.0.0.1", port)
    sel = selectors.EpollSelector()
    latencies: list[float] = []
    counts = {"sessions": 0, "ok": 0, "other_result": 0, "timeouts": 0, "connection_errors": 0}
    in_flight: dict[int, list[Any]] = {}  # fd → [socket, packet view, started, answer bytes]
    cpu_start: float | None = None
    cpu_end: float | None = None

    def cpu_now() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def start() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        started = time.perf_counter()
        code = sock.connect_ex(address)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            finish(None, started, "connection_error")
            return
        in_flight[sock.fileno()] = [sock, memoryview(pool.next_packet()[0]), started, b""]
        sel.register(sock, selectors.EVENT_WRITE)

    def finish(session: list[Any] | None, started: float, outcome: str) -> None:
        now = time.perf_counter()
        if session is not None:
            sock = session[0]
            sel.unregister(sock)
            del in_flight[sock.fileno()]
            sock.close()
        wall = time.time()
        if measure_from <= wall < measure_until:
            counts["sessions"] += 1
            if outcome == "ok":
                counts["ok"] += 1
                latencies.append(now - started)
            elif outcome == "answered":
                counts["other_result"] += 1
            elif outcome == "timeout":
                counts["timeouts"] += 1
            else:
                counts["connection_errors"] += 1

    for _ in range(connections):
        start()
    next_timeout_check = time.perf_counter()
    while True:
        wall = time.time()
        if cpu_start is None and wall >= measure_from:
            cpu_start = cpu_now()
        if cpu_end is None and wall >= measure_until:
            cpu_end = cpu_now()
        if wall >= measure_until and not in_flight:
            break
        if wall >= measure_until + ANSWER_TIMEOUT_S:
            for session in list(in_flight.values()):
                finish(session, session[2], "timeout")
            break
        for key, events in sel.select(timeout=0.05):
            session = in_flight[key.fd]
            sock, view, started = session[0], session[1], session[2]
            try:
                if events & selectors.EVENT_WRITE:
                    sent = sock.send(view)
                    view = session[1] = view[sent:]
                    if not view:
                        sel.modify(sock, selectors.EVENT_READ)
                    continue
                data = sock.recv(64)
            except OSError:
                finish(session, started, "connection_error")
                if time.time() < measure_until:
                    start()
                continue
            if not data:
                finish(session, started, "connection_error")
            else:
                answer = session[3] = session[3] + data
                if len(answer) < 2:
                    continue
                finish(session, started, "ok" if answer[:2] == b"\x09\x00" else "answered")
            if time.time() < measure_until:
                start()
        if time.perf_counter() >= next_timeout_check:  # answer timeouts, looked for twice a second
            next_timeout_check = time.perf_counter() + 0.5
            for session in [s for s in in_flight.values() if next_timeout_check - s[2] > ANSWER_TIMEOUT_S + 0.5]:
                finish(session, session[2], "timeout")
                if time.time() < measure_until:
                    start()
    results.put({**counts, "latencies": latencies, "cpu_s": (cpu_end or cpu_now()) - (cpu_start or 0.0)})


def run_load(port: int, *, connections: int, generators: int, warmup_s: float, duration_s: float,
             server_pids: Any, loadgen: Path | None, workdir: Path) -> dict[str, Any]:
    """Run the generators against `port` (loadgen's binary; generate() if None); the load's figures
    and the server's CPU in the window."""
    per_process = [connections // generators + (1 if i < connections % generators else 0) for i in range(generators)]
    seeds = [random.randrange(2**31) for _ in per_process]  # each process its own terminals
    if loadgen is None:
        measure_from = time.time() + 1.0 + warmup_s  # 1 s to build the packet pools
        collect = start_generate(port, per_process, seeds, measure_from, measure_from + duration_s)
    else:
        # The pools are built here, before the clock starts; loadgen reads its plan in a few ms.
        plans = [write_plan(make_pool(seed, TERMINALS), workdir / f"plan-{port}-{i}.bin")
                 for i, seed in enumerate(seeds)]
        measure_from = time.time() + 0.2 + warmup_s
        collect = start_loadgen(loadgen, port, per_process, plans, measure_from, measure_from + duration_s)
    measure_until = measure_from + duration_s
    time.sleep(max(0.0, measure_from - time.time()))
    pids = server_pids()
    cpu_before = process_cpu_s(pids)
    time.sleep(max(0.0, measure_until - time.time()))
    cpu_after = process_cpu_s(pids)
    reports = collect()
    latencies = sorted(x for r in reports for x in r["latencies"])
    figures: dict[str, Any] = {k: sum(r[k] for r in reports) for k in
                               ("sessions", "ok", "other_result", "timeouts", "connection_errors")}
    ok = figures["ok"]
    server_cpu = {name: cpu_after[name] - cpu_before.get(name, 0.0) for name in cpu_after}
    server_cpu_s = sum(server_cpu.values())
    generator_cpu_s = sum(r["cpu_s"] for r in reports)
    figures.update(
        sessions_per_s=ok / duration_s,
        p50_ms=1000 * latencies[len(latencies) // 2] if latencies else None,
        p99_ms=1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else None,
        server_cores=server_cpu_s / duration_s,
        server_cpu_us_per_session=1e6 * server_cpu_s / ok if ok else None,
        generator_cores=generator_cpu_s / duration_s,
        generator_cpu_us_per_session=1e6 * generator_cpu_s / ok if ok else None,
        cpu_by_process={name: round(v / duration_s, 2) for name, v in server_cpu.items()},
        generator="python" if loadgen is None else "c",
    )
    return figures


Reports = Callable[[], list[dict[str, Any]]]


def start_generate(port: int, per_process: list[int], seeds: list[int], measure_from: float,
                   measure_until: float) -> Reports:
    """Fork one generate() per entry of per_process; a function that waits for their reports."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    processes = [context.Process(target=generate, args=(port, n, seed, measure_from, measure_until, results))
                 for n, seed in zip(per_process, seeds, strict=True)]
    for process in processes:
        process.start()

    def collect() -> list[dict[str, Any]]:
        reports = [results.get(timeout=max(0.0, measure_until - time.time()) + 3 * ANSWER_TIMEOUT_S)
                   for _ in processes]
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        return reports

    return collect


def start_loadgen(loadgen: Path, port: int, per_process: list[int], plans: list[Path], measure_from: float,
                  measure_until: float) -> Reports:
    """Start one loadgen per entry of per_process; a function that waits for their JSON reports."""
    processes = [subprocess.Popen([str(loadgen), "--plan", str(plan), "--port", str(port), "--connections", str(n),
                                  "--measure-from", repr(measure_from), "--measure-until", repr(measure_until),
                                  "--answer-timeout", repr(ANSWER_TIMEOUT_S)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for n, plan in zip(per_process, plans, strict=True)]

    def collect() -> list[dict[str, Any]]:
        reports = []
        try:
            for process in processes:  # each prints after its window and the last answers
                out, err = process.communicate(timeout=max(0.0, measure_until - time.time()) + 3 * ANSWER_TIMEOUT_S)
                if process.returncode:
                    raise RuntimeError(f"loadgen exited with {process.returncode}: {err.decode(errors='replace')}")
                reports.append(json.loads(out))
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            for plan in plans:
                plan.unlink(missing_ok=True)
        return reports

    return collect


def process_cpu_s(pids: dict[str, int]) -> dict[str, float]:
    """utime + stime of each named process, from /proc/<pid>/stat."""
    cpu = {}
    for name, pid in pids.items():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu[name] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of stat(5)
    return cpu


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found.extend(int(p) for p in f.read().split())
        except FileNotFoundError:
            pass
    return sorted(found)


# -- the contenders ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(count: int) -> int:
    """The first of `count` consecutive free ports (one metrics endpoint per server process)."""
    while True:
        port = free_port()
        taken = []
        try:
            for other in range(port + 1, port + count):
                s = socket.socket()
                taken.append(s)
                s.bind(("127.0.0.1", other))
        except OSError:
            continue
        finally:
            for s in taken:
                s.close()
        return port


def wait_listening(port: int, process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout_s} s")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def raise_file_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Mosquitto:
    def __init__(self, workdir: Path):
        self.port = free_port()
        config = workdir / "mosquitto.conf"
        config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                          "max_inflight_messages 0\nmax_queued_messages 100000\n")
        self.process = subprocess.Popen(["/usr/sbin/mosquitto", "-c", str(config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        wait_listening(self.port, self.process)

    def stop(self) -> None:
        stop(self.process)


def metrics(ports: list[int]) -> dict[str, float]:
    """Every endpoint's figures, summed (the server's processes count apart)."""
    values: dict[str, float] = {}
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = values.get(name, 0.0) + float(value)
    return values


DRAIN_S = 60.0
"""With MQTT: how long after the load the bench waits for every committed packet's messages to be
acknowledged (backlog 0) before giving up and saying so."""


def run_contender(name: str, args: argparse.Namespace, workdir: Path, loadgen: Path | None) -> dict[str, Any]:
    port = free_port()
    broker: Mosquitto | None = None
    cluster: Any = None  # tests/natscluster.py NatsCluster, for +nats
    endpoints: list[int] = []
    bridge_command: list[str] = []
    bridge_metrics = 0
    if name in ("bare", "bare-close", "bare-close-x2"):
        command = [PYTHON, __file__, "--bare-server", str(port)] + (["--direct-close"] if name != "bare" else []) \
            + (["--processes", "2"] if name == "bare-close-x2" else [])
    else:
        base, *modifiers = name.split("+")
        known = {"mqtt", "writer", "nats", "bridge"}
        if (base != "full" and not base.startswith("workers=")) or set(modifiers) - known \
                or ("bridge" in modifiers and set(modifiers) & {"mqtt", "nats"}):
            raise SystemExit(f"unknown contender {name!r}")
        data_dir = workdir / f"data-{name}-{port}"
        command = [PYTHON, "-m", "dtgserver", "serve", "-q", "--host", "127.0.0.1", "--port", str(port),
                   "--data-dir", str(data_dir), "--max-connections", "100000"]
        # one metrics endpoint per server process: (front or combined) processes, then writers
        workers = int(base.split("=")[1]) if base.startswith("workers=") else 1
        processes = workers * (2 if "writer" in modifiers else 1)
        metrics_port = free_ports(processes)
        endpoints = list(range(metrics_port, metrics_port + processes))
        command += ["--metrics-port", str(metrics_port)]
        if "nats" in modifiers:  # a 3-node JetStream cluster (R3) on this machine, started afresh
            sys.path.insert(0, str(ROOT / "tests"))
            from natscluster import NatsCluster

            cluster = NatsCluster(workdir / f"nats-{port}")
            cluster.start_all()
            command += ["--store", cluster.url]
        if "mqtt" in modifiers:
            broker = Mosquitto(workdir)
            command += ["--mqtt", f"mqtt://127.0.0.1:{broker.port}", "--client-id", f"bench-{port}"]
        if "bridge" in modifiers:  # `dtgserver bridge` in a process of its own, started once the store exists
            broker = Mosquitto(workdir)
            command += ["--external-bridge"]
            bridge_metrics = free_ports(1)
            bridge_command = [PYTHON, "-m", "dtgserver", "bridge", "-q", "--data-dir", str(data_dir),
                              "--mqtt", f"mqtt://127.0.0.1:{broker.port}", "--client-id", f"bench-bridge-{port}",
                              "--metrics-port", str(bridge_metrics)]
        if base.startswith("workers="):
            command += ["--workers", base.split("=")[1]]
        if "writer" in modifiers:
            command += ["--writer-process"]
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    bridge: subprocess.Popen[bytes] | None = None
    try:
        wait_listening(port, server)
        if bridge_command:
            bridge = subprocess.Popen(bridge_command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            wait_listening(bridge_metrics, bridge)
            endpoints.append(bridge_metrics)
        time.sleep(0.5)  # every worker up, not only the first

        def pids() -> dict[str, int]:
            named = {"server": server.pid}
            named.update((f"worker{i}", pid) for i, pid in enumerate(children(server.pid)))
            if bridge is not None:  # the server's CPU is both processes'
                named["bridge"] = bridge.pid
            if broker is not None:
                named["mosquitto"] = broker.process.pid
            if cluster is not None:
                named.update((f"nats-{node.name}", node.process.pid) for node in cluster.nodes if node.process)
            return named

        figures = run_load(port, connections=args.connections, generators=args.generators,
                           warmup_s=args.warmup, duration_s=args.duration, server_pids=pids,
                           loadgen=loadgen, workdir=workdir)
        load_stopped = time.monotonic()
        if broker is not None:  # the broker is not the server: keep its CPU apart
            broker_cores = figures["cpu_by_process"].pop("mosquitto", 0.0)
            figures["broker_cores"] = broker_cores
            figures["server_cores"] -= broker_cores
            figures["server_cpu_us_per_session"] = 1e6 * figures["server_cores"] / figures["sessions_per_s"]
        if cluster is not None:  # the JetStream nodes are not the server either
            nats_cores = sum(figures["cpu_by_process"].pop(f"nats-{node.name}", 0.0) for node in cluster.nodes)
            figures["nats_cores"] = nats_cores
            figures["server_cores"] -= nats_cores
            figures["server_cpu_us_per_session"] = 1e6 * figures["server_cores"] / figures["sessions_per_s"]
            figures["nats_cpu_us_per_session"] = 1e6 * nats_cores / figures["sessions_per_s"]
        if endpoints:
            m = metrics(endpoints)
            figures["committed_packets"] = m.get("dtg_committed_packets_total")
            commits = m.get("dtg_commits_total") or 0
            if commits:  # over the whole run, warm-up included
                figures["commit_ms_mean"] = 1000 * m.get("dtg_commit_seconds_sum", 0.0) / commits
                figures["batch_mean"] = m.get("dtg_commit_batch_size_sum", 0.0) / commits
            if broker is not None:
                time.sleep(1.0)
                m = metrics([bridge_metrics] if bridge is not None else endpoints)
                figures["mqtt_acknowledged"] = m.get("dtg_mqtt_acknowledged_total")
                figures["mqtt_backlog_1s_after"] = m.get("dtg_mqtt_backlog")
                # commit → PUBACK of a packet's last message, over the bridge's last 10,000 packets
                figures["bridge_lag_p50_ms"] = 1000 * (m.get("dtg_bridge_lag_p50_seconds") or 0.0)
                figures["bridge_lag_p99_ms"] = 1000 * (m.get("dtg_bridge_lag_p99_seconds") or 0.0)
                # then until every committed packet's messages are acknowledged (the issue: "within a
                # few seconds after the load stops"), at most DRAIN_S
                while m.get("dtg_mqtt_backlog") and time.monotonic() - load_stopped < DRAIN_S:
                    time.sleep(0.25)
                    m = metrics([bridge_metrics] if bridge is not None else endpoints)
                figures["mqtt_drained_s"] = (time.monotonic() - load_stopped if not m.get("dtg_mqtt_backlog")
                                             else None)
    finally:
        if bridge is not None:
            stop(bridge)
            bridge_errors = bridge.stderr.read().decode(errors="replace") if bridge.stderr else ""
            if bridge.stderr:
                bridge.stderr.close()
            if bridge_errors.strip():
                print(f"[{name} bridge stderr] {bridge_errors.strip()[-2000:]}", file=sys.stderr)
        stop(server)
        if broker is not None:
            broker.stop()
        if cluster is not None:
            cluster.stop_all()
        errors = server.stderr.read().decode(errors="replace") if server.stderr else ""
        if server.stderr:
            server.stderr.close()
        if errors.strip():
            print(f"[{name} stderr] {errors.strip()[-2000:]}", file=sys.stderr)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="bare,full,full+mqtt,workers=1,workers=2",
                        help="contenders, comma-separated: bare, bare-close, bare-close-x2, full, full+mqtt, "
                             "workers=N, and +writer or +nats after full or workers=N (e.g. full+writer, "
                             "workers=2+writer, full+writer+mqtt, full+nats, workers=2+nats), and full+bridge "
                             "(`serve --external-bridge` beside `dtgserver bridge`)")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per contender and round")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    parser.add_argument("--rounds", type=int, default=1, help="rounds; every contender runs once per round")
    parser.add_argument("--connections", type=int, default=48, help="sessions in flight (closed loop)")
    parser.add_argument("--generators", type=int, default=2, help="load generator processes (of either kind)")
    parser.add_argument("--generator", choices=("c", "python"), default="c",
                        help="c: bench/loadgen.c, compiled at start with gcc -O2 ($CC if set), its packets "
                             "checked byte for byte against PacketPool's first (default); python: generate() "
                             "in this file, about twice the CPU per session")
    parser.add_argument("--json", action="store_true", help="print every run as JSON too")
    parser.add_argument("--bare-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--direct-close", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server is not None:
        import trio

        # --processes 2: this process and one child, both on the port with SO_REUSEPORT
        child = subprocess.Popen([PYTHON, __file__, "--bare-server", str(args.bare_server), "--direct-close",
                                  "--processes", "0"]) if args.processes > 1 else None
        try:
            trio.run(bare_server, args.bare_server, args.direct_close, args.processes != 1)
        finally:
            if child is not None:
                child.terminate()
                child.wait(timeout=10)
        return 0
    raise_file_limit()
    contenders = [c.strip() for c in args.only.split(",") if c.strip()]
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in contenders}
    workdir = Path(tempfile.mkdtemp(prefix="dtg-bench-"))
    generator = (f"load generator: {'C, bench/loadgen.c' if args.generator == 'c' else 'Python, generate()'}, "
                 f"{args.generators} processes, {args.connections} sessions in flight")
    try:
        loadgen: Path | None = None
        if args.generator == "c":
            loadgen = build_loadgen(workdir)
            checked = check_loadgen(loadgen, workdir)  # before any measuring
            print(f"{generator} (its first {checked} packets checked: byte for byte PacketPool's)", flush=True)
        else:
            print(generator, flush=True)
        for round_ in range(args.rounds):
            for name in contenders:
                figures = run_contender(name, args, workdir, loadgen)
                runs[name].append(figures)
                print(f"round {round_ + 1} {name:<16} {figures['sessions_per_s']:8.0f} sessions/s  "
                      f"p50 {figures['p50_ms'] or 0:6.2f} ms  p99 {figures['p99_ms'] or 0:6.2f} ms  "
                      f"server {figures['server_cores']:.2f} cores "
                      f"{figures['server_cpu_us_per_session'] or 0:5.0f} µs/session  "
                      f"generator {figures['generator_cores']:.2f} cores "
                      f"{figures['generator_cpu_us_per_session'] or 0:3.0f} µs/session  "
                      f"errors {figures['timeouts'] + figures['connection_errors'] + figures['other_result']}"
                      + (f"  commit {figures['commit_ms_mean']:.1f} ms × {figures['batch_mean']:.0f} packets"
                         if "commit_ms_mean" in figures else "")
                      + (f"  broker {figures['broker_cores']:.2f} cores" if "broker_cores" in figures else "")
                      + (f"  lag p50 {figures['bridge_lag_p50_ms']:.0f} ms p99 {figures['bridge_lag_p99_ms']:.0f} ms"
                         f"  all acknowledged {figures['mqtt_drained_s']:.1f} s after the load"
                         if figures.get("mqtt_drained_s") is not None else
                         f"  NOT all acknowledged {DRAIN_S:.0f} s after the load" if "bridge_lag_p50_ms" in figures
                         else "")
                      + (f"  JetStream nodes {figures['nats_cores']:.2f} cores "
                         f"{figures['nats_cpu_us_per_session']:.0f} µs/session" if "nats_cores" in figures else ""),
                      flush=True)
                if args.json:
                    print(json.dumps({"contender": name, **figures}), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report(runs, generator)
    return 0


def report(runs: dict[str, list[dict[str, Any]]], generator: str) -> None:
    def median(name: str, key: str) -> float:
        values = [r[key] for r in runs[name] if r.get(key) is not None]
        return statistics.median(values) if values else float("nan")

    print()
    print(generator)
    print(f"{'contender':<16} {'sessions/s':>10} {'p50 ms':>7} {'p99 ms':>7} {'server cores':>12} "
          f"{'µs/session':>10} {'generator cores':>15} {'÷ bare':>7}")
    bare = median("bare", "sessions_per_s") if "bare" in runs else None
    for name in runs:
        rate = median(name, "sessions_per_s")
        ratio = f"{rate / bare:.2f}×" if bare else "-"
        print(f"{name:<16} {rate:10.0f} {median(name, 'p50_ms'):7.2f} {median(name, 'p99_ms'):7.2f} "
              f"{median(name, 'server_cores'):12.2f} {median(name, 'server_cpu_us_per_session'):10.0f} "
              f"{median(name, 'generator_cores'):15.2f} {ratio:>7}")
    def per_round(name: str, baseline: str, key: str = "sessions_per_s") -> str:
        """The ratio in each round (contenders run back to back, so slow spells of a shared
        machine hit both sides of a ratio alike), and their median."""
        ratios = [a[key] / b[key] for a, b in zip(runs[name], runs[baseline], strict=False) if a[key] and b[key]]
        listed = ", ".join(f"{r:.2f}" for r in ratios)
        return f"{statistics.median(ratios):.2f}× median of rounds [{listed}]" if ratios else "-"

    print()
    for suffix in ("", "+mqtt", "+writer", "+writer+mqtt", "+nats"):
        one, two = f"workers=1{suffix}", f"workers=2{suffix}"
        if one in runs and two in runs:
            print(f"{two} ÷ {one}: {per_round(two, one)} (target 1.6×); the generator shares the same "
                  f"{os.cpu_count()} cores")
    if "bare-close" in runs and "bare-close-x2" in runs:  # what two processes gain here with no work at all
        print(f"bare-close-x2 ÷ bare-close: {per_round('bare-close-x2', 'bare-close')} (the same scaling "
              f"for two bare processes: this machine's ceiling for workers=2 ÷ workers=1)")
    if "full" in runs and "full+writer" in runs:
        print(f"full+writer ÷ full: {per_round('full+writer', 'full')}")
    if "full" in runs and "full+nats" in runs:
        print(f"full+nats ÷ full: {per_round('full+nats', 'full')}; by CPU per session (server only): "
              f"{per_round('full', 'full+nats', 'server_cpu_us_per_session')}")
    # MQTT on: one process (the bridge beside the sessions), and the bridge in a process of its own
    for name, goal in (("full+mqtt", 0.35), ("full+bridge", 0.5), ("full+writer+mqtt", 0.5)):
        if name in runs and "bare" in runs:
            print(f"{name} ÷ bare: {per_round(name, 'bare')} (target {goal}×); "
                  f"by CPU per session: {per_round('bare', name, 'server_cpu_us_per_session')}")
    for name in ("full", "full+writer", "full+nats", "bare-close"):
        if name in runs and "bare" in runs:
            target = " (target 0.6×)" if name.startswith("full") else ""
            print(f"{name} ÷ bare: {per_round(name, 'bare')}{target}; "
                  f"by CPU per session: {per_round('bare', name, 'server_cpu_us_per_session')}")


if __name__ == "__main__":
    sys.exit(main())
