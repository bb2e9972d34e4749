"""`wan-motion`: the procedural clips and their detector, the pixel-space WanPipeline around the model, and the
learning check of the bundled weights (trained vs random weights)."""

import logging

import pytest
import torch

from invardiff.models import motion, wan_motion


def _as_output(clip):
    """(3, F, H, W) in [-1, 1] -> (F, 3, H, W) in [0, 1], the pipeline's output layout."""
    return (clip.permute(1, 0, 2, 3) + 1) / 2


def test_clips_move_as_prompted_and_the_detector_reads_every_prompt_back():
    generator = torch.Generator().manual_seed(0)
    clips = torch.stack([_as_output(motion.render(*a, generator=generator)) for a in motion.ALL_ATTRIBUTES])
    assert clips.shape == (64, 8, 3, 32, 32) and len(set(motion.ALL_PROMPTS)) == 64
    assert motion.agreement(clips, motion.ALL_ATTRIBUTES) == 1.0
    found = motion.detect(clips[motion.ALL_ATTRIBUTES.index(("red", "circle", "left", "fast"))])
    assert (found["colour"], found["direction"], found["speed"]) == ("red", "left", "fast")
    assert motion.prompt_for("red", "circle", "left", "fast") == "a red circle moving left fast"


def test_a_path_is_centred_and_moves_the_prompted_distance_per_frame():
    centres = motion.path("up", "slow", torch.zeros(2))
    assert centres[:, 0].tolist() == pytest.approx([0.5] * 8)
    assert centres[:, 1].diff().tolist() == pytest.approx([-0.03] * 7, abs=1e-6)  # float32 coordinates
    assert float(centres[:, 1].mean()) == pytest.approx(0.5)


def test_the_detector_fails_clips_that_do_not_move_or_show_nothing():
    generator = torch.Generator().manual_seed(0)
    clip = _as_output(motion.render("red", "circle", "left", "fast", generator=generator))
    frozen = clip[:1].expand(8, -1, -1, -1)
    assert motion.detect(frozen)["speed"] == "slow"  # no displacement
    assert motion.agreement(frozen[None], [("red", "circle", "left", "fast")]) == 0.0
    empty = motion.background()[None].expand(8, -1, -1, -1)
    assert motion.detect(empty) == {"colour": None, "direction": None, "speed": None, "position": None}
    reversed_clip = clip.flip(0)
    assert motion.detect(reversed_clip)["direction"] == "right"


def test_the_pipeline_samples_8_frame_clips_in_pixel_space_without_frame_warnings(caplog):
    pipe = wan_motion.build_pipeline()
    with caplog.at_level(logging.WARNING):
        video = pipe("a red circle moving left fast", num_inference_steps=2, output_type="pt").frames
    assert video.shape == (1, 8, 3, 32, 32) and 0 <= float(video.min()) and float(video.max()) <= 1
    assert not [r for r in caplog.records if "num_frames" in r.getMessage()]
    latents = pipe("a red circle moving left fast", num_inference_steps=2, output_type="latent").frames
    # the identity VAE: the decoded clip is the latent mapped from [-1, 1] to [0, 1]
    generator = torch.Generator().manual_seed(5)
    decoded = pipe("a blue square moving up slow", num_inference_steps=2, output_type="pt", generator=generator)
    generator = torch.Generator().manual_seed(5)
    raw = pipe("a blue square moving up slow", num_inference_steps=2, output_type="latent", generator=generator)
    expected = (raw.frames.permute(0, 2, 1, 3, 4) / 2 + 0.5).clamp(0, 1)
    assert latents.shape == (1, 3, 8, 32, 32) and torch.allclose(decoded.frames, expected, atol=1e-6)
    with pytest.raises(ValueError, match="8 frames"):
        pipe("a red circle moving left fast", num_frames=9)


def test_prompts_are_words_of_the_bundled_tokenizer():
    pipe = wan_motion.build_pipeline()
    ids = pipe.tokenizer("a red circle moving left fast").input_ids
    assert len(ids) == 7 and pipe.tokenizer.unk_token_id not in ids  # six words and </s>
    embeds = wan_motion.encode(pipe, ["a red circle moving left fast", ""])
    assert embeds.shape == (2, wan_motion.MAX_SEQUENCE_LENGTH, wan_motion.TEXT_WIDTH)
    assert embeds[1, 1:].abs().sum() == 0  # the empty prompt: </s> then padding zeros


@pytest.mark.slow
def test_learning_check_of_the_bundled_weights():
    from invardiff.models import checks, get, load

    pipe, entry = load("wan-motion"), get("wan-motion")
    clips, cases = checks.motion_samples(pipe, entry)
    assert clips.shape == (20, 8, 3, 32, 32) and len(set(cases)) == 20
    assert motion.agreement(clips, cases) >= 0.8
    generator = torch.Generator().manual_seed(0)
    for parameter in pipe.transformer.parameters():  # the same architecture with random weights
        torch.nn.init.normal_(parameter, std=0.02, generator=generator)
    random_clips, _ = checks.motion_samples(pipe, entry)
    # chance of matching colour, direction and speed together is about 1/32
    assert motion.agreement(random_clips, cases) <= 0.25


def test_calibrate_on_the_bundled_model_samples_its_clip_size(tmp_path):
    # The memory estimate and the runs used WanPipeline's default clip (81 frames of 480p) and failed.
    import json

    from invardiff.cli.main import main

    (tmp_path / "prompts.txt").write_text("a red circle moving up fast\n")
    argv = ["calibrate", "--model", "wan-motion", "--prompts", str(tmp_path / "prompts.txt"), "--steps", "6"]
    assert main([*argv, "--preset", "debug-args", "-o", str(tmp_path / "plan.json")]) == 0
    recorded = json.loads((tmp_path / "plan.json").read_text())["provenance"]["calibration"]["pipeline_kwargs"]
    assert (recorded["height"], recorded["width"], recorded["num_frames"]) == (32, 32, 8)
