"""The online probe: runs the first m blocks, decides per sample whether the rest of the network runs, and
supplies the hidden state of the samples that skip (SPEC.md B.2-B.4).

The transformer's own ``forward`` runs unchanged; hooks on its blocks (``hooks.py``) call in here:

* block 0's input is x_k; block m-1's image-stream output is the probe P_k. There the decision is made.
* every sample computes: ``forward`` goes on (the probe is never computed twice);
* every sample skips: :class:`SkipRemainingBlocks` unwinds to the step hook, which runs only the output head;
* some skip: the probe's output is cut to the computing samples, the deep blocks run on them alone (their
  per-sample conditioning arguments are cut the same way), and the head input is put back together.

What a skipping sample gets depends on the policy: DiCache extrapolates its last two computed residuals
(``reuse="extrapolate"``); plan+probe keeps the plan's reuse of the last computed pre-head state (``"plan"``).
"""

from __future__ import annotations

import numpy as np
import torch

from ..engine.state import COMPUTED, REUSED, tensor_bytes
from .estimators import extrapolate, probe_error, trajectory_gamma


# Per step and sample, why it computed or skipped (the summary's ``decision``).
DECISIONS = (
    "warmup",  # DiCache warm-up: computed, accumulator reset
    "last_step",  # forced last step: computed
    "no_reference",  # no earlier probe output to compare with: computed
    "computed",  # accumulator reached delta: computed, accumulator reset
    "skipped",  # accumulator under delta: deep layers skipped, residual extrapolated
    "non_finite",  # the probe error was NaN or inf: computed, accumulator reset
    "plan_compute",  # plan+probe: the plan computes this step
    "plan_reuse",  # plan+probe: the plan's reuse was accepted
    "vetoed",  # plan+probe: the probe vetoed the plan's reuse: computed
)
NOT_RUN = -1
CODE = {name: code for code, name in enumerate(DECISIONS)}


class SkipRemainingBlocks(Exception):
    """Raised after the probe when no sample computes; the step hook catches it and runs only the head."""


class ProbeBranch:
    """Probe state of one CFG branch during one run: references, accumulators, residual windows, records."""

    def __init__(self, num_steps: int, batch: int):
        self.batch = batch
        self.accumulator = np.zeros(batch)  # host float64: the decision reads it every step anyway
        self.computed_steps = np.zeros(batch, dtype=np.int64)
        self.block_input = self.probe = None  # x_k, P_k of the current step
        self.block_input_prev = self.probe_prev = None  # updated on every step, computed or skipped (SPEC B.3)
        self.full_alpha = self.full_beta = None  # R of the last two computed steps (alpha most recent)
        self.probe_alpha = self.probe_beta = None  # r of the same steps
        # per-step scratch
        self.full_reason: str | None = None
        self.compute: np.ndarray | None = None  # (B,) bool: samples that run the deep layers
        self.subset: torch.Tensor | None = None  # their indices when only some do
        self.approx: torch.Tensor | None = None  # hidden state for the samples that skip
        self.skipped_all = False
        self.accounted_bytes = 0
        # records for invardiff.summary
        self.error = np.full((num_steps, batch), np.nan)
        self.accumulated = np.full((num_steps, batch), np.nan)
        self.gamma = np.full((num_steps, batch), np.nan)
        self.decision = np.full((num_steps, batch), NOT_RUN, dtype=np.int8)

    def held_bytes(self) -> int:
        """Bytes held from one step to the next: the two references and the two residual pairs."""
        held = [self.block_input_prev, self.probe_prev, self.full_alpha, self.probe_alpha]
        if self.full_beta is not self.full_alpha:  # beta aliases alpha until a second step is computed
            held += [self.full_beta, self.probe_beta]
        return tensor_bytes(held)

    def drop_tensors(self) -> None:
        self.block_input = self.probe = self.block_input_prev = self.probe_prev = None
        self.full_alpha = self.full_beta = self.probe_alpha = self.probe_beta = None
        self.subset = self.approx = None
        self.accounted_bytes = 0

    def records(self) -> dict[str, np.ndarray]:
        return {
            "error": self.error.copy(),
            "accumulator": self.accumulated.copy(),
            "gamma": self.gamma.copy(),
            "decision": self.decision.copy(),
        }


