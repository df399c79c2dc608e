"""Who may import whom (docs/architecture.md), checked on the source: the same rules as the
import-linter contracts in setup.cfg (`tox -e lint`), here so that every test run checks them.

protocol ← store ← bridge ← server, cli: a package imports only from those to its left; the
bridge knows the store only through its read interface, `dtgserver.store.log`; the simulator
and `dtgserver.testing` are clients and import only the protocol. No import cycle between packages follows.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dtgserver"

# package → the packages (or modules) of ours it may import, besides itself
ALLOWED: dict[str, set[str]] = {
    "protocol": set(),
    "store": {"protocol"},
    "bridge": {"protocol", "store.log"},
    "sim": {"protocol"},
    "testing": {"protocol"},
    "logs": set(),
    "server": {"protocol", "store", "bridge", "logs"},
    "cli": {"protocol", "store", "bridge", "server", "sim", "logs", ""},
    "__main__": {"cli"},
}


def is_module(dotted: str) -> bool:
    path = PACKAGE.joinpath(*dotted.split(".")) if dotted else PACKAGE
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """Every module of ours `path` imports (also inside functions), as a dotted name under dtgserver
    ("" for the dtgserver package itself)."""
    package = path.relative_to(PACKAGE).with_suffix("").parts[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name.removeprefix("dtgserver").lstrip(".") for a in node.names
                         if a.name.split(".")[0] == "dtgserver")
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if not node.module or node.module.split(".")[0] != "dtgserver":
                    continue
                base = node.module.removeprefix("dtgserver").lstrip(".")
            else:
                parts = package[:len(package) - (node.level - 1)]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            for alias in node.names:  # `from .. import logs` imports the module dtgserver.logs
                candidate = f"{base}.{alias.name}".strip(".")
                found.add(candidate if is_module(candidate) else base)
    return found


def allowed(source: str, target: str) -> bool:
    """Whether package `source` may import module `target`: its own, or one under an allowed name."""
    return target.split(".")[0] == source or any(target == rule or target.startswith(rule + ".")
                                                 for rule in ALLOWED[source] if rule) or target in ALLOWED[source]


def test_every_package_has_a_rule() -> None:
    packages = {p.name if p.is_dir() else p.stem for p in PACKAGE.iterdir()
                if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"}
    assert packages - {"__init__"} <= set(ALLOWED)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layers(path: Path) -> None:
    source = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    if source == "__init__":
        return
    wrong = sorted(t for t in imports_of(path) if not allowed(source, t))
    assert wrong == [], f"{path.relative_to(PACKAGE)} ({source}) must not import {wrong} (docs/architecture.md)"


def test_the_checker_sees_relative_and_lazy_imports(tmp_path: Path) -> None:
    """The checker itself: a lazy `from ..bridge.mapping import x` inside a function of the store."""
    fake = PACKAGE / "store" / "_layers_probe.py"
    fake.write_text("def f():\n    from ..bridge.mapping import TripState\n    from .. import logs\n", "utf-8")
    try:
        assert imports_of(fake) == {"bridge.mapping", "logs"}
        assert not allowed("store", "bridge.mapping") and not allowed("bridge", "store.packets")
        assert allowed("bridge", "store.log") and allowed("server", "bridge.consumer")
    finally:
        fake.unlink()


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_module_imports_itself_through_others() -> None:
    """No import cycle between modules either, lazy imports included (a lazy import that closes a
    circle is still a circle: the two modules can only be understood together)."""
    graph = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}
    assert import_cycles(graph) == []
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
