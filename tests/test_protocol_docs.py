"""docs/protocol.md agrees with the code: every field table row with the schema, every JSON example
with what the decoder prints for the fixture it names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import construct
import pytest
from conftest import load_sample

from dtgserver.protocol import decode, to_json
from dtgserver.protocol.codec import schema_fields
from dtgserver.protocol.schema import (
    BASIC_INFO,
    DTG_BODY,
    DTG_REALTIME,
    KEY_OFF,
    MDT_BODY,
    OBD_BODY,
    RESPONSE,
    STATUS_LOG,
    Bodies,
)

DOC = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text("utf-8")
SECTIONS = {
    "0x01 basic info": BASIC_INFO,
    "Realtime header": DTG_REALTIME,
    "0x03 DTG body": DTG_BODY,
    "0x06 OBD body": OBD_BODY,
    "0x07 MDT body": MDT_BODY,
    "0x04 KEY OFF": KEY_OFF,
    "0x63 status log": STATUS_LOG,
    "0x09 response": RESPONSE,
}


def table_rows(heading: str) -> list[tuple[int, str, str]]:
    """(offset, size, first JSON key) of each row of the table under the `### heading`."""
    section = DOC.split(f"### {heading}", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0].isdigit():
            rows.append((int(cells[0]), cells[1], re.findall(r"`([a-z_0-9]+)`", cells[4])[0]))
    return rows


@pytest.mark.parametrize("heading", list(SECTIONS))
def test_field_tables_match_the_schema(heading: str) -> None:
    schema: construct.Struct = SECTIONS[heading]
    expected, offset = [], 0
    for name, adapter in schema_fields(schema):
        if isinstance(adapter, Bodies):
            expected.append((offset, "N × size", name))
        elif name == "log":
            expected.append((offset, "L", name))
        else:
            expected.append((offset, str(adapter.size), name))
            offset += adapter.size
    assert table_rows(heading) == expected


def test_json_examples_are_the_decoders_output() -> None:
    examples = re.findall(r"<!-- fixture: (\w+) -->\n```json\n(.*?)```", DOC, re.S)
    assert len(examples) >= 3
    for name, text in examples:
        assert json.loads(text) == to_json(decode(load_sample(name).data)), name


def test_every_json_key_is_documented() -> None:
    for name in ["dtg_spec_sample", "obd_spec_sample", "mdt_spec_sample", "basic_info_spec_sample",
                 "key_off_spec_sample", "status_log_spec_sample", "response_spec_sample"]:
        obj = to_json(decode(load_sample(name).data))
        keys = set(obj) | {k for body in obj.get("bodies", []) for k in body}
        for key in keys:
            assert f"`{key}`" in DOC, key
