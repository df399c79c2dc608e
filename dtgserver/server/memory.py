"""The budget of bytes buffered by all sessions of a process, and giving freed memory back to the OS.

A session buffers the packet it is receiving until the packet is whole: at most one frame (it
reads no more than the frame still lacks), 183,623 bytes for a realtime packet of 3,600 bodies.
`BufferBudget` counts what every session of the process holds (`serve --buffer-budget`); a
session whose bytes would take it past the limit is answered 4 and closed, and a new connection is
answered 4 and closed while less than one maximal frame of it is left (server/app.py). Bytes are
counted as they arrive, never from what a header announces, so holding the budget costs an
attacker the bytes themselves.

CPython hands buffers of this size to the C library's malloc, and glibc keeps freed heap memory
for reuse: 1,000 partial maximal frames took a server from 41 to 312 MiB, and it stayed there
after they closed (docs/performance.md). `trim()` calls glibc's `malloc_trim(0)`, which returns the
free pages of every arena to the kernel; without glibc (musl, macOS) it does nothing. The server
calls it (in a worker thread, at most once a second) when a burst is over: when the bytes let go
since the last trim reach 8 MiB and at most half the peak is still held; not in steady traffic.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

import attrs


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim

_TRIM = _malloc_trim()

def trim() -> bool:
    """Give the C heap's free pages back to the OS; False where there is no malloc_trim."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True

@attrs.define
class BufferBudget:
    """Bytes received and not yet handed out as packets, summed over a process's sessions."""

    limit: int
    used: int = 0
    high: int = 0  # the most used since the last trim
    released: int = 0  # bytes let go since the last trim
    refused: int = 0  # sessions and connections answered 4 because it was spent
    trims: int = 0

    def charge(self, n: int) -> bool:
        """Count `n` more bytes; False (nothing counted) when they would take it past the limit."""
        if self.used + n > self.limit:
            return False
        self.used += n
        if self.used > self.high:
            self.high = self.used
        return True

    def release(self, n: int) -> None:
        self.used -= n
        self.released += n

    def worth_trimming(self, after: int) -> bool:
        """A burst is over: `after` bytes or more let go since the last trim, and at most half the
        peak still held. (Not in steady traffic, where what is let go is soon needed again.)"""
        return self.released >= after and self.used <= self.high // 2

    def trimmed(self, done: bool) -> None:
        self.trims += done
        self.released = 0
        self.high = self.used
