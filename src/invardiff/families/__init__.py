"""Model families: which diffusers transformers invardiff can cache, and how their blocks are laid out.

Adding a family is one file that builds a :class:`FamilySpec` and calls :func:`register_family` (from
``.table``), plus its import in :func:`_load_builtin_families`; another package adds one through the
``invardiff.families`` entry point group (``invardiff.plugins``). Everything else (calibration, official books,
configs, benchmarks, the CLI) reads the registered specs through :func:`get_family`, :func:`resolve_family` and
:func:`family_names`. Every family passes the conformance kit (``tests/test_family_conformance.py``) once its spec
names a tiny config (``ConfigSpec.tiny``).

The layers (``tests/test_import_layers.py`` holds them): a family file imports only the bottom modules, which
import nothing above them: :mod:`.spec` (the engine facts and the plain data of the tools), :mod:`.table`
(:func:`register_family`), :mod:`.calibration_spec` (thresholds, calibration behaviour), :mod:`.model_config`
(random-weight configs), ``invardiff.plan_file`` (``PlanError``, reading an official book's fields),
``invardiff.toy_components`` and ``invardiff.seeding``, and sibling family files. This registry sits above the
family files (it imports them when first asked); the tools that use the data (``invardiff.calibration``,
``invardiff.official``, ``invardiff.model_configs``, ``invardiff.toy_pipelines``) sit above the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from .. import plugins
from . import table
from .spec import (
    INPUT_KINDS,
    BlockListSpec,
    ConfigSpec,
    Expert,
    FamilySpec,
    InputKind,
    OfficialSpec,
    PipelineSpec,
    ReuseUnit,
    SizeRule,
    SpecError,
    TransformerCall,
    check_spec,
)
from .table import register_family


def get_family(name: str) -> FamilySpec:
    """The registered family ``name``; raise ``ValueError`` naming the supported families if there is none."""
    _load_builtin_families()
    if name not in table.registered():
        _load_plugin_families()
    if name not in table.registered():
        raise ValueError(f"Unknown model family {name!r}; supported families are {sorted(table.registered())}.")
    return table.registered()[name]


def family_names() -> list[str]:
    """The names of the registered families, sorted; families of other packages (entry points) by their entry
    point's name, without importing them."""
    _load_builtin_families()
    return sorted({*table.registered(), *plugins.entry_point_names(plugins.FAMILIES)})


def families() -> list[FamilySpec]:
    """The registered families, those of other packages included, sorted by name."""
    _load_builtin_families()
    _load_plugin_families()
    return [table.registered()[name] for name in sorted(table.registered())]


class LazyTable(Mapping):
    """A read-only mapping computed from the registered families each time it is read.

    It keeps module-level tables that used to be written out per family (``PRESETS``, ``MODEL_CONFIGS``...)
    importable, while their content comes from the family files, read at use time so that every family has
    registered by then.
    """

    def __init__(self, build: Callable[[], dict[str, Any]]):
        self._build = build

    def __getitem__(self, key: str) -> Any:
        return self._build()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._build())

    def __len__(self) -> int:
        return len(self._build())

    def __repr__(self) -> str:
        return f"LazyTable({self._build()!r})"


def resolve_family(transformer: torch.nn.Module) -> FamilySpec:
    """Return the family of ``transformer`` by its class (or a registered base class); raise if unsupported."""
    _load_builtin_families()
    for load_plugins in (False, True):
        if load_plugins:
            _load_plugin_families()
        for cls in type(transformer).__mro__:
            for spec in table.registered().values():
                if spec.transformer_class is cls:
                    return spec
    supported = ", ".join(f"{s.transformer_class.__name__} ({s.name})" for s in table.registered().values())
    raise ValueError(
        f"Model class {type(transformer).__name__} is not supported by invardiff. Supported transformers: {supported}."
    )


def is_video(name: str) -> bool:
    """Whether family ``name`` generates video: its pipelines return clips, (B, F, C, H, W) ``.frames``."""
    pipeline = get_family(name).pipeline
    return pipeline is not None and pipeline.video


def _load_plugin_families() -> None:
    taken = set(table.registered())  # the names before any plugin: built-in and registered in this process

    def accept(entry_point, loaded) -> None:
        # The entry point names a module whose import registered the family, or the FamilySpec itself.
        where = (
            f"The invardiff.families entry point {entry_point.name!r} of package {plugins.package_of(entry_point)!r}"
        )
        if entry_point.name in taken:
            raise plugins.PluginError(
                f"{where} declares the family {entry_point.name!r}, which is already registered."
            )
        if isinstance(loaded, FamilySpec) and table.registered().get(loaded.name) is not loaded:
            register_family(loaded)
        if entry_point.name not in table.registered():
            raise plugins.PluginError(
                f"{where} ({entry_point.value!r}) registered no family named {entry_point.name!r}; name the entry "
                f"point after the family it registers."
            )

    plugins.load(plugins.FAMILIES, accept)


def _load_builtin_families() -> None:
    # The registry: one import per family file. Imported lazily so that `import invardiff.families` (and of the
    # bottom modules in this package, which runs this one first) stays cheap. Family files register into `table`.
    from . import (  # noqa: F401
        allegro,
        chroma,
        cogvideox,
        cogview4,
        dit,
        flux,
        flux2,
        hidream,
        hunyuanvideo,
        hunyuanvideo15,
        ltx,
        ltx2,
        mochi,
        pixart,
        qwenimage,
        sana,
        sd3,
        skyreels_v2,
        wan,
        wanvace,
        zimage,
    )


table.install_lookup(get_family)  # the bottom data types (ModelConfig) find their family through the table

__all__ = [
    "INPUT_KINDS",
    "BlockListSpec",
    "ConfigSpec",
    "Expert",
    "FamilySpec",
    "InputKind",
    "LazyTable",
    "OfficialSpec",
    "PipelineSpec",
    "ReuseUnit",
    "SizeRule",
    "SpecError",
    "TransformerCall",
    "check_spec",
    "families",
    "family_names",
    "get_family",
    "is_video",
    "register_family",
    "resolve_family",
]
