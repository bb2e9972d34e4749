"""Your own model, end to end from the command line: a saved pipeline, a bare transformer, a base pipeline with a
transformer swapped in, and a hub id in the local Hugging Face cache; no bundled-model name anywhere."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DiTPipeline, DiTTransformer2DModel
from PIL import Image

from invardiff.cli.main import main
from invardiff.families import get_family
from invardiff.models import MODELS
from invardiff.toy_components import IdentityVAE


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tiny_transformer(seed: int = 0) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
    ).eval()  # fmt: skip


@pytest.fixture
def own_dit(tmp_path):
    """A tiny pixel-space DiT saved twice: as a whole pipeline (with id2label in its config) and as a bare
    transformer directory."""
    transformer = tiny_transformer()
    pipe = DiTPipeline(transformer, IdentityVAE(latent_channels=1), get_family("dit").pipeline.scheduler())
    pipe.register_to_config(id2label={i: f"class {i}" for i in range(10)})
    pipe.save_pretrained(tmp_path / "my-dit")
    transformer.save_pretrained(tmp_path / "my-dit-transformer")
    return tmp_path


def image(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def own_model_workflow(source: list[str], name: str, where, capsys, steps: int = 6, classes: str = "1,2") -> dict:
    """calibrate -> inspect -> generate (full compute and with the plan) -> bench on ``source``; the figures."""
    argv = [*source]
    assert not any(model in " ".join(argv) for model in MODELS)  # no bundled-model name anywhere
    plan = where / f"{name}-plan.json"
    code, out, err = run(["calibrate", *source, "--classes", classes, "--steps", str(steps), "-o", str(plan)], capsys)
    assert code == 0, err
    assert "default preset 'fast'" in err  # no --preset: the family's default, and it says so
    code, out, err = run(["inspect", str(plan), *source, "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert {k: summary["call_shape"][k] for k in ("text_tokens", "batch", "dtype")} == {
        "text_tokens": 0,
        "batch": 2,
        "dtype": "float32",
    }  # a DiT config: no text tokens, batched CFG, the weights' dtype
    full, cached = where / f"{name}-full", where / f"{name}-cached"
    assert main(["generate", *source, "--class", "3", "--steps", str(steps), "-o", str(full)]) == 0
    assert main(["generate", *source, "--class", "3", "--plan", str(plan), "-o", str(cached)]) == 0
    generated = json.loads((cached / f"{name}-seed0-plan.summary.json").read_text())
    plan_steps = json.loads(plan.read_text())["step_cache"]
    assert generated["num_steps"] == steps
    sweep = where / f"{name}-sweep"
    bench = ["bench", *source, "--classes", "3", "--steps", str(steps), "--rounds", "1", "--out", str(sweep)]
    assert main([*bench, "--methods", "invardiff"]) == 0
    results = [json.loads(line) for line in (sweep / f"sweep-{name}.jsonl").read_text().splitlines()]
    return {
        "plan": plan_steps,
        "ideal_speedup": summary["ideal_speedup"],
        "full": image(full / f"{name}-seed0.png"),
        "cached": image(cached / f"{name}-seed0-plan.png"),
        "bench": {r["label"]: r for r in results},
    }


def test_own_pipeline_and_bare_transformer_end_to_end(own_dit, capsys):
    pipeline = own_model_workflow(["--pipeline", str(own_dit / "my-dit")], "my-dit", own_dit, capsys)
    bare = own_model_workflow(
        ["--transformer", str(own_dit / "my-dit-transformer")], "my-dit-transformer", own_dit, capsys
    )
    # The bare transformer runs in the family's stock pipeline, which is what the saved pipeline holds: the same
    # plan, the same images, bit for bit.
    assert pipeline["plan"] == bare["plan"]
    assert np.array_equal(pipeline["full"], bare["full"]) and np.array_equal(pipeline["cached"], bare["cached"])
    assert pipeline["ideal_speedup"] == bare["ideal_speedup"] > 1.0
    assert sorted(pipeline["bench"]) == ["invardiff fast", "invardiff slow"]
    for label, result in pipeline["bench"].items():
        assert result["ideal_speedup"] == bare["bench"][label]["ideal_speedup"] >= 1.0


def test_demo_on_your_own_pipeline(own_dit, capsys):
    out = own_dit / "demo"
    argv = ["demo", "--pipeline", str(own_dit / "my-dit"), "--classes", "3,5", "--steps", "6", "--rounds", "1"]
    assert main([*argv, "--seeds", "0", "--json", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "my-dit" and report["preset"] == "fast"  # the family's default preset
    assert report["cases"] == [{"input": 3, "seed": 0}, {"input": 5, "seed": 0}]
    # calibrated on the evaluated classes with their own noises, never an evaluated one
    assert report["plan_provenance"]["calibration"]["runs"] == [[3, 1000], [5, 1001]]


def test_fine_tuned_transformer_on_a_base_pipeline(own_dit, tmp_path, capsys):
    """--pipeline BASE --transformer DIR: the fine-tune replaces the base pipeline's transformer."""
    tiny_transformer(seed=1).save_pretrained(tmp_path / "tuned")
    args = ["--class", "3", "--steps", "4"]
    assert main(["generate", "--pipeline", str(own_dit / "my-dit"), *args, "-o", str(tmp_path / "base")]) == 0
    tuned = ["--pipeline", str(own_dit / "my-dit"), "--transformer", str(tmp_path / "tuned")]
    assert main(["generate", *tuned, *args, "-o", str(tmp_path / "t")]) == 0
    assert main(["generate", "--transformer", str(tmp_path / "tuned"), *args, "-o", str(tmp_path / "bare")]) == 0
    swapped, alone = image(tmp_path / "t" / "tuned-seed0.png"), image(tmp_path / "bare" / "tuned-seed0.png")
    assert np.array_equal(swapped, alone)  # the fine-tune's images, not the base model's
    assert not np.array_equal(swapped, image(tmp_path / "base" / "my-dit-seed0.png"))


