"""Shared helpers for the tests: tiny pipelines, hand-made plans, and an independent reference executor.

Every family-specific fact comes from the family registry (``invardiff.families``): the tiny config
(``ConfigSpec.tiny``), the toy pipeline and its call (``PipelineSpec``), the units and the head input.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch

import invardiff
from invardiff import CachePlan, ModelFacts
from invardiff.bench.loop import clone_latents, euler_update
from invardiff.calibration.run import output_tensor
from invardiff.families import get_family
from invardiff.families.model_config import ModelConfig
from invardiff.model_configs import MODEL_CONFIGS
from invardiff.toy_pipelines import build_pipeline, pipeline_call_kwargs


def tiny_config(family: str) -> ModelConfig:
    """The family's test-size config (``ConfigSpec.tiny``)."""
    configs = get_family(family).configs
    if configs is None or configs.tiny is None:
        raise ValueError(f"Family {family!r} names no tiny config (ConfigSpec.tiny).")
    return MODEL_CONFIGS[configs.tiny]


def tiny_pipeline(family: str, seed: int = 0):
    config = tiny_config(family)
    transformer = config.build_transformer(seed=seed)
    return config, build_pipeline(config, transformer)


def facts_for(transformer, family: str) -> ModelFacts:
    return ModelFacts.for_family(family, get_family(family).num_layers(transformer))


def plan_from_bits(facts: ModelFacts, step_cache: str, reuse: dict[str, dict[str, list[str]]] | None = None):
    """Plan from readable strings; ``reuse[block_list][kind]`` lists rows, missing kinds reuse nothing."""
    T = len(step_cache)
    matrices = {}
    for block in facts.block_lists:
        matrices[block.name] = {}
        for kind in block.module_kinds:
            rows = (reuse or {}).get(block.name, {}).get(kind)
            if rows is None:
                matrices[block.name][kind] = np.zeros((T, block.num_layers), bool)
            else:
                matrices[block.name][kind] = np.array([[c == "1" for c in row] for row in rows])
    return CachePlan(facts, T, np.array([c == "1" for c in step_cache]), matrices)


def random_plan(facts: ModelFacts, steps: int, seed: int, rate: float = 0.5) -> CachePlan:
    """A seeded random plan with step reuse and unit reuse: step 0 computes (nothing to reuse yet), and so does every
    unit at the first step; every other bit is set with probability ``rate``."""
    rng = np.random.default_rng(seed)
    step_cache = rng.random(steps) < rate
    step_cache[0] = False
    reuse = {}
    for block in facts.block_lists:
        reuse[block.name] = {}
        for kind in block.module_kinds:
            bits = rng.random((steps, block.num_layers)) < rate
            bits[0] = False
            reuse[block.name][kind] = bits
    return CachePlan(facts, steps, step_cache, reuse)


def run_pipeline(pipe, config, steps: int, seed: int = 0, **overrides):
    """Run a tiny pipeline; returns the final latents: what its VAE decodes when it has one (DiT's identity VAE,
    whose image postprocessing clamps), else the pipeline's output (the toys without a VAE, and calls with
    ``output_type="latent"``, return latents; LTX-2's video and audio latents are packed per sample)."""
    kwargs = {**pipeline_call_kwargs(config, steps, seed=seed), **overrides}
    if getattr(pipe, "vae", None) is None or kwargs.get("output_type") == "latent":
        result = pipe(**kwargs)
        audio = getattr(result, "audio", None)  # LTX2Pipeline: its audio latents too, packed after the video's
        if torch.is_tensor(audio):
            return torch.cat([output_tensor(result).flatten(1), audio.flatten(1)], dim=1).clone()
        return output_tensor(result).clone()
    captured = {}
    original_decode = pipe.vae.decode

    def recording_decode(latents, return_dict=True):
        captured["latents"] = latents.clone()
        return original_decode(latents, return_dict=return_dict)

    pipe.vae.decode = recording_decode
    try:
        pipe(**kwargs)
    finally:
        del pipe.vae.decode
    return captured["latents"]


# ---------------------------------------------------------------------------------------------------------------
# Bare-transformer loops for the probe policies: a batch of two different samples, cut into rows, and an Euler loop
# that steps the transformer directly (no pipeline), so a test sees every call.
# ---------------------------------------------------------------------------------------------------------------
T_PROBE = 10


def batched_call(family: str):
    config = dataclasses.replace(tiny_config(family), batch=2)
    return config, config.build_transformer(seed=0), config.example_call(seed=3)


