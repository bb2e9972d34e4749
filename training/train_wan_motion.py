"""Train `wan-motion`: a text-conditioned WanTransformer3DModel on procedural clips of moving shapes (8 frames of
32x32 RGB, pixel space).

Rectified flow as Wan: x_s = (1 - s) x0 + s noise, the model predicts the velocity noise - x0 at timestep 1000 s
(logit-normal s), conditioned through the bundled frozen tiny UMT5 encoder; 10% of the clips get the empty
prompt (the pipeline's default negative prompt), so that classifier-free guidance has an unconditional branch.
AdamW, EMA; the EMA weights are exported. Sampling: WanPipeline with the Wan family's flow-matching UniPC.
Seeded and resumable (a killed run continues from its last checkpoint).

    python training/train_wan_motion.py --minutes 60 --out training/runs/wan-motion
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from invardiff.models import motion, wan_motion

from loop import train_for


def train(args) -> None:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = wan_motion.build_pipeline()
    model = pipe.transformer.train()
    ema = copy.deepcopy(model).requires_grad_(False)
    # Every prompt once, and the empty one last (the encoder is frozen).
    embeds = wan_motion.encode(pipe, motion.ALL_PROMPTS + [""])
    prompt_index = {prompt: i for i, prompt in enumerate(motion.ALL_PROMPTS)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)

    def loss_fn() -> torch.Tensor:
        clips, prompts, _ = motion.sample_batch(args.batch_size, generator)  # (B, 3, F, H, W)
        index = torch.tensor([prompt_index[p] for p in prompts])
        dropped = torch.rand(args.batch_size, generator=generator) < args.prompt_dropout
        index = torch.where(dropped, len(motion.ALL_PROMPTS), index)
        noise = torch.randn(clips.shape, generator=generator)
        # Logit-normal timesteps shifted toward noise: the sampler's shift 5 spends most steps at high noise,
        # where the direction of motion is decided.
        u = torch.sigmoid(torch.randn(args.batch_size, generator=generator))
        s = args.shift * u / (1 + (args.shift - 1) * u)
        xs = (1 - s[:, None, None, None, None]) * clips + s[:, None, None, None, None] * noise
        prediction = model(
            hidden_states=xs, timestep=s * 1000, encoder_hidden_states=embeds[index], return_dict=False
        )[0]
        return F.mse_loss(prediction, noise - clips)

    losses = train_for(
        args.minutes,
        out,
        model,
        ema,
        optimizer,
        generator,
        loss_fn,
        args.ema,
        clip_grad=1.0,
        decay_from=args.decay_from,
    )
    ema.eval().save_pretrained(out / "ema", safe_serialization=True)
    # UMT5 ties encoder.embed_tokens to shared: store the tied weight once (restored on load).
    state = {
        k: v.contiguous() for k, v in pipe.text_encoder.state_dict().items() if k != "encoder.embed_tokens.weight"
    }
    save_file(state, str(out / "text_encoders.safetensors"))
    (out / "train_log.json").write_text(
        json.dumps({"args": vars(args), "config": wan_motion.TRANSFORMER_CONFIG, "losses": losses}, indent=1)
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="training/runs/wan-motion")
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument(
        "--decay-from", type=float, default=0.7, help="fraction of --minutes after which the lr decays (cosine) to 0"
    )
    parser.add_argument("--shift", type=float, default=3.0, help="timestep shift of the logit-normal draw")
    parser.add_argument("--prompt-dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    train(parser.parse_args())
