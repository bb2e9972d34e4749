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
from ..model_configs import ModelConfig
from .timing import timed


def euler_update(latents: torch.Tensor, output: torch.Tensor, num_steps: int) -> torch.Tensor:
    """The loop's Euler update ``latents - prediction / num_steps`` on the channels that the model predicts: DiT
    predicts (eps, variance), of which eps is kept; HunyuanVideo-1.5 takes its latent channels followed by
    conditioning channels (a conditioning latent and a mask), which the update leaves as they are."""
    channels = min(latents.shape[1], output.shape[1])
    updated = latents[:, :channels] - output[:, :channels] / num_steps
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
        self.call_timestep = get_family(config.family).configs.call_timestep
        self.latents = self.call["hidden_states"].clone()
        self.seconds = 0.0

    def restart(self) -> None:
        self.latents = self.call["hidden_states"].clone()
        self.seconds = 0.0

    def run(self) -> None:
        """A whole run from the first step; ``seconds`` is then its transformer time."""
        self.restart()
        for index in range(self.num_steps):
            self.step(index)

    def step(self, index: int) -> None:
        """Run denoising step ``index``: one timed transformer call, then the Euler update."""
        fraction = 1.0 - index / self.num_steps  # 1 -> 1/T, like the flow-matching sigmas
        call = dict(self.call, hidden_states=self.latents)
        call["timestep"] = self.call_timestep(fraction, self.call["timestep"])
        seconds, output = timed(lambda: self._forward(call, index), self.device)
        self.seconds += seconds
        self.latents = euler_update(self.latents, output[0], self.num_steps)

    @torch.no_grad()
    def _forward(self, call: dict, index: int):
        if self.context is not None:
            with self.context(self.transformer, index):
                return self.transformer(**call)
        if not api.is_enabled(self.transformer):
            return self.transformer(**call)
        with api.cache_context(self.transformer, "default", step_index=index):
            return self.transformer(**call)
