"""Calibration on explicit latents: the noises a calibration with seeds draws, given as latents, give the same plan
bit for bit (calibrate and calibrate_budget, the library and the CLI's --latents file); the provenance records them."""

from __future__ import annotations

import json

import pytest
import torch

from invardiff.calibration import calibrate
from invardiff.calibration.budget import calibrate_budget
from invardiff.model_configs import get_model_config
from invardiff.toy_pipelines import build_pipeline


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


CASES = {"dit": [(3, 11), (5, 12)], "flux": [("a red cat", 11), ("a blue dog", 12)]}
STEPS = 6


def toy(family: str):
    config = get_model_config(f"{family}-tiny")
    return build_pipeline(config, config.build_transformer(), text_encoders=True)


def drawn_latents(pipe, cases, call_kwargs: dict) -> list[torch.Tensor]:
    """The latents the pipeline draws for each seeded case: the first transformer call's hidden states, one run per
    case (flow matching and DDIM do not scale the first input; without CFG the rows are the samples)."""
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).clone()),
        with_kwargs=True,
    )
    arg = "class_labels" if isinstance(cases[0][0], int) else "prompt"
    try:
        latents = []
        for item, seed in cases:
            seen.clear()
            pipe(**{arg: [item]}, generator=[torch.Generator().manual_seed(seed)], **call_kwargs)
            latents.append(seen[0][0])
    finally:
        handle.remove()
    return latents


def without_provenance(plan) -> dict:
    return {k: v for k, v in plan.to_dict().items() if k != "provenance"}


@pytest.mark.parametrize("family", ["dit", "flux"])
def test_calibrate_on_latents_is_calibrate_on_their_seeds(family):
    pipe, cases = toy(family), CASES[family]
    size = {"guidance_scale": 1.0} if family == "dit" else {"height": 32, "width": 32}  # a small Flux image
    latents = drawn_latents(pipe, cases, {"num_inference_steps": STEPS, "output_type": "latent", **size})
    runs = {"num_inference_steps": STEPS, "thresholds": "fast", "pipeline_kwargs": size}
    seeded, _ = calibrate(pipe, cases=cases, **runs)
    given, rates = calibrate(pipe, cases=list(zip([i for i, _ in cases], latents, strict=True)), **runs)
    assert without_provenance(given) == without_provenance(seeded)
    assert seeded.step_cache.any()  # a plan that reuses something: the comparison is not vacuous
    runs = rates.provenance["runs"]
    assert [item for item, _ in runs] == [item for item, _ in cases]
    assert runs[0][1]["shape"] == list(latents[0].shape) and len(runs[0][1]["latents_sha256"]) == 64
    assert rates.provenance["seed_rule"] == "cases (explicit latents)" and rates.provenance["seeds"] == []


def test_calibrate_budget_on_latents_is_calibrate_budget_on_their_seeds():
    pipe, cases = toy("dit"), CASES["dit"]
    # the budget search samples at the pipeline's guidance (DiTPipeline: 4.0): the CFG rows repeat the samples
    latents = drawn_latents(pipe, cases, {"num_inference_steps": STEPS, "output_type": "latent"})
    given_cases = list(zip([i for i, _ in cases], latents, strict=True))
    runs = {"num_inference_steps": STEPS, "speedups": [1.5, 2.0], "verify": True}
    seeded, seeded_stats = calibrate_budget(pipe, cases=cases, **runs)
    given, given_stats = calibrate_budget(pipe, cases=given_cases, **runs)
    assert len(seeded) == len(given) == 2
    for a, b in zip(seeded, given, strict=True):
        assert without_provenance(a.plan) == without_provenance(b.plan)
        assert a.plan.provenance["search"]["verified"] == b.plan.provenance["search"]["verified"]
    assert all((seeded_stats.gram[k] == given_stats.gram[k]).all() for k in seeded_stats.gram)
    assert given_stats.provenance["cases"][1][1]["shape"] == list(latents[1].shape)


def test_cli_calibrate_with_a_latents_file(tmp_path, capsys):
    from invardiff.cli.main import main

    pipe, cases = toy("dit"), CASES["dit"]
    pipe.save_pretrained(tmp_path / "toy")
    latents = drawn_latents(pipe, cases, {"num_inference_steps": STEPS, "guidance_scale": 1.0})
    torch.save(torch.stack(latents), tmp_path / "noise.pt")
    argv = ["calibrate", "--pipeline", str(tmp_path / "toy"), "--classes", "3,5", "--steps", str(STEPS)]
    assert main([*argv, "--seed", "11", "-o", str(tmp_path / "seeded.json")]) == 0  # seeds 11, 12
    assert main([*argv, "--latents", str(tmp_path / "noise.pt"), "-o", str(tmp_path / "given.json")]) == 0
    seeded, given = (json.loads((tmp_path / name).read_text()) for name in ("seeded.json", "given.json"))
    assert {k: v for k, v in seeded.items() if k != "provenance"} == {
        k: v for k, v in given.items() if k != "provenance"
    }
    assert given["provenance"]["calibration"]["latents_file"] == str(tmp_path / "noise.pt")
    capsys.readouterr()
    assert main([*argv[:4], "3", *argv[5:], "--latents", str(tmp_path / "noise.pt"), "-o", "x.json"]) == 2
    assert "holds 2 latents for 1 inputs" in capsys.readouterr().err
