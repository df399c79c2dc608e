"""`dtgserver decode` and `dtgserver encode`: packets to JSON lines and back."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from typing import IO

import click

from ..protocol import (
    DEFAULT_MAX_BODY_COUNT,
    JsonError,
    ProtocolError,
    Role,
    encode,
    format_table,
    from_json,
    iter_packets,
    to_json,
)

_COMMENT = re.compile(rb"#[^\n]*")
_NOT_HEX = re.compile(r"[^0-9A-Fa-f\s]")
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")  # control characters but whitespace (\t \n \v \f \r)


def parse_hex_text(data: bytes) -> bytes:
    """Bytes from hex text: whitespace ignored, `#` starts a comment that runs to the end of the line.

    A ValueError names the first character that is no hex digit and its line and column, or the
    odd count of digits (and the first line with an odd count, when there are several lines).
    """
    lines = _COMMENT.sub(b"", data).decode("utf-8", "replace").split("\n")
    for number, line in enumerate(lines, 1):
        if bad := _NOT_HEX.search(line):
            prefix = line[bad.start() - 1:bad.start() + 1].lower() == "0x"
            column = bad.start() + (0 if prefix else 1)
            where = f"line {number}, column {column}" if len(lines) > 1 else f"column {column}"
            if prefix:
                raise ValueError(f"not hex: '0x' prefix ({where}): write the bytes as plain hex digits, e.g. '03 1f'")
            raise ValueError(f"not hex: {bad.group()!r} ({where})")
    digits = "".join("".join(line.split()) for line in lines)
    if len(digits) % 2:
        odd = next(n for n, line in enumerate(lines, 1) if len("".join(line.split())) % 2)
        raise ValueError(f"odd number of hex digits ({len(digits)})" + (f"; line {odd} has an odd number"
                                                                          if len(lines) > 1 else ""))
    return bytes.fromhex(digits)


def is_text(data: bytes) -> bool:
    """UTF-8 without control characters: hex text (perhaps a bad one), never a captured packet.

    Every packet has a byte below 0x20 that is no whitespace: the protocol ID, a raw modem digit,
    a time byte or a length's high byte, so a capture is never taken for text.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return bool(text.strip()) and _CONTROL.search(text) is None


def _read(file: IO[bytes], input_format: str) -> bytes:
    data = file.read()
    if input_format == "hex" or (input_format == "auto" and is_text(data)):
        return parse_hex_text(data)
    return data


def _fail(message: str) -> None:
    click.echo(f"dtgserver: error: {message}", err=True)
    sys.exit(1)


@click.command()
@click.argument("hex_packets", metavar="[HEX]...", nargs=-1)
@click.option("-f", "--file", "files", type=click.File("rb"), multiple=True,
              help="Read packets from FILE ('-' for stdin): raw binary, back to back, or hex text "
                   "(whitespace and '#' comments ignored, e.g. one packet per line).")
@click.option("--input-format", type=click.Choice(["auto", "hex", "binary"]), default="auto",
              help="How to read --file: guess, or force hex text or raw binary.")
@click.option("--format", "output_format", type=click.Choice(["json", "table"]), default="json",
              help="json: one JSON object per packet (JSON lines); table: each field, offset, raw hex, value, unit.")
@click.option("--max-body-count", type=click.IntRange(1, 32767), default=DEFAULT_MAX_BODY_COUNT,
              help="Reject realtime packets declaring more bodies than this.")
def decode(hex_packets: tuple[str, ...], files: tuple[IO[bytes], ...], input_format: str, output_format: str,
           max_body_count: int) -> None:
    """Decode packets given as HEX arguments or read from files, and print them.

    Each HEX argument (spaces allowed) and each file is a stream of one or more packets back to
    back. On bad input, the packets before it are printed, then an error naming the byte offset
    goes to stderr and the exit status is 1.
    """
    sources: list[tuple[str, bytes]] = []
    for i, text in enumerate(hex_packets, 1):
        try:
            sources.append((f"argument {i}", parse_hex_text(text.encode("utf-8", "replace"))))
        except ValueError as e:
            hint = f" (a file? read it with --file {text})" if os.path.isfile(text) else ""
            _fail(f"argument {i}: {e}{hint}")
    for file in files:
        name = getattr(file, "name", "-")
        name = "stdin" if name in ("-", "<stdin>") else name
        try:
            sources.append((name, _read(file, input_format)))
        except ValueError as e:
            _fail(f"{name}: {e}")
    if not sources:
        _fail("nothing to decode: give HEX arguments or --file (see --help)")
    for name, data in sources:
        count = 0
        try:
            for count, packet in enumerate(iter_packets(data, role=Role.ANY, max_body_count=max_body_count), 1):
                if output_format == "json":
                    click.echo(json.dumps(to_json(packet.record), ensure_ascii=False))
                else:
                    click.echo(("\n" if count > 1 else "") + format_table(packet.record, packet.raw))
        except ProtocolError as e:
            offset = "" if e.offset is None else f" byte {e.offset}"
            _fail(f"{name}{offset}: {e.message}")
        if not count:
            _fail(f"{name}: no packets")


def _json_objects(texts: tuple[str, ...], stdin: IO[str]) -> Iterator[tuple[str, object]]:
    if texts:
        for i, text in enumerate(texts, 1):
            yield from _parse_json(f"argument {i}", text)
    else:
        for n, line in enumerate(stdin, 1):
            if line.strip():
                yield from _parse_json(f"line {n}", line)


def _parse_json(where: str, text: str) -> Iterator[tuple[str, object]]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise JsonError(f"{where}: not JSON: {e}") from None
    for obj in value if isinstance(value, list) else [value]:
        yield where, obj


@click.command()
@click.argument("json_packets", metavar="[JSON]...", nargs=-1)
@click.option("--binary", is_flag=True, help="Write raw bytes instead of one hex line per packet.")
def encode_cmd(json_packets: tuple[str, ...], binary: bool) -> None:
    """Encode packets from JSON (as `decode` prints it) to hex, one packet per line.

    JSON comes from the arguments, or from stdin as JSON lines, so `decode | encode`
    reproduces the input bytes.
    """
    count = 0
    try:
        for where, obj in _json_objects(json_packets, sys.stdin):
            count += 1
            try:
                raw = encode(from_json(obj))
            except (JsonError, ValueError) as e:
                raise JsonError(f"{where}: {e}") from None
            # click.echo writes bytes to the binary stdout (click 8.5 deprecates get_binary_stream).
            click.echo(raw if binary else raw.hex(), nl=not binary)
    except JsonError as e:
        _fail(str(e))
    if not count:
        _fail("no packets: " + ("the JSON arguments hold no packet" if json_packets else "stdin held no JSON line"))


encode_cmd.name = "encode"
COMMANDS = [decode, encode_cmd]
