"""Train `flux-shapes`: a text-conditioned FluxTransformer2DModel on procedural coloured shapes (32x32 RGB).

Rectified flow as FLUX: x_s = (1 - s) x0 + s noise, the model predicts the velocity noise - x0 at timestep s
(logit-normal s), conditioned through the bundled frozen tiny T5 / CLIP text stack. AdamW 5e-4, EMA 0.999; the
EMA weights are exported. Sampling: FluxPipeline with FlowMatchEulerDiscreteScheduler. Resumable.

    python training/train_flux_shapes.py --minutes 61 --batch-size 24 --out training/runs/flux-shapes
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from invardiff.models import flux_shapes, shapes

from loop import train_for


def train(args) -> None:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = flux_shapes.build_pipeline()
    model = pipe.transformer.train()
    ema = copy.deepcopy(model).requires_grad_(False)
    embeds, pooled, _ = flux_shapes.encode(pipe, shapes.ALL_PROMPTS)  # every prompt once: the encoders are frozen
    prompt_index = {prompt: i for i, prompt in enumerate(shapes.ALL_PROMPTS)}
    img_ids, txt_ids = flux_shapes.image_ids(), torch.zeros(flux_shapes.MAX_SEQUENCE_LENGTH, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)

    def loss_fn() -> torch.Tensor:
        images, prompts, _ = shapes.sample_batch(args.batch_size, generator)
        index = torch.tensor([prompt_index[p] for p in prompts])
        x0 = flux_shapes.pack(images)  # (B, 256, 12)
        noise = torch.randn(x0.shape, generator=generator)
        s = torch.sigmoid(torch.randn(args.batch_size, generator=generator))  # logit-normal timesteps
        xs = (1 - s[:, None, None]) * x0 + s[:, None, None] * noise
        prediction = model(
            hidden_states=xs,
            timestep=s,
            encoder_hidden_states=embeds[index],
            pooled_projections=pooled[index],
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return F.mse_loss(prediction, noise - x0)

    losses = train_for(args.minutes, out, model, ema, optimizer, generator, loss_fn, args.ema, clip_grad=1.0)
    ema.eval().save_pretrained(out / "ema", safe_serialization=True)
    # T5 ties encoder.embed_tokens to shared: store the tied weight once (load with strict=False).
    t5_state = {k: v for k, v in pipe.text_encoder_2.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(
        {f"clip.{k}": v.contiguous() for k, v in pipe.text_encoder.state_dict().items()}
        | {f"t5.{k}": v.contiguous() for k, v in t5_state.items()},
        str(out / "text_encoders.safetensors"),
    )
    (out / "train_log.json").write_text(
        json.dumps({"args": vars(args), "config": flux_shapes.TRANSFORMER_CONFIG, "losses": losses}, indent=1)
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="training/runs/flux-shapes")
    parser.add_argument("--minutes", type=float, default=45)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    train(parser.parse_args())
