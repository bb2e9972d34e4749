"""The numbers DiCache decides and extrapolates with (SPEC.md B.2, B.3), as pure tensor functions.

All reductions run in float32. ``per_sample=True`` reduces over every dimension but the batch; ``False`` over the
whole tensor, batch included (the official batch-global statistic), broadcast back to one value per sample.
"""

from __future__ import annotations

import torch


EPS = 1e-8  # in the denominator (SPEC.md decision 2): a zero reference gives a large error, never inf or NaN


def _mean_abs(value: torch.Tensor, per_sample: bool) -> torch.Tensor:
    value = value.float().abs()
    if per_sample:
        return value.flatten(1).mean(1)  # (B,)
    return value.mean().expand(value.shape[0])  # (B,), one value


def relative_l1(current: torch.Tensor, previous: torch.Tensor, per_sample: bool) -> torch.Tensor:
    """``mean|current - previous| / (mean|previous| + eps)`` per sample, float32 ``(B,)``."""
    return _mean_abs(current.float() - previous.float(), per_sample) / (_mean_abs(previous, per_sample) + EPS)


def probe_error(
    error: str,
    probe: torch.Tensor,
    probe_prev: torch.Tensor,
    block_input: torch.Tensor,
    block_input_prev: torch.Tensor,
    per_sample: bool,
) -> torch.Tensor:
    """e_k of SPEC.md B.2: ``delta_y`` = e_y, ``delta_minus`` = |e_y - e_x|. Float32 ``(B,)``."""
    e_y = relative_l1(probe, probe_prev, per_sample)
    if error == "delta_y":
        return e_y
    return (e_y - relative_l1(block_input, block_input_prev, per_sample)).abs()


def trajectory_gamma(
    probe_residual: torch.Tensor,
    probe_alpha: torch.Tensor,
    probe_beta: torch.Tensor,
    gamma_max: float,
    per_sample: bool,
) -> torch.Tensor:
    """gamma = clip(mean|r - w_beta| / mean|w_alpha - w_beta|, 1, gamma_max), float32 ``(B,)``.

    The official code leaves the denominator unprotected (SPEC.md C.2 item 8). Here a zero denominator gives
    ``gamma_max`` when the numerator is positive (the official inf, clipped) and 1 when it is zero too (0/0: the
    probe residual has not moved, so plain residual reuse); a NaN gives 1. The output is always finite.
    """
    numerator = _mean_abs(probe_residual.float() - probe_beta.float(), per_sample)
    denominator = _mean_abs(probe_alpha.float() - probe_beta.float(), per_sample)
    return gamma_from_means(numerator, denominator, gamma_max)


def gamma_from_means(numerator: torch.Tensor, denominator: torch.Tensor, gamma_max: float) -> torch.Tensor:
    """gamma from its two means (``(B,)`` each), protected as :func:`trajectory_gamma` describes. Also used when
    the means are reduced over the ranks of a context-parallel group (:mod:`invardiff.scale.distributed`)."""
    ratio = numerator / denominator.clamp_min(torch.finfo(numerator.dtype).tiny)
    ratio = torch.where(denominator > 0, ratio, torch.where(numerator > 0, gamma_max, 1.0))
    return ratio.nan_to_num(nan=1.0, posinf=gamma_max).clamp(1.0, gamma_max)


def extrapolate(
    block_input: torch.Tensor,
    full_alpha: torch.Tensor,
    full_beta: torch.Tensor,
    gamma: torch.Tensor,
    has_two: torch.Tensor,
    add_input_last: bool = True,
) -> torch.Tensor:
    """Y = x + W_beta + gamma (W_alpha - W_beta) where a sample has two computed steps, else x + W_alpha.

    ``add_input_last``: ``x + (W_beta + gamma (W_alpha - W_beta))``, the order of FLUX's and WAN's official
    ``x += ...``; else ``(x + W_beta) + gamma (W_alpha - W_beta)``, HunyuanVideo's. Both cost the same; they differ
    by float rounding only (up to a few ulps of x). Computed in float32 and returned in the input's dtype.
    ``gamma`` and ``has_two`` are ``(B,)``.
    """
    shape = (-1,) + (1,) * (block_input.ndim - 1)
    x, alpha, beta = block_input.float(), full_alpha.float(), full_beta.float()
    step = gamma.view(shape) * (alpha - beta)
    extrapolated = x + (beta + step) if add_input_last else (x + beta) + step
    return torch.where(has_two.view(shape), extrapolated, x + alpha).to(block_input.dtype)
