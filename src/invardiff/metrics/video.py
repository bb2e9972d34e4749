"""Video fidelity against full compute: per-frame PSNR / SSIM / LPIPS (the image metrics of
:mod:`invardiff.metrics.image`, torchmetrics and offline LPIPS-AlexNet), clip PSNR, and a temporal metric.

Videos are batches in [0, 1] of shape (B, F, C, H, W), WanPipeline's ``output_type="pt"`` layout. Per-frame values
are averaged over frames and clips (the headline numbers), the worst frame and the worst clip are kept (a cache
that breaks one frame of one clip is visible there), and per clip values are listed.

The temporal metric asks whether the motion is kept: ``temporal`` is the root mean square, over pixels and frame
pairs, of the difference between the frame-to-frame changes of a video and those of its reference,
``sqrt(mean(((v[t+1] - v[t]) - (r[t+1] - r[t]))^2))``, in the images' [0, 1] units (0: the same motion). A cache
that freezes or jitters content between frames raises it even when each frame alone is close to its reference.
"""

from __future__ import annotations

import math

import torch

from .image import _as_float32_pair, lpips, psnr, ssim


def temporal_error(videos: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per clip: the RMS difference of frame-to-frame changes, (B,). Needs at least 2 frames."""
    videos, references = _as_video_pair(videos, references)
    if videos.shape[1] < 2:
        raise ValueError(f"The temporal metric needs at least 2 frames per clip, got {videos.shape[1]}.")
    change = videos.diff(dim=1) - references.diff(dim=1)
    return change.pow(2).flatten(1).mean(dim=1).sqrt()


def clip_psnr(videos: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per clip: PSNR of the whole clip (one mean squared error over all its frames), (B,), data range 1."""
    videos, references = _as_video_pair(videos, references)
    mse = (videos - references).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse)  # inf for identical clips, as torchmetrics' PSNR


def video_fidelity(videos: torch.Tensor, references: torch.Tensor) -> dict:
    """Per-frame PSNR, SSIM and LPIPS (means over all frames, worst frame, per clip means), clip PSNR and the
    temporal error of each video against its reference. Keys ``psnr`` / ``ssim`` / ``lpips`` and ``worst`` have
    the meaning of :func:`~invardiff.metrics.image.fidelity` with frames in place of images."""
    videos, references = _as_video_pair(videos, references)
    batch, frames = videos.shape[:2]
    per_frame = {
        name: metric(videos.flatten(0, 1), references.flatten(0, 1)).reshape(batch, frames)
        for name, metric in (("psnr", psnr), ("ssim", ssim), ("lpips", lpips))
    }
    per_clip = {name: values.mean(dim=1) for name, values in per_frame.items()}
    per_clip["clip_psnr"] = clip_psnr(videos, references)
    per_clip["temporal"] = temporal_error(videos, references) if frames > 1 else torch.zeros(batch)
    return {
        **{name: _mean(values) for name, values in per_frame.items()},
        "clip_psnr": _mean(per_clip["clip_psnr"]),
        "temporal": _mean(per_clip["temporal"]),
        "worst": {
            "psnr": float(per_frame["psnr"].min()),
            "ssim": float(per_frame["ssim"].min()),
            "lpips": float(per_frame["lpips"].max()),
            "clip_psnr": float(per_clip["clip_psnr"].min()),
            "temporal": float(per_clip["temporal"].max()),
        },
        "per_clip": {name: values.tolist() for name, values in per_clip.items()},
        "per_frame": {name: values.tolist() for name, values in per_frame.items()},
    }


def _mean(values: torch.Tensor) -> float:
    # A mean of PSNRs with an identical frame (inf) is inf: say so rather than average it away.
    value = float(values.float().mean())
    return math.inf if math.isinf(value) else value


def _as_video_pair(videos: torch.Tensor, references: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if videos.ndim != 5:
        raise ValueError(
            f"Video metrics need batches of clips (B, F, C, H, W) in [0, 1], got shape {tuple(videos.shape)}; "
            f"for single images use invardiff.metrics.fidelity."
        )
    return _as_float32_pair(videos, references)


def output_fidelity(outputs: torch.Tensor, references: torch.Tensor) -> dict:
    """:func:`video_fidelity` for clips (B, F, C, H, W), :func:`~invardiff.metrics.image.fidelity` for images
    (B, C, H, W): what a benchmark of any bundled model reports against full compute."""
    from .image import fidelity

    return video_fidelity(outputs, references) if outputs.ndim == 5 else fidelity(outputs, references)
