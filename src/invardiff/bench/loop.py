"""A denoising loop over a bare transformer, one step at a time, so that variants can run in lockstep.

The loop makes the transformer calls a pipeline would make (Flux: packed latents, distilled guidance 3.5;
DiT: batched CFG on a class and the null class) and advances the latents with a plain Euler update on a linear
time grid. Only the transformer call is timed; the update is the same for every variant, so it cannot bias a
ratio. Steps come from ``invardiff.cache_context(step_index=i)`` when invardiff is enabled; ``context`` replaces that
for other caches (diffusers' hooks want ``transformer.cache_context("cond")`` around each call).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import api
from ..families import get_family
from ..families.model_config import ModelConfig
from .timing import timed


def clone_latents(latents):
    """A copy of a call's latents: a tensor, or a list of per-sample tensors (Z-Image)."""
    return [item.clone() for item in latents] if isinstance(latents, (list, tuple)) else latents.clone()


def euler_update(latents, prediction, steps: int):
    """``latents - prediction / steps`` on the channels the model predicts, for a tensor or a list of per-sample
    tensors (channels first in each): DiT predicts (eps, variance), of which eps is kept; HunyuanVideo-1.5 takes its
    latent channels followed by conditioning channels (a conditioning latent and a mask), left as they are."""
    if isinstance(latents, (list, tuple)):
        return [euler_update(item[None], out[None], steps)[0] for item, out in zip(latents, prediction, strict=True)]
    channels = min(latents.shape[1], prediction.shape[1])
    updated = latents[:, :channels] - prediction[:, :channels] / steps
    return updated if channels == latents.shape[1] else torch.cat([updated, latents[:, channels:]], dim=1)


class Trajectory:
    def __init__(
        self,
        transformer: torch.nn.Module,
        config: ModelConfig,
        num_steps: int,
        device: torch.device,
        context: Callable | None = None,
    ):
        self.transformer = transformer
        self.context = context
        self.config = config
        self.num_steps = num_steps
        self.device = device
        self.call = config.example_call(device, seed=0)
        family = get_family(config.family)
        self.call_timestep = family.configs.call_timestep
        self.timestep_arg = family.timestep_arg
        # The noisy latents of each output, in output order: one, or each head stream's (LTX-2: video, audio).
        streams = family.head_streams
        self.latent_args = (family.latent_arg,) if streams is None else streams.latents
        self.restart()

    def restart(self) -> None:
        self.latents = [clone_latents(self.call[arg]) for arg in self.latent_args]
        self.seconds = 0.0

    def run(self) -> None:
        """A whole run from the first step; ``seconds`` is then its transformer time."""
        self.restart()
        for index in range(self.num_steps):
            self.step(index)

    def step(self, index: int) -> None:
        """Run denoising step ``index``: one timed transformer call, then the Euler update."""
        fraction = 1.0 - index / self.num_steps  # 1 -> 1/T, like the flow-matching sigmas
        call = {**self.call, **dict(zip(self.latent_args, self.latents, strict=True))}
        call[self.timestep_arg] = self.call_timestep(fraction, self.call[self.timestep_arg])
        seconds, output = timed(lambda: self._forward(call, index), self.device)
        self.seconds += seconds
        self.latents = [euler_update(x, out, self.num_steps) for x, out in zip(self.latents, output, strict=False)]

    @torch.no_grad()
    def _forward(self, call: dict, index: int):
        if self.context is not None:
            with self.context(self.transformer, index):
                return self.transformer(**call)
        if not api.is_enabled(self.transformer):
            return self.transformer(**call)
        with api.cache_context(self.transformer, "default", step_index=index):
            return self.transformer(**call)
