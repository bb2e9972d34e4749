"""Model families and runtime policies from other packages, found through Python entry points.

A package adds a family or a policy without touching invardiff by declaring an entry point in its metadata
(``pyproject.toml``)::

    [project.entry-points."invardiff.families"]
    my-family = "my_package.family"        # importing it calls invardiff.families.register_family(...)

    [project.entry-points."invardiff.policies"]
    my-policy = "my_package.policy"        # importing it calls invardiff.register_policy(MyConfig)(builder)

A family entry point is named after the family it registers, and may instead name a :class:`FamilySpec`
(``"my_package.family:SPEC"``), which is then registered. Each group is loaded once, on first use: the families when
a spec is first looked up (``family_names()`` lists the entry points' names without importing them), the policies
when a policy is first built. A failing entry point, a family entry point that registers no family of its name,
a name that two packages declare or that is already taken, and a policy entry point that registers no policy all
raise :class:`PluginError` naming the package, every time the group is used again.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable


FAMILIES = "invardiff.families"
POLICIES = "invardiff.policies"

_LOADED: dict[str, BaseException | None] = {}  # group -> None when loaded, or the error that stopped it


class PluginError(ValueError):
    """An entry point of another package could not be loaded or does not register what it should."""


def entry_points(group: str) -> list[importlib.metadata.EntryPoint]:
    """The entry points of ``group`` across the installed packages, sorted by name (the same package found twice on
    the path, once). Read package by package: ``importlib.metadata.entry_points`` keeps one entry point per name, so
    it would hide a name that two packages declare."""
    unique = {}
    for dist in importlib.metadata.distributions():
        for entry_point in dist.entry_points:
            if entry_point.group == group:
                unique.setdefault((entry_point.name, entry_point.value, package_of(entry_point)), entry_point)
    return sorted(unique.values(), key=lambda ep: (ep.name, package_of(ep)))


def entry_point_names(group: str) -> list[str]:
    """The names of the entry points of ``group``, without importing anything."""
    return sorted({ep.name for ep in entry_points(group)})


def package_of(entry_point: importlib.metadata.EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    return dist.name if dist is not None else "an unknown package"


def load(group: str, accept: Callable[[importlib.metadata.EntryPoint, object], None]) -> None:
    """Load every entry point of ``group`` once and hand each loaded object to ``accept``, which registers it or
    raises; the first failure is raised as a :class:`PluginError` naming the package, now and at every later call."""
    if group in _LOADED:
        if _LOADED[group] is not None:
            raise _LOADED[group]
        return
    _LOADED[group] = None  # loading a plugin may look things up again: do not recurse
    try:
        points = entry_points(group)
        _refuse_duplicates(group, points)
        for entry_point in points:
            try:
                accept(entry_point, entry_point.load())
            except PluginError:
                raise
            except Exception as error:  # noqa: BLE001 - any failure of another package's code is reported as its own
                raise PluginError(
                    f"The {group} entry point {entry_point.name!r} = {entry_point.value!r} of package "
                    f"{package_of(entry_point)!r} failed to load: {type(error).__name__}: {error}. Fix or uninstall "
                    f"that package."
                ) from error
    except PluginError as error:
        _LOADED[group] = error
        raise


def _refuse_duplicates(group: str, points: list[importlib.metadata.EntryPoint]) -> None:
    by_name: dict[str, list[str]] = {}
    for entry_point in points:
        by_name.setdefault(entry_point.name, []).append(package_of(entry_point))
    for name, packages in by_name.items():
        if len(packages) > 1:
            raise PluginError(
                f"The {group} entry point {name!r} is declared by more than one package: {sorted(packages)}. "
                f"Uninstall all but one of them."
            )
