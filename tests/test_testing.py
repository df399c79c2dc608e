"""`dtgserver.testing` is public: what its strategies promise holds, and docs/testing.md names all of it."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings

import dtgserver.testing
from dtgserver.protocol import BasicInfo, KeyOff, Realtime, decode, encode
from dtgserver.testing import drives

DOCS = Path(__file__).resolve().parent.parent / "docs" / "testing.md"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drives())
def test_a_drive_is_one_terminals_trip_in_order(trip: list[object]) -> None:
    assert isinstance(trip[-1], KeyOff)
    realtime = [p for p in trip if isinstance(p, Realtime)]
    assert realtime and len(realtime) + 1 + isinstance(trip[0], BasicInfo) == len(trip)
    assert {p.modem for p in trip} == {realtime[0].modem}  # type: ignore[attr-defined]
    assert {p.key_on_time for p in realtime} == {realtime[0].key_on_time}
    assert len({type(p) for p in realtime}) == 1
    times = [b.time for p in realtime for b in p.bodies]
    assert times[0] == realtime[0].key_on_time
    assert all((b - a).total_seconds() == 1 for a, b in itertools.pairwise(times))
    assert trip[-1].key_off_time >= times[-1]
    for packet in trip:
        assert decode(encode(packet)) == packet  # type: ignore[arg-type]


def test_docs_testing_describes_every_public_name() -> None:
    text = DOCS.read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `(\w+)", text, re.M))
    assert documented == set(dtgserver.testing.__all__)
    assert all(hasattr(dtgserver.testing, name) for name in dtgserver.testing.__all__)


def test_without_hypothesis_the_import_says_what_to_install() -> None:
    code = "import sys; sys.modules['hypothesis'] = None; import dtgserver.testing"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "ImportError: dtgserver.testing needs hypothesis: pip install 'dtgserver[testing]'" in result.stderr