def test_many_items_from_your_own_pipeline(own_dit, tmp_path, capsys):
    """generate --classes / --seeds on a saved pipeline: every worker loads it; the images are the one-item
    command's, and the manifest keys them on the pipeline's files and settings."""
    pipeline = ["--pipeline", str(own_dit / "my-dit")]
    many = tmp_path / "many"
    assert main(["generate", *pipeline, "--classes", "3,5", "--seeds", "0,1", "--steps", "4", "-o", str(many)]) == 0
    lines = [json.loads(line) for line in (many / "manifest.jsonl").read_text().splitlines()]
    assert sorted((line["input"], line["seed"]) for line in lines) == [(3, 0), (3, 1), (5, 0), (5, 1)]
    one = tmp_path / "one"
    assert main(["generate", *pipeline, "--class", "5", "--seed", "1", "--steps", "4", "-o", str(one)]) == 0
    written = next(line["file"] for line in lines if (line["input"], line["seed"]) == (5, 1))
    assert np.array_equal(image(many / written), image(one / "my-dit-seed1.png"))
    capsys.readouterr()
    # a resume with another step count is refused; a bare --transformer cannot be shipped to workers
    code, _, err = run(["generate", *pipeline, "--classes", "3,5", "--steps", "5", "-o", str(many)], capsys)
    assert code == 2 and "call.num_inference_steps: 4 there, 5 now" in err
    bare = ["--transformer", str(own_dit / "my-dit-transformer"), "--classes", "3", "--steps", "4"]
    code, _, err = run(["generate", *bare, "-o", str(tmp_path / "bare")], capsys)
    assert code == 2 and "give --pipeline DIR, without --transformer" in err and len(err.strip().splitlines()) == 1


def test_a_bare_transformer_of_a_text_family_says_what_else_it_needs(tmp_path, capsys):
    from invardiff.model_configs import get_model_config

    get_model_config("flux-tiny").build_transformer().save_pretrained(tmp_path / "flux-tuned")
    code, _, err = run(["generate", "--transformer", str(tmp_path / "flux-tuned"), "--prompt", "a", "-o", "x"], capsys)
    assert code == 2 and "text encoders, tokenizers and a VAE" in err
    assert f"--pipeline BASE_DIR_OR_HUB_ID --transformer {tmp_path / 'flux-tuned'}" in err


