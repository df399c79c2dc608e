"""Coarse session deadlines: one watcher task for every connection, instead of a timer per wait.

A session moves its deadline several times per packet (the next byte, nothing while the store
commits, the answer's send, the next packet). With Trio's own deadlines every move goes through
`CancelScope.deadline` (a context manager and the run's deadline heap), ~5 µs each, a few percent
of a whole session. Here a move is a dict store, and one task looks at every open session's
deadline every `tick` seconds and cancels the scopes that are past theirs: a timeout fires between
0 and `tick` late (50 ms against the protocol's 3 s idle timeout).

The watcher is a Trio system task started by the first session and ending when no session is
left, so `DtgServer.handle` needs nothing started beside it (tests serve it on memory streams).
"""

from __future__ import annotations

import math

import trio

DEFAULT_TICK = 0.05


class Timeouts:
    """Deadlines by cancel scope; the watcher cancels a scope once the clock passes its deadline."""

    def __init__(self, tick: float = DEFAULT_TICK):
        self.tick = tick
        self._deadlines: dict[trio.CancelScope, float] = {}
        self._watching = False
        self._parked: trio.Event | None = None  # the watcher waits here while no deadline is finite

    def set(self, scope: trio.CancelScope, deadline: float) -> None:
        """(Re)arm `scope` to be cancelled at `deadline` (trio.current_time() clock); math.inf disarms."""
        self._deadlines[scope] = deadline
        if not self._watching:
            self._watching = True
            trio.lowlevel.spawn_system_task(self._watch, name="dtgserver session timeouts")
        elif self._parked is not None and deadline != math.inf:
            self._parked.set()

    def discard(self, scope: trio.CancelScope) -> None:
        """The session is over: forget its scope (call in a `finally`)."""
        self._deadlines.pop(scope, None)

    async def _watch(self) -> None:
        try:
            while self._deadlines:
                if min(self._deadlines.values()) == math.inf:
                    # Every session is committing: nothing can expire until one sets a deadline.
                    # (Sleeping on would also let a test's autojump clock race ahead meanwhile.)
                    self._parked = trio.Event()
                    await self._parked.wait()
                    self._parked = None
                    continue
                await trio.sleep(self.tick)
                now = trio.current_time()
                for scope in [scope for scope, deadline in self._deadlines.items() if deadline <= now]:
                    del self._deadlines[scope]
                    scope.cancel()
        finally:
            self._watching = False
            self._parked = None
