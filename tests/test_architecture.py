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


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ewc":
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "ewc"]
    return found


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
    here = floor_of(module)
    for target, names in _imports(MODULES[module]):
        if target not in MODULES:  # ``from ewc.x import y`` where y is a submodule of ewc.x
            raise AssertionError(f"{module} imports {target}, which does not exist")
        assert floor_of(target) <= here, (
            f"{module} (floor {here}) imports {target} (floor {floor_of(target)}): an upward import"
        )
        private = [n for n in names if n.startswith("_") and f"{target}.{n}" not in MODULES]
        assert not private or target == module, f"{module} imports private {private} from {target}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_above_500_lines(module: str) -> None:
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines (more than {MAX_LINES}): split it by job"


def test_the_floor_check_can_fail() -> None:
    """An import from a higher floor is caught (the check is not vacuous)."""
    assert floor_of("ewc.cli") > floor_of("ewc.train") > floor_of("ewc.penalty") > floor_of("ewc.checks")
    assert floor_of("ewc.experiments.patterns") == floor_of("ewc.experiments.sequence")
