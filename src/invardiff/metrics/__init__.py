"""Fidelity metrics against full compute: PSNR, SSIM (torchmetrics) and LPIPS-AlexNet (offline weights)."""

from .image import LPIPS, lpips, psnr, ssim
