"""Prometheus metrics through `prometheus_client` (its registry, metric families and text formats),
and the /metrics + /healthz HTTP endpoint on the Trio side.

The sessions count into plain integers and Counters (`Metrics`), cheap on the hot path and never
touched by another thread; a scrape turns them into metric families (`MetricsCollector`) in a
`CollectorRegistry` of their own, and prometheus_client writes the exposition: the Prometheus
text format 0.0.4, or OpenMetrics when the scraper asks for it. Each process has its own
registry and endpoint (`--workers`, `--writer-process`: one scrape target per process).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import attrs
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from .tcp import listen_error

log = logging.getLogger("dtgserver.metrics")

PREFIX = "dtg_"
# What is read from the owners when scraped (`Metrics.gauges`): name without the prefix → type, help.
# A `_sum` is the sum of a summary whose count is dtg_commits_total (one observation per commit).
READ_AT_SCRAPE: dict[str, tuple[str, str]] = {
    "commit_queue": ("gauge", "Packets waiting for a commit."),
    "commits_total": ("counter", "Transactions committed."),
    "commit_failures_total": ("counter", "Transactions that failed (their packets answered 4)."),
    "committed_packets_total": ("counter", "Packets stored (new rows)."),
    "duplicate_packets_total": ("counter", "Resends answered 0 without a new row."),
    "commit_batch_size_last": ("gauge", "Packets in the last commit."),
    "commit_batch_size_sum": ("summary", "Packets per commit."),
    "commit_seconds_last": ("gauge", "Duration of the last commit, in seconds."),
    "commit_seconds_sum": ("summary", "Duration of the commits, in seconds."),
    "mqtt_backlog": ("gauge", "Committed packets after the MQTT bridge's saved cursor (not yet all acknowledged)."),
    "maintenance": ("gauge", "1 in maintenance mode."),
    "control_reload_failures_total": ("counter", "Reloads of the registry and switches that failed (last state kept)."),
    "commit_timeouts_total": ("counter", "Packets answered 4: their commit had not ended within --commit-timeout."),
    "healthy": ("gauge", "1 while /healthz answers 200: a packet sent now would be committed."),
    "relayed_packets_total": ("counter", "Packets this process relayed to the process of their shard."),
    "relay_received_packets_total": ("counter", "Packets other processes relayed to this one."),
    "mqtt_published_total": ("counter", "MQTT messages published (republishes included)."),
    "mqtt_acknowledged_total": ("counter", "MQTT messages acknowledged by the broker."),
    "mqtt_reconnects_total": ("counter", "Broker connection attempts after the first."),
    "mqtt_connected": ("gauge", "1 while connected to the broker."),
    "buffered_bytes": ("gauge", "Bytes of partly received packets this process holds."),
    "buffer_budget_bytes": ("gauge", "--buffer-budget in bytes."),
    "buffer_budget_refusals_total": ("counter", "Sessions and new connections answered 4: the buffer budget spent."),
    "memory_trims_total": ("counter", "Times freed memory was handed back to the OS (malloc_trim)."),
    "bridge_derived_packets_total": ("counter", "Packets the MQTT bridge derived messages from."),
    "bridge_derive_errors_total": ("counter", "Packets whose messages could not be built (logged, skipped)."),
    "bridge_resends_dropped_total": ("counter", "Packets the stream held twice (a resend after its duplicate "
                                                "window) whose second copy the bridge skipped."),
    "bridge_read_errors_total": ("counter", "Failed reads of packets or saved trip states (retried)."),
    "bridge_cursor_saves_total": ("counter", "Saves of the bridge's cursor (one per batch of acknowledgements)."),
    "bridge_cursor_errors_total": ("counter", "Failed saves or opens of the bridge's cursor (retried)."),
    "bridge_lag_p50_seconds": ("gauge", "Median seconds from a packet's arrival to the PUBACK of its last message."),
    "bridge_lag_p99_seconds": ("gauge", "99th percentile of the same, over the last 10,000 packets."),
    "bridge_trip_states": ("gauge", "Trip states in the bridge's memory (bounded by --trip-cache)."),
    "bridge_leftovers_published_total": ("counter", "Messages an earlier version had queued in a shard's outbox, "
                                         "published on the shard's first start."),
    "bridge_cursor_read_errors_total": ("counter", "With --external-bridge: failed reads of the bridge's cursor "
                                        "file (the last value kept)."),
}
SUMMARY_COUNT = "commits_total"


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
    registry: CollectorRegistry = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(MetricsCollector(self))

    def render(self) -> str:
        """The Prometheus text format (0.0.4) of every metric, as prometheus_client writes it."""
        return generate_latest(self.registry).decode("utf-8")


class MetricsCollector(Collector):
    """`Metrics` as prometheus_client metric families, built afresh at each scrape."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        yield _labelled(CounterMetricFamily("dtg_sessions", "Connections handled, by the last result answered "
                                            "(none: closed unanswered).", labels=["result"]), m.sessions)
        yield _labelled(CounterMetricFamily("dtg_answers", "Answers sent, by result code.", labels=["result"]),
                        m.results)
        yield _labelled(CounterMetricFamily("dtg_packets", "Complete packets received, by kind.", labels=["kind"]),
                        m.packets)
        yield CounterMetricFamily("dtg_bodies", "Realtime bodies received.", value=m.bodies)
        yield CounterMetricFamily("dtg_received_bytes", "Bytes received from terminals.", value=m.bytes_received)
        yield GaugeMetricFamily("dtg_open_connections", "Connections open now.", value=m.open_connections)
        yield CounterMetricFamily("dtg_rejected_connections",
                                  "Connections answered 4 at once: --max-connections, or the buffer budget spent.",
                                  value=m.rejected_connections)
        values = {name: float(read()) for name, read in m.gauges.items()}
        for name, value in sorted(values.items()):
            kind, text = READ_AT_SCRAPE.get(name, ("counter" if name.endswith("_total") else "gauge", name))
            if kind == "summary":
                yield SummaryMetricFamily(PREFIX + name.removesuffix("_sum"), text,
                                          count_value=int(values.get(SUMMARY_COUNT, 0)), sum_value=value)
            elif kind == "counter":
                yield CounterMetricFamily(PREFIX + name, text, value=value)
            else:
                yield GaugeMetricFamily(PREFIX + name, text, value=value)


