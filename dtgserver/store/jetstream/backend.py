"""The JetStream layout dtgserver uses, and the set-up shared by the packet store and the control.

- Stream `DTG_PACKETS` (file storage, `replicas` copies, default 3): one message per accepted
  packet on `dtg.packets.<partition>.<modem>`, payload the packet's exact bytes, `Nats-Msg-Id` its
  digest (so a resend inside the duplicate window is the same message), and headers
  `Dtg-Received-At` (Unix seconds, server clock), `Dtg-Peer` and `Dtg-Kind`: what `export` needs
  to print today's JSON. Status logs are packets like any other: their text is in the stream.
- Key-value bucket `dtg_control` (same replicas): `maintenance` and `registry` ("on"/"off"),
  `device.<modem>` (JSON: status, note, updated_at), and `partitions`, the number of partitions
  the packets are spread over, recorded by the first node that starts and kept from then on.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import attrs
import nats.errors
import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType, StreamConfig

from .link import NatsLink, StoreUrl

log = logging.getLogger("dtgserver.store.jetstream")

STREAM = "DTG_PACKETS"
SUBJECT_PREFIX = "dtg.packets"
CONTROL_BUCKET = "dtg_control"
PARTITIONS_KEY = "partitions"
DEFAULT_PARTITIONS = 16
DUPLICATE_WINDOW_S = 600.0  # what a stream is made with unless a server asks for another window
SETUP_RETRY_S = 0.5
JS_API_TIMEOUT_S = 5.0  # one JetStream API request (stream info, create, key-value get/put)
COMMAND_SETUP_S = 15.0  # how long a command waits for JetStream to answer before it gives up

# What "not now" looks like from nats-py: no connection, no stream leader, no answer in time.
UNAVAILABLE = (nats.errors.Error, OSError, asyncio.TimeoutError, ConnectionError)


class PartitionMismatch(Exception):
    """The cluster's packets are spread over another number of partitions than was asked for."""


@attrs.frozen
class NatsOptions:
    url: StoreUrl
    replicas: int = 3
    ack_timeout: float = 10.0  # seconds a packet may wait for its PubAck before the packet is answered 4
    duplicate_window: float | None = None  # seconds a Nats-Msg-Id is remembered by a stream made here (None: 600)
    partitions: int | None = None  # None: whatever the cluster has recorded, else DEFAULT_PARTITIONS


def subject(partition: int, modem: str) -> str:
    return f"{SUBJECT_PREFIX}.{partition}.{modem}"


def partition_of_subject(name: str) -> tuple[int, str]:
    _, _, partition, modem = name.split(".", 3)
    return int(partition), modem


async def ensure_stream(js: Any, options: NatsOptions) -> None:
    """Create the packet stream unless it exists (an existing one is used as configured)."""
    try:
        info = await js.stream_info(STREAM)
    except nats.js.errors.NotFoundError:
        pass
    else:
        window = info.config.duplicate_window
        asked = options.duplicate_window
        if asked is not None and window is not None and abs(window - asked) > 0.001:
            log.warning("stream %s has a duplicate window of %.0f s, not the %.0f s asked for: kept (change it "
                        "with `nats stream edit`)", STREAM, window, asked)
        return
    await js.add_stream(StreamConfig(
        name=STREAM, subjects=[f"{SUBJECT_PREFIX}.>"], storage=StorageType.FILE, num_replicas=options.replicas,
        duplicate_window=options.duplicate_window or DUPLICATE_WINDOW_S,
        description="dtgserver: every accepted packet, raw"))
    log.info("created stream %s (%d replicas, duplicate window %.0f s)", STREAM, options.replicas,
             options.duplicate_window or DUPLICATE_WINDOW_S)


async def ensure_control(js: Any, options: NatsOptions) -> Any:
    """The control bucket (created with the stream's replicas when missing)."""
    try:
        return await js.key_value(CONTROL_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        pass
    kv = await js.create_key_value(KeyValueConfig(
        bucket=CONTROL_BUCKET, history=1, storage=StorageType.FILE, replicas=options.replicas,
        description="dtgserver: registry, maintenance mode, partitions"))
    log.info("created key-value bucket %s (%d replicas)", CONTROL_BUCKET, options.replicas)
    return kv


async def claim_partitions(kv: Any, wanted: int | None) -> int:
    """The recorded partition count; records `wanted` (or the default) when none is yet."""
    proposal = wanted or DEFAULT_PARTITIONS
    try:
        await kv.create(PARTITIONS_KEY, str(proposal).encode())
        return proposal
    except nats.js.errors.KeyWrongLastSequenceError:
        pass
    recorded = int((await kv.get(PARTITIONS_KEY)).value)
    if wanted is not None and wanted != recorded:
        raise PartitionMismatch(
            f"the NATS cluster's packets are spread over {recorded} partitions, not {wanted}: a terminal's "
            f"packets live in one partition chosen by its modem number, and moving them is not supported")
    return recorded


class NatsBackend:
    """One connection for a process, and what the process needs on it: the stream and the control bucket."""

    def __init__(self, options: NatsOptions, *, name: str = "dtgserver"):
        self.options = options
        self.link = NatsLink(options.url, name=name)
        self.js: Any = None
        self.kv: Any = None
        self.partitions = 0
        self.ready = False  # connected once, stream and bucket there, partitions known

    async def setup(self, *, retry: bool = True) -> None:
        """On the NATS loop: connect, then make sure of the stream and the bucket.

        retry=True (a server): until done. retry=False (a command): a failed connect raises at
        once; JetStream not answering yet (a meta leader being elected) is retried for
        COMMAND_SETUP_S, then raises ConnectionError.
        """
        nc = await self.link.connect(retry=retry)
        self.js = nc.jetstream(timeout=JS_API_TIMEOUT_S)
        deadline = asyncio.get_running_loop().time() + COMMAND_SETUP_S
        while True:
            try:
                await ensure_stream(self.js, self.options)
                self.kv = await ensure_control(self.js, self.options)
                self.partitions = await claim_partitions(self.kv, self.options.partitions)
                break
            except PartitionMismatch:
                raise
            except UNAVAILABLE as e:
                if not retry and asyncio.get_running_loop().time() > deadline:
                    raise ConnectionError(f"NATS cluster {self.options.url}: {e or type(e).__name__}") from None
                log.warning("JetStream not ready on %s (%s); retrying", self.options.url, e or type(e).__name__)
                await asyncio.sleep(SETUP_RETRY_S)
        self.ready = True

    def open_blocking(self) -> None:
        """For one-shot commands: connect and set up now, or raise ConnectionError."""
        self.link.call_blocking(self.setup(retry=False), timeout=COMMAND_SETUP_S + 2 * JS_API_TIMEOUT_S)

    def close(self) -> None:
        self.link.close()
