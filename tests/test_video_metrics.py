"""Video metrics on hand-checkable clips: per-frame PSNR / SSIM / LPIPS, worst frame and clip, clip PSNR, and the
temporal error (difference of frame-to-frame changes)."""

import math

import pytest
import torch

from invardiff.metrics import clip_psnr, temporal_error, video_fidelity


def _offset_clip(offsets):
    """A reference clip (1, F, 3, 16, 16) of 0.5 and a video equal to it plus ``offsets[f]`` on frame f."""
    reference = torch.full((1, len(offsets), 3, 16, 16), 0.5)
    video = reference + torch.tensor(offsets)[None, :, None, None, None]
    return video, reference


def test_one_broken_frame_shows_in_the_worst_frame_the_clip_psnr_and_the_temporal_error():
    video, reference = _offset_clip([0.01, 0.01, 0.1, 0.01])
    result = video_fidelity(video, reference)
    # frames: MSE 1e-4 -> 40 dB (three of them), 1e-2 -> 20 dB
    assert result["per_frame"]["psnr"][0] == pytest.approx([40, 40, 20, 40], abs=1e-3)
    assert result["psnr"] == pytest.approx((3 * 40 + 20) / 4, abs=1e-3)
    assert result["worst"]["psnr"] == pytest.approx(20, abs=1e-3)
    # the clip: one MSE over all frames, (3e-4 + 1e-2) / 4
    assert result["clip_psnr"] == pytest.approx(10 * math.log10(4 / (3e-4 + 1e-2)), abs=1e-3)
    # changes differ by +0.09 into frame 2 and -0.09 out of it, 0 elsewhere: RMS 0.09 sqrt(2/3)
    assert result["temporal"] == pytest.approx(0.09 * math.sqrt(2 / 3), rel=1e-5)
    assert result["ssim"] <= 1.0 and result["lpips"] >= 0.0


def test_a_constant_offset_keeps_the_motion():
    video, reference = _offset_clip([0.1, 0.1, 0.1])
    assert temporal_error(video, reference).tolist() == pytest.approx([0.0], abs=1e-7)
    assert clip_psnr(video, reference).tolist() == pytest.approx([20.0], abs=1e-4)


def test_a_frozen_video_has_exact_frames_where_the_reference_stands_still_and_loses_its_motion():
    reference = torch.zeros(1, 3, 1, 4, 4)
    reference[0, 2, :, 0, 0] = 1.0  # one pixel lights up in the last frame
    frozen = reference[:, :1].expand(-1, 3, -1, -1, -1).clone()
    # change of the reference: 0, then 1 at one of 16 pixels; of the video: 0, 0 -> mean square 1 / 32
    assert temporal_error(frozen, reference).tolist() == pytest.approx([math.sqrt(1 / 32)], rel=1e-6)


def test_identical_clips():
    video = torch.rand(2, 3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    result = video_fidelity(video, video.clone())
    assert result["lpips"] == 0.0 and result["temporal"] == 0.0
    assert result["ssim"] == pytest.approx(1.0) and math.isinf(result["psnr"])
    assert len(result["per_clip"]["psnr"]) == 2 and len(result["per_frame"]["lpips"][1]) == 3


def test_bad_shapes_are_refused_with_the_expected_layout():
    with pytest.raises(ValueError, match=r"\(B, F, C, H, W\)"):
        video_fidelity(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="equal shapes"):
        video_fidelity(torch.zeros(1, 2, 3, 8, 8), torch.zeros(1, 3, 3, 8, 8))
    with pytest.raises(ValueError, match="at least 2 frames"):
        temporal_error(torch.zeros(1, 1, 3, 8, 8), torch.zeros(1, 1, 3, 8, 8))
