"""Shared test helpers: a clean environment for every test; fixture samples and the record checks."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from dtgserver.cli.codec_cmds import parse_hex_text
from dtgserver.protocol import KST, BadTime, Packet
from dtgserver.server.app import DtgServer
from dtgserver.store import PacketStore


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own DTGSERVER_* variables must not leak into any test."""
    for name in list(os.environ):
        if name.startswith("DTGSERVER_"):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """`serve` and `logs.configure` set up the dtgserver logger for the process: put it back."""
    logger = logging.getLogger("dtgserver")
    saved = logger.level, list(logger.handlers), logger.propagate
    yield
    logger.setLevel(saved[0])
    logger.handlers[:] = saved[1]
    logger.propagate = saved[2]


def store_of(server: DtgServer) -> PacketStore:
    """The server's own store: every server has one but a `--writer-process` front (`store` None)."""
    assert server.store is not None, "a --writer-process front has no store"
    return server.store


async def until(condition: Callable[[], bool], *, poll_s: float = 0.01) -> None:
    """Sleep until `condition()` holds (the caller bounds the wait, with `trio.fail_after`). A
    condition read through a call is read anew each time, for mypy too, which would otherwise keep
    an attribute narrowed by an earlier loop or assert."""
    while not condition():
        await trio.sleep(poll_s)


FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@attrs.frozen
class Sample:
    """One `fixtures/<name>.hex`, with its expected JSON (`.json`) and/or expected error (`.error`)."""

    name: str
    data: bytes
    expected: Any  # the parsed .json: one object, or a list of the packets before an error
    error_offset: int | None
    error_message: str | None

    @property
    def malformed(self) -> bool:
        return self.error_offset is not None

    def __str__(self) -> str:
        return self.name


def load_sample(name: str) -> Sample:
    data = parse_hex_text((FIXTURES / f"{name}.hex").read_bytes())
    json_path, error_path = FIXTURES / f"{name}.json", FIXTURES / f"{name}.error"
    expected = json.loads(json_path.read_text("utf-8")) if json_path.exists() else None
    offset = message = None
    if error_path.exists():
        fields = dict(line.split(": ", 1) for line in error_path.read_text("utf-8").splitlines() if line)
        offset, message = int(fields["offset"]), fields["message"]
    return Sample(name, data, expected, offset, message)


SAMPLES = [load_sample(path.stem) for path in sorted(FIXTURES.glob("*.hex"))]
VALID_SAMPLES = [s for s in SAMPLES if not s.malformed]
MALFORMED_SAMPLES = [s for s in SAMPLES if s.malformed]
# Samples whose values are deliberately outside their documented range (they must warn).
OUT_OF_RANGE = {"dtg_out_of_range"}
REALISTIC_SAMPLES = [s for s in VALID_SAMPLES if s.name not in OUT_OF_RANGE]


def hexdump(data: bytes) -> str:
    """16 bytes a line with offsets, so a failed comparison shows where the bytes part."""
    return "\n".join(f"{i:5d}  {data[i:i + 16].hex(' ')}" for i in range(0, len(data), 16))


def verify_frame(actual: bytes, expected: bytes) -> None:
    """Two frames are the same bytes (compared as hex dumps: a failure is readable)."""
    assert hexdump(actual) == hexdump(expected)


# -- the range check run on every decoded record ----------------------------------------------------
EARLIEST = datetime(2000, 1, 1, tzinfo=KST)  # YY is 2000 + YY
LATEST = datetime.now(KST) + timedelta(days=366 * 5)


TIME_FIELDS = ("time", "key_on_time", "sent_time", "key_off_time")


def out_of_range(record: Packet) -> list[str]:
    """Field paths whose values lie outside where the spec says (computed here, not by the code)."""
    found = []
    parts = [("", record)] + [(f"bodies[{i}].", b) for i, b in enumerate(getattr(record, "bodies", ()))]
    for prefix, part in parts:
        limits = {"lat": (-90, 90), "lon": (-180, 180), "azimuth_deg": (0, 360), "battery_v": (0, 99.9)}
        for name, (lo, hi) in limits.items():
            if hasattr(part, name) and not lo <= getattr(part, name) <= hi:
                found.append(prefix + name)
        if hasattr(part, "brake") and not isinstance(part.brake, bool):
            found.append(prefix + "brake")
        for name in TIME_FIELDS:
            t = getattr(part, name, None)
            if isinstance(t, BadTime):
                found.append(prefix + name)
            elif t is not None:
                assert t.utcoffset() == timedelta(hours=9), t
                if not EARLIEST <= t <= LATEST:
                    found.append(prefix + name)
    return found


def check_ranges(record: Packet, *, realistic: bool = True) -> None:
    """The range check every decoded record gets: a realistic record is all in range, with no
    warnings; any other names each out-of-range field in its warnings (and still decoded).

    Catches a wrong scale or offset even in tests that only ask "does it decode".
    """
    bad = out_of_range(record)
    if realistic:
        assert bad == [], bad
        assert record.warnings == []
        if record.modem is not None:
            assert re.fullmatch(r"[0-9]{1,11}", record.modem)
    else:
        warned = {w.split(":")[0] for w in record.warnings}
        assert {b for b in bad if not _implausible_only(record, b)} <= warned, (bad, record.warnings)


def _implausible_only(record: Packet, path: str) -> bool:
    # A calendar time outside 2000..now+5y is plausible-checked here but not a documented range.
    return path.rsplit(".", 1)[-1] in TIME_FIELDS and not isinstance(_get(record, path), BadTime)


def _get(record: Any, path: str) -> Any:
    for part in path.split("."):
        name, _, index = part.partition("[")
        record = getattr(record, name)
        if index:
            record = record[int(index.rstrip("]"))]
    return record
