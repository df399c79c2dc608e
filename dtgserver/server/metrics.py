"""Prometheus metrics in the text exposition format, and the /metrics + /healthz HTTP endpoint."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import attrs
import trio

from .tcp import listen_error

log = logging.getLogger("dtgserver.metrics")


@attrs.define
class Metrics:
    """Everything the server counts; gauges are read from their owners when scraped."""

    sessions: Counter[str] = attrs.field(factory=Counter)  # by final result name
    packets: Counter[str] = attrs.field(factory=Counter)  # by kind
    results: Counter[int] = attrs.field(factory=Counter)  # answers sent, by code
    bodies: int = 0
    bytes_received: int = 0
    open_connections: int = 0
    rejected_connections: int = 0
    gauges: dict[str, Callable[[], float]] = attrs.field(factory=dict)

    def render(self) -> str:
        lines = [
            "# HELP dtg_sessions_total Connections handled, by the last result answered (none: closed unanswered).",
            "# TYPE dtg_sessions_total counter",
            *(f'dtg_sessions_total{{result="{k}"}} {v}' for k, v in sorted(self.sessions.items())),
            "# HELP dtg_answers_total Answers sent, by result code.",
            "# TYPE dtg_answers_total counter",
            *(f'dtg_answers_total{{result="{k}"}} {v}' for k, v in sorted(self.results.items())),
            "# HELP dtg_packets_total Complete packets received, by kind.",
            "# TYPE dtg_packets_total counter",
            *(f'dtg_packets_total{{kind="{k}"}} {v}' for k, v in sorted(self.packets.items())),
            "# TYPE dtg_bodies_total counter",
            f"dtg_bodies_total {self.bodies}",
            "# TYPE dtg_received_bytes_total counter",
            f"dtg_received_bytes_total {self.bytes_received}",
            "# TYPE dtg_open_connections gauge",
            f"dtg_open_connections {self.open_connections}",
            "# TYPE dtg_rejected_connections_total counter",
            f"dtg_rejected_connections_total {self.rejected_connections}",
        ]
        for name, read in sorted(self.gauges.items()):
            value = read()  # every digit: ':g' kept six, so counters past 999999 stopped moving
            lines.append(f"dtg_{name} {int(value) if isinstance(value, int) else repr(float(value))}")
        return "\n".join(lines) + "\n"


async def serve_metrics(metrics: Metrics, host: str, port: int, healthy: Callable[[], bool],
                        *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """A minimal HTTP/1.0 responder for GET /metrics and GET /healthz; reports its bound port."""

    async def handle(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(5):
                request = b""
                while b"\r\n\r\n" not in request and len(request) < 8192:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    request += chunk
                parts = request.split(b" ", 2)
                path = parts[1].decode("ascii", "replace") if len(parts) > 1 else ""
                if path == "/metrics":
                    status, body = "200 OK", metrics.render()
                elif path == "/healthz":
                    ok = healthy()
                    status, body = ("200 OK", "ok\n") if ok else ("503 Service Unavailable", "unhealthy\n")
                else:
                    status, body = "404 Not Found", "not found\n"
                data = body.encode()
                head = (f"HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n"
                        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n")
                await stream.send_all(head.encode() + data)
        except trio.BrokenResourceError:
            pass
        finally:
            await stream.aclose()

    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as e:
        raise listen_error(e, host, port, "--metrics-host, --metrics-port") from None
    log.info("metrics on http://%s:%d/metrics", host, listeners[0].socket.getsockname()[1])
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)