def row_of(call: dict, index: int) -> dict:
    per_sample = (
        "x",  # Z-Image: lists of per-sample latents and caption features, and its timestep t
        "cap_feats",
        "t",
        "timesteps",  # HiDream
        "encoder_hidden_states_t5",
        "pooled_embeds",
        "hidden_states",
        "audio_hidden_states",  # LTX-2: the audio stream, its text and mask
        "audio_encoder_hidden_states",
        "audio_encoder_attention_mask",
        "encoder_hidden_states",
        "pooled_projections",
        "timestep",
        "guidance",
        "class_labels",
        "encoder_attention_mask",
        "attention_mask",  # Chroma: the text padding mask over text and image tokens
        "control_hidden_states",  # Wan VACE: the control latents
        "encoder_hidden_states_2",  # HunyuanVideo-1.5: glyph text and image embeddings, with their masks
        "encoder_attention_mask_2",
        "image_embeds",
        "original_size",  # CogView4: the size conditioning, one row per sample
        "target_size",
        "crop_coords",
    )
    sliced = (torch.Tensor, list)
    row = {k: (v[index : index + 1] if k in per_sample and isinstance(v, sliced) else v) for k, v in call.items()}
    if torch.is_tensor(call.get("encoder_hidden_states_llama3")):  # HiDream: (Llama layers, B, T, D)
        row["encoder_hidden_states_llama3"] = call["encoder_hidden_states_llama3"][:, index : index + 1]
    return row


@torch.no_grad()
def branch_loop(transformer, family: str, calls: dict[str, dict], steps: int) -> dict[str, torch.Tensor]:
    """Euler loop over a bare transformer with one call per branch and step, the branches interleaved in the order of
    ``calls`` (name -> call); under invardiff each call runs in ``cache_context(name, step_index=step)``. Returns
    each branch's final latents: a family with head streams (LTX-2) advances each stream's latents by its output,
    and returns them packed (``HeadStreams.pack``), so that every stream is compared."""
    enabled = invardiff.is_enabled(transformer)
    spec = get_family(family)
    timestep_of, timestep_arg = spec.configs.call_timestep, spec.timestep_arg
    latent_args = (spec.latent_arg,) if spec.head_streams is None else spec.head_streams.latents
    latents = {name: [clone_latents(call[arg]) for arg in latent_args] for name, call in calls.items()}
    for step in range(steps):
        for name, call in calls.items():
            kwargs = {**call, **dict(zip(latent_args, latents[name], strict=True))}
            kwargs[timestep_arg] = timestep_of(1.0 - step / steps, call[timestep_arg])
            if enabled:
                with invardiff.cache_context(transformer, name, step_index=step):
                    outputs = transformer(**kwargs)
            else:
                outputs = transformer(**kwargs)
            assert len(outputs) == len(latent_args)
            latents[name] = [euler_update(x, out, steps) for x, out in zip(latents[name], outputs, strict=True)]
    if spec.head_streams is not None:
        return {name: spec.head_streams.pack(value) for name, value in latents.items()}
    # Per-sample latents (Z-Image's list) as one batch tensor, like every other family's.
    return {name: torch.stack(x) if isinstance(x, list) else x for name, (x,) in latents.items()}


def euler_loop(transformer, family: str, call: dict, config=None, steps: int = T_PROBE):
    """Euler loop over a bare transformer; returns the final latents and, when enabled, the summary branch."""
    if config is None:
        return branch_loop(transformer, family, {"default": call}, steps)["default"], None
    with invardiff.enabled(transformer, config):
        latents = branch_loop(transformer, family, {"default": call}, steps)["default"]
        return latents, invardiff.summary(transformer).branches["default"]


def probe_decisions(branch) -> list[list[str]]:
    return branch.to_dict()["probe"]["decision"]


def threshold_where_samples_disagree(transformer, family, call, make_config):
    """The smallest grid threshold at which the two samples, run alone, decide differently at some step."""
    for threshold in np.round(np.arange(0.005, 1.5, 0.005), 3):
        config = make_config(float(threshold))
        alone = [probe_decisions(euler_loop(transformer, family, row_of(call, i), config)[1]) for i in range(2)]
        if [row[0] for row in alone[0]] != [row[0] for row in alone[1]]:
            return config, alone
    raise AssertionError("no threshold makes the two samples decide differently")


