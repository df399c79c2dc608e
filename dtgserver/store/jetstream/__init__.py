"""The store on a NATS JetStream cluster (`--store nats://…`): packets in a replicated stream,
registry and maintenance mode in a key-value bucket shared by every node. See docs/scaling.md."""

from __future__ import annotations

from .backend import CONTROL_BUCKET, STREAM, NatsBackend, NatsOptions, PartitionMismatch
from .control import NatsControl
from .link import NatsLink, StoreUrl
from .packets import JetStreamStore, read_stream

__all__ = [
    "CONTROL_BUCKET", "STREAM", "JetStreamStore", "NatsBackend", "NatsControl", "NatsLink", "NatsOptions",
    "PartitionMismatch", "StoreUrl", "open_server_store", "read_stream",
]


def open_server_store(options: NatsOptions, *, queue_high_water: int) -> tuple[NatsControl, JetStreamStore]:
    """A server's control and packet store on one connection; both start working once `store.run` runs.

    Nothing here waits for the cluster: a server started while it is unreachable accepts
    connections and answers 4 until it is back.
    """
    backend = NatsBackend(options)
    control = NatsControl(backend, watch=True)
    return control, JetStreamStore(backend, queue_high_water=queue_high_water, control=control)
