"""Export a trained run into the package (safetensors), and write its model card with samples, the change-rate
curves of SPEC.md A.2, the numerical learning check (trained vs random weights) and the file hash.

    python training/make_card.py dit-digits --run training/runs/dit-digits
    python training/make_card.py flux-shapes --run training/runs/flux-shapes
    python training/make_card.py wan-motion --run training/runs/wan-motion
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from invardiff.calibration import calibrate
from invardiff.models import checks, get, load, motion, shapes
from invardiff.plot import plot_rates


def export(name: str, run: Path) -> Path:
    target = get(name, include_unbundled=True).directory
    target.mkdir(parents=True, exist_ok=True)
    for file in (run / "ema").iterdir():
        shutil.copy(file, target / file.name)
    if (run / "text_encoders.safetensors").exists():
        shutil.copy(run / "text_encoders.safetensors", target / "text_encoders.safetensors")
    log = json.loads((run / "train_log.json").read_text())
    (target / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    return target


def samples(name: str, pipe, seeds) -> tuple[torch.Tensor, list]:
    entry = get(name, include_unbundled=True)
    images, cases = [], []
    if name == "wan-motion":  # 20 clips of distinct prompts: (N, F, C, H, W)
        return checks.motion_samples(pipe, entry)
    if name == "dit-digits":
        for seed in seeds:
            for digit in range(10):
                out = pipe(**entry.call_kwargs(digit, seed)).images
                images.append(torch.as_tensor(np.asarray(out)).permute(0, 3, 1, 2))
                cases.append(digit)
    else:
        generator = torch.Generator().manual_seed(1234)
        for seed in seeds:
            for attributes in [
                shapes.ALL_ATTRIBUTES[i] for i in torch.randperm(len(shapes.ALL_ATTRIBUTES), generator=generator)[:10]
            ]:
                images.append(pipe(**entry.call_kwargs(shapes.prompt_for(*attributes), seed)).images)
                cases.append(attributes)
    return torch.cat(images).float().clamp(0, 1), cases


def learning_score(name: str, images, cases) -> float:
    if name == "wan-motion":
        return motion.agreement(images, cases)
    return (
        checks.digit_agreement(images, cases) if name == "dit-digits" else checks.shape_colour_accuracy(images, cases)
    )


def _schedule(args: dict) -> str:
    """The learning-rate schedule and timestep sampling of a run, where the script has options for them."""
    parts = []
    if args.get("decay_from") is not None:
        parts.append(f" (constant, then cosine-decayed to 0 over the last {1 - args['decay_from']:.0%} of the time)")
    if args.get("shift"):
        parts.append(f", logit-normal timesteps shifted by {args['shift']:g} toward noise")
    return "".join(parts)


def save_grid(images: torch.Tensor, path: Path, columns: int = 10, scale: int = 4) -> None:
    from PIL import Image

    rows = [torch.cat(list(images[i : i + columns]), dim=-1) for i in range(0, len(images), columns)]
    grid = torch.nn.functional.interpolate(torch.cat(rows, dim=-2)[None], scale_factor=scale, mode="nearest")[0]
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(path)


def save_strip(clips: torch.Tensor, path: Path, scale: int = 3) -> None:
    """One row per clip (N, F, C, H, W), its frames left to right."""
    save_grid(clips.flatten(0, 1), path, columns=clips.shape[1], scale=scale)


def main(args) -> None:
    torch.manual_seed(0)
    target = export(args.name, Path(args.run))
    entry = get(args.name, include_unbundled=True)
    pipe = load(args.name, include_unbundled=True)
    images, cases = samples(args.name, pipe, seeds=range(args.seeds))
    (save_strip if images.ndim == 5 else save_grid)(images, target / "samples.png")
    trained = learning_score(args.name, images, cases)
    random_pipe = load(args.name, include_unbundled=True)
    for parameter in random_pipe.transformer.parameters():  # same architecture, random weights
        torch.nn.init.normal_(parameter, std=0.02)
    random_images, _ = samples(args.name, random_pipe, seeds=range(args.seeds))
    untrained = learning_score(args.name, random_images, cases)
    inputs = {
        "dit-digits": {"class_labels": list(range(10))},
        "flux-shapes": {"prompts": [shapes.prompt_for(*a) for a in shapes.ALL_ATTRIBUTES[::12]]},
        "wan-motion": {"prompts": [motion.prompt_for(*a) for a in motion.ALL_ATTRIBUTES[::16]]},
    }[args.name]
    thresholds = "default" if args.name == "wan-motion" else "fast"  # Wan's presets: default, debug-args
    _, rates = calibrate(
        pipe,
        num_inference_steps=entry.num_inference_steps,
        thresholds=thresholds,
        seeds=[0],
        pipeline_kwargs=entry.pipeline_kwargs,
        **inputs,
    )
    plot_rates(rates, target / "rates.png")
    log = json.loads((target / "train_log.json").read_text())
    weights = target / "diffusion_pytorch_model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    check = {
        "dit-digits": "SVM (trained on the real 8x8 digits) agreement with the conditioning class",
        "flux-shapes": "prompted colour found at the prompted position",
        "wan-motion": "procedural detector (colour of the moving pixels, direction and speed from a least-squares fit "
        "of the frame-to-frame centroids, path centred) agrees with the prompt on all of colour, direction and speed",
    }[args.name]
    data = {
        "dit-digits": "scikit-learn `load_digits()` (1797 8x8 digits, 10 classes), upsampled to 16x16, in [-1, 1]",
        "flux-shapes": "procedural 32x32 RGB coloured shapes (`invardiff.models.shapes`): 4 colours x 3 shapes x 5 "
        "positions x 2 textured backgrounds, with jitter; prompts name all four",
        "wan-motion": "procedural clips of 8 frames of 32x32 RGB (`invardiff.models.motion`): 4 colours x 2 shapes "
        "x 4 directions x 2 speeds over a static striped background, path centred, with start, offset and size "
        "jitter; prompts name all four; 10% empty prompts (the unconditional branch)",
    }[args.name]
    retrain = {
        "dit-digits": "python training/train_dit_digits.py --minutes 40 --out training/runs/dit-digits",
        "flux-shapes": "python training/train_flux_shapes.py --minutes 61 --batch-size 24 --out training/runs/flux-shapes",
        "wan-motion": f"nice -n 19 python training/train_wan_motion.py --minutes {log['args']['minutes']:g} "
        "--out training/runs/wan-motion",
    }
    card = f"""# {args.name}

