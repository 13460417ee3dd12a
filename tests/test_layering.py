"""Our modules import downward only and in no circle (issue 30): the layering, checked on every import statement.

Layers, lowest first: common <- client, server <- simulations.support <-
simulations.{evaluation, threats, bench, launch} <- simulations.commands <-
simulations.cli. A module may import its own group and any lower layer;
client and server never import each other, and the groups of the middle
layer import each other only where `SIBLINGS` names the very module. Every import counts:
top-level, inside a function (a late import hides a cycle, it does not
remove it) and under `if TYPE_CHECKING` (a type is a dependency too).
Importing `a.b.c` is an edge to that module only, not to the packages
`a` and `a.b` above it, so a package's `__init__` may import its own
submodules (the method registry does).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterable, Mapping

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "client", "server", "simulations")
LAYERS = (
    ("common",),
    ("client", "server"),
    ("simulations.support",),
    ("simulations.evaluation", "simulations.threats", "simulations.bench", "simulations.launch"),
    ("simulations.commands",),
    ("simulations.cli",),
)
MARKERS = {"simulations"}  # an empty package file: in no layer, and it must import nothing of ours
# Imports across groups of one layer, each (importer's group, imported module) with why; nothing else.
SIBLINGS = {
    ("simulations.threats", "simulations.evaluation.adaptation"):
        "membership inference attacks a task-adapted model, adapted as the grid adapts it (evaluation.adaptation)",
    ("simulations.bench", "simulations.evaluation.adaptation"):
        "the training benchmark times the task adaptation on the pairs the grid draws for it (adaptation_pairs)",
}


def module_files() -> dict[str, Path]:
    """{dotted module name: file} of every module of ours (a package by its `__init__.py`)."""
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported(name: str, source: str, modules: Iterable[str], is_package: bool = False) -> set[str]:
    """The modules of ours (among `modules`) that the module `name` with this source imports, anywhere in it.

    `from a.b import c` is the module a.b.c when there is one, else a.b;
    relative imports are resolved against `name`'s package.
    """
    known = set(modules)
    found: set[str] = set()
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c.func`-like spellings: the module that holds it
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported(name, path.read_text(encoding="utf-8"), files, path.name == "__init__.py")
            for name, path in files.items()}


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One import circle of `graph` as [a, b, ..., a], or None: a depth-first search that keeps its path."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every edge out of it is explored
    for start in sorted(graph):
        if start in state:
            continue
        path = [start]
        stack = [iter(sorted(graph.get(start, ())))]
        state[start] = "open"
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = "done"
                stack.pop()
            elif state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = "open"
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def group(module: str) -> str:
    """The layer group of `module`: the longest group name it is or lies under."""
    names = [g for layer in LAYERS for g in layer if module == g or module.startswith(g + ".")]
    if not names:
        raise AssertionError(f"{module} is in no layer: add its group to LAYERS")
    return max(names, key=len)


def rank(group_name: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if group_name in layer)


def upward(graph: Mapping[str, Iterable[str]]) -> list[str]:
    """Every import of `graph` that the layering forbids, as 'importer -> imported (groups)'."""
    wrong = []
    for importer, targets in sorted(graph.items()):
        for target in sorted(targets):
            if importer in MARKERS:
                wrong.append(f"{importer} -> {target} (a package marker imports nothing)")
                continue
            if target in MARKERS:
                continue
            low, high = group(target), group(importer)
            if low == high or rank(low) < rank(high) or (high, target) in SIBLINGS:
                continue
            wrong.append(f"{importer} -> {target} ({high} -> {low})")
    return wrong


# ------------------------------------------------------------------ the checker itself


def test_the_checker_finds_a_planted_cycle_and_its_path():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"d"}, "d": set()}) is None
    assert find_cycle({"x": {"x"}}) == ["x", "x"]
    # A diamond is not a circle: d is reached twice, but never while on the path.
    assert find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None


def test_the_checker_reads_late_relative_and_type_only_imports():
    modules = {"pkg", "pkg.low", "pkg.high", "pkg.sub", "pkg.sub.leaf"}
    source = (
        "from typing import TYPE_CHECKING\n"
        "import os\n"
        "if TYPE_CHECKING:\n"
        "    from pkg.high import Thing\n"
        "def f():\n"
        "    from . import low\n"
        "    import pkg.sub.leaf.function_like\n"
        "from .sub import leaf, not_a_module\n"
    )
    assert imported("pkg.mid", source, modules) == {"pkg.high", "pkg.low", "pkg.sub.leaf", "pkg.sub"}
    assert imported("pkg.sub", "from .leaf import x\nfrom .. import low\n", modules, is_package=True) == {
        "pkg.sub.leaf", "pkg.low"}


def test_the_checker_refuses_an_upward_or_sideways_import():
    assert upward({"common.x": {"client.y"}}) == ["common.x -> client.y (common -> client)"]
    assert upward({"client.a": {"server.b"}}) == ["client.a -> server.b (client -> server)"]
    assert upward({"simulations.evaluation.grid": {"simulations.launch.simulate"}}) == [
        "simulations.evaluation.grid -> simulations.launch.simulate (simulations.evaluation -> simulations.launch)"]
    assert upward({"simulations.threats.x": {"simulations.evaluation.grid"}}) == [
        "simulations.threats.x -> simulations.evaluation.grid (simulations.threats -> simulations.evaluation)"]
    assert upward({"simulations.threats.x": {"simulations.evaluation.adaptation"}, "simulations.cli": {"common.y"},
                   "simulations.commands.eval": {"simulations.evaluation.grid", "simulations.commands.x"}}) == []


# ------------------------------------------------------------------ our code


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_every_module_is_found_and_in_a_layer(graph):
    assert {"common.settings", "client.training", "server.personalize", "simulations.cli",
            "simulations.evaluation.grid", "simulations.evaluation.methods"} <= graph.keys()
    assert "simulations.evaluation.settings" in graph["simulations.evaluation.grid"]
    for module in graph:
        if module not in MARKERS:
            group(module)


def test_no_import_cycle(graph):
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_old_circle_planted_back_is_found(graph):
    """The methods reading EvalConfig again (settings imports the methods' registry) would close the circle."""
    planted = {**graph, "simulations.evaluation.methods.base": graph["simulations.evaluation.methods.base"]
               | {"simulations.evaluation.settings"}}
    cycle = find_cycle(planted)
    assert cycle is not None and {"simulations.evaluation.settings", "simulations.evaluation.methods.base"} <= set(cycle)


def test_imports_go_down_the_layers(graph):
    assert upward(graph) == []


def test_every_sibling_exception_is_used(graph):
    used = {(group(a), b) for a, targets in graph.items() if a not in MARKERS for b in targets}
    assert set(SIBLINGS) <= used, f"unused exceptions, drop them: {sorted(set(SIBLINGS) - used)}"


def test_the_methods_know_nothing_of_the_grid(graph):
    """A method reads its `MethodSettings`, never EvalConfig nor the grid's modules (the old import circle)."""
    grid_side = {m for m in graph if m.startswith("simulations.evaluation.")
                 and not m.startswith("simulations.evaluation.methods")}
    for module, targets in graph.items():
        if module.startswith("simulations.evaluation.methods"):
            assert not targets & grid_side, f"{module} imports {sorted(targets & grid_side)}"
