"""Books and peers on the engine loop (``bench-engine --peers``): exact work counts, full compute left untouched."""

from __future__ import annotations

import pytest
import torch

import invardiff
from invardiff.bench import peers
from invardiff.bench.engine_peers import book_variant, peer_variant, run_variants
from invardiff.model_configs import MODEL_CONFIGS

from helpers import facts_for, plan_from_bits


CPU = torch.device("cpu")


def _attention_fraction(plan) -> float:
    """Attention computations the plan runs: dual blocks compute their joint attention unless both streams reuse
    it (SPEC.md A.4: attn AND context_attn), single blocks unless attn reuses; step-cached steps run nothing."""
    dual, single = plan.module_reuse["transformer_blocks"], plan.module_reuse["single_transformer_blocks"]
    executed = ~plan.step_cache[:, None]
    computed = (executed & ~(dual["attn"] & dual["context_attn"])).sum() + (executed & ~single["attn"]).sum()
    blocks = dual["attn"].shape[1] + single["attn"].shape[1]
    return computed / (plan.num_inference_steps * blocks)


@pytest.fixture(scope="module")
def loop_results():
    config = MODEL_CONFIGS["flux-tiny"]  # 2 dual + 4 single blocks
    stock = config.build_transformer(CPU)
    # Steps 2, 3 and 5 reuse the whole step; at step 4 dual block 1 reuses both attention streams (no
    # computation), dual block 0 only the image stream (the joint attention still runs), single block 3 its attn.
    dual = {"attn": ["00"] * 4 + ["11"] + ["00"] * 3, "context_attn": ["00"] * 4 + ["01"] + ["00"] * 3}
    single = {"attn": ["0000"] * 4 + ["0001"] + ["0000"] * 3}
    reuse = {"transformer_blocks": dual, "single_transformer_blocks": single}
    plan = plan_from_bits(facts_for(stock, "flux"), "00110100", reuse)
    weights = {name: tensor.clone() for name, tensor in stock.state_dict().items()}
    # From the peer registry: TaylorSeer, and cache-dit on the transformer alone (attached and detached around
    # every run, on the weights full compute runs on).
    variants = [book_variant("hand", plan), peer_variant(peers.taylorseer(2)), peer_variant(peers.dbcache(0.2, 8))]
    results = run_variants(stock, config, variants, 8, CPU, rounds=1)
    return plan, stock, weights, {r["label"]: r for r in results}


def test_the_book_runs_exactly_its_attention_computations(loop_results):
    plan, _, _, results = loop_results
    book = results["InvarDiff book hand"]
    # 5 executed steps x 6 blocks, less dual block 1 and single block 3 at step 4: 28 of 48.
    assert _attention_fraction(plan) == 28 / 48
    assert book["attention_computed"] == 28 / 48
    assert book["ideal_speedup"] > 1.5  # FLOP-counted: 3 of 8 steps skipped outright


def test_a_peer_on_the_loop_skips_work_and_full_compute_is_not_among_the_results(loop_results):
    _, _, _, results = loop_results
    assert set(results) == {"InvarDiff book hand", "TaylorSeer interval=2", "DBCache F1B0 thr=0.2"}
    taylor = results["TaylorSeer interval=2"]
    assert taylor["attention_computed"] < 1.0 and taylor["ideal_speedup"] > 1.0
    assert taylor["efficiency"] == pytest.approx(taylor["measured_speedup"] / taylor["ideal_speedup"])


def test_the_loop_leaves_the_full_compute_transformer_as_it_found_it(loop_results):
    _, stock, weights, _ = loop_results
    assert not invardiff.is_enabled(stock)
    registry = getattr(stock, "_diffusers_hook", None)
    assert registry is None or not registry.hooks  # every peer's hooks were removed after its runs
    assert not hasattr(stock, "_original_forward") and not hasattr(stock, "_context_manager")  # cache-dit's
    for name, tensor in stock.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
