"""The online probe shared by DiCache and plan+probe (SPEC.md B.2-B.4), as a runtime policy base class.

The engine runs the first ``probe_depth`` blocks and calls :meth:`ProbePolicy.decide` with the block-stack input
x_k and the probe output P_k. The accumulated relative L1 change of P decides, per sample (or for the whole batch),
whether the remaining blocks run. Samples that skip get their pre-head state at the head: DiCache extrapolates its
last two computed residuals (``reuse="extrapolate"``); plan+probe keeps the plan's reuse of the last computed
pre-head state (``"plan"``).

All per-sample state (accumulators, residual windows, computed-step counts) lives on the features' device, and the
decision reads one small packed tensor back to the host: one host sync per step, at the decision.

Under context parallelism (each rank holds a shard of the tokens, :mod:`invardiff.scale.distributed`) the policy's
``context_parallel`` reduction sums the statistics' numerators and denominators over the group in one all-reduce per
step, so that every rank takes the same decision (a rank that skipped the deep layers alone would hang the others in
their attention collectives).
"""

from __future__ import annotations

import numpy as np
import torch

from ..engine.policy import COMPUTE_ALL, CachePolicy, ProbeDecision
from ..engine.state import put_rows, tensor_bytes
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
CONTROLNET_ARGUMENTS = ("controlnet_block_samples", "controlnet_single_block_samples")


class ProbeBranch:
    """Probe state of one CFG branch during one run: references, accumulators, residual windows, records."""

    def __init__(self, num_steps: int, batch: int, device: torch.device):
        self.batch = batch
        self.accumulator = torch.zeros(batch, dtype=torch.float64, device=device)
        self.computed_steps = torch.zeros(batch, dtype=torch.int64, device=device)
        self.block_input = self.probe = None  # x_k, P_k of the current step
        self.block_input_prev = self.probe_prev = None  # updated on every step, computed or skipped (SPEC B.3)
        self.full_alpha = self.full_beta = None  # R of the last two computed steps (alpha most recent)
        self.probe_alpha = self.probe_beta = None  # r of the same steps
        # per-step scratch
        self.compute: torch.Tensor | None = None  # (B,) bool on the device when only some samples compute
        self.approx: torch.Tensor | None = None  # pre-head state of the samples that skip
        # context parallelism: samples whose last computed residual was not finite on this rank's shard; the
        # window reset waits for the next step's all-reduce, where every rank learns of it
        self.pending_reset: torch.Tensor | None = None
        # DiCache: (T, B) which samples warm up at each step, on the host; on the device when it varies in a call
        self.warmup: np.ndarray | None = None
        self.warmup_device: torch.Tensor | None = None
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
        self.compute = self.approx = None

    def records(self) -> dict[str, np.ndarray]:
        return {
            "error": self.error.copy(),
            "accumulator": self.accumulated.copy(),
            "gamma": self.gamma.copy(),
            "decision": self.decision.copy(),
        }


