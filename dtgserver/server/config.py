"""Server configuration: one attrs class, unit-named defaults."""

from __future__ import annotations

from pathlib import Path

import attrs

from ..bridge.driving import DEFAULT_EDITION, DrivingConfig
from ..bridge.tripmetrics import DEFAULT_BATTERY_WARNING_V
from ..protocol import DEFAULT_MAX_BODY_COUNT, max_frame_length

SECONDS = 1.0
MIB = 1 << 20
DEFAULT_PORT = 9320
MAX_TRIP_DEADLINE_H = 24 * 365  # a longer wait for a trip's last bodies is a mistake, not a setting


@attrs.frozen
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    data_dir: Path = attrs.field(default=Path("dtg-data"), converter=Path)
    idle_timeout: float = 3 * SECONDS  # spec §4.4: nothing received for 3 s → close
    packet_timeout: float = 30 * SECONDS  # one packet must arrive whole within this (slow-drip bound)
    send_timeout: float = 10 * SECONDS  # a terminal that does not read its answer
    commit_timeout: float = 10 * SECONDS  # a packet not committed by then is answered 4 (hung disk, stopped writer)
    max_connections: int = 10_000
    max_body_count: int = DEFAULT_MAX_BODY_COUNT
    buffer_budget: int = 64  # MiB: bytes of partly received packets all sessions of a process may hold
    queue_high_water: int = 2048  # packets waiting for a commit before new ones get 4
    max_batch: int = 512
    grace_period: float = 10 * SECONDS  # on SIGTERM: time for in-flight sessions to finish
    control_poll: float = 1 * SECONDS  # how often a running server looks for registry/maintenance changes
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    # MQTT forwarding (dtgserver.bridge); None = store only
    mqtt_url: str | None = None
    mqtt_tls_ca: Path | None = None
    topic_prefix: str = ""
    client_id: str | None = None
    profile: str = "seed"
    battery_warning_v: float = DEFAULT_BATTERY_WARNING_V
    backlog_high_water: int = 100_000  # packets after the bridge's cursor before new packets get 4
    external_bridge: bool = False  # a `dtgserver bridge` process consumes the data dir: its backlog counts
    trip_cache: int = 100_000  # terminals whose trip state the bridge keeps in memory
    edition: str = DEFAULT_EDITION  # which edition of the dangerous-driving criteria (docs/driving.md)
    default_class: str | None = "taxi"  # the class of vehicle type 41 and unknown types; None: no behaviours
    vehicle_class: dict[str, str] = attrs.field(factory=dict)  # modem -> class, whatever its basic info says
    trip_deadline_h: float = 24.0  # a trip waiting this long after its KEY OFF for its last bodies goes out partial
    # the store on a NATS JetStream cluster (dtgserver.store.jetstream) instead of SQLite in data_dir; None = SQLite
    store: str | None = None  # nats://… URL
    store_tls_ca: Path | None = None
    store_replicas: int = 3
    store_ack_timeout: float = 10 * SECONDS
    store_duplicate_window: float = 600 * SECONDS  # the stream's duplicate window, when a server creates it
    store_partitions: int | None = None  # None: what the cluster has recorded (16 for a new one)

    def __attrs_post_init__(self) -> None:
        frame = max_frame_length(max_body_count=self.max_body_count)
        if self.buffer_budget * MIB < frame:
            raise ValueError(f"--buffer-budget {self.buffer_budget} MiB is less than one packet of "
                             f"--max-body-count {self.max_body_count} ({frame:,} bytes)")
        self.driving()  # ValueError for an unknown edition or class
        if not 0 < self.trip_deadline_h <= MAX_TRIP_DEADLINE_H:
            raise ValueError(f"--trip-deadline-h {self.trip_deadline_h} is not above 0 and at most "
                             f"{MAX_TRIP_DEADLINE_H}")

    def driving(self) -> DrivingConfig:
        """Which dangerous-driving criteria the bridge applies to which terminal."""
        return DrivingConfig(edition=self.edition, default_class=self.default_class, classes=self.vehicle_class)

    @property
    def trip_deadline_ms(self) -> int:
        return round(self.trip_deadline_h * 3_600_000)
