"""Registry and maintenance mode in the cluster's key-value bucket, shared by every node.

The same methods as the SQLite `Control` (store/control.py). A running server watches the
bucket: a change made through any node (`dtgserver devices add --store …`) arrives as a watch
update, typically within milliseconds, and the server swaps in the new `ControlState` without a
restart. Until the watch has delivered the bucket's current values, the store answers 4 (the
registry is not known yet).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Any

import trio

from ..control import ControlState, Device, DeviceStatus
from .backend import CONTROL_BUCKET, PARTITIONS_KEY, UNAVAILABLE, NatsBackend

log = logging.getLogger("dtgserver.store.jetstream")

DEVICE_PREFIX = "device."
WATCH_RETRY_S = 0.5


def _state(values: dict[str, bytes]) -> ControlState:
    active: set[str] = set()
    cancelled: set[str] = set()
    for key, value in values.items():
        if key.startswith(DEVICE_PREFIX):
            status = json.loads(value).get("status")
            (cancelled if status == DeviceStatus.CANCELLED.value else active).add(key[len(DEVICE_PREFIX):])
    return ControlState(maintenance=values.get("maintenance") == b"on",
                        registry_enforced=values.get("registry") == b"on",
                        active=frozenset(active), cancelled=frozenset(cancelled))


def _devices(values: dict[str, bytes]) -> list[Device]:
    found = []
    for key, value in sorted(values.items()):
        if key.startswith(DEVICE_PREFIX):
            entry = json.loads(value)
            found.append(Device(key[len(DEVICE_PREFIX):], DeviceStatus(entry["status"]), entry.get("note", ""),
                                float(entry.get("updated_at", 0))))
    return found


async def _read_all(js: Any, kv: Any) -> dict[str, bytes]:
    """Every key's current value, read through one watcher, stopped once it has delivered the bucket's
    last revision (asked of the stream's leader first). The watcher's own end-of-initial-values marker
    is not enough: it comes from the consumer's pending count, which a replica that has not yet applied
    a write just acknowledged by the quorum reports as 0, and the read would then miss that write."""
    last = (await js.stream_info("KV_" + CONTROL_BUCKET)).state.last_seq
    values: dict[str, bytes] = {}
    if not last:
        return values
    watcher = await kv.watchall()
    seen = 0
    try:
        while seen < last:
            entry = await watcher.updates(timeout=5)
            if entry is None:  # the marker: more may still come from a lagging replica
                continue
            seen = max(seen, entry.revision or 0)
            if entry.operation is None:
                values[entry.key] = entry.value
            else:
                values.pop(entry.key, None)
    finally:
        await watcher.stop()
    return values


class NatsControl:
    """Control on the cluster. Commands use the blocking methods; a server also runs `watch` on the NATS thread."""

    def __init__(self, backend: NatsBackend, *, watch: bool = False):
        """watch=True: a server's control, kept current by a watch (`load` never waits for the cluster);
        else a command's, reading and writing the bucket directly (the backend opened with `open_blocking`)."""
        self.backend = backend
        self.watching = watch
        self.link = backend.link
        self._values: dict[str, bytes] = {}
        self._state = ControlState()
        self.loaded = False  # the watch delivered the bucket's values at least once
        self._changed = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._wake: trio.Event | None = None

    def close(self) -> None:
        """Closes the connection too: the control is the last user of it (a server closes it last)."""
        self.backend.close()

    # -- as store.control.Control --------------------------------------------------------------
    def load(self) -> ControlState:
        if self.watching:  # a server: the watch keeps the state
            return self._state
        return _state(self.link.call_blocking(_read_all(self.backend.js, self.backend.kv)))

    def changed(self) -> bool:
        changed = self._changed.is_set()
        self._changed.clear()
        return changed

    async def wait_changed(self, poll: float) -> bool:
        """In a server: until the watch reports a change (or `poll` seconds passed: False)."""
        if self._token is None:
            self._token = trio.lowlevel.current_trio_token()
            self.link.submit(self._watch())
        if not self._changed.is_set():
            self._wake = trio.Event()
            with trio.move_on_after(poll):
                await self._wake.wait()
        return self.changed()

    def devices(self) -> list[Device]:
        return _devices(self.link.call_blocking(_read_all(self.backend.js, self.backend.kv)))

    def set_maintenance(self, on: bool) -> None:
        self._put("maintenance", b"on" if on else b"off")

    def set_registry_enforced(self, on: bool) -> None:
        self._put("registry", b"on" if on else b"off")

    def add_device(self, modem: str, note: str = "", status: DeviceStatus = DeviceStatus.ACTIVE) -> None:
        entry = {"status": status.value, "note": note, "updated_at": time.time()}
        self._put(DEVICE_PREFIX + modem, json.dumps(entry, ensure_ascii=False).encode())

    def remove_device(self, modem: str) -> bool:
        return self.link.call_blocking(self._remove(DEVICE_PREFIX + modem))

    def _put(self, key: str, value: bytes) -> None:
        self.link.call_blocking(self.backend.kv.put(key, value))

    async def _remove(self, key: str) -> bool:
        import nats.js.errors

        kv = self.backend.kv
        try:
            await kv.get(key)
        except nats.js.errors.KeyNotFoundError:  # KeyDeletedError is one too
            return False
        await kv.delete(key)
        return True

    # -- the watch (on the NATS thread) ----------------------------------------------------------
    async def _watch(self) -> None:
        while not self.backend.ready:
            await asyncio.sleep(0.05)
        while True:
            try:
                watcher = await self.backend.kv.watchall()
                values: dict[str, bytes] = {}
                initial = True
                async for entry in watcher:
                    if entry is not None and entry.key != PARTITIONS_KEY:
                        if entry.operation is None:
                            values[entry.key] = entry.value
                        else:
                            values.pop(entry.key, None)
                    if entry is None or not initial:  # None: the initial values are all in
                        initial = False
                        self._publish(dict(values))
            except asyncio.CancelledError:
                raise
            except UNAVAILABLE as e:
                log.warning("control watch broke (%s); watching again", e or type(e).__name__)
                await asyncio.sleep(WATCH_RETRY_S)

    def _publish(self, values: dict[str, bytes]) -> None:
        state = _state(values)
        if self.loaded and state == self._state:
            return
        self._values, self._state, self.loaded = values, state, True
        self._changed.set()
        if self._token is not None:
            try:
                self._token.run_sync_soon(self._wake_trio)
            except trio.RunFinishedError:
                pass

    def _wake_trio(self) -> None:
        if self._wake is not None:
            self._wake.set()
