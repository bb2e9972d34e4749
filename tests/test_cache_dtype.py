"""Cache storage dtypes (engine/storage.py): the codec, the plan field (format version 3), runs on a tiny pipeline."""

import json

import pytest
import torch

import invardiff
from invardiff.engine.state import tensor_bytes
from invardiff.engine.storage import CacheCodec
from invardiff.plan import CachePlan, PlanError

from helpers import facts_for, plan_from_bits, run_pipeline, tiny_pipeline


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16", "float16"])
def test_cast_storage_round_trips_to_the_models_dtype(model_dtype, cache_dtype):
    value = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0)).to(model_dtype)
    codec = CacheCodec(cache_dtype)
    stored = codec.encode((value, value[:, :2]))  # tuple outputs (Flux's joint attention) element by element
    assert tensor_bytes(stored) == (80 + 32) * getattr(torch, cache_dtype).itemsize
    back = codec.decode(stored)
    assert isinstance(back, tuple) and back[0].dtype == model_dtype
    expected = value.to(getattr(torch, cache_dtype)).to(model_dtype)  # exactly one rounding to the storage dtype
    assert torch.equal(back[0], expected)


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_storage_has_a_per_tensor_scale_and_e4m3_precision(model_dtype):
    value = (torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * 30).to(model_dtype)
    stored = CacheCodec("float8_e4m3fn").encode(value)
    assert stored.data.dtype == torch.float8_e4m3fn and stored.scale.dtype == torch.float32
    assert stored.scale.device == value.device and stored.scale.ndim == 0
    assert tensor_bytes(stored) == 256 + 4
    back = CacheCodec("float8_e4m3fn").decode(stored)
    assert back.dtype == model_dtype
    # e4m3 keeps 3 mantissa bits: rounding is within 2^-4 of the value for normals, and within half the subnormal
    # step (2^-10 of the scaled range 448) near 0; the model dtype's own rounding of the result is added on top.
    x, y, scale = value.float(), back.float(), stored.scale.float()
    eps = torch.finfo(model_dtype).eps
    assert ((y - x).abs() <= x.abs() * (2**-4 + 2 * eps) + scale * 2**-9).all()
    assert (y - x).abs().max() > 0  # it is a lossy format: the test would notice a silent no-op


def test_fp8_storage_of_zeros_and_the_meta_device():
    zeros = CacheCodec("float8_e4m3fn").decode(CacheCodec("float8_e4m3fn").encode(torch.zeros(3, 4)))
    assert torch.equal(zeros, torch.zeros(3, 4))  # scale 1, no division by zero
    meta = CacheCodec("float8_e4m3fn").encode(torch.empty(3, 4, device="meta", dtype=torch.bfloat16))
    assert meta.data.device.type == "meta" and tensor_bytes(meta) == 12 + 4


def test_codec_refuses_unknown_dtypes():
    with pytest.raises(ValueError, match="cache_dtype must be one of"):
        CacheCodec("int8")


# ----- the plan field -----
def _plan(cache_dtype=None):
    from invardiff.model_configs import MODEL_CONFIGS

    transformer = MODEL_CONFIGS["flux-tiny"].build_transformer("meta")
    facts = facts_for(transformer, "flux")
    plan = plan_from_bits(facts, "0010", {"transformer_blocks": {"ff": ["00", "11", "00", "11"]}})
    plan.cache_dtype = cache_dtype
    return plan


def test_cache_dtype_is_a_version_3_field_that_round_trips(tmp_path):
    plain = _plan().to_dict()
    assert plain["format_version"] == 1 and "cache_dtype" not in plain  # plans without it are unchanged
    plan = CachePlan.from_dict(_plan("float8_e4m3fn").to_dict())
    data = plan.to_dict()
    assert data["format_version"] == 3 and data["cache_dtype"] == "float8_e4m3fn"
    plan.save(tmp_path / "p.json")
    assert CachePlan.load(tmp_path / "p.json").cache_dtype == "float8_e4m3fn"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(format_version=2), "cache_dtype needs format_version 3"),
        (lambda d: d.update(cache_dtype="int8"), "cache_dtype must be one of"),
        (lambda d: d.pop("cache_dtype"), "format_version 3 is for plans with a cache_dtype"),
        (lambda d: d.update(step_extrapolation=[0.0, 0.0, 0.5, 0.0]), "both a cache_dtype and extrapolation"),
    ],
)
def test_malformed_cache_dtype_is_refused(change, message):
    data = json.loads(json.dumps(_plan("bfloat16").to_dict()))
    change(data)
    with pytest.raises(PlanError, match=message):
        CachePlan.from_dict(data)


def test_plan_probe_refuses_a_cache_dtype():
    from invardiff.dicache.config import PlanProbeConfig

    with pytest.raises(ValueError, match="cache_dtype 'bfloat16'"):
        PlanProbeConfig(_plan("bfloat16"), threshold=0.1)


# ----- runs -----
T = 8
MODULES = {
    "transformer_blocks": {"ff": ["00", "11", "11", "00", "10", "11", "00", "00"]},
    "single_transformer_blocks": {"mlp": ["0000", "0011", "0011", "1100", "0000", "0101", "1111", "0000"]},
}


@pytest.mark.slow
def test_runs_with_a_cache_dtype_on_a_pipeline():
    config, pipe = tiny_pipeline("flux")  # float32
    facts = facts_for(pipe.transformer, "flux")
    outputs, peaks = {}, {}
    for dtype in (None, "float32", "bfloat16", "float8_e4m3fn"):
        plan = plan_from_bits(facts, "00110110", MODULES)
        plan.cache_dtype = dtype
        with invardiff.enabled(pipe, plan):
            outputs[dtype] = run_pipeline(pipe, config, T)
            peaks[dtype] = invardiff.summary(pipe).peak_cache_bytes
    assert torch.equal(outputs["float32"], outputs[None])  # storing in the model's own dtype changes nothing
    assert peaks["float32"] == peaks[None] == 2 * peaks["bfloat16"]
    for dtype in ("bfloat16", "float8_e4m3fn"):
        error = (outputs[dtype] - outputs[None]).abs().max()
        assert 0 < error < 0.1 * outputs[None].abs().max()  # rounded reuses: close to the plain plan, not equal


def test_the_cli_offers_exactly_the_storage_dtypes_the_engine_has():
    # The CLI keeps its own torch-free list (cli/parsing.py); it must not drift from the engine's table.
    from invardiff.cli.parsing import CACHE_DTYPES as offered
    from invardiff.engine.storage import CACHE_DTYPES as stored

    assert sorted(offered) == sorted(stored)
