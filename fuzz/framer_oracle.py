"""What the framer fuzz target checks for one input, without atheris: the fuzzer and the tests share it.

One input = two bytes that choose how the rest is chunked (and the body-count limit), then the
byte stream a terminal might send. The contract (h11's): `Connection.next_event()`
raises nothing but ProtocolError, with an offset inside the stream; the chunking never changes
what is decoded or where it fails; every decoded frame encodes back to the same bytes, and
`decode(frame)` agrees with the framer.
"""

from __future__ import annotations

import random
from pathlib import Path

from dtgserver.cli.codec_cmds import parse_hex_text
from dtgserver.protocol import CLOSED, NEED_DATA, Connection, ProtocolError, Received, Role, decode, encode

ROOT = Path(__file__).resolve().parent.parent
MAX_BODY_COUNTS = (1, 5, 60, 3600, 32767)


def chunk_sizes(seed: int, total: int) -> list[int]:
    """Chunk sizes summing to `total`, from the input's first two bytes: one chunk when the second is 0,
    else anything from 1-byte drips to 1000-byte chunks."""
    if seed & 0xFF == 0:
        return [total] if total else []
    rng = random.Random(seed)
    largest = rng.choice((1, 2, 7, 64, 1000))
    sizes = []
    while total > 0:
        size = min(total, rng.randint(1, largest))
        sizes.append(size)
        total -= size
    return sizes


def run(stream: bytes, sizes: list[int], max_body_count: int) -> list[object]:
    """Feed `stream` in chunks; the events, ending with CLOSED or the error's (message, offset)."""
    conn = Connection(Role.SERVER, max_body_count=max_body_count)
    events: list[object] = []
    position = 0
    try:
        for size in [*sizes, 0]:
            conn.receive_data(stream[position:position + size])
            position += size
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    break
                if event is CLOSED:
                    events.append(CLOSED)
                    return events
                assert isinstance(event, Received)
                check_frame(event, max_body_count)
                events.append((event.raw, event.offset))
        raise AssertionError("no CLOSED after the end of the stream")
    except ProtocolError as e:
        assert e.result == 1 and e.offset is not None and 0 <= e.offset <= len(stream), (e, e.offset)
        events.append((e.message, e.offset))
        return events


def check_frame(event: Received, max_body_count: int) -> None:
    raw = event.raw
    again = encode(event.record)
    assert again == raw, f"encode(decode(frame)) differs:\n{raw.hex()}\n{again.hex()}"
    assert decode(raw, max_body_count=max_body_count) == event.record


def check_input(data: bytes) -> list[object]:
    """The whole check for one fuzz input; returns the events (for tests), raises AssertionError on a bug."""
    if len(data) < 2:
        return []
    seed, stream = int.from_bytes(data[:2], "big"), data[2:]
    max_body_count = MAX_BODY_COUNTS[data[0] % len(MAX_BODY_COUNTS)]  # 3 (and 8, 13, ...): the default 3600
    chunked = run(stream, chunk_sizes(seed, len(stream)), max_body_count)
    whole = run(stream, [len(stream)], max_body_count)
    assert chunked == whole, f"chunking changed the outcome:\n{chunked}\n{whole}"
    return whole


def seeds() -> dict[str, bytes]:
    """Every fixture, as one whole chunk (limit 3600) and as a drip of 1-7 byte chunks."""
    found = {}
    for hex_file in sorted((ROOT / "fixtures").glob("*.hex")):
        stream = parse_hex_text(hex_file.read_bytes())
        found[f"seed-{hex_file.stem}-whole"] = b"\x03\x00" + stream
        found[f"seed-{hex_file.stem}-drip"] = b"\x03\x01" + stream
    return found
