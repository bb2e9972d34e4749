"""HiDream beyond the conformance kit: the pipeline keeps only the aspect ratio of a requested size (and the
transformer pads a non-square latent), so the call shape follows what the transformer computes on, and a non-square
run with a step-cached step equals the reference executor (the head cuts the image tokens out of the padded
sequence)."""

from __future__ import annotations

import torch

import invardiff
from invardiff.families import get_family
from invardiff.toy_pipelines import pipeline_call_kwargs

from helpers import facts_for, output_tensor, plan_from_bits, reference_pipeline, tiny_pipeline


T = 3


def _tokens_computed(pipe, kwargs) -> int:
    seen = []
    handle = pipe.transformer.x_embedder.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    try:
        pipe(**kwargs)
    finally:
        handle.remove()
    return seen[0]


def test_the_call_shape_is_what_the_transformer_computes_on():
    config, pipe = tiny_pipeline("hidream")
    call_shape = get_family("hidream").pipeline.call_shape
    base = pipeline_call_kwargs(config, 1)  # one step: only the shape of the call matters
    # The tiny pipeline's default area is 64x64 px (a 8x8 latent, 16 tokens); max_resolution pads to 64 tokens.
    cases = {(64, 64): 16, (128, 128): 16, (32, 128): 64}  # a larger square is scaled down; 1:4 is padded
    for (height, width), expected in cases.items():
        kwargs = {**base, "height": height, "width": width}
        shape = call_shape(pipe, kwargs)
        assert shape["image_tokens"] == _tokens_computed(pipe, kwargs) == expected, (height, width)
        assert shape["batch"] == 2  # guidance 5: batched CFG


def test_a_non_square_run_with_a_step_cached_step_equals_the_reference():
    # The step-cached step runs run_head on the padded, masked sequence: it must cut the image tokens as stock does.
    config, pipe = tiny_pipeline("hidream")
    plan = plan_from_bits(facts_for(pipe.transformer, "hidream"), "010")
    reference = reference_pipeline(config, pipe.transformer, plan)

    def run(target):
        return output_tensor(target(**{**pipeline_call_kwargs(config, T), "height": 32, "width": 128})).clone()

    expected = run(reference)
    with invardiff.enabled(pipe, plan):
        actual = run(pipe)
        assert invardiff.summary(pipe).branches["default"].step_status.tolist() == [0, 1, 0]
    assert actual.shape == (1, 4, 4, 16) and torch.equal(actual, expected)
    assert not torch.equal(actual, run(pipe))  # the step reuse changed the result
