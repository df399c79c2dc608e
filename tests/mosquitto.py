"""A real Mosquitto broker for tests: own config, free 127.0.0.1 port, stop and restart on that port.

    broker = Mosquitto(tmp_path); broker.start(); ...; broker.stop(); broker.start()  # same port

Persistence is on (saved when the broker stops), so a subscriber's persistent session and the
QoS 1 messages queued for it survive a restart, as in production. The `broker` fixture starts one
per test (`from mosquitto import broker_fixture`). Without the binary the tests skip, except in
CI (env CI=true), where they fail.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import trio
from paho.mqtt.enums import CallbackAPIVersion

BINARY_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


def mosquitto_binary() -> str | None:
    for path in BINARY_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("mosquitto")


def require_mosquitto() -> str:
    """The broker binary; fails the test in CI and skips it elsewhere when there is none."""
    binary = mosquitto_binary()
    if binary is None:
        message = "mosquitto binary not found (apt-get install mosquitto)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return binary


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def make_test_ca(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost: (ca.pem, server.pem, server.key)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.pem", "server.key", "server.csr",
                                                           "server.pem"))
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=dtgserver test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    _openssl("req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    extensions = directory / "server.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
             "-days", "2", "-extfile", extensions)
    return ca, cert, key


class Mosquitto:
    """One broker process at a time on a fixed 127.0.0.1 port (chosen free on first start).

    `tls=(ca, cert, key)` makes the listener TLS-only; `users={name: password}` turns anonymous
    access off.
    """

    def __init__(self, workdir: Path, *, port: int | None = None, binary: str | None = None,
                 tls: tuple[Path, Path, Path] | None = None, users: dict[str, str] | None = None):
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.binary = binary or require_mosquitto()
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.tls = tls
        self.users = users
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def config(self) -> str:
        lines = [f"listener {self.port} {self.host}"]
        if self.tls is not None:
            ca, cert, key = self.tls
            lines += [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}"]
        if self.users is None:
            lines.append("allow_anonymous true")
        else:
            passwords = self.workdir / "passwords"
            passwords.write_text("")
            passwords.chmod(0o600)
            tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
            for user, password in self.users.items():
                subprocess.run([tool, "-b", str(passwords), user, password], check=True, capture_output=True,
                               timeout=30)
            lines += ["allow_anonymous false", f"password_file {passwords}"]
        lines += [
            "persistence true",
            f"persistence_location {self.workdir}/",
            "max_queued_messages 0",  # no limit: a restarted subscriber must get everything queued
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to user mosquitto and cannot write workdir
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        if self.process is not None:
            raise RuntimeError("broker already running")
        config = self.workdir / "mosquitto.conf"
        config.write_text(self.config())
        self.process = subprocess.Popen([self.binary, "-c", str(config)], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.starts += 1
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise RuntimeError(f"mosquitto exited with {code} on start; log:\n{self.read_log()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    log = self.read_log()
                    raise RuntimeError(f"mosquitto did not accept on port {self.port}; log:\n{log}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM (the broker saves its persistence file and closes connections), SIGKILL if stuck."""
        process, self.process = self.process, None
        if process is None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing is read or acknowledged."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.resume()  # a paused broker ignores SIGTERM until continued
        self.stop()


class Subscriber:
    """A real paho subscriber with a persistent session (QoS 1), collecting what arrives, in order.

    It reconnects on its own after a broker restart; the broker keeps what was published for it
    meanwhile. Use as a context manager; `await wait_for(...)` polls within a bound.
    """

    def __init__(self, broker: Mosquitto, topic: str = "#", *, client_id: str = "test-subscriber"):
        self.broker = broker
        self.topic = topic
        self.messages: list[mqtt.MQTTMessage] = []
        self.connects = 0
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        self.client.reconnect_delay_set(1, 1)
        if broker.tls is not None:
            self.client.tls_set(ca_certs=str(broker.tls[0]))
        if broker.users:
            self.client.username_pw_set(*next(iter(broker.users.items())))
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = lambda client, userdata, message: self.messages.append(message)

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason_code: object,
                    properties: object) -> None:
        self.connects += 1
        client.subscribe(self.topic, qos=1)

    def __enter__(self) -> Subscriber:
        self.client.connect(self.broker.host, self.broker.port, keepalive=10)
        self.client.loop_start()
        if not self._subscribed.wait(START_TIMEOUT_S):
            self.__exit__()
            raise RuntimeError("subscriber got no SUBACK")
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        # paho closes its wake-up socket pair only in __del__; our callbacks make a reference cycle,
        # and the garbage collector may finalise the sockets first (ResourceWarning)
        self.client._reset_sockets()

    @property
    def payloads(self) -> list[bytes]:
        return [bytes(m.payload) for m in list(self.messages)]

    async def wait_for(self, done: Callable[[Subscriber], bool], timeout_s: float = 20.0) -> None:
        with trio.fail_after(timeout_s):
            while not done(self):
                await trio.sleep(0.02)

    async def wait_count(self, count: int, timeout_s: float = 20.0) -> None:
        await self.wait_for(lambda s: len(s.messages) >= count, timeout_s)


@pytest.fixture(name="broker")
def broker_fixture(tmp_path: Path) -> Iterator[Mosquitto]:
    """A running broker for one test (import `broker_fixture` into the test module to use it)."""
    with Mosquitto(tmp_path / "mosquitto") as running:
        yield running
