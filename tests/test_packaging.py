"""The installed package is the whole package: every module ships in the wheel."""

from __future__ import annotations

import pkgutil
from pathlib import Path

import dtgserver


def test_every_source_folder_is_a_regular_package() -> None:
    """setuptools' `find:` skips folders without __init__.py: a wheel would lack them."""
    root = Path(dtgserver.__file__).parent
    folders = [p for p in root.rglob("*") if p.is_dir() and p.name != "__pycache__" and any(p.glob("*.py"))]
    assert folders, "no subpackages found"
    assert [str(p.relative_to(root)) for p in folders if not (p / "__init__.py").exists()] == []


def test_every_module_imports() -> None:
    names = [m.name for m in pkgutil.walk_packages(dtgserver.__path__, "dtgserver.") if m.name != "dtgserver.__main__"]
    assert "dtgserver.server.app" in names
    for name in names:
        __import__(name)
