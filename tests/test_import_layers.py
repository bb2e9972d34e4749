"""The import layers of invardiff, read from the source (``ast``; nothing is imported to find them).

A family file (``invardiff/families/<name>.py``) imports only the bottom modules, which import nothing above them:
the engine facts and the plain data a family declares (``families/spec.py``, ``table.py``, ``calibration_spec.py``,
``model_config.py``), ``plan_file.py`` (``PlanError`` and an official book's fields), the toy pipelines' stand-in
components and seeding; the registry (``families/__init__.py``) and the tools that use the data (calibration,
official books, model configs, toy pipelines) sit above. And no module imports one that imports it back, counting
every import statement: those at module level, and those deferred into functions, which only hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import invardiff


SRC = Path(invardiff.__file__).parent
PACKAGE = "invardiff"

# The modules a family file may import (besides sibling family files), and that import only each other.
BOTTOM = {
    "invardiff.families.spec",
    "invardiff.families.table",
    "invardiff.families.calibration_spec",
    "invardiff.families.model_config",
    "invardiff.plan_file",
    "invardiff.toy_components",
    "invardiff.seeding",
}
REGISTRY = "invardiff.families"


def _modules() -> dict[str, Path]:
    """Every module of invardiff by dotted name (a package by its own name)."""
    modules = {}
    for path in SRC.rglob("*.py"):
        parts = (PACKAGE, *path.relative_to(SRC).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The invardiff module that ``name`` (a module, or a name inside one) is, or lies in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, *, deferred: bool = True) -> set[str]:
    """The invardiff modules that ``module`` imports: every import statement (in functions and ``if`` blocks too),
    or, with ``deferred=False``, those at module level only. ``from . import name`` counts as importing the
    submodule ``name`` where there is one, else the package itself."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    nodes = ast.walk(tree) if deferred else tree.body
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found |= {_resolve(name) for name in names if name.split(".")[0] == PACKAGE}
    return found - {None, module}


def _family_files() -> list[str]:
    return sorted(m for m in MODULES if m.startswith(REGISTRY + ".") and m not in BOTTOM)


def _cycles(deferred: bool) -> list[list[str]]:
    """The import cycles among invardiff modules: the strongly connected components of more than one module."""
    graph = {module: imports_of(module, deferred=deferred) for module in MODULES}
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_the_reader_sees_the_imports_it_must():
    # The checks below are only as good as the reader: a module-level, a relative and a deferred import.
    assert "invardiff.families.spec" in imports_of("invardiff.families.flux")
    assert "invardiff.families.table" in imports_of("invardiff.families.flux")
    assert "invardiff.families.flux" in imports_of("invardiff.families.chroma")
    assert "invardiff.families.flux" in imports_of(REGISTRY)  # deferred: _load_builtin_families
    assert "invardiff.families.flux" not in imports_of(REGISTRY, deferred=False)
    assert {"invardiff.families.wan", "invardiff.families.dit"} <= set(_family_files())
    assert not set(_family_files()) & (BOTTOM | {REGISTRY})


def test_family_files_import_only_the_bottom_modules_and_each_other():
    allowed = BOTTOM | set(_family_files())
    wrong = {module: sorted(imports_of(module) - allowed) for module in _family_files()}
    assert not {module: names for module, names in wrong.items() if names}, (
        "family files may import only the bottom modules (see the docstring of invardiff.families) and sibling "
        "family files; register with `from .table import register_family`"
    )


def test_the_bottom_modules_import_nothing_above_them():
    wrong = {module: sorted(imports_of(module) - BOTTOM) for module in BOTTOM}
    assert not {module: names for module, names in wrong.items() if names}


def test_no_import_cycle_at_module_level():
    assert _cycles(deferred=False) == []


def test_no_import_cycle_counting_deferred_imports():
    # A deferred import that closes a cycle is a cycle the layers hide, not one they avoid.
    assert _cycles(deferred=True) == []
