"""The family conformance kit: every registered family that names a tiny config (``ConfigSpec.tiny``) passes the same
checks, on that config, through its stock pipeline where the family describes a toy one (``PipelineSpec``) and on
the bare transformer otherwise. The families come from the registry; a new family is covered by registering it.

* a reuse-nothing plan, DiCache at delta 0 and ``disable`` give the stock output bit for bit (float32, bfloat16);
* seeded random plans with step and unit reuse equal an independent reference executor (``helpers.py``: the stock
  forward with outputs substituted by plain forward hooks) bit for bit, and the summary counts what the plan says;
* the FLOPs of what ran are the plan's FLOPs, so the ideal speedup is the measured FLOP ratio;
* calibration is deterministic and its plan runs; a plan of another depth or step count is refused;
* classifier-free guidance runs as the spec says (one batched call, or a call per branch), and every branch and every
  sample of a batch decides alone;
* a wrong spec fails a named check (``SpecError.check``) instead of giving a silently wrong output.

The default suite runs float32 and one random plan per family; bfloat16 identity and a second random plan are
``slow`` (``python -m pytest -q -m slow tests/test_family_conformance.py``).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect

import numpy as np
import pytest
import torch

import invardiff
import invardiff.families.table as family_table
from invardiff import CachePlan, EngineError, ModelFacts, PlanError
from invardiff.calibration import calibrate
from invardiff.calibration.recording import recording
from invardiff.families import SpecError, TransformerCall, families, get_family
from invardiff.families.calibration_spec import InvarDiffThresholds
from invardiff.flops import flop_counter, profile_flops
from invardiff.stats import plan_flops, unit_reuse
from invardiff.toy_pipelines import build_pipeline

import toy_family  # noqa: F401  (registers the test families toy and toy-open-end: the kit covers them too)
from helpers import (
    ReferenceExecutor,
    batched_call,
    branch_loop,
    facts_for,
    random_plan,
    row_of,
    run_pipeline,
    tiny_config,
)
from model_state import ModelState, assert_unchanged
from toy_family import TOY, ToyTransformer


T = 4  # steps of the kit's runs: a first computed step, then room for step and unit reuse
KIT = [spec.name for spec in families() if spec.configs is not None and spec.configs.tiny is not None]


class Driver:
    """Runs one family on its tiny config: its toy stock pipeline (with classifier-free guidance, as the spec says
    to turn it on) where it has one, else an Euler loop over the bare transformer with explicit step indices."""

    def __init__(self, family: str, dtype: str = "float32"):
        self.family = family
        self.spec = get_family(family)
        self.config = dataclasses.replace(tiny_config(family), dtype=dtype)
        pipeline = self.spec.pipeline
        self.pipeline = pipeline if pipeline is not None and pipeline.build_toy is not None else None
        # Transformer calls per step: one per CFG branch unless the pipeline batches them or has no branches.
        unbranched = self.pipeline is None or self.pipeline.batched_cfg or not self.pipeline.guided
        self.calls_per_step = 1 if unbranched else 2

    def build(self, seed: int = 0):
        return self.wrap(self.config.build_transformer(seed=seed))

    def wrap(self, transformer):
        return transformer if self.pipeline is None else build_pipeline(self.config, transformer)

    def transformer(self, target):
        return target if self.pipeline is None else target.transformer

    def run(self, target, steps: int = T, seed: int = 0) -> torch.Tensor:
        if self.pipeline is None:
            return branch_loop(target, self.family, {"default": self.config.example_call(seed=seed)}, steps)["default"]
        guidance = self.pipeline.toy_cfg_kwargs
        extra = {} if guidance is None else guidance(self.config, seed, "cpu")
        return run_pipeline(target, self.config, steps, seed=seed, **extra)

    def reference(self, transformer, plan: CachePlan, share_branches: bool = False):
        clone = copy.deepcopy(transformer)
        ReferenceExecutor(clone, plan, self.family, self.calls_per_step, share_branches)
        return self.wrap(clone)


PIPELINED = [name for name in KIT if Driver(name).pipeline is not None]


def _equal(actual, expected) -> bool:
    return actual.shape == expected.shape and torch.equal(actual, expected)


# ----- identity -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
@pytest.mark.parametrize("family", KIT)
def test_reuse_nothing_dicache_at_zero_and_disable_are_stock(family, dtype):
    driver = Driver(family, dtype)
    target = driver.build()
    transformer = driver.transformer(target)
    stock = driver.run(target)
    before = ModelState(transformer)  # after a stock call: pipelines' cache_context sets up the hook registry
    configs = {
        "reuse-nothing plan": CachePlan.reuse_nothing(facts_for(transformer, family), T),
        "DiCache at delta 0": invardiff.DiCacheConfig(threshold=0.0, num_inference_steps=T),
    }
    for name, config in configs.items():
        with invardiff.enabled(target, config):
            assert _equal(driver.run(target), stock), name
    assert _equal(driver.run(target), stock)  # after disable
    assert_unchanged(before, transformer)


# ----- plans against the reference executor ---------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
@pytest.mark.parametrize("family", KIT)
def test_random_plans_equal_the_reference_executor(family, seed):
    driver = Driver(family)
    target = driver.build()
    transformer = driver.transformer(target)
    plan = random_plan(facts_for(transformer, family), T, seed)
    stock = driver.run(target)
    expected = driver.run(driver.reference(transformer, plan))
    with invardiff.enabled(target, plan):
        actual = driver.run(target)
        branches = invardiff.summary(target).branches
    assert _equal(actual, expected)
    assert not _equal(actual, stock)  # the plan changed the computation
    assert len(branches) == driver.calls_per_step  # one state per CFG branch that runs as its own call
    executed = ~plan.step_cache
    present = {}  # (block list, unit) -> the layers that have the unit
    for block_list, layer, unit, _ in driver.spec.units_of(transformer):
        present.setdefault((block_list.attr, unit.name), []).append(layer)
    for branch in branches.values():
        assert branch.step_status.tolist() == plan.step_cache.astype(int).tolist()
        for block_list in driver.spec.block_lists:
            for unit, reuse in unit_reuse(plan, block_list.attr).items():
                layers = present.get((block_list.attr, unit), [])
                counts = branch.counts()[block_list.attr].get(unit, {"computed": 0, "reused": 0})
                assert counts["reused"] == int((executed[:, None] & reuse)[:, layers].sum()), unit
                assert counts["computed"] == int((executed[:, None] & ~reuse)[:, layers].sum()), unit
    if driver.calls_per_step == 2 and seed == 0:
        # The control: a reference that shares one cache between the branches gives another output.
        assert not _equal(driver.run(driver.reference(transformer, plan, share_branches=True)), expected)


# ----- FLOPs ----------------------------------------------------------------------------------------------------
def _flops(run, transformer) -> float:
    # The transformer's FLOPs alone: a pipeline may run other modules once per call (LTX-2's text connectors).
    counter = flop_counter()
    with torch.no_grad(), counter:
        run()
    return float(sum(counter.get_flop_counts()[type(transformer).__name__].values()))


@pytest.mark.parametrize("family", KIT)
def test_the_ideal_speedup_is_the_flop_ratio_of_what_ran(family):
    driver = Driver(family)
    target = driver.build()
    plan = random_plan(facts_for(driver.transformer(target), family), T, seed=2)
    profile = profile_flops(driver.config)
    transformer = driver.transformer(target)
    full = _flops(lambda: driver.run(target), transformer)
    with invardiff.enabled(target, plan):
        ran = _flops(lambda: driver.run(target), transformer)
    assert full == driver.calls_per_step * T * profile.full_step
    # What ran: the plan's FLOPs per branch (the engine's head-input check at the first call runs outside the count).
    assert ran == driver.calls_per_step * plan_flops(plan, profile)
    assert invardiff.ideal_speedup(plan, profile) == pytest.approx(full / ran, rel=1e-12)
    assert full / ran > 1.0


# ----- calibration, and plans that do not fit -------------------------------------------------------------------
@pytest.mark.parametrize("family", PIPELINED)
def test_calibration_is_deterministic_and_its_plan_runs(family):
    driver = Driver(family)
    target = driver.build()
    steps = T + 1
    levels = {f"{b.attr}.{kind}": 0.5 for b in driver.spec.block_lists for kind in b.module_kinds}
    thresholds = InvarDiffThresholds(0.2, 0.5, levels)
    case = ("a prompt" if driver.pipeline.input_kind == "prompt" else 1, 3)

    def runner(name, setup, batches, provisional):
        # The library's two passes, with the pipeline called as the kit calls it (embeddings, no text encoders).
        (part,) = setup.parts  # one transformer: the kit's families have no experts
        options = (setup.epsilon, setup.offload, setup.branches)
        frozen = (provisional or {}).get(part.name)
        with recording(target, part.facts, part.num_steps, frozen, *options) as recorder:
            for batch in batches:
                for _, seed in batch:
                    driver.run(target, part.num_steps, seed)
        return {part.name: recorder.rates()}

    plans = [
        calibrate(target, num_inference_steps=steps, thresholds=thresholds, cases=[case], batch_size=1, runner=runner)[
            0
        ]
        for _ in range(2)
    ]
    assert plans[0].to_dict() == plans[1].to_dict()
    plan = plans[0]
    assert plan.step_cache.any() or any(m.any() for kinds in plan.module_reuse.values() for m in kinds.values())
    with invardiff.enabled(target, plan):
        driver.run(target, steps)
        branches = invardiff.summary(target).branches
    for branch in branches.values():
        assert branch.step_status.tolist() == plan.step_cache.astype(int).tolist()


@pytest.mark.parametrize("family", KIT)
def test_a_plan_of_another_depth_or_step_count_is_refused(family):
    driver = Driver(family)
    target = driver.build()
    transformer = driver.transformer(target)
    deeper = {name: count + 1 for name, count in driver.spec.num_layers(transformer).items()}
    with pytest.raises(PlanError, match="expects .* blocks"):
        invardiff.enable(target, CachePlan.reuse_nothing(ModelFacts.for_family(family, deeper), T))
    assert not invardiff.is_enabled(target)
    longer = CachePlan.reuse_nothing(facts_for(transformer, family), T + 1)
    with invardiff.enabled(target, longer):
        if driver.pipeline is not None:  # the scheduler's step count is checked before the first call
            with pytest.raises(PlanError, match=f"plan is for {T + 1} inference steps but the run has {T}"):
                driver.run(target, T)
        else:  # explicit step indices: the step past the plan fails
            with pytest.raises(EngineError, match=f"outside the plan's {T + 1} steps"):
                driver.run(target, T + 2)


# ----- classifier-free guidance: one decision per branch and per sample ----------------------------------------
@pytest.mark.parametrize("family", PIPELINED)
def test_the_pipelines_guidance_runs_as_the_spec_says(family):
    driver = Driver(family)
    target = driver.build()
    with invardiff.enabled(target, invardiff.DiCacheConfig(threshold=0.5, num_inference_steps=T)):
        driver.run(target)
        branches = invardiff.summary(target).branches
    # The toy call has one input: one batched call carries its cond and uncond rows, each with its own decision;
    # a guidance-distilled pipeline calls once per step, one row; else each branch is a call of one row in its own
    # cache context.
    if not driver.pipeline.guided:
        assert list(branches) == ["default"]
        assert np.asarray(branches["default"].probe["decision"]).shape == (T, 1)
    elif driver.pipeline.batched_cfg:  # one state, under the pipeline's own context name (LTX: "cond_uncond")
        (branch,) = branches.values()
        assert np.asarray(branch.probe["decision"]).shape == (T, 2)
    else:
        assert sorted(branches) == ["cond", "uncond"]
        for branch in branches.values():
            assert np.asarray(branch.probe["decision"]).shape == (T, 1)


def _decisions(branch, column: int = 0) -> list[str]:
    return [row[column] for row in branch.to_dict()["probe"]["decision"]]


@pytest.mark.parametrize("family", KIT)
def test_every_branch_and_every_sample_decides_alone(family):
    steps = 6
    _, transformer, call = batched_call(family)  # two different samples
    rows = {"cond": row_of(call, 0), "uncond": row_of(call, 1)}

    def dicache(threshold):
        return invardiff.DiCacheConfig(threshold=threshold, num_inference_steps=steps, warmup_ratio=0.2)

    def alone(name, config):
        with invardiff.enabled(transformer, config):
            latents = branch_loop(transformer, family, {name: rows[name]}, steps)[name]
            return latents, invardiff.summary(transformer).branches[name]

    # A threshold between the two samples' first accumulated errors (steps 0 and 1 warm up, the accumulator starts
    # at step 2): there one sample skips and the other computes.
    first = [alone(name, dicache(0.0))[1].probe["accumulator"][2, 0] for name in rows]
    config = dicache(float(np.mean(first)))
    solo = {name: alone(name, config) for name in rows}
    assert _decisions(solo["cond"][1]) != _decisions(solo["uncond"][1])

    with invardiff.enabled(transformer, config):  # two branches, interleaved call by call
        latents = branch_loop(transformer, family, rows, steps)
        branches = invardiff.summary(transformer).branches
    for name in rows:
        assert _decisions(branches[name]) == _decisions(solo[name][1])
        assert _equal(latents[name], solo[name][0])

    with invardiff.enabled(transformer, config):  # one batched call
        batched = branch_loop(transformer, family, {"default": call}, steps)["default"]
        branch = invardiff.summary(transformer).branches["default"]
    for column, name in enumerate(rows):
        assert _decisions(branch, column) == _decisions(solo[name][1])
        # A batch of two and a batch of one take different matmul paths: float32 rounding only.
        torch.testing.assert_close(batched[column : column + 1], solo[name][0], rtol=1e-4, atol=1e-5)


# ----- what a policy reads from the family -----------------------------------------------------------------------
def _first_block_inputs_and_outputs_on_the_way(transformer, spec, call: dict):
    """One stock forward: the arguments of the first block's call, and every tensor a module returned until that
    block returned (the conditioning on the way to the blocks, and inside the first one)."""
    block = getattr(transformer, spec.block_lists[0].attr)[0]
    seen = {"open": True, "outputs": []}

    def record(module, args, output):
        if seen["open"]:
            pieces = output if isinstance(output, (tuple, list)) else (output,)
            seen["outputs"] += [piece for piece in pieces if isinstance(piece, torch.Tensor)]

    def block_called(module, args, kwargs):
        if "arguments" not in seen:
            seen["arguments"] = inspect.signature(module.forward).bind(*args, **kwargs).arguments

    def block_returned(module, args, output):
        seen["open"] = False

    handles = [module.register_forward_hook(record) for module in transformer.modules()]
    handles.append(block.register_forward_pre_hook(block_called, with_kwargs=True))
    handles.append(block.register_forward_hook(block_returned))
    try:
        with torch.no_grad():
            transformer(**call)
    finally:
        for handle in handles:
            handle.remove()
    return seen["arguments"], seen["outputs"]


@pytest.mark.parametrize("family", KIT)
def test_the_block_stack_input_and_timestep_embedding_are_the_stock_forwards(family):
    # A policy reads both from the family (TeaCache- or MagCache-like): embed_input must be the first block's input
    # and embed_timestep a tensor the stock forward itself computes on the way to the blocks (the embedder's
    # output: FLUX's temb, DiT's first AdaLayerNormZero embedding; or, where the forward combines embedders' outputs
    # outside any module, what the first block receives: HiDream's timestep plus pooled-text temb), bit for bit; a
    # family without one says so.
    driver = Driver(family)
    spec, transformer = driver.spec, driver.config.build_transformer()
    kwargs = driver.config.example_call()
    call = TransformerCall(inspect.signature(transformer.forward), (), kwargs)
    arguments, outputs = _first_block_inputs_and_outputs_on_the_way(transformer, spec, kwargs)
    with torch.no_grad():
        if spec.embed_input is None:
            with pytest.raises(NotImplementedError, match=rf"{family!r} does not provide its block-stack input"):
                spec.block_stack_input(transformer, call)
            x = None
        else:
            x = spec.block_stack_input(transformer, call)
            streams = spec.head_streams  # several streams (LTX-2): packed as the pre-head state is
            first = (
                arguments["hidden_states"]
                if streams is None
                else streams.pack([arguments[a] for a in streams.arguments])
            )
            assert _equal(x, first)
        if spec.embed_timestep is None:
            with pytest.raises(NotImplementedError, match=rf"{family!r} does not provide its timestep embedding"):
                spec.timestep_embedding(transformer, call)
            return
        temb = spec.timestep_embedding(transformer, call)
    assert x is None or not _equal(temb, x)
    stream = {"hidden_states", next(iter(arguments))}  # the block's token stream (Z-Image's is `x`)
    block_arguments = [value for name, value in arguments.items() if name not in stream]
    computed = [value for value in outputs + block_arguments if isinstance(value, torch.Tensor)]
    assert any(_equal(temb, value) and temb.dtype == value.dtype for value in computed), (
        f"{family}: embed_timestep returned {tuple(temb.shape)} {temb.dtype}, which neither a module of the stock "
        f"forward computed before the first block returned nor the first block received"
    )


def test_a_family_without_a_timestep_embedding_says_so_to_the_policy_that_asks():
    spec = dataclasses.replace(TOY, embed_input=None, embed_timestep=None)
    model = ToyTransformer(num_layers=2).eval()
    call = TransformerCall(inspect.signature(model.forward), (), tiny_config("toy").example_call())
    for method in (spec.block_stack_input, spec.timestep_embedding):
        with pytest.raises(NotImplementedError, match="'toy' does not provide its"):
            method(model, call)


# ----- the registry, and wrong specs fail by name ---------------------------------------------------------------
def test_every_family_that_can_be_built_is_in_the_kit():
    # A family with configs or a pipeline must name its tiny config, or the kit would silently pass it by.
    for spec in families():
        if spec.configs is not None or spec.pipeline is not None:
            assert spec.name in KIT, f"family {spec.name!r} names no tiny config (ConfigSpec.tiny)"
    assert len(KIT) >= 2


def _toy_plan(transformer, family="toy"):
    return CachePlan.reuse_nothing(ModelFacts.for_family(family, {"blocks": len(transformer.blocks)}), T)


def test_a_unit_missing_in_one_block_fails_at_enable_naming_block_and_unit():
    model = ToyTransformer(num_layers=3, last_block_ff=False).eval()  # the toy family's spec says every block has ff
    before = ModelState(model)
    for config in (_toy_plan(model), invardiff.DiCacheConfig(threshold=0.1, num_inference_steps=T)):
        with pytest.raises(SpecError, match=r"blocks\.2 \(ToyBlock\) has no module 'ff' \(unit 'ff'\)") as error:
            invardiff.enable(model, config)
        assert error.value.check == "unit-path"
        assert not invardiff.is_enabled(model)
        assert_unchanged(before, model)


class _WrongHeadToy(ToyTransformer):
    pass


@pytest.mark.parametrize(
    ("head_input", "check", "when"),
    [
        ("proj_out", "head-input-state", "first call"),  # after the norm: a step-cached step would norm twice
        ("blocks.2", "head-input-state", "first call"),  # the last block's input: one block short of H
        ("time_embed", "head-input-state", "first call"),  # runs, but is not on the way to the head at all
        ("head_norm", "head-input-path", "enable"),  # no such module
    ],
)
def test_a_head_input_that_is_not_the_pre_head_state_fails_by_name(monkeypatch, head_input, check, when):
    spec = dataclasses.replace(TOY, name="toy-wrong-head", transformer_class=_WrongHeadToy, head_input=head_input)
    monkeypatch.setitem(family_table._FAMILIES, spec.name, spec)  # a throwaway family, gone after the test
    model = _WrongHeadToy(num_layers=3).eval()
    call = tiny_config("toy").example_call()
    plan = _toy_plan(model, spec.name)
    if when == "enable":
        with pytest.raises(SpecError, match=repr(head_input)) as error:
            invardiff.enable(model, plan)
        assert error.value.check == check and not invardiff.is_enabled(model)
        return
    with invardiff.enabled(model, plan):
        with pytest.raises(SpecError, match="does not reproduce|did not run") as error:
            with invardiff.cache_context(model, "default", step_index=0):
                model(**call)
        assert error.value.check == check
        with pytest.raises(SpecError):  # and every later call, until the spec is fixed
            with invardiff.cache_context(model, "default", step_index=0):
                model(**call)


def test_a_block_list_that_is_not_on_the_model_fails_by_name(monkeypatch):
    block_list = dataclasses.replace(TOY.block_lists[0], attr="layers")
    spec = dataclasses.replace(TOY, name="toy-wrong-list", transformer_class=_WrongHeadToy, block_lists=(block_list,))
    monkeypatch.setitem(family_table._FAMILIES, spec.name, spec)
    model = _WrongHeadToy(num_layers=3).eval()
    with pytest.raises(SpecError, match=r"_WrongHeadToy\.layers is NoneType, not a ModuleList") as error:
        invardiff.enable(model, invardiff.DiCacheConfig(threshold=0.1, num_inference_steps=T))
    assert error.value.check == "block-list" and not invardiff.is_enabled(model)