class ProbePolicy(CachePolicy):
    """Base of the probe policies. Subclasses set ``reuse`` and implement :meth:`full_reason`."""

    reuse = "extrapolate"  # or "plan"
    record_labels = {"decision": DECISIONS}
    # A reduction over a context-parallel group (invardiff.scale.distributed.enable_context_parallel), or None.
    context_parallel = None

    def __init__(self, config):
        self.config = config
        self.probe_depth = config.probe_depth
        self.threshold = config.threshold
        self.gamma_max = getattr(config, "gamma_max", 1.0)

    def full_reason(self, state) -> str | None:
        """A reason to compute every sample of this call without asking the probe, or ``None`` to let it decide."""
        raise NotImplementedError

    def warmup_rows(self, state) -> tuple[np.ndarray, torch.Tensor] | None:
        """The samples of this call that compute for their warm-up while the others ask the probe (a batched call
        holding CFG branches that warm up for different lengths): ``(B,)`` bool on the host and on the features'
        device, or ``None`` when there are none."""
        return None

    def check_call(self, state) -> None:
        for name in CONTROLNET_ARGUMENTS:
            if state.call.arguments.get(name) is not None:
                raise NotImplementedError(
                    f"invardiff {self.name}: ControlNet residuals ({name}) are added between the blocks the "
                    f"probe skips; this combination is not supported. Disable invardiff for ControlNet pipelines."
                )

    def new_branch(self, state) -> ProbeBranch:
        hidden = state.call["hidden_states"]
        return ProbeBranch(state.num_steps, hidden.shape[0], hidden.device)

    # ----- after the probe blocks -----
    def decide(self, state, block_input: torch.Tensor, probe: torch.Tensor) -> ProbeDecision:
        branch, step = state.policy_state, state.step
        branch.block_input, branch.probe = block_input, probe
        reason = self.full_reason(state)
        warm = None if reason is not None else self.warmup_rows(state)
        if reason is None and branch.probe_prev is None:
            reason = "no_reference"
        measured = None
        if self.context_parallel is not None:
            # Every rank reduces at every probed step, whatever it decides: none waits on a collective another skips.
            measured = self.context_parallel.reduce(self, branch, block_input, probe, needed=reason is None)
        if reason is not None:
            branch.decision[step] = CODE[reason]
            if warm is not None:
                branch.decision[step][warm[0]] = CODE["warmup"]
            branch.accumulator.zero_()
            return COMPUTE_ALL
        config = self.config
        if measured is None:
            error = probe_error(
                config.error, probe, branch.probe_prev, block_input, branch.block_input_prev, config.per_sample
            )
            # Computed before the decision, for every sample, so that its record travels in the same single sync.
            gamma = self._gamma(branch, block_input, probe)
        else:
            error, gamma = measured  # over the whole context-parallel group
        finite = torch.isfinite(error)
        accumulated = branch.accumulator + torch.where(finite, error.double(), 0.0)
        under = accumulated < self.threshold if config.skip_when == "<" else accumulated <= self.threshold
        # DiCache extrapolates from finite residual windows only (reset by a non-finite computed step).
        has_windows = branch.computed_steps > 0 if self.reuse == "extrapolate" else torch.ones_like(finite)
        if not config.per_sample:  # one decision for the batch
            has_windows = has_windows.all().expand(branch.batch)
        skip = finite & under & has_windows
        if warm is not None:
            skip = skip & ~warm[1]
        packed = torch.stack(
            [error.double(), accumulated, skip.double(), finite.double(), has_windows.double(), gamma]
        )
        error_h, accumulated_h, skip_h, finite_h, windows_h, gamma_h = np.array(packed.tolist())  # the one sync
        skip_h, finite_h, windows_h = skip_h > 0, finite_h > 0, windows_h > 0
        branch.accumulator = torch.where(skip, accumulated, 0.0)
        branch.error[step], branch.accumulated[step] = error_h, accumulated_h
        skipped, computed = ("plan_reuse", "vetoed") if self.reuse == "plan" else ("skipped", "computed")
        reasons = np.where(finite_h, np.where(windows_h, CODE[computed], CODE["no_reference"]), CODE["non_finite"])
        branch.decision[step] = np.where(skip_h, CODE[skipped], reasons)
        if warm is not None:  # computed without the probe's say, as the official warm-up (no error recorded)
            branch.decision[step][warm[0]] = CODE["warmup"]
            branch.error[step][warm[0]] = branch.accumulated[step][warm[0]] = np.nan
        if not skip_h.any():
            return COMPUTE_ALL
        if self.reuse == "extrapolate":
            branch.gamma[step] = np.where(skip_h, gamma_h, np.nan)
        branch.approx = self._skipped_hidden(state, branch, gamma)
        if skip_h.all():
            return ProbeDecision(skip_all=True)
        branch.compute = ~skip
        # Made from host values that the sync above already paid for.
        return ProbeDecision(compute_rows=torch.as_tensor(np.flatnonzero(~skip_h), device=probe.device))

    def _gamma(self, branch: ProbeBranch, block_input: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
        """float64 ``(B,)``: the trajectory step of SPEC.md B.3 where a sample has two computed steps, else 1."""
        if self.reuse != "extrapolate" or branch.probe_alpha is None:
            return torch.ones(branch.batch, dtype=torch.float64, device=probe.device)
        gamma = trajectory_gamma(
            probe - block_input, branch.probe_alpha, branch.probe_beta, self.gamma_max, self.config.per_sample
        )
        return torch.where(branch.computed_steps >= 2, gamma, 1.0).double()

    def _skipped_hidden(self, state, branch: ProbeBranch, gamma: torch.Tensor) -> torch.Tensor:
        if self.reuse == "plan":
            if state.hidden is None:
                raise RuntimeError(f"invardiff: the plan reuses step {state.step} but no hidden state is cached.")
            return state.hidden
        return extrapolate(
            branch.block_input,
            branch.full_alpha,
            branch.full_beta,
            gamma.float(),
            branch.computed_steps >= 2,
            self.config.add_input_last,
        )

    # ----- at the head -----
    def assemble(self, state, hidden: torch.Tensor) -> torch.Tensor:
        """The full-batch pre-head state: computed rows from the deep layers, the others from ``approx``."""
        branch = state.policy_state
        if state.skip_all:
            return branch.approx
        if state.compute_rows is not None:
            hidden = put_rows(branch.approx, state.compute_rows, hidden)
        if self.reuse == "extrapolate" and branch.block_input is not None:
            self._store_residuals(branch, hidden)
        return hidden

    def _store_residuals(self, branch: ProbeBranch, hidden: torch.Tensor) -> None:
        full = hidden - branch.block_input  # R_k = Y_k - x_k
        probe = branch.probe - branch.block_input  # r_k = P_k - x_k
        if branch.full_alpha is None or branch.compute is None:
            branch.full_beta, branch.probe_beta = branch.full_alpha, branch.probe_alpha
            branch.full_alpha, branch.probe_alpha = full, probe
            if branch.full_beta is None:  # first computed step: beta is never read before a second one exists
                branch.full_beta, branch.probe_beta = full, probe
            compute = torch.ones_like(branch.computed_steps, dtype=torch.bool)
        else:
            compute = branch.compute
            mask = compute.view((-1,) + (1,) * (hidden.ndim - 1))
            branch.full_beta = torch.where(mask, branch.full_alpha, branch.full_beta)
            branch.probe_beta = torch.where(mask, branch.probe_alpha, branch.probe_beta)
            branch.full_alpha = torch.where(mask, full, branch.full_alpha)
            branch.probe_alpha = torch.where(mask, probe, branch.probe_alpha)
        # A sample whose residuals are not finite (NaN / inf features) must not be extrapolated from: its windows
        # restart, so it computes until it has a finite residual again.
        finite = torch.isfinite(full).flatten(1).all(1) & torch.isfinite(probe).flatten(1).all(1)
        steps = branch.computed_steps
        if self.context_parallel is not None:  # this rank's shard only: the reset waits for the next all-reduce
            reset = compute & ~finite
            branch.pending_reset = reset if branch.pending_reset is None else branch.pending_reset | reset
            finite = torch.ones_like(finite)
        branch.computed_steps = torch.where(compute, torch.where(finite, steps + 1, 0), steps)

    # ----- bookkeeping -----
    def end_step(self, state) -> None:
        branch = state.policy_state
        branch.block_input_prev, branch.probe_prev = branch.block_input, branch.probe
        branch.block_input = branch.probe = branch.compute = branch.approx = None

    def held_bytes(self, policy_state: ProbeBranch) -> int:
        return policy_state.held_bytes()

    def drop_tensors(self, policy_state: ProbeBranch) -> None:
        policy_state.drop_tensors()

    def records(self, policy_state: ProbeBranch) -> dict:
        return policy_state.records()