class ProbeController:
    """Executes a probe policy (``DiCachePolicy`` or ``PlanProbePolicy``) for one engine."""

    def __init__(self, engine, policy):
        self.engine = engine
        self.policy = policy
        config = policy.config
        self.threshold = config.threshold
        self.error = config.error
        self.per_sample = config.per_sample
        self.skip_when = config.skip_when
        self.gamma_max = getattr(config, "gamma_max", 1.0)
        self.reuse = policy.reuse  # "extrapolate" (DiCache) or "plan" (plan+probe)

    # ----- called by the step hook -----
    def run_step(self, transformer, state, forward):
        for name in ("controlnet_block_samples", "controlnet_single_block_samples"):
            if state.call.arguments.get(name) is not None:
                raise NotImplementedError(
                    f"invardiff {self.policy.name}: ControlNet residuals ({name}) are added between the blocks the "
                    f"probe skips; this combination is not supported. Disable invardiff for ControlNet pipelines."
                )
        if state.probe is None or state.step == 0:
            state.probe = ProbeBranch(state.num_steps, state.call["hidden_states"].shape[0])
        branch = state.probe
        branch.full_reason = self.policy.full_reason(state.step)
        try:
            output = forward()
            state.step_status[state.step] = COMPUTED
        except SkipRemainingBlocks:
            branch.skipped_all = True
            state.step_status[state.step] = REUSED
            output = self.engine.family.run_head(transformer, branch.approx, state.call)
        branch.block_input_prev, branch.probe_prev = branch.block_input, branch.probe
        branch.block_input = branch.probe = branch.compute = branch.subset = branch.approx = None
        branch.skipped_all = False
        self.engine.sync_probe_bytes(state)
        return output

    # ----- called by the block hooks -----
    def on_block_input(self, state, block_input: torch.Tensor) -> None:
        state.probe.block_input = block_input

    def on_probe_output(self, state, probe: torch.Tensor):
        """Record P_k and decide. Returns the indices of the samples that compute when only some do, else None."""
        branch, step = state.probe, state.step
        branch.probe = probe
        if branch.full_reason is not None or branch.probe_prev is None:
            reason = branch.full_reason or "no_reference"
            branch.decision[step] = CODE[reason]
            branch.accumulator[:] = 0.0
            branch.compute = np.ones(branch.batch, dtype=bool)
            return None
        error = probe_error(
            self.error, probe, branch.probe_prev, branch.block_input, branch.block_input_prev, self.per_sample
        )
        error = error.double().cpu().numpy()
        finite = np.isfinite(error)
        branch.accumulator += np.where(finite, error, 0.0)
        under = branch.accumulator < self.threshold if self.skip_when == "<" else branch.accumulator <= self.threshold
        # DiCache extrapolates from finite residual windows only (reset by a non-finite computed step).
        has_windows = branch.computed_steps > 0 if self.reuse == "extrapolate" else np.ones(branch.batch, bool)
        if not self.per_sample:  # one decision for the batch
            has_windows[:] = has_windows.all()
        skip = finite & under & has_windows
        branch.error[step], branch.accumulated[step] = error, branch.accumulator
        skipped, computed = ("plan_reuse", "vetoed") if self.reuse == "plan" else ("skipped", "computed")
        reasons = np.where(finite, np.where(has_windows, CODE[computed], CODE["no_reference"]), CODE["non_finite"])
        branch.decision[step] = np.where(skip, CODE[skipped], reasons)
        branch.accumulator[~skip] = 0.0
        branch.compute = ~skip
        if skip.any():
            branch.approx = self._skipped_hidden(state, branch, skip)
        if skip.all():
            raise SkipRemainingBlocks
        if not skip.any():
            return None
        branch.subset = torch.as_tensor(np.flatnonzero(~skip), device=probe.device)
        return branch.subset

    def _skipped_hidden(self, state, branch: ProbeBranch, skip: np.ndarray) -> torch.Tensor:
        if self.reuse == "plan":
            if state.hidden is None:
                raise RuntimeError(f"invardiff: the plan reuses step {state.step} but no hidden state is cached.")
            return state.hidden
        x = branch.block_input
        gamma = trajectory_gamma(
            branch.probe - x, branch.probe_alpha, branch.probe_beta, self.gamma_max, self.per_sample
        )
        has_two = branch.computed_steps >= 2
        gamma = torch.where(torch.as_tensor(has_two, device=gamma.device), gamma, 1.0)
        branch.gamma[state.step] = np.where(skip, gamma.double().cpu().numpy(), np.nan)
        return extrapolate(x, branch.full_alpha, branch.full_beta, gamma, torch.as_tensor(has_two, device=x.device))

    # ----- called by the head-input hook -----
    def head_input(self, state, hidden: torch.Tensor) -> torch.Tensor:
        """The full-batch pre-head state: computed rows from the deep layers, the others from ``approx``."""
        branch = state.probe
        if branch is None or branch.skipped_all:
            return hidden
        if branch.subset is not None:
            hidden = branch.approx.index_copy(0, branch.subset, hidden)
        if self.reuse == "extrapolate":
            self._store_residuals(branch, hidden)
        return hidden

    def _store_residuals(self, branch: ProbeBranch, hidden: torch.Tensor) -> None:
        full = hidden - branch.block_input  # R_k = Y_k - x_k
        probe = branch.probe - branch.block_input  # r_k = P_k - x_k
        if branch.full_alpha is None or branch.compute.all():
            branch.full_beta, branch.probe_beta = branch.full_alpha, branch.probe_alpha
            branch.full_alpha, branch.probe_alpha = full, probe
            if branch.full_beta is None:  # first computed step: beta is never read before a second one exists
                branch.full_beta, branch.probe_beta = full, probe
        else:
            mask = torch.as_tensor(branch.compute, device=hidden.device).view((-1,) + (1,) * (hidden.ndim - 1))
            branch.full_beta = torch.where(mask, branch.full_alpha, branch.full_beta)
            branch.probe_beta = torch.where(mask, branch.probe_alpha, branch.probe_beta)
            branch.full_alpha = torch.where(mask, full, branch.full_alpha)
            branch.probe_alpha = torch.where(mask, probe, branch.probe_alpha)
        # A sample whose residuals are not finite (NaN / inf features) must not be extrapolated from: its windows
        # restart, so it computes until it has a finite residual again.
        finite = (torch.isfinite(full).flatten(1).all(1) & torch.isfinite(probe).flatten(1).all(1)).cpu().numpy()
        branch.computed_steps = np.where(
            branch.compute, np.where(finite, branch.computed_steps + 1, 0), branch.computed_steps
        )
