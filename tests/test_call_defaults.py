"""The FLOP profile the budgeted search plans with is taken at the shapes the pipeline really runs: a pipeline
subclass's own call defaults (the bundled flux-shapes: 32x32 images, 16 T5 tokens) count, not the stock ones."""

from __future__ import annotations

import torch

from invardiff.calibration.batching import pipeline_call_config
from invardiff.models import flux_shapes


def test_flux_shapes_call_config_has_the_shapes_the_transformer_sees():
    torch.manual_seed(0)
    pipe = flux_shapes.build_pipeline()
    seen = {}

    def capture(module, args, kwargs):
        seen["image"] = kwargs["hidden_states"].shape[1]
        seen["text"] = kwargs["encoder_hidden_states"].shape[1]

    handle = pipe.transformer.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        pipe(prompt="a red circle", num_inference_steps=1, output_type="pt")
    finally:
        handle.remove()
    config = pipeline_call_config(pipe, "flux", {"num_inference_steps": 1})
    assert (config.image_tokens, config.text_tokens) == (seen["image"], seen["text"]) == (256, 16)
