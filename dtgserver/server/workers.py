"""`serve --workers N` and `serve --writer-process`: server processes and the supervisor keeping them up.

Each worker binds its own listening socket to the same address with SO_REUSEPORT, so the kernel
spreads new connections over the workers without a shared accept queue. A terminal's data lives
in the shard its modem hashes to; worker i is the only writer of shard i, runs its MQTT
forwarder, and relays a packet whose terminal belongs to another shard to that shard's
worker (server/relay.py).

With `--writer-process` the two halves of a worker run as two processes: N front processes take
the connections (sessions, framing, registry, answers) and relay every packet to the writer of
its terminal's shard; N writer processes listen on no TCP port, commit the packets relayed to
them and forward their shard's outbox to MQTT. The sessions' CPU and the commits' CPU are then
spent in separate processes, each with its own GIL, so a second core is used even with N = 1.

The supervisor starts the workers as separate Python processes (the writers first, and the front
processes once the writers take links), restarts one that dies (with a growing delay, reset after
it has run a while), and on SIGTERM or SIGINT stops them gracefully: the front processes first,
so that the packets of their last sessions still reach a writer, then the writers.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import trio

from .. import logs
from ..store import Control, shard_paths
from ..store.control import connect
from .app import STOP_SIGNALS, ProcessRole, check_shard_count, serve, stop_signals
from .config import ServerConfig
from .relay import RelayDir
from .tcp import bound_address, listen_error, reserve_port

log = logging.getLogger("dtgserver.workers")

SECONDS = 1.0
WRITER_READY_S = 30 * SECONDS  # the front processes start when the writers take links, or after this


MAX_WORKERS_PER_CPU = 4
"""More workers than this per CPU is a typo, not a choice: each is a process of its own (with
--writer-process two), the sessions are CPU-bound, and a data dir keeps its shard count for good."""


def cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_count(value: str | int) -> int:
    """`auto` → the CPUs this process may run on; otherwise a positive integer of at most
    MAX_WORKERS_PER_CPU per CPU (ValueError, saying why, if not)."""
    if value == "auto":
        return cpus()
    count = int(value)
    if count < 1:
        raise ValueError(f"workers must be at least 1, got {count}")
    most = MAX_WORKERS_PER_CPU * cpus()
    if count > most:
        raise ValueError(f"{count} is more than {MAX_WORKERS_PER_CPU} per CPU ({cpus()} here, so at most {most}): "
                         f"each worker is a process, and a data dir keeps the shard count it was first served with")
    return count


# -- the worker process ------------------------------------------------------------------------------


def _config_to_json(config: ServerConfig) -> dict[str, Any]:
    return {k: (str(v) if k in _PATHS and v is not None else v) for k, v in attrs.asdict(config).items()}


def _config_from_json(fields: dict[str, Any]) -> ServerConfig:
    for name in _PATHS:
        if fields.get(name) is not None:
            fields[name] = Path(fields[name])
    return ServerConfig(**fields)


_PATHS = ("data_dir", "mqtt_tls_ca", "store_tls_ca")


async def _run_worker(config: ServerConfig, shard: int, shards: int, role: ProcessRole, supervisor_pid: int) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_when_orphaned, supervisor_pid)
        await serve(config, shard=shard, shards=shards, reuse_port=True, role=role)
        nursery.cancel_scope.cancel()


async def _stop_when_orphaned(supervisor_pid: int) -> None:
    """Shut down gracefully when the supervisor is gone (killed, crashed) and nobody would restart us.

    Polled rather than PR_SET_PDEATHSIG: that fires when the *thread* that forked us exits, and
    trio starts processes from its worker threads, which end when idle.
    """
    while os.getppid() == supervisor_pid:
        await trio.sleep(1)
    log.error("supervisor %d is gone: stopping", supervisor_pid)
    os.kill(os.getpid(), signal.SIGTERM)


SPEC_VARIABLE = "_DTGSERVER_WORKER_SPEC"  # the environment, not argv: the broker password stays out of `ps`


def worker_main() -> int:
    """Entry point of one worker process: `python -m dtgserver.server.workers`, its settings in SPEC_VARIABLE."""
    spec = json.loads(os.environ.pop(SPEC_VARIABLE))
    logs.configure(spec["verbosity"], spec["log_format"])
    config = _config_from_json(spec["config"])
    exit_code = 0
    try:
        trio.run(_run_worker, config, spec["shard"], spec["shards"], spec["role"], spec["supervisor_pid"])
    except* OSError as group:  # e.g. the address is taken by a process that did not set SO_REUSEPORT
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
        log.error("%s %d: %s", _ROLE_NAMES[spec["role"]], spec["shard"], error)
        exit_code = 1
    return exit_code


# -- the supervisor ---------------------------------------------------------------------------------


_ROLE_NAMES = {"combined": "worker", "front": "front process", "writer": "writer"}


@attrs.define
class Worker:
    index: int  # its shard (a writer's, a combined worker's); a front process's number
    role: ProcessRole = "combined"
    process: trio.Process | None = None
    starts: int = 0

    @property
    def name(self) -> str:
        return f"{_ROLE_NAMES[self.role]} {self.index}"


class Supervisor:
    """Runs the worker processes until stop(); restarts any that exits while running.

    `workers` combined workers, or with `writer_process` as many writers and front processes.
    """

    def __init__(self, config: ServerConfig, workers: int, *, writer_process: bool = False, verbosity: int = 0,
                 backoff_initial_s: float = 0.5 * SECONDS, backoff_max_s: float = 30 * SECONDS,
                 stable_s: float = 30 * SECONDS):
        self.config = config
        self.shards = workers
        self.writers = [Worker(i, "writer") for i in range(workers)] if writer_process else []
        self.fronts = [Worker(i, "front" if writer_process else "combined") for i in range(workers)]
        self.workers = self.fronts + self.writers
        self.verbosity = verbosity
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.stable_s = stable_s
        self.port: int | None = None
        self.failed_exits = 0  # workers that exited non-zero during shutdown
        self._stopping = trio.Event()

    def stop(self) -> None:
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        relay_dir: RelayDir | None = None
        self._check_metrics_ports()  # a worker that cannot listen would restart forever
        if cfg.store is None:  # with --store nats:// the workers keep nothing in the data dir
            control = Control(cfg.data_dir)
            check_shard_count(control, cfg.data_dir, self.shards)  # refuse before any worker starts
            control.close()
            for path in shard_paths(cfg.data_dir):  # a file that is no database: say so once, not in a restart loop
                connect(path).close()
            relay_dir = RelayDir(cfg.data_dir)  # and a relay directory other users could reach
        try:
            reserved = reserve_port(cfg.host, cfg.port)
        except BaseException:
            if relay_dir is not None:
                relay_dir.close()
            raise
        try:
            self.port = int(reserved.getsockname()[1])
            config = attrs.evolve(cfg, port=self.port)
            async with trio.open_nursery() as nursery:
                for worker in self.writers:
                    nursery.start_soon(self._keep_running, worker, config)
                for worker in self.writers:  # a front process would answer 4 until its writer is up
                    assert relay_dir is not None  # writers relay through the data dir, never with --store
                    await self._wait_taking_links(worker, config, relay_dir)
                if not self._stopping.is_set():  # a stop during start-up starts nothing more
                    for worker in self.fronts:
                        nursery.start_soon(self._keep_running, worker, config)
                    if self.writers:
                        log.info("front processes: %d, writers: %d, on %s:%d, data in %s", len(self.fronts),
                                 len(self.writers), cfg.host, self.port, cfg.data_dir)
                    else:
                        log.info("%d workers on %s:%d, data in %s", len(self.fronts), cfg.host, self.port,
                                 cfg.data_dir)
                task_status.started(self.port)
                await self._stopping.wait()
                await self._stop_all(self.fronts)  # their last packets still reach the writers
                await self._stop_all(self.writers)
        finally:
            reserved.close()
            if relay_dir is not None:
                relay_dir.close()

    def _check_metrics_ports(self) -> None:
        """Every process's metrics port can be bound now (a ListenError naming the first that cannot)."""
        cfg = self.config
        if cfg.metrics_port is None:
            return
        family, _ = bound_address(cfg.metrics_host, 0)
        for place, worker in enumerate(self.workers):
            port = cfg.metrics_port + place
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the endpoint's own socket
                try:
                    probe.bind(bound_address(cfg.metrics_host, port)[1])
                except OSError as e:
                    option = f"--metrics-port + {place}" if place else "--metrics-port"
                    raise listen_error(e, cfg.metrics_host, port, f"{option}, {worker.name}") from None

    async def _stop_all(self, workers: list[Worker]) -> None:
        """SIGTERM, then wait for the graceful exits; one that outlives its grace period by far is stuck: kill it."""
        for worker in workers:
            _signal(worker, signal.SIGTERM)
        with trio.move_on_after(self.config.grace_period + 15 * SECONDS):
            while any(w.process is not None and w.process.returncode is None for w in workers):
                await trio.sleep(0.05)
        for worker in workers:
            if _signal(worker, signal.SIGKILL):
                log.error("%s did not stop in time: killed", worker.name)

    async def _wait_taking_links(self, writer: Worker, config: ServerConfig, relay_dir: RelayDir) -> None:
        """Until the writer accepts a relay link (it has opened its shard), at most WRITER_READY_S."""
        name = relay_dir.socket_path(config.port, writer.index)
        with trio.move_on_after(WRITER_READY_S):
            while not self._stopping.is_set():
                sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    await sock.connect(name)
                    return
                except OSError:
                    await trio.sleep(0.05)
                finally:
                    sock.close()
        if not self._stopping.is_set():
            log.error("%s takes no links after %.0f s; starting the front processes anyway (its terminals "
                      "are answered 4 until it does)", writer.name, WRITER_READY_S)

    async def _keep_running(self, worker: Worker, config: ServerConfig) -> None:
        delay = self.backoff_initial_s
        if config.metrics_port:  # one endpoint per process: METRICS_PORT + its place in self.workers
            config = attrs.evolve(config, metrics_port=config.metrics_port + self.workers.index(worker))
        spec = {"config": _config_to_json(config), "shard": worker.index, "shards": self.shards, "role": worker.role,
                "verbosity": self.verbosity, "log_format": logs.current_format, "supervisor_pid": os.getpid()}
        command = [sys.executable, "-m", "dtgserver.server.workers"]
        env = {**os.environ, SPEC_VARIABLE: json.dumps(spec)}
        while not self._stopping.is_set():
            started = trio.current_time()
            # A session of its own: a Ctrl-C on the terminal reaches the supervisor only, which passes
            # it on. SIGINT and SIGTERM blocked from its first instruction: one that comes before its
            # handler is in place waits for it, instead of killing it (serve() unblocks them).
            process = await trio.lowlevel.open_process(command, stdin=subprocess.DEVNULL, env=env,
                                                       start_new_session=True, preexec_fn=_hold_stop_signals)
            worker.process, worker.starts = process, worker.starts + 1
            log.info("%s started (pid %d)", worker.name, process.pid)
            if self._stopping.is_set():  # stopped while it was being started: _stop_all missed it
                _signal(worker, signal.SIGTERM)
            with trio.CancelScope(shield=True):  # the nursery ends only when its workers have exited
                returncode = await process.wait()
            if self._stopping.is_set():
                if returncode != 0:
                    self.failed_exits += 1
                    log.error("%s exited with %s while stopping", worker.name, _describe(returncode))
                return
            if trio.current_time() - started >= self.stable_s:
                delay = self.backoff_initial_s
            log.error("%s (pid %d) exited with %s; restarting in %.1f s", worker.name, process.pid,
                      _describe(returncode), delay)
            with trio.move_on_after(delay):
                await self._stopping.wait()
            delay = min(delay * 2, self.backoff_max_s)


