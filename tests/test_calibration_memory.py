"""Calibration at real sizes: one reference feature per stream, host syncs per step, memory estimate, batch size."""

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sync_counter import count_host_syncs

from invardiff.calibration import RateRecorder, calibrate
from invardiff.cli.main import main
from invardiff.families import get_family
from invardiff.memory import calibration_memory
from invardiff.model_configs import MODEL_CONFIGS
from invardiff.toy_pipelines import build_pipeline


F = [0.0, 1.0, 3.0, 4.0, 4.5, 6.0, 10.0]  # exact in bfloat16; increments 1, 2, 1, 0.5, 1.5, 4
FIRST_PASS = [2 / 1, 1 / 2, 0.5 / 1, 1.5 / 0.5, 4 / 1.5]
CORRECTED = [2.0, 0.5, 0.5, (6 - 4) / (4 - 3), (10 - 6) / (6 - 4)]  # provisional reuse at j = 2, 3 (SPEC.md A.3)


def _recorder(T, provisional=None, offload=None):
    return RateRecorder([], get_family("dit"), T, provisional, epsilon=0.0, offload=offload)


def _feed(recorder, values, dtype=torch.float32, start=0):
    for k, value in enumerate(values, start):
        recorder.on_hidden(SimpleNamespace(name="default", step=k), torch.full((1, 3), float(value), dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offload", [None, "cpu"])
def test_one_reference_in_the_feature_dtype_gives_the_same_rates(dtype, offload):
    provisional = {"step": np.array([False, False, True, True, False, False, False])}
    for frozen, expected in ((None, FIRST_PASS), (provisional, CORRECTED)):
        recorder = _recorder(len(F), frozen, offload)
        _feed(recorder, F[:3], dtype)
        stream = recorder.branches["default"]["step"]
        assert stream.reference.dtype == dtype and stream.reference.device.type == "cpu"
        # One (1, 3) feature in the model's dtype, one float32 denominator, one pending float32 rate.
        assert recorder.held_bytes() == {"references": 3 * dtype.itemsize, "scalars": 4 + 4, "streams": 1}
        _feed(recorder, F[3:], dtype, start=3)
        _feed(recorder, F, dtype)  # a second run: step 0 ends the first
        step, _ = recorder.rates()
        assert step.shape == (2, len(F))
        for run in step:  # |f| sums three equal elements: the ratios are exact
            assert run[1:-1].tolist() == pytest.approx(expected, rel=1e-7)


def test_the_reference_is_a_copy_not_the_model_output():
    recorder = _recorder(len(F))
    for k, value in enumerate(F):
        feature = torch.full((1, 2), value)
        recorder.on_hidden(SimpleNamespace(name="default", step=k), feature)
        feature.fill_(1e6)  # a model that reuses its output buffer must not move the references
    step, _ = recorder.rates()
    assert step[0, 1:-1].tolist() == pytest.approx(FIRST_PASS)


def test_finish_frees_the_references_and_keeps_the_rates():
    recorder = _recorder(len(F))
    _feed(recorder, F)
    recorder.finish()
    assert recorder.held_bytes()["references"] == 0
    assert recorder.rates()[0][0, 1:-1].tolist() == pytest.approx(FIRST_PASS)


def test_sync_counter_counts_conversions_once_and_restores_torch():
    original_item = torch.Tensor.item
    t = torch.tensor([1.5, 2.5])
    with count_host_syncs() as syncs:
        t[0].item()
        bool(t[0])
        float(t[1])
        np.asarray(t)  # __array__ calls numpy(): one sync
        t.to("cpu")  # already on the host: no copy
        t.to(torch.float64)
        t.tolist()
    assert syncs.count == 5
    assert dict(syncs.methods) == {"item": 1, "__bool__": 1, "__float__": 1, "__array__": 1, "tolist": 1}
    assert syncs.at("tests/test_calibration_memory.py") == 5
    assert torch.Tensor.item is original_item and "__bool__" not in torch.Tensor.__dict__


@pytest.mark.parametrize("family", ["dit", "flux"])
def test_calibration_makes_at_most_one_host_sync_per_step(family):
    config = MODEL_CONFIGS[f"{family}-tiny"]
    pipe = build_pipeline(config, config.build_transformer(), text_encoders=family == "flux")
    if family == "flux":
        inputs = {"prompts": ["a red cat", "blue sky", "a house"]}
        inputs["pipeline_kwargs"] = {"height": 128, "width": 128, "max_sequence_length": 8}
    else:
        inputs = {"class_labels": [1, 5, 7]}
    T = 6
    with count_host_syncs() as syncs:
        calibrate(pipe, num_inference_steps=T, thresholds="fast", seeds=[3], batch_size=2, **inputs)
    # 2 passes x 2 pipeline calls x T steps. The rates exist from step 2 on and go to the host once per step:
    # T - 2 transfers per call, whatever the number of streams (the former recorder: one per stream and step).
    steps = 2 * 2 * T
    assert syncs.at("invardiff/calibration/recorder.py") == 2 * 2 * (T - 2), syncs.report()
    assert syncs.at("invardiff/calibration/") <= steps, syncs.report()


def test_flux_tiny_calibration_memory_by_hand():
    estimate = calibration_memory(MODEL_CONFIGS["flux-tiny"])
    # Hidden 32, 64 image + 8 text tokens, float32. Dual blocks (2): attn 64, context_attn 8, ff 64, context_ff 8
    # tokens; single blocks (4) over 72 tokens: attn 32 wide, mlp 128 wide; the step stream: 64 image tokens.
    dual = 2 * (64 + 8 + 64 + 8) * 32
    single = 4 * 72 * (32 + 128)
    references = 4 * (dual + single + 64 * 32)
    assert estimate == {
        "references": references,
        "scalars": 17 * (4 + 4),  # denominator and pending rate of 2 x 4 + 4 x 2 + 1 streams
        "working": 4 * 72 * 128,  # the float32 difference of the largest stream (a single-block mlp)
        "two_float32_references": 2 * references,
        "total": references + 17 * 8 + 4 * 72 * 128,
        "device": references + 17 * 8 + 4 * 72 * 128,
        "streams": 17,
    }
    offloaded = calibration_memory(MODEL_CONFIGS["flux-tiny"], offload="cpu")
    assert offloaded["working"] == 4 * 72 * 128 * 2  # the difference and the reference copied back
    assert offloaded["device"] == offloaded["scalars"] + offloaded["working"]


def test_inspect_calibration_memory_of_flux1_dev(capsys):
    assert main(["inspect", "--calibration-memory", "--model-config", "flux1-dev", "--json"]) == 0
    import json

    estimate = json.loads(capsys.readouterr().out)
    # bfloat16, hidden 3072, mlp 12288, 4096 image + 512 text tokens; 19 dual and 38 single blocks.
    dual = 19 * (4096 + 512 + 4096 + 512) * 3072
    single = 38 * 4608 * (3072 + 12288)
    assert estimate["references"] == 2 * (dual + single + 4096 * 3072)
    assert estimate["two_float32_references"] == 4 * estimate["references"]
    assert estimate["total"] <= 7 * 2**30  # the former recorder: 2 x 4 bytes per element, 24.1 GiB
    assert estimate["streams"] == 19 * 4 + 38 * 2 + 1
    assert main(["inspect", "--calibration-memory", "--model-config", "flux1-dev"]) == 0
    assert "calibration features per sample" in capsys.readouterr().out


def test_batch_size_from_the_memory_budget(caplog):
    config = MODEL_CONFIGS["dit-tiny"]
    pipe = build_pipeline(config, config.build_transformer())
    per_sample = calibration_memory(config)["total"]  # per transformer row; DiT calibrates without CFG: 1 row
    kwargs = dict(num_inference_steps=6, thresholds="fast", class_labels=[3, 4, 5])
    with caplog.at_level(logging.INFO, logger="invardiff.calibration.batching"):
        plan, _ = calibrate(pipe, memory_budget=2 * per_sample + 1, **kwargs)
    assert "calibration batch size 2 of 3 runs" in caplog.text
    explicit, _ = calibrate(pipe, batch_size=2, **kwargs)
    assert plan == explicit
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="invardiff.calibration.batching"):
        calibrate(pipe, memory_budget=per_sample - 1, **kwargs)
    assert "calibration batch size 1 of 3 runs" in caplog.text and "exceeds the budget" in caplog.text
    with pytest.raises(ValueError, match="offload must be one of"):
        calibrate(pipe, batch_size=2, offload="disk", **kwargs)
