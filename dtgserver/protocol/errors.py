"""The one exception type the protocol core raises, carrying the result code to answer with."""

from __future__ import annotations

import enum


class Result(enum.IntEnum):
    """The result byte of the 0x09 server response (spec §12)."""

    OK = 0
    FORMAT_ERROR = 1
    UNKNOWN_SUBSCRIBER = 2
    MAINTENANCE = 3
    OVERLOADED = 4


class ProtocolError(Exception):
    """Input that does not follow the protocol.

    `offset` is the byte offset of the problem in the stream (or packet) being decoded, when
    known; `result` is what the server answers with (always 1, format error, from the core).
    """

    def __init__(self, message: str, offset: int | None = None, result: Result = Result.FORMAT_ERROR):
        super().__init__(message)
        self.message = message
        self.offset = offset
        self.result = result

    def shifted(self, base: int) -> ProtocolError:
        """The same error with its offset made relative to an enclosing stream starting at `base`."""
        return ProtocolError(self.message, None if self.offset is None else base + self.offset, self.result)

    def __str__(self) -> str:
        if self.offset is None:
            return self.message
        return f"at byte {self.offset}: {self.message}"
