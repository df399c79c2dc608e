"""Coverage-guided fuzz target (atheris) for the sans-io framer and the packet decoder.

One input = two bytes that choose how the rest is chunked, then the byte stream a terminal
might send. The contract checked (STYLE.md, h11's): `Connection.next_event()` raises nothing
but ProtocolError; the chunking never changes what is decoded; every decoded frame encodes back
to the same bytes, and `decode(frame)` agrees with the framer.

    .venv/bin/python fuzz/fuzz_framer.py fuzz/corpus -max_total_time=600

Seeds: every fixtures/*.hex, written to the corpus directory (created) before fuzzing starts.
Run with `--check FILE...` to replay inputs (crashers) without libFuzzer.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import atheris  # noqa: E402

with atheris.instrument_imports(include=["dtgserver.protocol"]):
    from dtgserver.protocol import CLOSED, NEED_DATA, Connection, ProtocolError, Received, Role, decode, encode

from dtgserver.cli.codec_cmds import parse_hex_text  # noqa: E402

# The codec's fast path is compiled with exec() at import: instrument_imports cannot see it,
# so instrument every function loaded by now (the generated codecs and construct included).
atheris.instrument_all()

MAX_BODY_COUNTS = (1, 5, 60, 3600, 32767)


def chunk_sizes(seed: int, total: int) -> list[int]:
    """Chunk sizes summing to `total`, from the input's first two bytes: 1-byte drips to one chunk."""
    if seed == 0:
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
        raise AssertionError("no CLOSED after end of stream")
    except ProtocolError as e:
        assert e.result == 1 and e.offset is not None and 0 <= e.offset <= len(stream), (e, e.offset)
        events.append((e.message, e.offset))
        return events


def check_frame(event: Received, max_body_count: int) -> None:
    raw = event.raw
    again = encode(event.record)
    assert again == raw, f"encode(decode(frame)) differs:\n{raw.hex()}\n{again.hex()}"
    assert decode(raw, max_body_count=max_body_count) == event.record


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    seed, stream = int.from_bytes(data[:2], "big"), data[2:]
    max_body_count = MAX_BODY_COUNTS[data[0] % len(MAX_BODY_COUNTS)]
    chunked = run(stream, chunk_sizes(seed, len(stream)), max_body_count)
    whole = run(stream, [len(stream)], max_body_count)
    assert chunked == whole, f"chunking changed the outcome:\n{chunked}\n{whole}"


def write_seeds(corpus: Path) -> None:
    """Every fixture, as one whole chunk and as a one-byte drip, into the corpus directory."""
    corpus.mkdir(parents=True, exist_ok=True)
    for hex_file in sorted((ROOT / "fixtures").glob("*.hex")):
        stream = parse_hex_text(hex_file.read_bytes())
        for name, prefix in (("whole", b"\x00\x00"), ("drip", b"\x03\x01")):
            (corpus / f"seed-{hex_file.stem}-{name}").write_bytes(prefix + stream)


def main() -> None:
    if sys.argv[1:2] == ["--check"]:
        for name in sys.argv[2:]:
            test_one_input(Path(name).read_bytes())
            print(f"{name}: ok")
        return
    corpora = [a for a in sys.argv[1:] if not a.startswith("-")]
    write_seeds(Path(corpora[0]) if corpora else ROOT / "fuzz" / "corpus")
    if not corpora:
        sys.argv.append(str(ROOT / "fuzz" / "corpus"))
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
