"""The package's imports run one way: down the stack in ``pyramidion_ds/__init__.py``, never back up.

Every ``import`` in every ``.py`` file of the package (function-level ones too) is read with ``ast``,
resolved to the package module it names, and checked against :data:`RANKS`: a module may import its own
unit and units of a lower rank only. Units of the same rank (``train``/``generate``, ``bench``/``tune``)
stay independent of each other.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = "pyramidion_ds"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE

#: unit (a package or module, matched by the longest prefix) -> rank; imports go to a lower rank only
RANKS = {
    "pyramidion_ds": 0,  # the root __init__ (``__version__``), matched exactly
    "pyramidion_ds.errors": 0,  # UsageError, DataError, exit codes: importable by all
    "pyramidion_ds.distributed": 1,  # rank discovery: imports nothing of ours
    "pyramidion_ds.logs": 2,  # quiets DeepSpeed's accelerator probe via distributed.env
    "pyramidion_ds.config": 3,
    "pyramidion_ds.data": 4,
    "pyramidion_ds.model": 5,
    "pyramidion_ds.engine": 6,
    "pyramidion_ds.checkpoint": 7,  # the format: used by train and generate alike
    "pyramidion_ds.train": 8,
    "pyramidion_ds.generate": 8,
    "pyramidion_ds.bench": 9,  # beside the top: may import anything but cli
    "pyramidion_ds.tune": 9,
    "pyramidion_ds.cli": 10,
    "pyramidion_ds.distributed.selftest": 10,  # a ``python -m`` entry point, like a console script
}

#: third-party packages a unit must not import
FORBIDDEN_EXTERNAL = {"pyramidion_ds.model": ("deepspeed",)}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def unit_of(module: str) -> str | None:
    """The longest key of :data:`RANKS` that is ``module`` or a package holding it (the root: exactly)."""
    if module == PACKAGE:
        return PACKAGE
    matches = [unit for unit in RANKS if unit != PACKAGE and (module == unit or module.startswith(unit + "."))]
    return max(matches, key=len) if matches else None


def imports_of(module: str) -> list[tuple[int, str]]:
    """(line, imported name) for every import in ``module``: package modules resolved to absolute names
    (``from x import y`` names ``x.y`` when that is a module, else ``x``); others as written."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if sub in MODULES else target))
    return found


@functools.cache
def edges() -> tuple[tuple[str, int, str], ...]:
    """(importer, line, imported) for every import of the package, parsed once."""
    return tuple(dict.fromkeys((module, line, target) for module in MODULES for line, target in imports_of(module)))


def where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(ROOT.parent)}:{line}"


def test_every_module_has_a_rank():
    assert len(MODULES) > 50, "the package was not found"
    unranked = [module for module in MODULES if unit_of(module) is None]
    assert not unranked, f"give these a rank in RANKS: {unranked}"


def test_imports_run_down_the_stack():
    offenders = []
    for module, line, target in edges():
        if target.split(".")[0] != PACKAGE:
            continue
        unit, to = unit_of(module), unit_of(target)
        if unit is None or to is None:
            offenders.append(f"{where(module, line)}: {module} imports {target}, one of them without a rank")
        elif to != unit and RANKS[to] >= RANKS[unit]:
            offenders.append(
                f"{where(module, line)}: {unit} (rank {RANKS[unit]}) imports {target} ({to}, rank {RANKS[to]})"
            )
    assert not offenders, "imports running up the stack:\n" + "\n".join(offenders)


@pytest.mark.parametrize(
    "importer, forbidden",
    [
        ("", ("pyramidion_ds.cli",)),  # nothing outside cli/ imports cli/
        ("pyramidion_ds.generate", ("pyramidion_ds.train",)),
        ("pyramidion_ds.checkpoint", ("pyramidion_ds.train", "pyramidion_ds.generate", "pyramidion_ds.cli")),
        ("pyramidion_ds.model", ("pyramidion_ds.train", "pyramidion_ds.engine", "pyramidion_ds.checkpoint")),
        ("", ("pyramidion_ds.bench", "pyramidion_ds.tune")),  # only cli/ (and themselves) import bench/, tune/
    ],
)
def test_named_edges_are_absent(importer, forbidden):
    """The edges the layering exists to prevent, spelled out (the rank table implies them too)."""

    def inside(module: str, unit: str) -> bool:
        return module == unit or module.startswith(unit + ".")

    offenders = [
        f"{where(module, line)}: {module} imports {target}"
        for module, line, target in edges()
        if inside(module, importer or PACKAGE)
        and not inside(module, "pyramidion_ds.cli")
        and any(inside(target, unit) and not inside(module, unit) for unit in forbidden)
    ]
    assert not offenders, "\n".join(offenders)


def test_no_forbidden_third_party_imports():
    offenders = [
        f"{where(module, line)}: {module} imports {target}"
        for module, line, target in edges()
        for unit, names in FORBIDDEN_EXTERNAL.items()
        if unit_of(module) == unit and target.split(".")[0] in names
    ]
    assert not offenders, "\n".join(offenders)
