"""`dtgserver decode` and `dtgserver encode` through click's CliRunner: every input form, the table,
clear errors with byte offsets (and the packets before them), and `decode | encode` for every fixture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import FIXTURES, MALFORMED_SAMPLES, SAMPLES, VALID_SAMPLES, Sample, load_sample
from hypothesis import given, settings
from hypothesis import strategies as st

from dtgserver.cli import main
from dtgserver.cli.codec_cmds import is_text
from dtgserver.protocol import Packet, encode
from dtgserver.testing import packets

DTG = load_sample("dtg_spec_sample")
KEY_OFF = load_sample("key_off_spec_sample")
RESPONSE = load_sample("response_spec_sample")


def run(*args: str, input: bytes | str | None = None, env: dict[str, str] | None = None) -> Result:
    result = CliRunner().invoke(main, list(args), input=input, env=env)
    assert "Traceback" not in result.output
    if result.exception is not None:
        assert isinstance(result.exception, SystemExit), result.exception  # never an uncaught error
    return result


def json_lines(text: str) -> list[object]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def expected_objects(sample: Sample) -> list[object]:
    return sample.expected if isinstance(sample.expected, list) else [sample.expected]


def verify_fails(result: Result, offset: int, message: str) -> None:
    assert result.exit_code == 1
    assert f"byte {offset}: " in result.stderr
    assert message in result.stderr
    assert result.stderr.startswith("dtgserver: error: ")


# -- decode: input forms ---------------------------------------------------------------------------------


def test_decode_hex_arguments() -> None:
    result = run("decode", "09 00", DTG.data.hex(), KEY_OFF.data.hex().upper())
    assert result.exit_code == 0, result.stderr
    assert json_lines(result.stdout) == [
        {"kind": "response", "protocol_id": 9, "modem": None, "result": 0}, DTG.expected, KEY_OFF.expected,
    ]


def test_decode_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "capture.bin"
    path.write_bytes(DTG.data + KEY_OFF.data + DTG.data)  # packets back to back, as on the wire
    result = run("decode", "-f", str(path))
    assert result.exit_code == 0, result.stderr
    assert json_lines(result.stdout) == [DTG.expected, KEY_OFF.expected, DTG.expected]


def test_decode_hex_text_file_with_comments() -> None:
    result = run("decode", "-f", str(FIXTURES / "dtg_spec_sample.hex"))  # the README quickstart
    assert result.exit_code == 0, result.stderr
    assert json_lines(result.stdout) == [DTG.expected]


def test_decode_hex_text_one_packet_per_line(tmp_path: Path) -> None:
    path = tmp_path / "packets.txt"
    path.write_text(f"{DTG.data.hex()}\n# a comment line\n{KEY_OFF.data.hex(' ')}  # trailing comment\n")
    result = run("decode", "-f", str(path))
    assert json_lines(result.stdout) == [DTG.expected, KEY_OFF.expected]


def test_decode_stdin_binary_and_hex() -> None:
    assert json_lines(run("decode", "-f", "-", input=KEY_OFF.data).stdout) == [KEY_OFF.expected]
    assert json_lines(run("decode", "-f", "-", input=KEY_OFF.data.hex() + "\n").stdout) == [KEY_OFF.expected]


def test_decode_input_format_forced() -> None:
    # "0900" as text would be hex for a response; as binary it is the bytes 30 39 30 30.
    assert json_lines(run("decode", "-f", "-", "--input-format", "hex", input="0900").stdout)[0] == \
        {"kind": "response", "protocol_id": 9, "modem": None, "result": 0}
    result = run("decode", "-f", "-", "--input-format", "binary", input=b"0900")
    verify_fails(result, 0, "unknown protocol ID 0x30")


def test_decode_table() -> None:
    result = run("decode", "--format", "table", DTG.data.hex())
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "dtg (0x03), 74 bytes"
    assert lines[1].split() == ["offset", "raw", "field", "value"]
    # Columns: offset (in the packet), raw hex, field name, value and unit.
    rows = {line[34:66].strip(): (int(line[:6]), line[8:32].strip(), line[68:]) for line in lines[2:]}
    assert len(rows) == 5 + 20  # the header's fields, then one body's
    assert rows["bodies[0].lat"] == (44, "02 0c a1 0f", "34.382095 °")
    assert rows["bodies[0].battery_v"] == (69, "00 19", "2.5 V")
    assert rows["bodies[0].status_code"] == (54, "00", "0 (ok)")
    assert rows["key_on_time"] == (16, "0c 0a 19 0f 1e 2d 00", '"2012-10-25T15:30:45+09:00"')
    assert rows["modem"][:2] == (1, "00 01 00 39 39 39 39 ...")  # long raw fields are cut


def test_decode_table_shows_states_and_warnings() -> None:
    result = run("decode", "--format", "table", "-f", str(FIXTURES / "dtg_out_of_range.hex"))
    assert "temp_b_state=off" in result.stdout
    assert "warning: 400 outside 0..360 °" in result.stdout


def test_decode_max_body_count_option_and_env() -> None:
    bus = load_sample("dtg_seoul_bus_60").data.hex()
    verify_fails(run("decode", "--max-body-count", "59", bus), 14, "body count 60 is above the maximum of 59")
    verify_fails(run("decode", bus, env={"DTGSERVER_DECODE_MAX_BODY_COUNT": "10"}), 14, "maximum of 10")
    assert run("decode", "--max-body-count", "60", bus).exit_code == 0


# -- decode: bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sample", MALFORMED_SAMPLES, ids=str)
def test_decode_malformed_fixture(sample: Sample) -> None:
    result = run("decode", "-f", str(FIXTURES / f"{sample.name}.hex"))
    assert sample.error_message is not None and sample.error_offset is not None
    verify_fails(result, sample.error_offset, sample.error_message)
    assert json_lines(result.stdout) == (sample.expected or [])  # the packets before the error


def test_decode_error_after_good_packets_in_a_stream() -> None:
    result = run("decode", "-f", "-", input=DTG.data + KEY_OFF.data + b"\x42\x00")
    assert json_lines(result.stdout) == [DTG.expected, KEY_OFF.expected]
    verify_fails(result, len(DTG.data) + len(KEY_OFF.data), "unknown protocol ID 0x42")
    assert "error: stdin byte" in result.stderr  # names the source


def test_decode_names_the_argument_in_error() -> None:
    result = run("decode", KEY_OFF.data.hex(), KEY_OFF.data.hex()[:-4])
    assert json_lines(result.stdout) == [KEY_OFF.expected]
    verify_fails(result, 34, "stream ended inside a packet")
    assert "argument 2 byte 34" in result.stderr


@pytest.mark.parametrize(("arg", "message"), [("0G", "argument 1: not hex: 'G'"),
                                              ("090", "argument 1: odd number of hex digits (3)")])
def test_decode_bad_hex(arg: str, message: str) -> None:
    result = run("decode", arg)
    assert result.exit_code == 1
    assert message in result.stderr


def test_decode_of_a_file_name_as_argument_points_at_file(tmp_path: Path) -> None:
    path = tmp_path / "capture.bin"
    path.write_bytes(KEY_OFF.data)
    result = run("decode", str(path))
    assert result.exit_code == 1
    assert result.stderr == (f"dtgserver: error: argument 1: not hex: '/' (column 1) (a file? read it with "
                             f"--file {path})\n")
    assert json_lines(run("decode", "--file", str(path)).stdout) == [KEY_OFF.expected]


@pytest.mark.parametrize(("args", "stdin", "source"), [
    (["-f", "{empty}"], None, "empty.bin"),
    (["-f", "{comments}"], None, "comments.hex"),
    ([""], None, "argument 1"),
    (["09 00", "  "], None, "argument 2"),
    (["-f", "-"], b"", "stdin"),
])
def test_decode_of_no_packets_says_so(tmp_path: Path, args: list[str], stdin: bytes | None, source: str) -> None:
    (tmp_path / "empty.bin").write_bytes(b"")
    (tmp_path / "comments.hex").write_text("# only a comment\n\n")
    paths = {"empty": tmp_path / "empty.bin", "comments": tmp_path / "comments.hex"}
    result = run("decode", *[a.format(**paths) for a in args], input=stdin)
    assert result.exit_code == 1
    assert result.stderr.startswith("dtgserver: error: ") and result.stderr.rstrip().endswith(f"{source}: no packets")


@pytest.mark.parametrize(("args", "stdin", "message"), [
    ([], "", "no packets: stdin held no JSON line"),
    ([], "\n  \n", "no packets: stdin held no JSON line"),
    (["[]"], None, "no packets: the JSON arguments hold no packet"),
])
def test_encode_of_no_packets_says_so(args: list[str], stdin: str | None, message: str) -> None:
    result = run("encode", *args, input=stdin)
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == f"dtgserver: error: {message}\n"


def test_hex_text_with_a_typo_names_the_line_not_a_protocol_id(tmp_path: Path) -> None:
    """Read as text, not as binary: the error is the typo, not 'unknown protocol ID 0x30'."""
    lines = (FIXTURES / "dtg_spec_sample.hex").read_text("utf-8").splitlines()
    number = next(n for n, line in enumerate(lines, 1) if line.startswith("00 01 00 39"))
    lines[number - 1] = lines[number - 1].replace("00 39", "00 3Q", 1)
    path = tmp_path / "typo.hex"
    path.write_text("\n".join(lines) + "\n")
    result = run("decode", "-f", str(path))
    assert result.exit_code == 1
    assert result.stderr == f"dtgserver: error: {path}: not hex: 'Q' (line {number}, column 11)\n"


@pytest.mark.parametrize(("text", "message"), [
    ("0x09 0x00\n", "not hex: '0x' prefix (line 1, column 1): write the bytes as plain hex digits"),
    ("09 00\n0x09, 0x00\n", "not hex: '0x' prefix (line 2, column 1)"),
    ("09 00\n09 0\n", "odd number of hex digits (7); line 2 has an odd number"),
    ("09 00 # 응답 OK\n09 0O\n", "not hex: 'O' (line 2, column 5)"),
])
def test_hex_text_errors_name_line_and_column(text: str, message: str) -> None:
    result = run("decode", "-f", "-", input=text.encode())
    assert result.exit_code == 1
    assert message in result.stderr and "protocol ID" not in result.stderr


@settings(max_examples=100, deadline=None)
@given(st.lists(packets(), min_size=1, max_size=3))
def test_no_packet_capture_is_taken_for_text(stream: list[Packet]) -> None:
    """`auto` reads a capture as binary: every packet has a control byte that is no whitespace."""
    data = b"".join(encode(p) for p in stream)
    assert not is_text(data)


def test_decode_nothing() -> None:
    result = run("decode")
    assert result.exit_code == 1
    assert "nothing to decode" in result.stderr


def test_decode_missing_file(tmp_path: Path) -> None:
    result = run("decode", "-f", str(tmp_path / "absent.bin"))
    assert result.exit_code == 2  # click's usage error, with the path
    assert "absent.bin" in result.stderr


# -- encode ---------------------------------------------------------------------------------------------------


def test_encode_argument() -> None:
    result = run("encode", json.dumps(KEY_OFF.expected))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == KEY_OFF.data.hex() + "\n"


def test_encode_pretty_argument_and_list() -> None:
    text = (FIXTURES / "response_then_unknown.json").read_text("utf-8")  # a pretty-printed list
    assert run("encode", text).stdout == "0900\n0903\n"


def test_encode_stdin_json_lines() -> None:
    lines = "\n".join(json.dumps(o, ensure_ascii=False) for o in (DTG.expected, RESPONSE.expected)) + "\n\n"
    result = run("encode", input=lines)
    assert result.stdout.splitlines() == [DTG.data.hex(), RESPONSE.data.hex()]


def test_encode_binary() -> None:
    assert run("encode", "--binary", json.dumps(KEY_OFF.expected)).stdout_bytes == KEY_OFF.data


@pytest.mark.parametrize(("text", "message"), [
    ("{", "line 1: not JSON"),
    ('{"kind": "dtg"}', "line 1: modem: missing"),
    ('[1]', "line 1: expected a JSON object"),
    ('{"kind": "response", "result": 300}', "line 1: result: 300 does not fit its wire type"),
])
def test_encode_bad_json(text: str, message: str) -> None:
    result = run("encode", input=text + "\n")
    assert result.exit_code == 1
    assert message in result.stderr


def test_encode_bad_json_after_good_lines() -> None:
    truck = load_sample("key_off_pyeongtaek")
    good = json.dumps(truck.expected)
    result = run("encode", input=f"{good}\n{good.replace('25.1', '25.15')}\n")
    assert result.stdout == truck.data.hex() + "\n"  # the good one is already out
    assert "line 2: battery_v: 25.15 is not a multiple of 1/10 V" in result.stderr
    assert result.exit_code == 1


# -- decode | encode ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sample", SAMPLES, ids=str)
def test_decode_pipe_encode_reproduces_the_bytes(sample: Sample) -> None:
    decoded = run("decode", "-f", str(FIXTURES / f"{sample.name}.hex"))
    encoded = run("encode", input=decoded.stdout)
    if sample.malformed and not sample.expected:  # nothing before the error: nothing to encode, and it says so
        assert (encoded.exit_code, encoded.stdout) == (1, "")
        assert "no packets" in encoded.stderr
        return
    assert encoded.exit_code == 0, encoded.stderr
    # a malformed sample: only the packets before the error come out, and come back byte for byte
    expected = sample.data[:sample.error_offset] if sample.malformed else sample.data
    assert bytes.fromhex("".join(encoded.stdout.split())) == expected


def test_every_valid_fixture_is_decoded_by_the_cli_to_its_json() -> None:
    for sample in VALID_SAMPLES:
        assert json_lines(run("decode", "-f", str(FIXTURES / f"{sample.name}.hex")).stdout) == \
            expected_objects(sample)


def test_decode_names_a_non_hex_character_whole() -> None:
    result = run("decode", "09 서울")
    assert result.exit_code == 1
    assert "argument 1: not hex: '서'" in result.stderr