def _labelled(family: CounterMetricFamily, counts: Counter[str] | Counter[int]) -> CounterMetricFamily:
    for key, count in sorted(counts.items()):
        family.add_metric([str(key)], count)
    return family


def respond(metrics: Metrics, healthy: Callable[[], bool], request: bytes) -> bytes:
    """The whole HTTP/1.0 response to one request: GET or HEAD (headers only) of /metrics or
    /healthz, any query string ignored; 405 for other methods, 404 for other paths."""
    line = request.split(b"\r\n", 1)[0].decode("latin-1")
    method, target = [*line.split(" "), "", ""][:2]
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (h.partition(":") for h in request.decode("latin-1").split("\r\n")[1:]) if k}
    path = urlsplit(target).path
    content_type = "text/plain; charset=utf-8"
    if method not in ("GET", "HEAD"):
        status, body, extra = "405 Method Not Allowed", b"GET or HEAD only\n", "Allow: GET, HEAD\r\n"
    elif path == "/metrics":
        encoder, content_type = choose_encoder(headers.get("accept", ""))  # OpenMetrics if asked for
        status, body, extra = "200 OK", encoder(metrics.registry), ""
    elif path == "/healthz":
        ok = healthy()
        status, body, extra = ("200 OK", b"ok\n", "") if ok else ("503 Service Unavailable", b"unhealthy\n", "")
    else:
        status, body, extra = "404 Not Found", b"not found\n", ""
    head = (f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n{extra}"
            f"Connection: close\r\n\r\n").encode("latin-1")
    return head if method == "HEAD" else head + body


async def serve_metrics(metrics: Metrics, host: str, port: int, healthy: Callable[[], bool],
                        *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """A minimal HTTP/1.0 responder for /metrics and /healthz; reports its bound port."""

    async def handle(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(5):
                request = b""
                while b"\r\n\r\n" not in request and len(request) < 8192:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    request += chunk
                await stream.send_all(respond(metrics, healthy, request))
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
