"""Fidelity metrics against full compute: PSNR, SSIM (torchmetrics) and LPIPS-AlexNet (offline weights)."""

from .image import LPIPS, fidelity, lpips, psnr, ssim
