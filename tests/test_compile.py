"""torch.compile: a plan and DiCache under regional (compile_repeated_blocks) and whole-model compile.

The default tests use Dynamo with the ``eager`` backend: it traces, guards and splits graphs exactly as inductor
does, so graph counts and decisions are the real ones, and the outputs must be bit-identical to eager mode. The
``inductor`` tests (``python -m pytest -q --run-inductor -m inductor``, about 4 minutes on 2 cores) compile for real
and compare within float tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import invardiff
from invardiff.engine.adapters import graph_bound
from invardiff.model_configs import MODEL_CONFIGS
from invardiff.toy_pipelines import build_pipeline

from helpers import facts_for, plan_from_bits, run_pipeline, tiny_pipeline
from test_engine_exact import FLUX_MODULES, STEP_ONLY, T


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    # A block that outgrows the recompile limit silently falls back to eager; make that a failure here.
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()


def _policy(kind: str, transformer):
    if kind == "plan":
        return plan_from_bits(facts_for(transformer, "flux"), STEP_ONLY, FLUX_MODULES)
    return invardiff.DiCacheConfig(threshold=0.3)


def _compile(pipe, how: str, backend: str):
    if how == "regional":
        pipe.transformer.compile_repeated_blocks(backend=backend)
    else:
        pipe.transformer = torch.compile(pipe.transformer, backend=backend)


@pytest.mark.parametrize("how", ["regional", "whole"])
@pytest.mark.parametrize("kind", ["plan", "dicache"])
def test_compiled_runs_make_the_same_decisions_and_outputs_as_eager(kind, how):
    (eager, eager_steps), (compiled, compiled_steps) = _eager_then_compiled(kind, how, "eager")
    assert torch.equal(compiled, eager)
    np.testing.assert_array_equal(compiled_steps, eager_steps)
    assert counters["stats"]["unique_graphs"] > 0  # it did compile


def _eager_then_compiled(kind: str, how: str, backend: str):
    """(output, step status) of one eager run, then of one compiled run, of the same policy on flux-tiny."""
    config, pipe = tiny_pipeline("flux")
    invardiff.enable(pipe, _policy(kind, pipe.transformer))
    runs = []
    for compiled in (False, True):
        if compiled:
            _compile(pipe, how, backend)
        runs.append((run_pipeline(pipe, config, T), invardiff.summary(pipe).branches["cond"].step_status.copy()))
    invardiff.disable(pipe)
    return runs


def test_enable_accepts_a_compiled_transformer():
    config, pipe = tiny_pipeline("flux")
    compiled = torch.compile(pipe.transformer, backend="eager")
    invardiff.enable(compiled, _policy("plan", pipe.transformer))
    assert invardiff.is_enabled(pipe.transformer)
    invardiff.disable(compiled)
    assert not invardiff.is_enabled(pipe.transformer)


def _regional_graphs(config_name: str) -> int:
    config = MODEL_CONFIGS[config_name]
    pipe = build_pipeline(config, config.build_transformer(seed=0))
    facts = facts_for(pipe.transformer, "flux")
    rng = np.random.default_rng(0)
    reuse = {  # random layer-wise reuse on the computed steps: every mode combination a block can meet
        block.name: {
            kind: ["0" * block.num_layers] + ["".join(rng.choice(["0", "1"], block.num_layers)) for _ in range(T - 1)]
            for kind in block.module_kinds
        }
        for block in facts.block_lists
    }
    plan = plan_from_bits(facts, STEP_ONLY, reuse)
    invardiff.enable(pipe, plan)
    pipe.transformer.compile_repeated_blocks(backend="eager")
    run_pipeline(pipe, config, T)
    invardiff.disable(pipe)
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    counters.clear()
    return graphs


def test_regional_graph_count_is_bounded_and_independent_of_depth():
    # Flux: dual blocks have 3 units, single blocks 2; 6 blocks in flux-tiny, 57 (FLUX.1-dev's depth) in fulldepth.
    shallow, deep = _regional_graphs("flux-tiny"), _regional_graphs("flux-tiny-fulldepth")
    assert deep <= graph_bound(3, probe=False) + graph_bound(2, probe=False)
    assert deep == shallow


@pytest.mark.inductor
@pytest.mark.parametrize("how", ["regional", "whole"])
@pytest.mark.parametrize("kind", ["plan", "dicache"])
def test_inductor_outputs_match_eager_within_float_tolerance(kind, how):
    (eager, eager_steps), (compiled, compiled_steps) = _eager_then_compiled(kind, how, "inductor")
    np.testing.assert_array_equal(compiled_steps, eager_steps)
    # Inductor fuses and reorders float32 arithmetic: 1e-5 is about 100 ulps of these O(1) latents after 8 steps.
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)


def test_compile_regions_compiles_every_block_where_the_class_declares_no_repeated_blocks():
    from invardiff.bench.engine import compile_regions
    from invardiff.families import get_family

    config, pipe = tiny_pipeline("dit")
    transformer = pipe.transformer
    with pytest.raises(ValueError, match="_repeated_blocks` attribute is empty"):
        transformer.compile_repeated_blocks(backend="eager")  # what bench-engine --compile ran into
    calls = config.example_call()
    eager = transformer(**calls)[0]
    how = compile_regions(transformer, get_family("dit"), backend="eager")
    assert how.startswith("each block of transformer_blocks compiled on its own (eager; DiTTransformer2DModel")
    assert all(block._compiled_call_impl is not None for block in transformer.transformer_blocks)
    assert torch.equal(transformer(**calls)[0], eager)
    assert counters["stats"]["unique_graphs"] > 0
    _, flux = tiny_pipeline("flux")
    assert compile_regions(flux.transformer, get_family("flux"), backend="eager") == "compile_repeated_blocks (eager)"


@pytest.mark.slow  # 2 CPU-minutes: 28 DiT blocks traced by Dynamo, 50 steps of three variants
def test_bench_engine_compiles_a_family_without_repeated_blocks_block_by_block():
    """DiTTransformer2DModel declares no ``_repeated_blocks``, so diffusers' compile_repeated_blocks refused it and
    `bench-engine --compile` failed at once with its default families; every DiT block is now compiled on its own.
    The eager backend traces and guards as inductor does (the inductor run is the next test)."""
    from invardiff.bench.engine import bench_family

    [result] = bench_family("dit", "tiny", ["dit/fast"], torch.device("cpu"), 1, compile_blocks=True, backend="eager")
    assert result["compiled"] == (
        "each block of transformer_blocks compiled on its own (eager; DiTTransformer2DModel declares no "
        "_repeated_blocks for compile_repeated_blocks)"
    )
    assert result["compiled_graphs"] > 0 and result["ideal_speedup"] > 1.5


@pytest.mark.inductor
def test_bench_engine_compile_runs_its_default_families_with_inductor(tmp_path):
    from invardiff.cli.main import main

    argv = ["bench-engine", "--config", "tiny", "--rounds", "1", "--compile", "--out", str(tmp_path), "--json"]
    assert main(argv) == 0
    text = (tmp_path / "bench-engine-tiny-cpu-compiled.md").read_text()
    assert "flux-tiny-fulldepth: compile_repeated_blocks (inductor)" in text
    assert "dit-tiny-fulldepth: each block of transformer_blocks compiled on its own (inductor;" in text
