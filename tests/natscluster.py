"""A real 3-node NATS JetStream cluster for tests: own store dirs, free 127.0.0.1 ports, kill and restart.

    with NatsCluster(tmp_path) as cluster: url = cluster.url; cluster.kill(0); cluster.start(0)

Each node is a `nats-server -js` process with its own `-sd` store directory, client port,
cluster (route) port and monitoring port, all on loopback and chosen free on first start; a
node restarted after `kill` comes back on the same ports with the same store, as a real node
would. `start_all` waits until the cluster has elected a JetStream meta leader. The machine's
own NATS (port 4222) is never used. Without the binary the tests skip, except in CI (env
CI=true), where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

BINARY_CANDIDATES = ("/usr/sbin/nats-server", "/usr/local/sbin/nats-server", "/usr/bin/nats-server")
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
LEADER_TIMEOUT_S = 30.0


def nats_binary() -> str | None:
    for path in BINARY_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("nats-server")


def require_nats() -> str:
    """The server binary; fails the test in CI and skips it elsewhere when there is none."""
    binary = nats_binary()
    if binary is None:
        message = "nats-server binary not found (apt-get install nats-server)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return binary


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (held open together while choosing, so none repeats)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


class NatsNode:
    """One `nats-server` process of the cluster."""

    def __init__(self, cluster: NatsCluster, index: int, port: int, route_port: int, http_port: int):
        self.cluster = cluster
        self.index = index
        self.name = f"n{index}"
        self.port, self.route_port, self.http_port = port, route_port, http_port
        self.store_dir = cluster.workdir / self.name / "jetstream"
        self.log_path = cluster.workdir / self.name / "nats.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        routes = ",".join(f"nats://127.0.0.1:{n.route_port}" for n in self.cluster.nodes if n is not self)
        return [self.cluster.binary, "-js", "-sd", str(self.store_dir), "-n", self.name, "-a", "127.0.0.1",
                "-p", str(self.port), "-m", str(self.http_port), "--cluster_name", self.cluster.name,
                "--cluster", f"nats://127.0.0.1:{self.route_port}", "--routes", routes, "-l", str(self.log_path)]

    def start(self) -> None:
        if self.process is not None:
            raise RuntimeError(f"{self.name} already running")
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                code, self.process = self.process.returncode, None
                raise RuntimeError(f"nats-server {self.name} exited with {code} on start; log:\n{self.read_log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"nats-server {self.name} did not accept on {self.port}; log:\n"
                                       f"{self.read_log()}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no goodbye to the peers, nothing flushed beyond what the node had written."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM (lame duck off: a plain shutdown), SIGKILL if stuck."""
        self._end(signal.SIGTERM)

    def _end(self, sig: int) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.send_signal(sig)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def jsz(self) -> dict[str, object]:
        """The node's JetStream monitoring report (`/jsz`)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/jsz", timeout=2) as response:
            report: dict[str, object] = json.loads(response.read())
            return report

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return "(no log)"


class NatsCluster:
    """Three JetStream nodes routed to each other on loopback."""

    def __init__(self, workdir: Path, *, size: int = 3, name: str = "dtgtest", binary: str | None = None):
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.binary = binary or require_nats()
        self.name = name
        ports = free_ports(3 * size)
        self.nodes = [NatsNode(self, i, *ports[3 * i:3 * i + 3]) for i in range(size)]

    @property
    def url(self) -> str:
        """All nodes, as `--store` takes them."""
        return "nats://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start_all(self) -> None:
        for node in self.nodes:
            if not node.running:
                node.process = None
                node.start()
        self.wait_for_leader()

    def start(self, index: int) -> None:
        self.nodes[index].start()

    def kill(self, index: int) -> None:
        self.nodes[index].kill()

    def stop_all(self) -> None:
        for node in self.nodes:
            node.kill()

    def meta_leader(self) -> str | None:
        """The JetStream meta leader's name as a running node reports it, or None."""
        running = {n.name for n in self.nodes if n.running}
        for node in self.nodes:
            if not node.running:
                continue
            try:
                meta = node.jsz().get("meta_cluster")
            except (OSError, urllib.error.URLError, ValueError):
                continue
            if isinstance(meta, dict) and meta.get("leader") in running:  # a killed node may still be named
                return str(meta["leader"])
        return None

    def wait_for_leader(self, timeout_s: float = LEADER_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            leader = self.meta_leader()
            if leader is not None:
                return leader
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n.name}\n{n.read_log()}" for n in self.nodes)
                raise RuntimeError(f"no JetStream meta leader within {timeout_s} s; logs:\n{logs}")
            time.sleep(0.1)

    def __enter__(self) -> NatsCluster:
        try:
            self.start_all()
        except BaseException:
            self.stop_all()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


@pytest.fixture(name="nats_cluster")
def nats_cluster_fixture(tmp_path: Path) -> Iterator[NatsCluster]:
    """A running 3-node cluster for one test (import `nats_cluster_fixture` into the test module)."""
    with NatsCluster(tmp_path / "nats") as running:
        yield running
