"""The demo's grid is labelled: its size follows the columns and rows, and the labels are drawn (not blank)."""

import numpy as np
import torch
from PIL import Image

from invardiff.bench.timing import speedup_figures
from invardiff.demo import save_labelled_grid


def test_labelled_grid_layout(tmp_path):
    full = torch.zeros(3, 1, 16, 16)
    cached = torch.ones(3, 1, 16, 16)
    report = {
        "model": "dit-digits", "preset": "fast", "num_inference_steps": 50, "ideal_speedup": 2.7,
        "cases": [{"input": c, "seed": 0} for c in (0, 3, 5)], **speedup_figures([2.1, 2.2, 2.3], 2.7),
        "psnr": 31.0, "worst": {"psnr": 27.0}, "lpips": 0.01, "per_image": {"psnr": [30.0, 31.0, 32.0]},
    }  # fmt: skip
    path = tmp_path / "grid.png"
    save_labelled_grid(full, cached, report, path)
    grid = np.asarray(Image.open(path).convert("L"))
    tile, left, title, caption = 128, 150, 48, 14 + 8  # 16 px images scaled 8x; one caption line per column
    row_top = title + caption
    assert grid.shape[0] == row_top + 2 * (tile + 18) + 6 + 4
    assert grid.shape[1] >= left + 3 * (tile + 6)
    assert (grid[row_top : row_top + tile, left : left + tile] == 0).all()  # full compute's first image
    second_row = row_top + tile + 18 + 6
    assert (grid[second_row : second_row + tile, left : left + tile] == 255).all()  # the cached one, below
    assert (grid[:title, :] < 128).any()  # the title's text
    assert (grid[row_top:second_row, :left] < 128).any() and (grid[second_row:, :left] < 128).any()  # row labels
    assert (grid[second_row + tile :, left : left + tile] < 128).any()  # the PSNR under the cached image
