"""Families and policies of other packages, found through entry points (``invardiff.plugins``): a package installed
as metadata on the path (a ``.dist-info`` with ``entry_points.txt``) adds a family the CLI lists and runs, and a policy
``enable`` builds; a broken, duplicate or empty entry point fails naming its package; ``register_policy`` refuses a
second builder for one config type."""

from __future__ import annotations

import dataclasses
import importlib
import json
import textwrap

import pytest

import invardiff
import invardiff.engine.policy as policy_module
import invardiff.families as families_module
import invardiff.families.table as family_table
from invardiff import plugins
from invardiff.cli.main import build_parser, main
from invardiff.families import family_names, get_family
from invardiff.plugins import PluginError
from invardiff.policies import BUILTIN

import toy_family  # noqa: F401  (the plugin family below is built on the toy)


FAMILY = """
import dataclasses

from invardiff.families.model_config import ModelConfig
from toy_family import TOY, ToyTransformer


class PluginToyTransformer(ToyTransformer):
    pass


CONFIG = ModelConfig("plugin-toy-tiny", "plugin-toy", {"in_channels": 4, "dim": 16, "num_layers": 2}, image_tokens=8)
SPEC = dataclasses.replace(
    TOY,
    name="plugin-toy",
    transformer_class=PluginToyTransformer,
    configs=dataclasses.replace(TOY.configs, named=(CONFIG,), bench={"tiny": CONFIG.name}, tiny=CONFIG.name),
)
"""
CONFIG = """
from dataclasses import dataclass


@dataclass(frozen=True)
class EveryOtherConfig:
    num_inference_steps: int
"""
POLICY = '''
import invardiff
from invardiff.engine import CachePolicy, StepAction

from {package}_config import EveryOtherConfig


class EveryOther(CachePolicy):
    """Reuse the last computed pre-head state at every odd step."""

    name = "every-other"

    def __init__(self, num_steps):
        self.num_steps = num_steps

    def begin_step(self, state):
        return StepAction.REUSE if state.step % 2 else StepAction.COMPUTE

    def reused_hidden(self, transformer, state):
        return state.hidden

    def head_input(self, state, hidden):
        return hidden, hidden  # run the head on it, and keep it for the next step


@invardiff.register_policy(EveryOtherConfig)
def build(config, family, transformer, units):
    return EveryOther(config.num_inference_steps)
'''


@pytest.fixture
def fresh_registries(monkeypatch):
    """Entry points not yet loaded, and registries that forget what a test registers."""
    # The built-in families and policies register at their first import: complete the registries before the copies.
    families_module.family_names()
    for module in BUILTIN:
        importlib.import_module(module)
    monkeypatch.setattr(plugins, "_LOADED", {})
    monkeypatch.setattr(family_table, "_FAMILIES", dict(family_table._FAMILIES))
    monkeypatch.setattr(policy_module, "_POLICY_BUILDERS", dict(policy_module._POLICY_BUILDERS))


def _install(path, package: str, entry_points: dict[str, dict[str, str]], modules: dict[str, str]) -> None:
    """A package as pip leaves it on the path: its modules and a ``.dist-info`` declaring ``entry_points``."""
    for name, source in modules.items():
        (path / f"{name}.py").write_text(textwrap.dedent(source))
    info = path / f"{package}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    lines = [line for group, points in entry_points.items() for line in (f"[{group}]", *points_lines(points))]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


def points_lines(points: dict[str, str]) -> list[str]:
    return [f"{name} = {value}" for name, value in points.items()]


