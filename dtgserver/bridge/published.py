"""The digests of the packets the bridge has published, for as long as a terminal resends.

A store that holds a packet once whatever happens (SQLite: one row per digest) needs none of
this. The JetStream stream drops a resend only inside its duplicate window (10 minutes by
default); a terminal keeps unsent data up to 48 hours (spec §4.5) and resends a packet whose
answer it did not get, so a later resend is a second message in the stream. The bridge then
skips a packet whose digest it has already derived: no second microtrip, no second count in the
trip's state. What it remembers is this set, saved with the cursor (`CursorStore.save`) and read
back by the next owner of the partition.

Memory: the digests of the current hour in a set (~100 bytes each); older hours as two sorted
arrays of 64-bit halves, 16 bytes a digest, looked up by bisection. Hours older than the horizon
are dropped.
"""

from __future__ import annotations

import bisect
import collections
from array import array

import attrs

HORIZON_S = 48 * 3600.0  # §4.5: a terminal keeps at most 48 h of unsent data
CHUNK_S = 3600.0
DIGEST_BYTES = 16


@attrs.define(slots=True)
class _Chunk:
    start: float  # the time of its first digest
    high: array[int]  # first 8 bytes, sorted (with `low` in the same order)
    low: array[int]

    def __contains__(self, digest: bytes) -> bool:
        high, low = int.from_bytes(digest[:8], "big"), int.from_bytes(digest[8:16], "big")
        i = bisect.bisect_left(self.high, high)
        while i < len(self.high) and self.high[i] == high:
            if self.low[i] == low:
                return True
            i += 1
        return False


class PublishedDigests:
    """A set of 16-byte digests, each kept `horizon_s` after the time it was added at (then dropped by the hour)."""

    def __init__(self, horizon_s: float = HORIZON_S, chunk_s: float = CHUNK_S):
        self.horizon_s = horizon_s
        self.chunk_s = chunk_s
        self._chunks: collections.deque[_Chunk] = collections.deque()
        self._open: set[bytes] = set()
        self._open_start: float | None = None
        self._frozen = 0

    def __len__(self) -> int:
        return self._frozen + len(self._open)

    def __contains__(self, digest: object) -> bool:
        if not isinstance(digest, bytes):
            return False
        return digest in self._open or any(digest in chunk for chunk in self._chunks)

    def add(self, digest: bytes, at: float) -> None:
        """Remember `digest`, added at Unix time `at` (the times grow, up to the odd clock step)."""
        if self._open_start is None:
            self._open_start = at
        elif at >= self._open_start + self.chunk_s:
            self._freeze()
            self._open_start = at
            self._prune(at)
        self._open.add(bytes(digest[:DIGEST_BYTES]))

    def add_many(self, digests: bytes, at: float) -> None:
        """Concatenated 16-byte digests, as `saved()` gives them back."""
        for i in range(0, len(digests) - DIGEST_BYTES + 1, DIGEST_BYTES):
            self.add(digests[i:i + DIGEST_BYTES], at)

    def _freeze(self) -> None:
        if not self._open or self._open_start is None:
            return
        ordered = sorted(self._open)
        self._chunks.append(_Chunk(self._open_start, array("Q", (int.from_bytes(d[:8], "big") for d in ordered)),
                                   array("Q", (int.from_bytes(d[8:16], "big") for d in ordered))))
        self._frozen += len(ordered)
        self._open = set()

    def _prune(self, now: float) -> None:
        """Drop the hours whose every digest is older than the horizon."""
        while self._chunks:
            end = self._chunks[1].start if len(self._chunks) > 1 else self._open_start  # its digests are older
            if end is None or end > now - self.horizon_s:
                return
            self._frozen -= len(self._chunks.popleft().high)
