"""Fidelity metrics against full compute: PSNR, SSIM (torchmetrics) and LPIPS-AlexNet (offline weights) on images,
and per frame on videos with clip PSNR and a temporal error."""

from .image import LPIPS, fidelity, lpips, psnr, ssim
from .video import clip_psnr, output_fidelity, temporal_error, video_fidelity
