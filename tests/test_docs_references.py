"""The docs stand alone: they cite the specifications by title and section, never the project's
private notes or spec files, which are not in the repository (a reader could not follow them)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Written in pieces so that this file does not match itself.
PRIVATE = re.compile("|".join([
    r"spec/0\d\d" + "_",  # the spec texts as the project received them, named by number and hash
    "PROTOCOL" + "-NOTES", "MESSAGE" + "-MODEL", "HARSH" + "-DRIVING", r"\bSTYLE" + r"\.md",
    r"\.\./" + "shared", "/work/" + "shared",
]))
SUFFIXES = {".md", ".py", ".hex", ".json", ".txt", ".toml", ".cfg", ".ini", ".service"}


def published_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "setup.cfg", ROOT / "tox.ini"]
    for folder in ("docs", "dtgserver", "fixtures", "tests", "bench", "fuzz", "contrib"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in SUFFIXES and "__pycache__" not in p.parts]
    return [p for p in files if p.is_file()]


def test_no_file_cites_the_private_notes_or_spec_files() -> None:
    found = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}" for path in published_files()
             for n, line in enumerate(path.read_text("utf-8", "replace").splitlines(), 1) if PRIVATE.search(line)]
    assert found == []


def test_the_check_finds_each_kind_of_reference() -> None:
    for line in ["see spec/" + "004_9320bad09380cb74.txt", "digested in PROTOCOL" + "-NOTES.md",
                 "MESSAGE" + "-MODEL.md, Rulings revised", "per HARSH" + "-DRIVING.md", "STYLE" + ".md says",
                 "[notes](../" + "shared/x.md)"]:
        assert PRIVATE.search(line), line
    assert not PRIVATE.search("Triphos DTG Upload Protocol v0.5, §4.5")


def test_the_protocol_page_cites_the_spec_by_title() -> None:
    text = (ROOT / "docs" / "protocol.md").read_text("utf-8")
    assert "Triphos DTG Upload Protocol v0.5" in text
    assert "Smart[Fleet] platform manual, §8" in (ROOT / "docs" / "mqtt.md").read_text("utf-8")
