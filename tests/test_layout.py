"""The layout the README's "Where things live" describes holds: no import cycle in the package, the core
never imports the assembly layer, the trainer never names a method, and tests share helpers instead of
importing each other."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from rlvr_entropy.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rlvr_entropy"
TESTS = ROOT / "tests"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported_modules(path: Path) -> set[str]:
    """Package modules ``path`` imports anywhere in its body (function-level imports count: a cycle hidden in a
    function is still a cycle). ``from pkg import name`` counts as importing ``pkg.name`` when that is a module."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def package_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        # A package's __init__ imports its submodules to register them; a submodule importing a sibling goes
        # through the parent package only implicitly, which is not an edge here.
        graph[name] = {m for m in imported_modules(path) if m != name}
    return graph


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_in_the_package():
    graph = package_graph()
    assert "rlvr_entropy.trainer" in graph and graph["rlvr_entropy.trainer"]  # the parser sees imports
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


@pytest.mark.parametrize("core", ["rlvr_entropy.trainer", "rlvr_entropy.config", "rlvr_entropy.methods.base",
                                  "rlvr_entropy.methods.pipeline", "rlvr_entropy.reward_contract",
                                  "rlvr_entropy.sandbox", "rlvr_entropy.data", "rlvr_entropy.metrics",
                                  "rlvr_entropy.guards", "rlvr_entropy.checkpointing", "rlvr_entropy.rollout_stats"])
def test_the_core_does_not_import_the_assembly_layer(core):
    graph = package_graph()
    reachable, todo = set(), [core]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in reachable:
                reachable.add(nxt)
                todo.append(nxt)
    assert not reachable & {"rlvr_entropy.runner", "rlvr_entropy.cli"}, f"{core} reaches the assembly layer"


def test_the_trainer_never_names_a_method():
    source = (PACKAGE / "trainer.py").read_text() + (PACKAGE / "methods" / "pipeline.py").read_text()
    strings = {node.value for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Constant)
               and isinstance(node.value, str)}
    assert not strings & set(METHODS), "the trainer and pipeline must not branch on a method's name"


def test_no_test_module_imports_another():
    test_modules = {p.stem for p in TESTS.rglob("test_*.py")} | {"conftest"}
    offenders = []
    for path in [*TESTS.rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(TESTS)} imports {n}" for n in names if n.split(".")[0] in test_modules]
    assert not offenders


def test_worker_scripts_live_together():
    assert not [p.name for p in TESTS.glob("*worker*.py")], "worker scripts belong in tests/workers/"


def test_readme_map_lists_every_module():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Where things live", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`(rlvr_entropy/[\w/]+\.py|rlvr_entropy/[\w/]+/)`", section))
    files = {f"rlvr_entropy/{p.relative_to(PACKAGE)}" for p in PACKAGE.glob("*.py") if not p.name.startswith("__")}
    folders = {f"rlvr_entropy/{p.name}/" for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert listed == files | folders


def test_every_method_notes_citation_resolves():
    """Code and tests cite ``docs/methods.md §N.M``; each cited section is a heading there."""
    headings = set(re.findall(r"^#+ §(\d+(?:\.\d+)?)\b", (ROOT / "docs" / "methods.md").read_text(), re.M))
    cited = {}
    for path in [*PACKAGE.rglob("*.py"), *TESTS.rglob("*.py")]:
        for ref in re.findall(r"docs/methods\.md`*\s*§(\d+(?:\.\d+)?)", path.read_text()):
            cited.setdefault(ref, path.name)
    assert cited, "no citation found: the pattern is out of date"
    assert not {ref: f for ref, f in cited.items() if ref not in headings}
