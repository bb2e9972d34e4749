"""The sweep (bench/sweep.py) on a fake pipeline: one pipeline per sweep, points attached only for their own runs,
and only a point's own failure recorded as "cannot run"; full compute's and the metrics' failures are errors."""

from __future__ import annotations

import pytest
import torch

from invardiff.bench import sweep
from invardiff.bench.sweep import OperatingPoint, SweepInputs, run_sweep


class _Transformer(torch.nn.Module):
    def forward(self, hidden_states):
        return hidden_states @ torch.eye(hidden_states.shape[-1])  # a matmul: FLOPs to count


class _Pipeline:
    """Images of 0.5 plus whatever offset the attached point set; counts full-compute runs."""

    def __init__(self):
        self.transformer = _Transformer()
        self.offset = 0.0
        self.full_runs = 0

    def __call__(self) -> torch.Tensor:
        images = (self.transformer(hidden_states=torch.full((2, 3, 16, 16), 0.5)) + self.offset).clamp(0, 1)
        self.full_runs += self.offset == 0.0
        return images


def _inputs(factory) -> SweepInputs:
    return SweepInputs("fake", factory, lambda pipe: pipe(), [{"input": 0, "seed": 0}], torch.device("cpu"))


def _offset_point(label: str, offset: float, log: list | None = None) -> OperatingPoint:
    def attach(pipe):
        pipe.offset = offset
        if log is not None:
            log.append("attach")

        def detach():
            pipe.offset = 0.0
            if log is not None:
                log.append("detach")

        return detach

    return OperatingPoint("fake", label, attach, {"offset": offset})


def _failing_run_point(label: str) -> OperatingPoint:
    def attach(pipe):
        original = pipe.transformer.forward
        pipe.transformer.forward = lambda hidden_states: (_ for _ in ()).throw(AssertionError("too few blocks"))
        return lambda: setattr(pipe.transformer, "forward", original)

    return OperatingPoint("fake", label, attach)


def _failing_attach_point(label: str) -> OperatingPoint:
    def attach(pipe):
        raise TypeError("no CacheMixin")

    return OperatingPoint("fake", label, attach)


def test_one_pipeline_per_sweep_and_points_detached_between_their_runs():
    pipes = []

    def factory():
        pipes.append(_Pipeline())
        return pipes[-1]

    log = []
    points = [_offset_point("a", 0.1, log), _failing_run_point("b"), _offset_point("c", 0.2)]
    results = {r["label"]: r for r in run_sweep(_inputs(factory), points, rounds=2)}
    assert len(pipes) == 1  # every point, and full compute, ran on the one pipeline
    # Point a: attached for its counted warm-up run and each of its 2 timed runs, detached after each.
    assert log == ["attach", "detach"] * 3
    # Full compute ran with nothing attached: once at the start, once per timed round of the 2 measured points.
    assert pipes[0].full_runs == 1 + 2 * 2
    assert results["a"]["psnr"] == pytest.approx(20.0, abs=1e-3)  # 0.1 off everywhere: 20 dB
    assert results["c"]["psnr"] == pytest.approx(13.98, abs=1e-2)
    assert results["a"]["rounds"] == 2 and set(results["a"]["seconds"]) == {"full", "point"}
    assert results["a"]["ideal_speedup"] == 1.0  # the point skips no work


def test_a_point_whose_own_method_fails_cannot_run_and_says_why():
    inputs = _inputs(_Pipeline)
    points = [_failing_attach_point("attach fails"), _failing_run_point("run fails"), _offset_point("fine", 0.1)]
    results = {r["label"]: r for r in run_sweep(inputs, points, rounds=1)}
    assert results["attach fails"]["error"] == "TypeError('no CacheMixin')"
    assert results["run fails"]["error"] == "AssertionError('too few blocks')"
    assert "psnr" not in results["run fails"]
    assert results["fine"]["psnr"] == pytest.approx(20.0, abs=1e-3)  # the failed point was detached


def test_a_failing_metric_is_an_error_not_a_point_that_cannot_run(monkeypatch):
    def broken_fidelity(images, references):
        raise RuntimeError("Input type (torch.cuda.FloatTensor) and weight type (torch.FloatTensor) differ")

    monkeypatch.setattr(sweep, "output_fidelity", broken_fidelity)
    with pytest.raises(RuntimeError, match="weight type"):
        run_sweep(_inputs(_Pipeline), [_offset_point("a", 0.1)], rounds=1)


def test_a_failing_full_compute_run_is_an_error():
    class FlakyPipeline(_Pipeline):
        def __call__(self):
            if self.offset == 0.0 and self.full_runs == 1:  # full compute's first timed run
                raise RuntimeError("CUDA out of memory")
            return super().__call__()

    with pytest.raises(RuntimeError, match="out of memory"):
        run_sweep(_inputs(FlakyPipeline), [_offset_point("a", 0.1)], rounds=1)
