"""Tests mirror the code: each module of common/, client/, server/ and simulations/ has its own test file.

`pkg/sub/mod.py` is tested in `tests/modules/pkg/sub/test_mod.py`; a package whose `__init__.py` holds code
(`simulations/evaluation/methods/__init__.py`, the method registry) in `test_<package>.py` beside the package's
test folder (`tests/modules/simulations/evaluation/test_methods.py`). Tests of a promise across modules live in
`tests/promises/`, whole runs in `tests/end_to_end/`.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "client", "server", "simulations")
MODULE_TESTS = ROOT / "tests" / "modules"

# Modules with no test file of their own, each with why.
EXEMPT = {
    "common/errors.py": "the PrimeError base class alone; every one-line-error test goes through it",
}
# Modules whose own test file is still to be written, each with what covers it today: none left (issue 30 item 5).
# This list may only shrink: a module here that gains its test file fails below until it is taken off.
# The methods' files (methods/test_<method>.py) and test_methods.py share one session-scoped prepared grid
# (tests/modules/simulations/evaluation/conftest.py): a new method's test file uses it, or CI prepares another.
NOT_YET: dict[str, str] = {}


def _has_code(path: Path) -> bool:
    """Anything beyond a docstring."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return any(not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) for node in body)


def _test_file(module: Path) -> Path:
    relative = module.relative_to(ROOT)
    if module.name == "__init__.py":
        return MODULE_TESTS / relative.parent.parent / f"test_{relative.parent.name}.py"
    return MODULE_TESTS / relative.parent / f"test_{module.stem}.py"


def _modules() -> dict[str, Path]:
    """Every module with code, by its repository path, and the test file it should have."""
    found = {}
    for package in PACKAGES:
        for module in sorted((ROOT / package).rglob("*.py")):
            if module.name != "__init__.py" or _has_code(module):
                found[module.relative_to(ROOT).as_posix()] = _test_file(module)
    return found


def test_every_module_has_its_test_file():
    missing = [f"{module} -> {test.relative_to(ROOT)}" for module, test in _modules().items()
               if not test.is_file() and module not in EXEMPT and module not in NOT_YET]
    assert not missing, "modules without their test file:\n" + "\n".join(missing)


def test_the_lists_of_exceptions_name_only_modules_that_still_need_them():
    modules = _modules()
    stale = [m for m in [*EXEMPT, *NOT_YET] if m not in modules or modules[m].is_file()]
    assert not stale, f"take these off EXEMPT / NOT_YET (gone, or now tested in their own file): {stale}"
    assert not set(EXEMPT) & set(NOT_YET)


def test_the_mirror_rule_maps_modules_and_packages_as_documented():
    assert _test_file(ROOT / "server" / "coordinator.py") == MODULE_TESTS / "server" / "test_coordinator.py"
    methods = ROOT / "simulations" / "evaluation" / "methods" / "__init__.py"
    assert _test_file(methods) == MODULE_TESTS / "simulations" / "evaluation" / "test_methods.py"
    assert _has_code(methods) and not _has_code(ROOT / "common" / "__init__.py")


def test_the_architecture_page_names_every_module_and_only_modules_that_exist():
    """docs/ARCHITECTURE.md's module table is the map of the code: a module added without its row, or a row left
    for a module that moved, fails here (a row may name a package folder, e.g. `simulations/threats/`)."""
    page = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    table = page[page.index("## Modules"):page.index("## Contracts")]
    named = set(re.findall(r"`((?:common|client|server|simulations)/[\w/]*(?:\.py|/))`", table))
    assert named, "no module rows found"
    missing_files = sorted(path for path in named if not (ROOT / path).exists())
    assert not missing_files, f"rows for modules that do not exist: {missing_files}"
    folders = tuple(path for path in named if path.endswith("/"))
    unnamed = sorted(module for module in _modules()
                     if module not in named and not module.endswith("__init__.py") and not module.startswith(folders))
    assert not unnamed, f"modules without a row in docs/ARCHITECTURE.md: {unnamed}"