def test_an_out_of_tree_family_and_policy_are_found_listed_and_run(tmp_path, monkeypatch, fresh_registries, capsys):
    package = "plugin_demo"
    _install(
        tmp_path,
        "invardiff-plugin-demo",
        {
            "invardiff.families": {"plugin-toy": f"{package}_family:SPEC"},
            "invardiff.policies": {"every-other": f"{package}_policy"},
        },
        {
            f"{package}_family": FAMILY,
            f"{package}_config": CONFIG,
            f"{package}_policy": POLICY.format(package=package),
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "plugin-toy" in family_names()  # listed from the metadata, nothing imported yet

    # The CLI takes it where a family is chosen (checked when given: --help imports no registry), names it among
    # the choices of a refusal, and runs a command on it.
    assert build_parser().parse_args(["bench-engine", "--family", "plugin-toy"]).family == ["plugin-toy"]
    with pytest.raises(SystemExit) as refused:
        main(["bench-engine", "--family", "no-such-family"])
    assert refused.value.code == 2 and "plugin-toy" in capsys.readouterr().err
    spec = get_family("plugin-toy")
    facts = invardiff.ModelFacts.for_family("plugin-toy", {"blocks": 2})
    plan = invardiff.CachePlan.reuse_nothing(facts, 4)
    plan.step_cache[2] = True
    plan.save(tmp_path / "plan.json")
    assert main(["inspect", str(tmp_path / "plan.json"), "--model-config", "plugin-toy-tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ideal_speedup"] > 1.0

    # enable builds the policy of the entry point (its config module registers nothing itself).
    from plugin_demo_config import EveryOtherConfig

    config = spec.configs.named[0]
    transformer = config.build_transformer()
    call = config.example_call()
    with invardiff.enabled(transformer, EveryOtherConfig(num_inference_steps=4)):
        for step in range(4):
            with invardiff.cache_context(transformer, "default", step_index=step):
                transformer(**call)
        branch = invardiff.summary(transformer).branches["default"]
    assert branch.step_status.tolist() == [0, 1, 0, 1]


@pytest.mark.parametrize(
    ("entry_points", "modules", "message"),
    [
        (
            {"invardiff.families": {"broken": "no_such_module_xyz"}},
            {},
            r"entry point 'broken' = 'no_such_module_xyz' of package 'invardiff-broken' failed to load: "
            r"ModuleNotFoundError",
        ),
        (
            {"invardiff.families": {"flux": "quiet_module_a"}},
            {"quiet_module_a": ""},
            r"entry point 'flux' of package 'invardiff-broken' declares the family 'flux', which is already regist",
        ),
        (
            {"invardiff.families": {"nameless": "quiet_module_b"}},
            {"quiet_module_b": ""},
            r"'invardiff-broken' \('quiet_module_b'\) registered no family named 'nameless'",
        ),
    ],
)
def test_a_broken_family_entry_point_fails_naming_its_package(
    tmp_path, monkeypatch, fresh_registries, capsys, entry_points, modules, message
):
    _install(tmp_path, "invardiff-broken", entry_points, modules)
    monkeypatch.syspath_prepend(str(tmp_path))
    for _ in range(2):  # and again at the next use: a failed load is not half a registry
        with pytest.raises(PluginError, match=message):
            invardiff.families.families()
    facts = invardiff.ModelFacts.for_family("dit", {"transformer_blocks": 2})
    invardiff.CachePlan.reuse_nothing(facts, 4).save(tmp_path / "plan.json")
    assert main(["inspect", str(tmp_path / "plan.json"), "--model-config", "dit-tiny"]) == 2
    error = capsys.readouterr().err
    assert "invardiff-broken" in error and error.count("\n") == 1  # one line, no traceback


def test_one_entry_point_name_in_two_packages_is_refused(tmp_path, monkeypatch, fresh_registries):
    for package in ("invardiff-one", "invardiff-two"):
        _install(tmp_path, package, {"invardiff.families": {"same-name": "some_module"}}, {})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match=r"'same-name' is declared by more than one package: \['invardiff-one', "):
        invardiff.families.families()


def test_a_policy_entry_point_that_registers_nothing_is_refused(tmp_path, monkeypatch, fresh_registries):
    _install(
        tmp_path, "invardiff-idle", {"invardiff.policies": {"idle": "idle_policy_module"}}, {"idle_policy_module": ""}
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = toy_family.ToyTransformer(num_layers=2).eval()
    with pytest.raises(PluginError, match=r"'idle' = 'idle_policy_module' of package 'invardiff-idle' registered no"):
        invardiff.enable(model, invardiff.IntervalConfig(interval=2, num_inference_steps=4))
    assert not invardiff.is_enabled(model)


def test_register_policy_refuses_a_second_builder_for_one_config(fresh_registries):
    @dataclasses.dataclass(frozen=True)
    class OwnConfig:
        pass

    def first(config, family, transformer, units):
        return invardiff.CachePolicy()

    invardiff.register_policy(OwnConfig)(first)
    with pytest.raises(ValueError, match=r"already registered for .*OwnConfig \(builder .*first\); cannot also"):
        invardiff.register_policy(OwnConfig)(lambda *args: None)
    with pytest.raises(ValueError, match="PlanConfig"):
        invardiff.register_policy(invardiff.PlanConfig)(first)  # a built-in policy cannot be replaced either
    assert policy_module.registered_policies()[OwnConfig] is first
