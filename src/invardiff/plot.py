"""Heatmaps of a cache plan: the step gate c[t] and every module kind's C[t, layer] (needs matplotlib)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .plan import CachePlan


def plot_plan(plan: CachePlan, path: str | Path, title: str | None = None) -> None:
    """Write a PNG: one strip for c[t], then one (layers x steps) heatmap per module kind.

    Colours: computed (light), reused (dark), and step-cached steps (mid grey) where nothing executes.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
    except ImportError as error:
        raise ImportError("Plotting needs matplotlib: pip install 'invardiff[plots]'.") from error

    panels = [
        (f"{facts.name}.{kind}", plan.module_reuse[facts.name][kind])
        for facts in plan.model.block_lists
        for kind in facts.module_kinds
    ]
    heights = [0.6] + [max(1.2, m.shape[1] * 0.06) for _, m in panels]
    figure, axes = plt.subplots(
        len(heights), 1, figsize=(10, sum(heights) + 1.2), gridspec_kw={"height_ratios": heights}, squeeze=False
    )
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
    figure.savefig(path, dpi=120)
    plt.close(figure)


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
