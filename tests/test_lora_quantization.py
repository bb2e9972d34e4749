"""invardiff next to LoRAs and torchao weight-only int8, on tiny Flux and Wan pipelines.

Each LoRA call a user makes through diffusers (``load_lora_weights``, ``set_adapters``, ``fuse_lora``,
``unfuse_lora``, a hot-swap with ``hotswap=True``, ``unload_lora_weights``) and torchao's ``quantize_`` runs both
before ``enable`` and between runs of an enabled pipeline. Then: a reuse-nothing plan gives the stock output of the
same model bit for bit; a plan and DiCache give, bit for bit, what enabling them fresh on the changed model gives
(nothing stale from the model as it was), and differ from full compute (the plan as the independent reference
executor of tests/helpers.py computes it; DiCache with a step-cached step); ``disable`` gives the stock output back.

A LoRA loaded after ``enable`` wraps Flux's single-block ``proj_mlp``, a reusable unit on its own, in a PEFT layer:
before the engine followed replaced units, every reused MLP output got a fresh LoRA term added, and unloading the
LoRA left the bare Linear unadapted (reused steps returned its pre-activation output).
"""

import pytest
import torch

import invardiff
from invardiff import CachePlan
from invardiff.bench.lora import random_lora, save_lora

from helpers import assert_close_reason, facts_for, plan_from_bits, reference_pipeline, run_pipeline, tiny_pipeline


pytest.importorskip("peft")  # diffusers' LoRA loading runs on PEFT (a dev extra)

STEPS = 4
BRANCHES = {"flux": 1, "wan": 2}  # transformer calls per step: the tiny Wan pipeline runs CFG as two calls


def _plan(transformer, family: str) -> CachePlan:
    # Step 3 step-cached, and units reused at steps 1-2: Flux's single-block MLP (proj_mlp, which a LoRA wraps) and
    # dual-block feed-forward; Wan's feed-forward and self-attention (whose Linear layers a LoRA wraps).
    if family == "flux":
        reuse = {
            "single_transformer_blocks": {"mlp": ["0000", "1111", "1111", "0000"]},
            "transformer_blocks": {"ff": ["00", "01", "11", "00"]},
        }
    else:
        reuse = {"blocks": {"ffn": ["00", "11", "11", "00"], "self_attn": ["00", "01", "10", "00"]}}
    return plan_from_bits(facts_for(transformer, family), "0001", reuse)


def _reuse_nothing(transformer, family: str) -> CachePlan:
    return CachePlan.reuse_nothing(facts_for(transformer, family), STEPS)


def _dicache(transformer, family: str):
    # 4 steps with the default warm-up: the threshold lets it step-cache after the warm-up (asserted below).
    return invardiff.DiCacheConfig(threshold=0.5, num_inference_steps=STEPS)


POLICIES = {"reuse-nothing": _reuse_nothing, "plan": _plan, "dicache": _dicache}


def _lora_files(directory, transformer) -> str:
    # Three seeded LoRAs on the base weights, each a visible change (asserted below).
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        save_lora(random_lora(transformer, rank=2, strength=0.3, seed=seed), directory / f"{name}.safetensors")
    return str(directory)


def _lora_chain(directory: str) -> list:
    """(name, call) pairs: the LoRA states a pipeline goes through, each one or two diffusers calls from the last."""

    def load(pipe, name, adapter, **kwargs):
        pipe.load_lora_weights(directory, weight_name=f"{name}.safetensors", adapter_name=adapter, **kwargs)

    def second_adapter(pipe):
        load(pipe, "b", "b")
        pipe.set_adapters(["a", "b"], adapter_weights=[0.6, 0.5])

    return [
        ("load_lora_weights", lambda pipe: load(pipe, "a", "a")),
        ("set_adapters", second_adapter),
        ("fuse_lora", lambda pipe: pipe.fuse_lora(lora_scale=0.8)),
        ("unfuse_lora", lambda pipe: pipe.unfuse_lora()),
        ("hotswap", lambda pipe: load(pipe, "c", "a", hotswap=True)),  # c's weights into adapter a, in place
        ("set_adapters one", lambda pipe: pipe.set_adapters("a")),
        ("unload_lora_weights", lambda pipe: pipe.unload_lora_weights()),
    ]


def _fresh_outputs(config, stock, family: str) -> dict:
    """Full compute of ``stock`` as it is now, and each policy enabled fresh on it (the LoRA call or quantize_ came
    before enable), then disabled: full compute again is the stock output bit for bit."""
    outputs = {"full": run_pipeline(stock, config, STEPS)}
    for name, make in POLICIES.items():
        with invardiff.enabled(stock, make(stock.transformer, family)):
            outputs[name] = run_pipeline(stock, config, STEPS)
            if name == "dicache":
                assert invardiff.summary(stock).branches["cond"].to_dict()["steps_step_cached"] >= 1
    assert torch.equal(run_pipeline(stock, config, STEPS), outputs["full"]), "disable did not restore"
    return outputs


