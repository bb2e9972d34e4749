"""Output files are written atomically: a write that fails part way (here a full disk, simulated with the process's
file-size limit, which makes a write past it fail with EFBIG as ENOSPC would) leaves the previous file intact, or no
file, and no temporary file; an interrupted append to a JSON-lines log leaves it readable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from invardiff import CachePlan, ModelFacts
from invardiff.files import append_json_line, atomic_path, read_json_lines


resource = pytest.importorskip("resource", reason="the file-size limit that simulates a full disk is POSIX")
LIMIT = 256  # bytes a file may reach on the "full disk"; every output below is larger, "old" is smaller
OLD = b"old"


@contextmanager
def full_disk(limit: int = LIMIT):
    """Writes past ``limit`` bytes of a file fail with OSError (EFBIG; Python ignores SIGXFSZ) until the end."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _plan(steps: int = 28) -> CachePlan:
    facts = ModelFacts.for_family("flux", {"transformer_blocks": 2, "single_transformer_blocks": 6})
    plan = CachePlan.reuse_nothing(facts, steps)
    plan.step_cache[4:24:2] = True
    return plan


def _rates():
    from invardiff.calibration import CalibrationRates, preset
    from invardiff.calibration.thresholds import FAMILY_CALIBRATION

    facts = ModelFacts.for_family("dit", {"transformer_blocks": 2})
    kinds = {f"{b.name}.{k}": b.num_layers for b in facts.block_lists for k in b.module_kinds}
    rng = np.random.default_rng(0)
    step, modules = rng.random((2, 6)) + 0.1, {k: rng.random((2, 6, n)) + 0.1 for k, n in kinds.items()}
    return CalibrationRates(facts, 6, preset("dit", "fast"), FAMILY_CALIBRATION["dit"], step, modules, step, modules)


def _trajectories():
    from invardiff.calibration.trajectory import STEP_STREAM, TrajectoryStats

    facts = ModelFacts.for_family("dit", {"transformer_blocks": 2})
    return TrajectoryStats(facts, 6, 2, {STEP_STREAM: np.ones((6, 3))}, {STEP_STREAM: 4}, 2)


def _manifest_image(path: Path) -> None:
    from invardiff.scale import Manifest, WorkItem

    image = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)  # noise: a PNG over 256 bytes
    Manifest(path.parent, {"model": "toy"}).record(WorkItem(3, 0), image, {})


def _bench_results(path: Path) -> None:
    from invardiff.bench.report import write_results

    write_results([{"book": "x" * 1000}], path.parent, path.stem, table=lambda results, meta: "x" * 1000)


CLIP = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # (F, C, H, W)
WRITERS = {  # name: (file name, write(path))
    "plan": ("plan.json", lambda path: _plan().save(path)),
    "rates": ("plan.rates.npz", lambda path: _rates().save(path)),
    "trajectories": ("plan.trajectories.npz", lambda path: _trajectories().save(path)),
    "plot": ("plan.png", lambda path: __import__("invardiff.plot").plot.plot_plan(_plan(), path)),
    "gif": ("clip.gif", lambda path: __import__("invardiff.video_files").video_files.save_gif(CLIP, path)),
    "frame strip": (
        "frames.png",
        lambda path: __import__("invardiff.video_files").video_files.save_frame_strip([("a", CLIP[None])], path),
    ),
    "manifest image": ("class3-seed0.png", _manifest_image),
    "bench report": ("bench.json", _bench_results),
}


@pytest.mark.parametrize(
    ("name", "exists"), [(name, True) for name in WRITERS] + [(name, False) for name in WRITERS if name != "plot"]
)
def test_a_write_on_a_full_disk_leaves_the_old_file_and_no_partial_one(name, exists, tmp_path):
    filename, write = WRITERS[name]
    write(tmp_path / "check" / filename)  # the real output is larger than the limit: the write must fail
    assert (tmp_path / "check" / filename).stat().st_size > LIMIT
    path = tmp_path / "out" / filename
    path.parent.mkdir()
    if exists:
        path.write_bytes(OLD)
    with full_disk(), pytest.raises(OSError, match="too large"):
        write(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ([filename] if exists else [])
    if exists:
        assert path.read_bytes() == OLD


def test_atomic_path_renames_only_a_complete_file(tmp_path):
    path = tmp_path / "sub" / "report.json"  # a missing parent is created
    with atomic_path(path) as temporary:
        temporary.write_text("{}")
        assert temporary.parent == path.parent and temporary.suffix == ".json" and not path.exists()
    assert path.read_text() == "{}"
    with pytest.raises(RuntimeError, match="writer failed"), atomic_path(path) as temporary:
        temporary.write_text('{"half": ')
        raise RuntimeError("writer failed")
    assert path.read_text() == "{}" and [p.name for p in path.parent.iterdir()] == ["report.json"]


def test_an_interrupted_append_leaves_the_log_readable(tmp_path):
    from invardiff.scale import Manifest, WorkItem

    settings = {"model": "toy"}
    manifest = Manifest(tmp_path, settings)
    manifest.record(WorkItem(3, 0), np.zeros((2, 2, 1), np.uint8), {})
    log = tmp_path / "manifest.jsonl"
    line = log.read_text()
    log.write_text(line + line[: len(line) // 2])  # a second line cut short by a full disk
    again = Manifest(tmp_path, settings)  # the cut line is skipped: its item counts as not done
    assert list(again.records) == ["class3-seed0"]
    again.record(WorkItem(4, 0), np.zeros((2, 2, 1), np.uint8), {})
    assert [r["key"] for r in read_json_lines(log)] == ["class3-seed0", "class4-seed0"]
    append_json_line(tmp_path / "new.jsonl", {"a": 1})
    assert (tmp_path / "new.jsonl").read_text() == '{"a": 1}\n'


@pytest.mark.slow  # a subprocess importing torch: 5-25 s
def test_resample_plan_on_a_full_disk_fails_cleanly_and_keeps_the_old_plan(tmp_path):
    """The CLI case: `resample-plan` on a full disk exits with one line and status 2, and the plan it would have
    replaced is intact (it used to be truncated to what fitted). A subprocess: the limit covers its every write."""
    source, output = tmp_path / "plan.json", tmp_path / "resampled.json"
    _plan().save(source)
    output.write_bytes(OLD)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    argv = [sys.executable, "-m", "invardiff.cli.main", "resample-plan", str(source), "--steps", "14"]
    done = subprocess.run([*argv, "-o", str(output)], capture_output=True, text=True, env=env, preexec_fn=limit)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("invardiff resample-plan: error:") and "too large" in lines[0]
    assert output.read_bytes() == OLD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "resampled.json"]
    json.loads(source.read_text())  # the source untouched
