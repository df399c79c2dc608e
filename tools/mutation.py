"""Mutation testing of protocol/ and the bridge: which changes to the code do the tests notice?

    python tools/mutation.py [--fail-under 92] [MODULE ...]      (what `tox -e mutation` runs)

Each module is mutated and its own test files are run against every mutant, in three stages:

1. mutmut (3.8) mutates every function and method and runs the tests that call it, each mutant in
   a process forked from one warm interpreter. Fast, but a fork only sees a mutant in code that
   runs after the fork.
2. Every mutant mutmut did not kill is run again from scratch: the mutated function is written
   into a copy of the tree and the module's test files run in a process that imports all of our
   code after the mutation (forked from one that has imported only third-party libraries). This
   reaches what mutmut's fork cannot: functions called only while modules load (the framer's length
   table, the codecs generated from the schemas) and static methods, which mutmut does not route
   to its mutants.
3. Our own mutator covers what mutmut never mutates: statements at module level and in class
   bodies (the schemas, the code tables, tables built at import). Each number literal n becomes
   n + 1, run from scratch like stage 2.

Mutants that cannot change behaviour are listed in tools/mutation-equivalent.txt with why; the score
is killed / (mutants - equivalent). A listed mutant whose change no longer matches (the function
changed, so mutmut's numbering moved) is reported stale and counted as a survivor.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT_FILE = ROOT / "tools" / "mutation-equivalent.txt"
WORK = ROOT / "mutants"  # mutmut's trees, one per group of modules sharing test files; logs

# Each module and its own test files, fastest and most telling first (the runs from scratch stop
# at the first failure). Modules with the same test files share one mutmut tree.
PROTOCOL_TESTS = ["tests/test_protocol_fixtures.py", "tests/test_protocol_framing.py",
                  "tests/test_protocol_fields.py", "tests/test_protocol_layout.py", "tests/test_protocol_json.py",
                  "tests/test_protocol_schema.py",
                  "tests/test_protocol_docs.py", "tests/test_protocol_hypothesis.py"]
# test_trip_*: what a trip's messages are (when its Trip goes out, its measures and behaviours), no network;
# the quick trip files first, the hypothesis-heavy test_mapping and test_messages after them
BRIDGE_TESTS = ["tests/test_trip_completion.py", "tests/test_trip_messages.py", "tests/test_derive.py",
                "tests/test_mapping.py", "tests/test_messages.py", "tests/test_trip_sim.py"]
TARGETS: dict[str, list[str]] = {
    "dtgserver/protocol/framing.py": PROTOCOL_TESTS,
    "dtgserver/protocol/fields.py": PROTOCOL_TESTS,
    "dtgserver/protocol/codec.py": PROTOCOL_TESTS,
    "dtgserver/protocol/layout.py": PROTOCOL_TESTS,
    "dtgserver/protocol/schema.py": PROTOCOL_TESTS,
    "dtgserver/protocol/records.py": PROTOCOL_TESTS,
    "dtgserver/protocol/views.py": PROTOCOL_TESTS,
    "dtgserver/protocol/errors.py": PROTOCOL_TESTS,
    "dtgserver/bridge/trips.py": BRIDGE_TESTS,
    "dtgserver/bridge/messages.py": BRIDGE_TESTS,
}
PYTEST_ARGS = ["-x", "-q", "--hypothesis-seed=0", "-p", "no:cacheprovider"]
COPIED = ["dtgserver", "tests", "fixtures", "docs", "setup.cfg", "pyproject.toml", "README.md"]


@dataclass
class Mutant:
    name: str
    change: str  # the mutated line(s), as the equivalents file quotes them
    source: str | None = None  # the whole mutated module, for a fresh run
    status: str = "survived"  # killed, survived, equivalent, not run (out of time)


@dataclass
class Report:
    module: str
    mutants: list[Mutant] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(m.status == status for m in self.mutants)

    @property
    def score(self) -> float:
        """Killed / non-equivalent; a mutant not run counts as a survivor (the lower bound)."""
        counted = len(self.mutants) - self.count("equivalent")
        return 100.0 * self.count("killed") / counted if counted else 100.0

    @property
    def best(self) -> float:
        """The score if every mutant not run were killed (the upper bound)."""
        counted = len(self.mutants) - self.count("equivalent")
        return 100.0 * (self.count("killed") + self.count("not run")) / counted if counted else 100.0


# -- stage 1 and the mutated sources of mutmut's mutants ---------------------------------------------------


def dotted(module: str) -> str:
    return module.removesuffix(".py").replace("/", ".")


def mutmut_tree(modules: list[str], tests: list[str]) -> Path:
    """A copy of the project where mutmut mutates `modules` and runs only `tests`: mutmut reads its
    settings from setup.cfg, so each group of modules gets a tree with a [mutmut] section of its own."""
    tree = WORK / "-".join(sorted(dotted(m).rsplit(".", 1)[-1] for m in modules))
    tree.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        src, dst = ROOT / name, tree / name
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, dst)
    lines = ["", "[mutmut]", "source_paths = dtgserver", "only_mutate =", *(f"    {m}" for m in modules),
             "also_copy =", "    fixtures/", "    docs/", "    mutation_fresh_caches.py",
             "pytest_add_cli_args =", *(f"    {a}" for a in [*PYTEST_ARGS[2:], "-p", "mutation_fresh_caches"]),
             "pytest_add_cli_args_test_selection =", *(f"    {t}" for t in tests)]
    with (tree / "setup.cfg").open("a") as cfg:
        cfg.write("\n".join(lines) + "\n")
    (tree / "mutation_fresh_caches.py").write_text(FRESH_CACHES.format(modules=[dotted(m) for m in modules]))
    return tree


# mutmut forks each mutant's tests from a process that has run the tests once (to learn which
# test calls which function): a function whose results are cached there (`functools.cache`,
# `lru_cache`: the microtrip builders generated from `_element_source`) would be called by no
# test after the fork, and its mutants survive unseen. Each test starts with those caches empty.
FRESH_CACHES = '''"""pytest plugin of tools/mutation.py: the mutated modules' caches are emptied before each test."""
import sys

