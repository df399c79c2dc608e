"""docs/protocol.md agrees with the code: every field table row with the schema, every JSON example
with what the decoder prints for the fixture it names."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import construct
import pytest
from conftest import load_sample

from dtgserver.protocol import decode, to_json
from dtgserver.protocol.codec import schema_fields
from dtgserver.protocol.fields import Code, Field, ProtocolId, Scaled, Temperature
from dtgserver.protocol.framing import DEFAULT_MAX_BODY_COUNT
from dtgserver.protocol.schema import (
    BASIC_INFO,
    DEVICE_STATUS,
    DTG_BODY,
    DTG_REALTIME,
    KEY_OFF,
    MDT_BODY,
    MDT_REALTIME,
    OBD_BODY,
    OBD_REALTIME,
    RESPONSE,
    STATUS_LOG,
    VEHICLE_TYPES,
    WORK_STATUS,
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


def table_cells(heading: str) -> list[list[str]]:
    """The cells of each row of the field table under the `### heading`."""
    section = DOC.split(f"### {heading}", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0].isdigit():
            rows.append(cells)
    return rows


def table_rows(heading: str) -> list[tuple[int, str, str]]:
    """(offset, size, first JSON key) of each row of the table under the `### heading`."""
    return [(int(cells[0]), cells[1], re.findall(r"`([a-z_0-9]+)`", cells[4])[0]) for cells in table_cells(heading)]


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


# The realtime header's table stands for the three realtime kinds.
SCHEMAS_OF = {heading: [schema] for heading, schema in SECTIONS.items()}
SCHEMAS_OF["Realtime header"] = [DTG_REALTIME, OBD_REALTIME, MDT_REALTIME]
UNIT_WORDS = {"bytes": "B"}  # the table's word for a unit the code abbreviates


def number(text: str) -> float:
    return float(text.replace("−", "-").replace(" ", ""))


@pytest.mark.parametrize("heading", list(SECTIONS))
def test_units_scales_and_ranges_match_the_schema(heading: str) -> None:
    """What the tables promise (units, scales, the ranges warned about, protocol IDs) is what the
    fields do: the decoder's warnings and `decode --format table` use these very values."""
    documented_ids: list[int] = []
    accepted_ids: list[int] = []
    for schema in SCHEMAS_OF[heading]:
        adapters = dict(schema_fields(schema))
        for cells in table_cells(heading):
            name = re.findall(r"`([a-z_0-9]+)`", cells[4])[0]
            adapter, unit, documented = adapters[name], cells[5].split(";")[0], cells[6]
            if isinstance(adapter, ProtocolId):
                documented_ids = [int(x, 16) for x in re.findall(r"`(0x[0-9a-f]{2})`", documented)]
                accepted_ids += adapter.accepted
                continue
            if not isinstance(adapter, Field) or isinstance(adapter, Code):
                continue
            if isinstance(adapter, Scaled):
                shown_unit, scale = unit.split(" = ")[-1].split(" × ")
                assert (shown_unit, number(scale)) == (adapter.unit, adapter.scale), name
            elif unit in ("km", "km/h", "rpm", "°", "min", "bytes"):
                assert UNIT_WORDS.get(unit, unit) == adapter.unit, name
            else:
                assert not adapter.unit, name
            if found := re.fullmatch(r"(−?[\d.]+) – (−?[\d. ]+)", documented):
                assert (adapter.lo, adapter.hi) == (number(found[1]), number(found[2])), name
            elif found := re.fullmatch(r"≥ (\d+)", documented):
                assert (adapter.lo, adapter.hi) == (int(found[1]), None), name
            elif found := re.fullmatch(r"(\d+) – max \((\d+)\)", documented):
                assert (adapter.lo, adapter.hi, int(found[2])) == (int(found[1]), None, DEFAULT_MAX_BODY_COUNT), name
            else:
                assert (adapter.lo, adapter.hi) == (None, None), name
    assert documented_ids == accepted_ids and bool(accepted_ids) != heading.endswith(" body")
    if "temp_a_c" in dict(schema_fields(SECTIONS[heading])):  # 99.0 and 98.0 °C are states
        assert set(Temperature.SPECIAL) == {990, 980}


def code_table(title: str) -> dict[int | str, str]:
    """A code table of the section "Code tables" (or the results under the response's table), as
    code → its English name."""
    paragraph = " ".join(DOC.split(title, 1)[1].split("\n\n", 1)[0].split())  # one line
    table: dict[int | str, str] = {}
    for code, name in re.findall(r"`(\d+)` ([A-Za-z][A-Za-z -]*[a-z])", paragraph):
        table.setdefault(code if title.startswith("**Vehicle") else int(code), name)  # the first is the name
    return table


@pytest.mark.parametrize(("title", "table"), [
    ("**Vehicle type**", VEHICLE_TYPES), ("**Device status**", DEVICE_STATUS), ("**Work status**", WORK_STATUS),
    ("Results, and what the terminal does", RESPONSE.subcons[1].table),
], ids=["vehicle type", "device status", "work status", "result"])
def test_code_tables_match_the_schema(title: str, table: dict[Any, str]) -> None:
    """The codes the decoder knows (others are warned about) and their names, as documented."""
    assert code_table(title) == table
