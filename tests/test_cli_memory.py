"""The command line's cache-memory bound: ``fit-memory``, ``inspect --memory`` per cache dtype, and the options
that only the budgeted search takes."""

import json

import numpy as np
import pytest
from test_cli_errors import one_error_line, run

from invardiff.cache_footprint import measure_footprint, peak_cache_bytes
from invardiff.cli.main import main
from invardiff.families import get_family
from invardiff.model_configs import MODEL_CONFIGS
from invardiff.plan import CachePlan, ModelFacts

from helpers import plan_from_bits


MODULES = {
    "transformer_blocks": {"ff": ["00", "11", "11", "00", "10", "11", "00", "00"]},
    "single_transformer_blocks": {"mlp": ["0000", "0011", "0011", "1100", "0000", "0101", "1111", "0000"]},
}


@pytest.fixture(scope="module")
def tiny():
    config = MODEL_CONFIGS["flux-tiny"]
    facts = ModelFacts.for_family("flux", get_family("flux").num_layers(config.build_transformer("meta")))
    return config, plan_from_bits(facts, "00110110", MODULES), measure_footprint(config)


def test_fit_memory_writes_a_plan_within_the_bound(tiny, tmp_path, capsys):
    config, plan, footprint = tiny
    plan.save(tmp_path / "plan.json")
    bound = peak_cache_bytes(plan, footprint) // 2
    out = tmp_path / "fit.json"
    argv = ["fit-memory", str(tmp_path / "plan.json"), "--model-config", "flux-tiny", "--max-cache-memory", str(bound)]
    assert main([*argv, "-o", str(out)]) == 0
    assert "(optimal)" in capsys.readouterr().out
    fitted = CachePlan.load(out)
    assert peak_cache_bytes(fitted, footprint) <= bound
    assert fitted.provenance["memory_fit"]["max_cache_bytes"] == bound
    assert main(["inspect", str(out), "--model-config", "flux-tiny", "--memory", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["peak_cache_bytes"] == summary["peak_cache_bytes_by_cache_dtype"]["float32"] <= bound
    assert summary["cache_dtype"] is None
    assert summary["peak_cache_bytes_by_cache_dtype"]["bfloat16"] * 2 == summary["peak_cache_bytes"]


def test_fit_memory_with_a_cache_dtype(tiny, tmp_path, capsys):
    _, plan, footprint = tiny
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "fit.json"
    bound = peak_cache_bytes(plan, footprint, "bfloat16")  # bf16 storage alone fits: nothing to drop
    argv = ["fit-memory", str(tmp_path / "plan.json"), "--model-config", "flux-tiny", "--max-cache-memory", str(bound)]
    assert main([*argv, "--cache-dtype", "bfloat16", "-o", str(out)]) == 0
    fitted = CachePlan.load(out)
    assert fitted.cache_dtype == "bfloat16"
    assert fitted.to_dict()["module_reuse"] == plan.to_dict()["module_reuse"]
    assert main(["inspect", str(out), "--model-config", "flux-tiny", "--memory"]) == 0
    assert "stored in bfloat16 (the plan's cache_dtype)" in capsys.readouterr().out


def test_fit_memory_with_step_reuse(tiny, tmp_path, capsys):
    _, plan, footprint = tiny
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "fit.json"
    bound = footprint.hidden_bytes()  # only H: every unit reuse must go, or its step become a step reuse
    argv = ["fit-memory", str(tmp_path / "plan.json"), "--model-config", "flux-tiny", "--max-cache-memory", str(bound)]
    assert main([*argv, "--allow-step-reuse", "0.01", "-o", str(out)]) == 0
    said = capsys.readouterr().out
    fitted = CachePlan.load(out)
    converted = fitted.provenance["memory_fit"]["step_reuse"]["converted"]
    assert converted and f"steps {', '.join(map(str, converted))} reused whole" in said
    assert (fitted.step_cache == (plan.step_cache | np.isin(np.arange(8), converted))).all()
    assert peak_cache_bytes(fitted, footprint) <= bound


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--max-cache-memory", "1GB", "--allow-step-reuse", "0"], "--allow-step-reuse takes a fraction in (0, 1]"),
        (["--max-cache-memory", "10"], "No fitted plan keeps its cache within 10 bytes on flux-tiny"),
        (["--max-cache-memory", "lots"], "A memory size is a number with an optional unit"),
        (["--max-cache-memory", "1GB", "--time-limit", "0"], "--time-limit must be a number of seconds > 0"),
        (["--max-cache-memory", "1GB"], "fit-memory needs --model-config or --model"),
    ],
)
def test_fit_memory_errors_are_one_line(tiny, tmp_path, capsys, extra, says):
    _, plan, _ = tiny
    plan.save(tmp_path / "plan.json")
    config = [] if extra == ["--max-cache-memory", "1GB"] else ["--model-config", "flux-tiny"]
    code, err = run(
        ["fit-memory", str(tmp_path / "plan.json"), *config, *extra, "-o", str(tmp_path / "o.json")], capsys
    )
    assert code == 2
    assert says in one_error_line(err)
    assert not (tmp_path / "o.json").exists()


@pytest.mark.parametrize("option", [["--max-cache-memory", "1GB"], ["--cache-dtype", "bfloat16"]])
def test_memory_options_need_the_budgeted_search(tmp_path, capsys, option):
    argv = ["calibrate", "--model", "dit-digits", "--preset", "fast", "--classes", "1", *option]
    code, err = run([*argv, "-o", str(tmp_path / "p.json")], capsys)
    assert code == 2
    assert f"{option[0]} applies to the budgeted search (--budget / --pareto)" in one_error_line(err)