MODULES = {modules!r}


def pytest_runtest_setup(item):
    for name in MODULES:
        for value in list(vars(sys.modules.get(name, sys)).values()):
            if getattr(value, "__module__", None) == name and callable(getattr(value, "cache_clear", None)):
                value.cache_clear()
'''


def run_mutmut(tree: Path, module: str) -> dict[str, str]:
    """mutmut's verdict for each mutant of `module` (killed, survived, no tests, timeout, ...)."""
    with (WORK / f"{dotted(module)}.log").open("w") as out:
        subprocess.run([sys.executable, "-m", "mutmut", "run", f"{dotted(module)}.*"], cwd=tree, stdout=out,
                       stderr=subprocess.STDOUT, check=False)
    return mutmut_verdicts(tree, module)


def mutmut_verdicts(tree: Path, module: str) -> dict[str, str]:
    """The verdicts of mutmut's last run on `module`."""
    from mutmut.stats import status_by_exit_code

    meta = tree / "mutants" / f"{module}.meta"
    if not meta.exists():
        raise SystemExit(f"mutmut wrote no results for {module}; its output is in {WORK / f'{dotted(module)}.log'}")
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    return {name: status_by_exit_code[code] for name, code in codes.items()}


def mutmut_mutant(tree: Path, module: str, name: str) -> Mutant:
    """The module's source with mutmut's mutant `name` in place of its function."""
    import libcst as cst
    from mutmut.mutation.diff_apply import read_functions_from_index, read_mutant_function, read_mutants_module
    from mutmut.utils.format_utils import orig_function_and_class_names_from_key

    os.chdir(tree)  # mutmut's readers take paths relative to the project
    function, class_name = orig_function_and_class_names_from_key(name)
    found = read_functions_from_index(name, module)
    mutant_def = found[1] if found else read_mutant_function(read_mutants_module(module), name)
    tree_cst = cst.parse_module((ROOT / module).read_text())
    scope = tree_cst.body
    if class_name is not None:  # methods of the same name live in many classes (fields.py)
        [cls] = [s for s in tree_cst.body if isinstance(s, cst.ClassDef) and s.name.value == class_name]
        scope = cls.body.body
    [target] = [s for s in scope if isinstance(s, cst.FunctionDef) and s.name.value == function]
    mutated = mutant_def.with_changes(name=cst.Name(function))
    source = tree_cst.deep_replace(target, mutated).code
    before = cst.Module([target]).code.splitlines()
    after = cst.Module([mutated]).code.splitlines()
    change = " / ".join(line.strip() for line in after if line not in before) or "(a line removed)"
    return Mutant(name, change, source)


# -- stage 3: literals outside functions -------------------------------------------------------------------


def import_time_mutants(module: str) -> Iterator[Mutant]:
    """n → n + 1 for each number literal at module level or in a class body (not in a function)."""
    text = (ROOT / module).read_text()
    lines = text.splitlines(keepends=True)
    found: list[ast.Constant] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if isinstance(node, ast.Constant) and type(node.value) in (int, float) and node.lineno == node.end_lineno:
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(text))
    per_line: dict[int, int] = {}
    for node in sorted(found, key=lambda n: (n.lineno, n.col_offset)):
        line = lines[node.lineno - 1]
        k = per_line[node.lineno] = per_line.get(node.lineno, -1) + 1
        literal = line.encode()[node.col_offset:node.end_col_offset].decode()
        value = node.value + 1
        new = hex(value) if literal.lower().startswith("0x") else repr(value)
        mutated_line = (line.encode()[:node.col_offset] + new.encode() + line.encode()[node.end_col_offset:]).decode()
        source = "".join([*lines[:node.lineno - 1], mutated_line, *lines[node.lineno:]])
        name = f"{dotted(module)}@{line.strip()}#{k}"
        yield Mutant(name, f"{literal} -> {new}", source)


# -- stages 2 and 3: each mutant imported from scratch --------------------------------------------------------


class FreshRunner:
    """A copy of the tree; each mutant is written into it and the tests run in a new process.

    The process is forked from this one, which has imported pytest and the third-party libraries
    but nothing of ours: every dtgserver module (and the tests) is imported after the mutation,
    as in a fresh interpreter, without paying for the third-party imports each time.
    """

    def __init__(self) -> None:
        self.tree = Path(tempfile.mkdtemp(prefix="dtg-mutation-"))
        for name in COPIED:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, self.tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif src.exists():
                shutil.copy2(src, self.tree / name)
        self.timeout = 600.0
        # The warm part: what every test run imports, none of it ours, and no pytest plugin (pytest
        # rewrites a plugin's asserts when it loads it, and warns, an error here, if it came first).
        import attrs  # noqa: F401
        import click  # noqa: F401
        import construct  # noqa: F401
        import pytest  # noqa: F401
        import trio  # noqa: F401

        assert not any(name.split(".")[0] in ("dtgserver", "conftest") for name in sys.modules), "imported too early"

    def calibrate(self, tests: list[str]) -> None:
        """Run the tests unmutated (they must pass) and allow each mutant 5× that time."""
        started = time.monotonic()
        if self._run(tests, timeout=1800) != 0:
            raise SystemExit(f"the tests fail on the unmutated tree: {' '.join(tests)}")
        self.timeout = max(60.0, 5 * (time.monotonic() - started))

    def killed(self, module: str, source: str, tests: list[str]) -> bool:
        path = self.tree / module
        original = path.read_text()
        path.write_text(source)
        try:
            code = self._run(tests, timeout=self.timeout)
        finally:
            path.write_text(original)
        if code == 5:
            raise SystemExit(f"pytest found no tests in {tests}")
        # A failed test, an error collecting them or importing conftest (exit 2 or 4: the mutant
        # breaks an import; the unmutated tree passed `calibrate` with the same arguments), a timeout.
        return code != 0

    def _run(self, tests: list[str], *, timeout: float) -> int | None:
        pid = os.fork()
        if pid == 0:  # the child: run the tests from the tree, exit with pytest's code
            code = 3
            try:
                import pytest

                os.chdir(self.tree)
                sys.path.insert(0, str(self.tree))
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
                sys.dont_write_bytecode = True
                code = int(pytest.main([*PYTEST_ARGS, *tests]))
            finally:
                os._exit(code)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        return None

    def close(self) -> None:
        shutil.rmtree(self.tree, ignore_errors=True)


# -- the equivalents file ----------------------------------------------------------------------------------


def load_equivalents() -> dict[str, tuple[str, str]]:
    """name → (the change it was judged on, why it is equivalent)."""
    found: dict[str, tuple[str, str]] = {}
    for number, line in enumerate(EQUIVALENT_FILE.read_text("utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        try:  # the change may hold " | " itself (a type annotation): the name is first, the why last
            name, rest = line.split(" | ", 1)
            change, why = (part.strip() for part in rest.rsplit(" | ", 1))
            name = name.strip()
        except ValueError:
            raise SystemExit(f"{EQUIVALENT_FILE.name} line {number}: expected 'name | change | why'") from None
        found[name] = (change, why)
    return found


def test_module(module: str, runner: FreshRunner, equivalents: dict[str, tuple[str, str]], *, reuse: bool,
                resume: bool = False, deadline: float = float("inf")) -> Report:
    tests = TARGETS[module]
    report = Report(module)
    tree = mutmut_tree([m for m in TARGETS if TARGETS[m] == tests], tests)
    if reuse:
        verdicts = mutmut_verdicts(tree, module)
    else:
        print(f"{module}: mutmut ...", flush=True)
        verdicts = run_mutmut(tree, module)
    mutants = [Mutant(name, "", status="killed") if verdict in ("killed", "caught by type check")
               else mutmut_mutant(tree, module, name) for name, verdict in sorted(verdicts.items())]
    mutants += import_time_mutants(module)
    report.mutants = mutants
    pending = []
    for mutant in mutants:
        if mutant.name in equivalents and mutant.status != "killed":
            if equivalents[mutant.name][0] == mutant.change:
                mutant.status = "equivalent"
                continue
            report.stale.append(mutant.name)
        if mutant.status != "killed":
            pending.append(mutant)
    # Each verdict from scratch is kept as it comes, so a later run can --resume (and an interrupted
    # one loses nothing): a mutant killed before, whose change still reads the same, stays killed.
    fresh_file = WORK / f"{dotted(module)}.fresh.json"
    fresh: dict[str, dict[str, str]] = json.loads(fresh_file.read_text()) if fresh_file.exists() else {}
    earlier = 0
    if resume:
        for mutant in pending:
            if fresh.get(mutant.name, {}).get("change") == mutant.change and fresh[mutant.name]["status"] == "killed":
                mutant.status, earlier = "killed", earlier + 1
        pending = [m for m in pending if m.status != "killed"]
    # First the mutants mutmut ran and did not kill (and ours), then those it never reached (a
    # stage 1 stopped early): with --minutes, the time goes to the survivors a new test may kill.
    unreached = {name for name, verdict in verdicts.items() if verdict == "not checked"}
    pending.sort(key=lambda m: m.name in unreached)
    print(f"{module}: {len(verdicts)} mutmut mutants, {len(mutants) - len(verdicts)} at import;"
          f" {len(pending)} to run from scratch" + (f" ({earlier} killed from scratch before)" if resume else ""),
          flush=True)
    for i, mutant in enumerate(pending, 1):
        assert mutant.source is not None
        if time.monotonic() > deadline:
            mutant.status = "not run"
            continue
        mutant.status = "killed" if runner.killed(module, mutant.source, tests) else "survived"
        print(f"  [{i}/{len(pending)}] {mutant.status:8} {mutant.name} | {mutant.change}", flush=True)
        fresh[mutant.name] = {"change": mutant.change, "status": mutant.status}
        fresh_file.write_text(json.dumps(fresh, indent=0, ensure_ascii=False))
    module_prefix = dotted(module)
    listed = {n for n in equivalents if n.startswith((module_prefix + ".", module_prefix + "@"))}
    report.stale += sorted(n for n in listed - {m.name for m in mutants if m.status == "equivalent"}
                           if n not in report.stale)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", default=list(TARGETS), metavar="MODULE",
                        help="modules to mutate (default: all of them)")
    parser.add_argument("--fail-under", type=float, default=92.0,
                        help="exit 1 when a module's score is below this percentage (default 92)")
    parser.add_argument("--reuse", action="store_true",
                        help="take mutmut's verdicts from its last run instead of running it again")
    parser.add_argument("--resume", action="store_true",
                        help="--reuse, and take the kills from scratch of earlier runs too: run from scratch only"
                             " the mutants that survived or were not run (sound while tests are only added)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="run no more mutants from scratch after this many minutes; those left are"
                             " reported as not run, and the score as a range")
    args = parser.parse_args()
    deadline = time.monotonic() + 60 * args.minutes if args.minutes is not None else float("inf")
    unknown = [m for m in args.modules if m not in TARGETS]
    if unknown:
        parser.error(f"not a mutation target: {', '.join(unknown)} (targets: {', '.join(TARGETS)})")
    equivalents = load_equivalents()
    WORK.mkdir(exist_ok=True)
    runner = FreshRunner()
    reports = []
    try:
        for tests in dict.fromkeys(tuple(TARGETS[m]) for m in args.modules):
            runner.calibrate(list(tests))
            for module in (m for m in args.modules if tuple(TARGETS[m]) == tests):
                reports.append(test_module(module, runner, equivalents, reuse=args.reuse or args.resume,
                                           resume=args.resume, deadline=deadline))
    finally:
        runner.close()
    print()
    print(f"{'module':34} {'mutants':>8} {'equiv.':>7} {'killed':>7} {'survived':>9} {'not run':>8} {'score':>7}")
    for r in reports:
        score = f"{r.score:6.1f}%" + (f" to {r.best:.1f}%" if r.count("not run") else "")
        print(f"{r.module:34} {len(r.mutants):8} {r.count('equivalent'):7} {r.count('killed'):7}"
              f" {r.count('survived'):9} {r.count('not run'):8} {score}")
    for r in reports:
        for m in r.mutants:
            if m.status == "survived":
                print(f"survived: {m.name} | {m.change}")
        for name in r.stale:
            print(f"stale equivalent (re-judge it in {EQUIVALENT_FILE.name}): {name}")
    low = [r.module for r in reports if r.score < args.fail_under]
    if low:
        print(f"below {args.fail_under:g}%: {', '.join(low)}")
    return 1 if low else 0


if __name__ == "__main__":
    sys.exit(main())
