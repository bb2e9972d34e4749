"""Shared helpers for the tests: tiny pipelines, hand-made plans, and an independent reference executor."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.modeling_outputs import Transformer2DModelOutput

import invardiff
from invardiff import CachePlan, ModelFacts
from invardiff.families import get_family, is_video
from invardiff.model_configs import MODEL_CONFIGS
from invardiff.toy_pipelines import build_pipeline, pipeline_call_kwargs


def tiny_pipeline(family: str, seed: int = 0):
    config = MODEL_CONFIGS[f"{family}-tiny"]
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


def run_pipeline(pipe, config, steps: int, seed: int = 0, **overrides):
    """Run a tiny pipeline; returns the final latents (Flux: packed; DiT: what the identity VAE decodes)."""
    kwargs = {**pipeline_call_kwargs(config, steps, seed=seed), **overrides}
    if config.family == "flux":
        return pipe(**kwargs).images.clone()
    if is_video(config.family):
        return pipe(**kwargs).frames.clone()  # the toy video pipelines have no VAE: latents
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
    config = dataclasses.replace(MODEL_CONFIGS[f"{family}-tiny"], batch=2)
    return config, config.build_transformer(seed=0), config.example_call(seed=3)


def row_of(call: dict, index: int) -> dict:
    per_sample = (
        "hidden_states",
        "encoder_hidden_states",
        "pooled_projections",
        "timestep",
        "guidance",
        "class_labels",
        "encoder_attention_mask",
    )
    return {k: (v[index : index + 1] if k in per_sample and torch.is_tensor(v) else v) for k, v in call.items()}


@torch.no_grad()
def euler_loop(transformer, family: str, call: dict, config=None, steps: int = T_PROBE):
    """Euler loop over a bare transformer; returns the final latents and, when enabled, the summary branch."""
    latents = call["hidden_states"].clone()
    if config is not None:
        invardiff.enable(transformer, config)
    try:
        for step in range(steps):
            fraction = 1.0 - step / steps
            timestep = get_family(family).configs.call_timestep(fraction, call["timestep"])
            kwargs = dict(call, hidden_states=latents, timestep=timestep)
            if config is None:
                (output,) = transformer(**kwargs)
            else:
                with invardiff.cache_context(transformer, "default", step_index=step):
                    (output,) = transformer(**kwargs)
            latents = latents - output[:, : latents.shape[1]] / steps
        branch = invardiff.summary(transformer).branches["default"] if config is not None else None
        return latents, branch
    finally:
        if config is not None:
            invardiff.disable(transformer)


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
# Reference executor: the plan semantics of SPEC.md A.4 written a second time, with plain torch forward hooks
# and a replaced forward, sharing no code with the engine. Calls are assigned to (branch, step) by counting,
# which the tests may do because they know the call pattern of the pipeline they run.
# ---------------------------------------------------------------------------------------------------------------
_UNIT_OUTPUT_MODULES = {  # per block list: (module whose output is cached, kinds ANDed)
    "flux": {
        "transformer_blocks": [("attn", ("attn", "context_attn")), ("ff", ("ff",)), ("ff_context", ("context_ff",))],
        "single_transformer_blocks": [("attn", ("attn",)), ("act_mlp", ("mlp",))],
    },
    "dit": {"transformer_blocks": [("attn1", ("attn",)), ("ff", ("ff",))]},
    "wan": {"blocks": [("attn1", ("self_attn",)), ("attn2", ("cross_attn",)), ("ffn", ("ffn",))]},
    "hunyuanvideo": {
        "transformer_blocks": [("attn", ("attn", "context_attn")), ("ff", ("ff",)), ("ff_context", ("context_ff",))],
        "single_transformer_blocks": [("attn", ("attn",)), ("act_mlp", ("mlp",))],
    },
}
# Families whose step-cached steps the reference runs as a full forward whose norm_out input is swapped for the
# cached hidden state (the head then runs exactly as in stock, with no head code of ours); units do not update.
_HEAD_BY_SWAP = ("wan", "hunyuanvideo")


class ReferenceExecutor:
    def __init__(self, model, plan: CachePlan, family: str, branches_per_step: int = 1, share_branches=False):
        self.model, self.plan, self.family = model, plan, family
        self.branches_per_step = branches_per_step
        self.share_branches = share_branches  # one cache for every branch: the mistake tests must be able to see
        self.calls = 0
        self.current = None  # (branch, step)
        self.unit_cache = {}
        self.hidden = {}
        self.swapping = False
        self.original_forward = model.forward
        model.forward = self.forward
        for block_list, units in _UNIT_OUTPUT_MODULES[family].items():
            for layer, block in enumerate(getattr(model, block_list)):
                for path, kinds in units:
                    module = block.get_submodule(path)
                    module.register_forward_hook(
                        self._unit_hook(f"{block_list}.{layer}.{path}", block_list, layer, kinds)
                    )
        model.norm_out.register_forward_pre_hook(self._capture_hidden)

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

    def _capture_hidden(self, module, inputs):
        if self.swapping:
            return (self.hidden[self.current[0]], *inputs[1:])
        self.hidden[self.current[0]] = inputs[0]
        return None

    def forward(self, *args, **kwargs):
        branch = 0 if self.share_branches else self.calls % self.branches_per_step
        step = self.calls // self.branches_per_step
        self.calls += 1
        self.current = (branch, step)
        if self.plan.step_cache[step] and self.family in _HEAD_BY_SWAP:
            self.swapping = True
            try:
                return self.original_forward(*args, **kwargs)
            finally:
                self.swapping = False
        if self.plan.step_cache[step]:
            output = self._head(self.hidden[branch], kwargs)
            return Transformer2DModelOutput(sample=output) if kwargs.get("return_dict", True) else (output,)
        return self.original_forward(*args, **kwargs)

    def _head(self, hidden, kwargs):
        model = self.model
        if self.family == "flux":
            timestep = kwargs["timestep"].to(hidden.dtype) * 1000
            guidance = kwargs["guidance"].to(hidden.dtype) * 1000
            temb = model.time_text_embed(timestep, guidance, kwargs["pooled_projections"])
            return model.proj_out(model.norm_out(hidden, temb))
        embedding = model.transformer_blocks[0].norm1.emb(
            kwargs["timestep"], kwargs["class_labels"], hidden_dtype=hidden.dtype
        )
        shift, scale = model.proj_out_1(F.silu(embedding)).chunk(2, dim=1)
        x = model.proj_out_2(model.norm_out(hidden) * (1 + scale[:, None]) + shift[:, None])
        side, p, c = int(x.shape[1] ** 0.5), model.patch_size, model.out_channels
        x = x.reshape(-1, side, side, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(-1, c, side * p, side * p)


def reference_pipeline(config, transformer, plan, branches_per_step=1, share_branches=False):
    """A pipeline on a copy of ``transformer`` whose forward executes ``plan`` the reference way."""
    clone = copy.deepcopy(transformer)
    ReferenceExecutor(clone, plan, config.family, branches_per_step, share_branches)
    return build_pipeline(config, clone)


def assert_close_reason(actual, expected):
    # The engine and the reference run the same kernels in the same order; the tolerance only absorbs
    # run-to-run differences of CPU kernels, not any difference in what is computed.
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