{entry.description}. Trained with this repository's code on data available offline; sampled with diffusers'
`{entry.pipeline}` ({entry.num_inference_steps} steps, guidance {entry.guidance_scale}).

- Data: {data}
- Config: `{json.dumps(log["config"])}`
- Training: {log["losses"][-1]["step"]} steps in {log["losses"][-1]["minutes"]:.1f} minutes on a 2-core CPU, batch {log["args"]["batch_size"]}, lr {log["args"]["lr"]}{_schedule(log["args"])}, EMA {log["args"]["ema"]}, seed {log["args"]["seed"]}; final loss (mean of the last 50 steps) {log["losses"][-1]["loss"]:.4f}. Loss curve: `train_log.json`.
- Weights: `diffusion_pytorch_model.safetensors` ({weights.stat().st_size / 2**20:.1f} MiB), sha256 `{digest}`.
- Learning check ({check}), {len(images)} samples: **trained {trained:.0%}**, same architecture with random weights {untrained:.0%}.
- Retrain: `{retrain[args.name]}` then `python training/make_card.py {args.name} --run training/runs/{args.name}`.

Samples (`samples.png`, {"one row per clip, frames left to right" if images.ndim == 5 else "one row per seed"}):

![samples](samples.png)

InvarDiff change rates (SPEC.md A.2; first pass and corrected, with the `{thresholds}` preset's thresholds; `rates.png`):

![rates](rates.png)
"""
    (target / "MODEL_CARD.md").write_text(card)
    (target / "card.json").write_text(
        json.dumps({"sha256": digest, "learning_check": trained, "learning_check_random_weights": untrained}, indent=1)
        + "\n"
    )
    print(card)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=["dit-digits", "flux-shapes", "wan-motion"])
    parser.add_argument("--run", required=True)
    parser.add_argument("--seeds", type=int, default=4)
    main(parser.parse_args())
