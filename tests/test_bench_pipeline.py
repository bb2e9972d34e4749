"""`invardiff bench --pipeline DIR`: the sweep on a user's saved diffusers pipeline (here a tiny random DiT)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

from invardiff.cli.main import main


@pytest.fixture
def saved_dit_pipeline(tmp_path):
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",  # DiTPipeline: null class 1000
    )  # fmt: skip
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,),
        latent_channels=4, norm_num_groups=8, sample_size=8,
    )  # fmt: skip
    pipe = DiTPipeline(transformer, vae, DDIMScheduler(), id2label={i: str(i) for i in range(10)})
    path = tmp_path / "my-dit"
    pipe.save_pretrained(path)
    return path


def test_bench_runs_on_a_saved_user_pipeline(saved_dit_pipeline, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["bench", "--pipeline", str(saved_dit_pipeline), "--classes", "1,2", "--steps", "8", "--rounds", "1"]
    assert main([*args, "--methods", "dicache", "--out", str(out)]) == 0
    results = [json.loads(line) for line in (out / "sweep-my-dit.jsonl").read_text().splitlines()]
    # DiTPipeline batches CFG, so DiCache runs per sample and batch-global: official 0.4, 3 thresholds and the
    # aggressive setting (bundled.DICACHE_AGGRESSIVE) each.
    assert len(results) == 10
    assert "dicache δ=1.5 warmup_ratio=0.1 batch-global" in [r["label"] for r in results]
    low = next(r for r in results if r["label"] == "dicache δ=0.1")
    high = next(r for r in results if r["label"] == "dicache δ=0.8")
    # A larger threshold skips at least as much work (FLOP-counted) and is at least as far from full compute.
    assert high["ideal_speedup"] >= low["ideal_speedup"] >= 1.0
    assert high["psnr"] <= low["psnr"]
    assert (out / "sweep-my-dit.png").read_bytes()[:4] == b"\x89PNG"
    assert "dicache δ=0.4 (official) batch-global" in (out / "sweep-my-dit.md").read_text()
    assert main(["bench", "--pipeline", str(saved_dit_pipeline), "--prompts", "p.txt", "--steps", "8"]) == 2
