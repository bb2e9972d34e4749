"""Train `dit-digits`: a class-conditional DiTTransformer2DModel on scikit-learn's bundled 8x8 digits.

Pixel space, 16x16 (digits upsampled bilinearly), 1 channel, scaled to [-1, 1]. DiT's diffusion: epsilon objective,
linear betas 1e-4..0.02 over 1000 steps; 10% class dropout to the null class 1000 (hard-coded in DiTPipeline) for
classifier-free guidance. AdamW 3e-4, EMA 0.999; the EMA weights are exported. Resumable: a checkpoint is written
every few minutes and picked up on restart.

    python training/train_dit_digits.py --minutes 40 --out training/runs/dit-digits
    python training/train_dit_digits.py --export training/runs/dit-digits --to src/invardiff/models/weights/dit-digits
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiTTransformer2DModel

from loop import train_for


CONFIG = {
    "num_attention_heads": 2,
    "attention_head_dim": 64,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 6,
    "sample_size": 16,
    "patch_size": 2,
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_zero",
}
NULL_CLASS = 1000


def digits_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
    images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    return images * 2 - 1, torch.tensor(digits.target, dtype=torch.long)


def train(args) -> None:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = digits_dataset()
    model = DiTTransformer2DModel(**CONFIG)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    generator = torch.Generator().manual_seed(args.seed)

    def loss_fn() -> torch.Tensor:
        index = torch.randint(0, len(images), (args.batch_size,), generator=generator)
        x0, y = images[index], labels[index].clone()
        y[torch.rand(args.batch_size, generator=generator) < args.class_dropout] = NULL_CLASS
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, 1000, (args.batch_size,), generator=generator)
        prediction = model(scheduler.add_noise(x0, noise, t), timestep=t, class_labels=y).sample
        return F.mse_loss(prediction, noise)

    losses = train_for(args.minutes, out, model, ema, optimizer, generator, loss_fn, args.ema, clip_grad=None)
    ema.save_pretrained(out / "ema", safe_serialization=True)
    (out / "train_log.json").write_text(json.dumps({"args": vars(args), "config": CONFIG, "losses": losses}, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="training/runs/dit-digits")
    parser.add_argument("--minutes", type=float, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--class-dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    train(parser.parse_args())