def dicache_where_samples_disagree(family: str):
    """A batch of two different samples, and DiCache (10 % warm-up) at the smallest threshold at which the two,
    run alone, decide differently at some step. Returns (transformer, call, config, decisions of each alone)."""
    _, transformer, call = batched_call(family)
    config, alone = threshold_where_samples_disagree(
        transformer,
        family,
        call,
        lambda delta: invardiff.DiCacheConfig(threshold=delta, num_inference_steps=T_PROBE, warmup_ratio=0.1),
    )
    return transformer, call, config, alone


# ---------------------------------------------------------------------------------------------------------------
# Reference executor: the plan semantics of SPEC.md A.4 written a second time, with plain torch forward hooks and a
# replaced forward, sharing no code with the engine. It reads from the family spec only which modules are the units
# and which module's first input is the pre-head state. Calls are assigned to (branch, step) by counting, which the
# tests may do because they know the call pattern of what they run. A step-cached step runs the stock forward with
# the head's input swapped for the cached hidden state (the head runs as in stock, with no head code of ours), and
# its units' outputs are discarded.
# ---------------------------------------------------------------------------------------------------------------
class ReferenceExecutor:
    def __init__(self, model, plan: CachePlan, family: str, branches_per_step: int = 1, share_branches=False):
        self.model, self.plan = model, plan
        self.branches_per_step = branches_per_step
        self.share_branches = share_branches  # one cache for every branch: the mistake tests must be able to see
        self.calls = 0
        self.current = None  # (branch, step)
        self.unit_cache = {}
        self.hidden = {}
        self.swapping = False
        self.original_forward = model.forward
        model.forward = self.forward
        spec = get_family(family)
        for block_list, layer, unit, block in spec.units_of(model):
            cached = block.get_submodule(unit.passthrough or unit.module)  # what the unit's output is
            cached.register_forward_hook(
                self._unit_hook(f"{block_list.attr}.{layer}.{unit.name}", block_list.attr, layer, unit.kinds)
            )
        # Every head's input: the one pre-head state, or each stream's (a family with head streams, LTX-2).
        heads = (spec.head_input,) if spec.head_streams is None else spec.head_streams.modules
        for head in heads:
            model.get_submodule(head).register_forward_pre_hook(self._capture_hidden(head))

    def _unit_hook(self, key, block_list, layer, kinds):
        def hook(module, inputs, output):
            if self.swapping:
                return output  # a step-cached step: its blocks' outputs are discarded
            branch, step = self.current
            reuse = all(self.plan.module_reuse[block_list][kind][step, layer] for kind in kinds)
            if reuse:
                return self.unit_cache[(branch, key)]
            self.unit_cache[(branch, key)] = output
            return output

        return hook

    def _capture_hidden(self, head):
        def hook(module, inputs):
            key = (self.current[0], head)
            if self.swapping:
                return (self.hidden[key], *inputs[1:])
            self.hidden[key] = inputs[0]
            return None

        return hook

    def forward(self, *args, **kwargs):
        branch = 0 if self.share_branches else self.calls % self.branches_per_step
        step = self.calls // self.branches_per_step
        self.calls += 1
        self.current = (branch, step)
        self.swapping = bool(self.plan.step_cache[step])
        try:
            return self.original_forward(*args, **kwargs)
        finally:
            self.swapping = False


def reference_pipeline(config, transformer, plan, branches_per_step=1, share_branches=False):
    """A pipeline on a copy of ``transformer`` whose forward executes ``plan`` the reference way."""
    clone = copy.deepcopy(transformer)
    ReferenceExecutor(clone, plan, config.family, branches_per_step, share_branches)
    return build_pipeline(config, clone)


def assert_close_reason(actual, expected):
    # The engine and the reference run the same kernels in the same order; the tolerance only absorbs
    # run-to-run differences of CPU kernels, not any difference in what is computed.
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def expert_reference_pipeline(pipe, plans, family: str = "wan", branches_per_step: int = 2):
    """A copy of the two-expert pipeline ``pipe`` whose experts are deep copies, each run by the independent
    :class:`ReferenceExecutor` under its plan of ``plans`` (``{expert attribute: CachePlan}``)."""
    reference = type(pipe)(**pipe.components, boundary_ratio=pipe.config.boundary_ratio)
    reference.set_progress_bar_config(disable=True)
    for name, plan in plans.items():
        clone = copy.deepcopy(getattr(pipe, name))
        ReferenceExecutor(clone, plan, family, branches_per_step=branches_per_step)
        reference.register_modules(**{name: clone})
    return reference
