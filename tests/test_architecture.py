"""docs/architecture.md stays true: its floor diagram lists every module, and imports point down.

The floors are read from the diagram itself (the first code block of docs/architecture.md), so the
document and this check cannot drift apart. Every ``import ewc...`` in ``src/ewc`` (lazy imports
inside functions included) must go to the importer's own floor or below, and no module may import
another module's private names.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "ewc"
DOC = ROOT / "docs" / "architecture.md"
MAX_LINES = 500
ENTRY = re.compile(r"^(?:floor (\d)  | {9})([\w<>]+(?:/[\w<>]+)*(?:\.py|/))(?:\s|$)")  # at column 9


def _floors() -> dict[str, int]:
    """``{listed entry: floor}`` from the diagram: files (``a/b.py``), packages (``a/``) and the
    ``experiments/<name>.py`` pattern."""
    block = DOC.read_text().split("```")[1]
    floors: dict[str, int] = {}
    floor = None
    for line in block.splitlines():
        m = ENTRY.match(line)
        if not m:
            continue
        if m.group(1):
            floor = int(m.group(1))
        assert floor is not None, f"an entry before the first floor: {line!r}"
        floors[m.group(2)] = floor
    return floors


FLOORS = _floors()


def _modules() -> dict[str, Path]:
    """``{dotted name: path}`` of every module of the package."""
    out = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def floor_of(module: str) -> int:
    """The floor of a dotted module name (``ewc`` itself: the floor of what it re-exports)."""
    if module == "ewc":
        return FLOORS["penalty.py"]
    path = MODULES[module].relative_to(SRC).as_posix()
    if path in FLOORS:
        return FLOORS[path]
    folder = path.rsplit("/", 1)[0] + "/" if "/" in path else ""
    if folder and folder in FLOORS:
        return FLOORS[folder]
    pattern = folder + "<name>.py"
    if pattern in FLOORS or (folder and path == folder + "__init__.py"):
        return FLOORS.get(pattern, min((f for e, f in FLOORS.items() if e.startswith(folder)), default=0))
    raise AssertionError(f"{path} is not listed in docs/architecture.md")


def _imports(source: str) -> list[tuple[str, list[str]]]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ewc":
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "ewc"]
    return found


def violations(module: str, source: str) -> list[str]:
    """What is wrong with the ewc imports of ``source`` as the code of ``module``."""
    here, wrong = floor_of(module), []
    for target, names in _imports(source):
        if target not in MODULES:  # ``from ewc.x import y`` where y is a submodule of ewc.x
            wrong.append(f"{module} imports {target}, which does not exist")
            continue
        if floor_of(target) > here:
            wrong.append(f"{module} (floor {here}) imports {target} (floor {floor_of(target)}): upward")
        private = [n for n in names if n.startswith("_") and f"{target}.{n}" not in MODULES]
        if private and target != module:
            wrong.append(f"{module} imports private {private} from {target}")
    return wrong


def test_every_module_is_listed_and_every_entry_exists() -> None:
    for name in MODULES:
        floor_of(name)
    files = {p.relative_to(SRC).as_posix() for p in MODULES.values()}
    for entry in FLOORS:
        if entry.endswith("/"):
            assert any(f.startswith(entry) for f in files), f"{entry} is listed but does not exist"
        elif "<name>" not in entry:
            assert entry in files, f"{entry} is listed but does not exist"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_and_not_at_private_names(module: str) -> None:
    assert violations(module, MODULES[module].read_text()) == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_above_500_lines(module: str) -> None:
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines (more than {MAX_LINES}): split it by job"


def test_the_checks_catch_what_they_forbid() -> None:
    """An upward import (also a lazy one), a private name and a missing module are all caught."""
    lazy_upward = "def f():\n    from ewc.cli import main\n    return main\n"
    assert any("upward" in v for v in violations("ewc.penalty", lazy_upward))
    assert any("private" in v for v in violations("ewc.train", "from ewc.fisher import _secret"))
    assert any("does not exist" in v for v in violations("ewc.train", "import ewc.nowhere"))
    assert violations("ewc.cli", "from ewc.train import TrainConfig") == []
    assert floor_of("ewc.cli") > floor_of("ewc.train") > floor_of("ewc.penalty") > floor_of("ewc.checks")
