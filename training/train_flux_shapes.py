"""Train `flux-shapes`: a text-conditioned FluxTransformer2DModel on procedural coloured shapes (32x32 RGB).

Rectified flow as FLUX: x_s = (1 - s) x0 + s noise, the model predicts the velocity noise - x0 at timestep s
(logit-normal s), conditioned through the bundled frozen tiny T5 / CLIP text stack. AdamW 5e-4, EMA 0.999; the
EMA weights are exported. Sampling: FluxPipeline with FlowMatchEulerDiscreteScheduler. Resumable.

    python training/train_flux_shapes.py --minutes 45 --out training/runs/flux-shapes
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from invardiff.models import flux_shapes, shapes


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
    step, losses, elapsed = 0, [], 0.0
    checkpoint = out / "checkpoint.pt"
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        step, losses, elapsed = state["step"], state["losses"], state["elapsed"]
    start, last_save, running = time.time() - elapsed, time.time(), []
    while time.time() - start < args.minutes * 60:
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
        loss = F.mse_loss(prediction, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            for target, source in zip(ema.parameters(), model.parameters(), strict=True):
                target.lerp_(source, 1 - args.ema)
        step += 1
        running.append(loss.item())
        if step % 50 == 0:
            losses.append({"step": step, "loss": float(np.mean(running)), "minutes": (time.time() - start) / 60})
            running = []
            print(json.dumps(losses[-1]), flush=True)
        if time.time() - last_save > 180:
            _save(checkpoint, model, ema, optimizer, generator, step, losses, time.time() - start)
            last_save = time.time()
    _save(checkpoint, model, ema, optimizer, generator, step, losses, time.time() - start)
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


def _save(path, model, ema, optimizer, generator, step, losses, elapsed) -> None:
    state = {
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "step": step,
        "losses": losses,
        "elapsed": elapsed,
    }
    torch.save(state, str(path) + ".tmp")
    Path(str(path) + ".tmp").replace(path)


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