def _hold_stop_signals() -> None:
    """In the child, between fork and exec (async-signal-safe: one system call)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def _signal(worker: Worker, signum: int) -> bool:
    process = worker.process
    if process is None or process.returncode is not None:
        return False
    try:
        process.send_signal(signum)
    except ProcessLookupError:
        return False
    return True


def _describe(returncode: int) -> str:
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"code {returncode}"


async def serve_workers(config: ServerConfig, workers: int, verbosity: int = 0, *, writer_process: bool = False,
                        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> int:
    """Supervise the processes until SIGINT or SIGTERM; 0 when every one stopped cleanly.

    A signal is acted on whenever it comes: during start-up (while the writers are awaited) the
    processes started so far are stopped, and no other is started.
    """
    supervisor = Supervisor(config, workers, writer_process=writer_process, verbosity=verbosity)
    with stop_signals() as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signals() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if supervisor.stopping:
                        log.info("%s again: already stopping (each process gets %.1f s for its sessions)", name,
                                 config.grace_period)
                    else:
                        log.info("%s: stopping %d processes", name, len(supervisor.workers))
                        supervisor.stop()

            async def run_then_stop_watching(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
                await supervisor.run(task_status=task_status)
                nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signals)
            port = await nursery.start(run_then_stop_watching)
            task_status.started(port)
    return 1 if supervisor.failed_exits else 0


if __name__ == "__main__":
    sys.exit(worker_main())
