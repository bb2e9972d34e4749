"""Bundled models: offline loading, shapes, determinism, weights hashes; generate and demo commands."""

import hashlib
import json
import socket

import numpy as np
import pytest
import torch

import invardiff
from invardiff.cli.main import main
from invardiff.models import MODELS, get, load
from invardiff.models.registry import UNBUNDLED


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bundled_model_loads_offline_and_is_deterministic(name, no_network):
    entry = get(name)
    pipe = load(name)
    item = entry.examples[0]
    field = "frames" if entry.family == "wan" else "images"  # video pipelines return frames
    first, second, other = (
        torch.as_tensor(np.asarray(getattr(pipe(**entry.call_kwargs(item, seed=seed, num_inference_steps=6)), field)))
        for seed in (3, 3, 4)
    )
    expected = {"flux": (1, 3, 32, 32), "dit": (1, 16, 16, 1), "wan": (1, 8, 3, 32, 32)}[entry.family]
    assert tuple(first.shape) == expected
    assert torch.equal(first, second) and not torch.equal(first, other)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_weights_hash_matches_the_model_card(name):
    directory = get(name).directory
    digest = hashlib.sha256((directory / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    assert json.loads((directory / "card.json").read_text())["sha256"] == digest
    assert f"sha256 `{digest}`" in (directory / "MODEL_CARD.md").read_text()
    assert (directory / "diffusion_pytorch_model.safetensors").stat().st_size < 15 * 2**20


@pytest.mark.parametrize("name", [*sorted(MODELS), *sorted(UNBUNDLED)])
def test_demo_preset_is_one_of_the_family_presets(name):
    from invardiff.calibration.thresholds import PRESETS

    entry = get(name, include_unbundled=True)
    assert entry.demo_preset in PRESETS[entry.family]  # `invardiff demo --model NAME` without --preset runs


def test_models_command_lists_them(capsys):
    assert main(["models", "--json"]) == 0
    assert {row["name"] for row in json.loads(capsys.readouterr().out)} == set(MODELS)


def test_generate_with_a_plan_writes_image_and_summary(tmp_path, capsys):
    pipe = load("dit-digits")
    facts = invardiff.ModelFacts.for_family("dit", {"transformer_blocks": len(pipe.transformer.transformer_blocks)})
    plan_path = tmp_path / "plan.json"
    invardiff.CachePlan.reuse_nothing(facts, 10).save(plan_path)
    args = ["generate", "--model", "dit-digits", "--class", "3", "--seed", "1", "--plan", str(plan_path)]
    assert main([*args, "-o", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "dit-digits-seed1-plan.summary.json").read_text())
    assert summary["branches"]["default"]["steps_computed"] == 10
    assert (tmp_path / "dit-digits-seed1-plan.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["generate", "--model", "dit-digits", "--prompt", "a cat", "-o", str(tmp_path)]) == 2
    assert "dit-digits takes --class" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_json_report(tmp_path, capsys):
    assert (
        main(["demo", "--model", "dit-digits", "--rounds", "1", "--seeds", "0", "--out", str(tmp_path), "--json"]) == 0
    )
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report) >= {"model", "measured_speedup", "ideal_speedup", "psnr", "ssim", "lpips"}
    # Speed is measured by the demo, not asserted here: a test on a shared CPU cannot time reliably.
    assert report["ideal_speedup"] > 1.5
    assert 0 <= report["lpips"] < 1 and report["psnr"] > 15
    assert (tmp_path / "grid.png").exists() and (tmp_path / "report.md").exists()


def test_shapes_renderer_and_prompts():
    from invardiff.models import shapes

    image = shapes.render("red", "circle", "left", "black", torch.Generator().manual_seed(0))  # (3, 32, 32)
    pixel = (image[:, 16, 9] + 1) / 2  # the centre of the left position (0.3, 0.5)
    assert pixel.tolist() == pytest.approx(list(shapes.COLOURS["red"]), abs=1e-6)
    assert (image[:, 2, 30] + 1).max() / 2 < 0.2  # a black background corner
    assert shapes.prompt_for("blue", "square", "center", "white") == "a blue square in the center, white background"
    assert len(shapes.ALL_PROMPTS) == 120 and "triangle" in shapes.VOCABULARY


def test_flux_shapes_pipeline_takes_prompts_offline(no_network):
    from invardiff.models import checks, flux_shapes, shapes

    pipe = flux_shapes.build_pipeline()
    ids = pipe.tokenizer_2("a red circle on the left").input_ids
    assert len(ids) == 7  # whole words of the vocabulary are single T5 pieces, plus </s>
    image = pipe("a red circle on the left, black background", num_inference_steps=3, output_type="pt").images
    assert tuple(image.shape) == (1, 3, 32, 32)
    # The learning check scores the real training images perfectly.
    generator = torch.Generator().manual_seed(0)
    images, _, attributes = shapes.sample_batch(12, generator)
    assert checks.shape_colour_accuracy((images + 1) / 2, attributes) == 1.0


def test_generate_with_dicache_and_plan_probe_policies(tmp_path, capsys):
    base = ["generate", "--model", "dit-digits", "--class", "3", "--steps", "10"]
    assert main([*base, "--policy", "dicache", "--threshold", "0.5", "--batch", "2", "-o", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "dit-digits-seed0-dicache.summary.json").read_text())
    assert summary["policy"]["policy"] == "dicache" and summary["policy"]["threshold"] == 0.5
    decisions = summary["branches"]["default"]["probe"]["decision"]
    assert len(decisions) == 10 and len(decisions[0]) == 4  # 2 images x (cond, uncond) rows, each decided alone
    assert decisions[:3] == [["warmup"] * 4] * 3  # floor(0.2 * 10) = 2, inclusive: steps 0-2
    assert (tmp_path / "dit-digits-seed1-dicache.png").exists()
    assert main([*base, "--policy", "plan+probe", "--threshold", "0.3", "-o", str(tmp_path)]) == 2
    assert "--policy plan+probe needs --plan" in capsys.readouterr().err
