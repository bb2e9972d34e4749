"""Heatmaps of a cache plan: the step gate c[t] and every module kind's C[t, layer] (needs matplotlib)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .files import atomic_path
from .plan import CachePlan


def plot_plan(plan: CachePlan, path: str | Path, title: str | None = None) -> None:
    """Write a PNG: one strip for c[t], then one (layers x steps) heatmap per module kind.

    Colours: computed (light), reused (dark), and step-cached steps (mid grey) where nothing executes.
    """
    Figure, ListedColormap = _matplotlib()

    panels = [
        (f"{facts.name}.{kind}", plan.module_reuse[facts.name][kind])
        for facts in plan.model.block_lists
        for kind in facts.module_kinds
    ]
    heights = [0.6] + [max(1.2, m.shape[1] * 0.06) for _, m in panels]
    figure = Figure(figsize=(10, sum(heights) + 1.2))
    axes = figure.subplots(len(heights), 1, gridspec_kw={"height_ratios": heights}, squeeze=False)
    colours = ListedColormap(["#f2efe6", "#1f4e79", "#a6a6a6"])  # compute, reuse, step-cached
    T = plan.num_inference_steps
    step_row = plan.step_cache.astype(int)[None, :]
    _heatmap(axes[0, 0], step_row, colours, f"step gate c[t]: {int(plan.step_cache.sum())}/{T} steps step-cached")
    axes[0, 0].set_yticks([])
    for axis, (name, matrix) in zip(axes[1:, 0], panels, strict=True):
        shown = matrix.T.astype(int)  # (L, T)
        shown[:, plan.step_cache] = 2
        outside = matrix[~plan.step_cache]
        label = (
            f"{name}: reuse {matrix.mean():.1%} of all, {outside.mean() if outside.size else 0:.1%} outside step cache"
        )
        _heatmap(axis, shown, colours, label)
        axis.set_ylabel("layer")
    axes[-1, 0].set_xlabel("step t (0 = noisiest)")
    figure.suptitle(title or _default_title(plan), fontsize=10)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=120)


def _matplotlib():
    # A bare Figure renders through its own canvas: no pyplot, so the process-wide backend and pyplot's figure
    # list stay as the caller set them.
    try:
        from matplotlib.colors import ListedColormap
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("Plotting needs matplotlib: pip install 'invardiff[plots]'.") from error
    return Figure, ListedColormap


def _heatmap(axis, data: np.ndarray, colours, title: str) -> None:
    axis.imshow(data, aspect="auto", interpolation="nearest", cmap=colours, vmin=0, vmax=2)
    axis.set_title(title, fontsize=9, loc="left")
    axis.set_xticks(range(0, data.shape[1], max(1, data.shape[1] // 14)))


def _default_title(plan: CachePlan) -> str:
    source = plan.provenance.get("source", {}).get("file") or plan.provenance.get("policy", "plan")
    return (
        f"{plan.model.model_class}, {plan.num_inference_steps} steps: {source}\n"
        f"light: compute, dark: reuse, grey: step-cached (nothing executes)"
    )


def plot_rates(rates, path: str | Path, thresholds=None) -> None:
    """Write a PNG: the run-averaged step-rate curve (first pass and corrected) with the step threshold, then one
    (layers x steps) heatmap of corrected rates per module kind, with the reused cells of the plan marked."""
    Figure, _ = _matplotlib()
    from .calibration.build import module_level, quantile_threshold

    thresholds = thresholds or rates.thresholds
    plan = rates.build_plan(thresholds, correction="stored")
    first_step, _ = rates.mean("first")
    corrected_step, corrected_modules = rates.mean("corrected")
    kinds = list(corrected_modules)
    figure = Figure(figsize=(10, 2.6 + 1.9 * len(kinds)))
    axes = figure.subplots(1 + len(kinds), 1, squeeze=False)
    axis = axes[0, 0]
    steps = np.arange(rates.num_steps)
    axis.plot(steps, first_step, "o-", ms=3, label="first pass")
    step_rates = corrected_step if rates.family_options.correct_step else first_step
    if rates.family_options.correct_step:
        axis.plot(steps, corrected_step, "s-", ms=3, label="corrected")
    threshold = quantile_threshold(step_rates, thresholds.step)
    axis.axhline(threshold, color="k", ls="--", lw=1, label=f"threshold (quantile {thresholds.step})")
    cached = np.flatnonzero(plan.step_cache)
    axis.plot(cached, step_rates[cached], "x", color="crimson", label="step-cached")
    axis.set_title(f"step rate |H[t+1]-H[t]| / |H[t]-H[t-1]|, {rates.num_runs} runs", fontsize=9, loc="left")
    axis.legend(fontsize=7, ncol=4)
    for axis, kind in zip(axes[1:, 0], kinds, strict=True):
        matrix = corrected_modules[kind].T  # (L, T)
        image = axis.imshow(np.log2(matrix), aspect="auto", cmap="viridis", interpolation="nearest")
        block_list, name = kind.split(".", 1)
        reused = plan.module_reuse[block_list][name] & ~plan.step_cache[:, None]
        layers, times = np.nonzero(reused.T)
        axis.plot(times, layers, "s", ms=2.5, mfc="none", mec="crimson")
        level = module_level(thresholds, rates.family_options, kind)
        axis.set_title(f"{kind}: log2 corrected rate; squares = reused (quantile {level})", fontsize=9, loc="left")
        axis.set_ylabel("layer")
        axis.set_yticks(range(0, matrix.shape[0], max(1, matrix.shape[0] // 8)))
        figure.colorbar(image, ax=axis, fraction=0.02)
    axes[-1, 0].set_xlabel("step index j (0 = noisiest)")
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=110)