def fake_hub_cache(tmp_path, monkeypatch, pipeline_dir, repo: str = "me/tiny-dit"):
    """A Hugging Face cache holding ``repo`` (models--ORG--NAME/snapshots/HASH, refs/main), offline."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    entry = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(pipeline_dir, entry / "snapshots" / commit)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read once, at import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_a_hub_id_in_the_local_cache(own_dit, tmp_path, monkeypatch, capsys):
    fake_hub_cache(tmp_path, monkeypatch, own_dit / "my-dit")
    monkeypatch.chdir(tmp_path)  # "me/tiny-dit" is no directory here: it is a hub id
    args = ["--class", "3", "--steps", "4"]
    assert main(["generate", "--pipeline", "me/tiny-dit", *args, "-o", "hub"]) == 0
    assert main(["generate", "--pipeline", str(own_dit / "my-dit"), *args, "-o", "dir"]) == 0
    assert np.array_equal(image(tmp_path / "hub" / "tiny-dit-seed0.png"), image(tmp_path / "dir" / "my-dit-seed0.png"))
    code, _, err = run(["generate", "--pipeline", "me/absent", *args, "-o", "absent"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "me/absent: not in the local Hugging Face cache" in err and "`hf download me/absent`" in err
    assert not (tmp_path / "absent").exists()


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--model", "dit-digits", "--pipeline", "d"], "not both"),
        ([], "Give a model: --model NAME"),
        (["--model", "."], "is a directory: use --pipeline"),
        (["--pipeline", "no/such/dir"], "no such directory, and not a hub id"),
        (["--transformer", "."], "is not a transformer directory (no config.json)"),
    ],
)
def test_model_source_errors_are_one_line(argv, says, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["generate", *argv, "--class", "1", "-o", "out"], capsys)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_a_saved_bundled_dit_keeps_its_classes(tmp_path, capsys):
    """DiTPipeline drops id2label in save_pretrained unless it is in the config: the saved dit-digits must still
    refuse class 42 (10 trained classes), not fall back to the 1000 rows of its embedding table."""
    from invardiff.models import load

    load("dit-digits").save_pretrained(tmp_path / "saved")
    argv = ["generate", "--pipeline", str(tmp_path / "saved"), "--class", "42", "--steps", "4", "-o", "x"]
    code, _, err = run(argv, capsys)
    assert code == 2 and "this model has 10 classes (0 to 9, from its id2label)" in err


def test_inspect_a_dit_config_assumes_dit_shapes(tmp_path, capsys):
    from invardiff import CachePlan, ModelFacts

    plan = tmp_path / "plan.json"
    CachePlan.reuse_nothing(ModelFacts.for_family("dit", {"transformer_blocks": 2}), 10).save(plan)
    tiny_transformer().save_pretrained(tmp_path / "t")
    code, out, err = run(["inspect", str(plan), "--model-config", str(tmp_path / "t" / "config.json")], capsys)
    assert code == 0, err
    # 8x8 samples in 2x2 patches: 16 tokens; no text; the weights beside the config are float32.
    assert "image_tokens 16, text_tokens 0, batch 2, dtype float32" in err


@pytest.mark.slow
def test_saved_dit_digits_end_to_end(tmp_path, capsys):
    """The acceptance path on a trained model: dit-digits saved as a pipeline and as a bare transformer, then
    calibrate -> inspect -> generate -> bench on each, from the CLI, with no bundled name."""
    from invardiff.models import load

    pipe = load("dit-digits")
    pipe.save_pretrained(tmp_path / "digits")
    pipe.transformer.save_pretrained(tmp_path / "digits-transformer")
    del pipe
    saved = own_model_workflow(["--pipeline", str(tmp_path / "digits")], "digits", tmp_path, capsys, 20)
    bare = own_model_workflow(
        ["--transformer", str(tmp_path / "digits-transformer")], "digits-transformer", tmp_path, capsys, 20
    )
    assert saved["plan"] == bare["plan"] and np.array_equal(saved["cached"], bare["cached"])
    assert saved["ideal_speedup"] > 1.5
    # measured 24.9 dB (20 steps, DiTPipeline's guidance 4.0); a broken plan or a leak of noise gives < 12 dB
    assert saved["bench"]["invardiff fast"]["psnr"] > 20