def _assert_as_expected(config, stock, family: str, fresh: dict, case: str) -> None:
    assert torch.equal(fresh["reuse-nothing"], fresh["full"]), case
    for name in ("plan", "dicache"):
        assert not torch.equal(fresh[name], fresh["full"]), f"{case}: {name} reused nothing"
    reference = reference_pipeline(config, stock.transformer, _plan(stock.transformer, family), BRANCHES[family])
    assert_close_reason(fresh["plan"], run_pipeline(reference, config, STEPS))


def _lora_calls_between_runs(family: str, tmp_path) -> None:
    config, stock = tiny_pipeline(family)  # never enabled but for the fresh references
    base = run_pipeline(stock, config, STEPS)
    directory = _lora_files(tmp_path, stock.transformer)
    enabled = {}
    for name, make in POLICIES.items():
        _, pipe = tiny_pipeline(family)
        invardiff.enable(pipe, make(pipe.transformer, family))
        run_pipeline(pipe, config, STEPS)  # a run on the base model: state the next run must not see
        enabled[name] = pipe
    for case, call in _lora_chain(directory):
        call(stock)
        fresh = _fresh_outputs(config, stock, family)
        if case != "unload_lora_weights":
            assert not torch.equal(fresh["full"], base), f"{case}: the LoRA changes nothing"
        _assert_as_expected(config, stock, family, fresh, case)
        for name, pipe in enabled.items():
            call(pipe)  # between two runs of the enabled pipeline
            assert torch.equal(run_pipeline(pipe, config, STEPS), fresh[name]), f"{case}: {name}"
    for pipe in enabled.values():
        invardiff.disable(pipe)
        assert torch.equal(run_pipeline(pipe, config, STEPS), fresh["full"])


def test_a_lora_loaded_and_unloaded_between_runs_gives_what_enabling_fresh_gives(tmp_path):
    # The small default version of the test below, on the unit a LoRA wraps (Flux's single-block proj_mlp).
    config, stock = tiny_pipeline("flux")
    directory = _lora_files(tmp_path, stock.transformer)
    with invardiff.enabled(stock, _plan(stock.transformer, "flux")):
        base = run_pipeline(stock, config, STEPS)
    stock.load_lora_weights(directory, weight_name="a.safetensors", adapter_name="a")
    with invardiff.enabled(stock, _plan(stock.transformer, "flux")):
        lora = run_pipeline(stock, config, STEPS)
    assert not torch.equal(lora, base)
    _, pipe = tiny_pipeline("flux")
    invardiff.enable(pipe, _plan(pipe.transformer, "flux"))
    assert torch.equal(run_pipeline(pipe, config, STEPS), base)
    pipe.load_lora_weights(directory, weight_name="a.safetensors", adapter_name="a")
    assert torch.equal(run_pipeline(pipe, config, STEPS), lora)
    pipe.unload_lora_weights()
    assert torch.equal(run_pipeline(pipe, config, STEPS), base)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "wan"])
def test_every_lora_call_between_runs_of_an_enabled_pipeline_leaves_nothing_stale(family, tmp_path):
    _lora_calls_between_runs(family, tmp_path)


def test_torchao_int8_weight_only_before_or_after_enable_gives_the_same_plan_output():
    # The small default version of the test below: a plan, quantize_ before and after enable.
    quantization = pytest.importorskip("torchao.quantization")
    config, stock = tiny_pipeline("flux")
    _, pipe = tiny_pipeline("flux")
    invardiff.enable(pipe, _plan(pipe.transformer, "flux"))
    for model in (stock, pipe):
        quantization.quantize_(model.transformer, quantization.Int8WeightOnlyConfig())
    full = run_pipeline(stock, config, STEPS)
    with invardiff.enabled(stock, _reuse_nothing(stock.transformer, "flux")):
        assert torch.equal(run_pipeline(stock, config, STEPS), full)
    with invardiff.enabled(stock, _plan(stock.transformer, "flux")):
        planned = run_pipeline(stock, config, STEPS)
    assert not torch.equal(planned, full)
    assert torch.equal(run_pipeline(pipe, config, STEPS), planned)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "wan"])
def test_torchao_int8_weight_only_before_or_after_enable(family):
    quantization = pytest.importorskip("torchao.quantization")

    def quantize(pipe):
        quantization.quantize_(pipe.transformer, quantization.Int8WeightOnlyConfig())

    config, stock = tiny_pipeline(family)
    base = run_pipeline(stock, config, STEPS)
    enabled = {}
    for name, make in POLICIES.items():  # enabled on the float32 model, which runs once before quantize_
        _, pipe = tiny_pipeline(family)
        invardiff.enable(pipe, make(pipe.transformer, family))
        run_pipeline(pipe, config, STEPS)
        enabled[name] = pipe
    quantize(stock)
    fresh = _fresh_outputs(config, stock, family)  # quantized, then enabled
    assert not torch.equal(fresh["full"], base)  # int8 weights: the model did change
    _assert_as_expected(config, stock, family, fresh, "quantize_ before enable")
    for name, pipe in enabled.items():
        quantize(pipe)
        assert torch.equal(run_pipeline(pipe, config, STEPS), fresh[name]), f"quantize_ after enable: {name}"
        invardiff.disable(pipe)
        assert torch.equal(run_pipeline(pipe, config, STEPS), fresh["full"])
