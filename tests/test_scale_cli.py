"""``invardiff generate --classes ... [--ray --workers 2]`` and ``invardiff calibrate --ray``: the Ray runs give the
single-process outputs, a rerun generates only the missing items. About 1-2 min on 2 busy cores (two Ray pools):
python -m pytest -q tests/test_scale_cli.py"""

from __future__ import annotations

import json
import signal

import pytest
from test_cli_errors import one_error_line, run

from invardiff.cli.main import main


ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _ray_down_after():
    yield
    ray.shutdown()  # the commands start a local Ray in this process and leave it up, as a CLI process would


def _digests(directory) -> dict:
    lines = (directory / "manifest.jsonl").read_text().splitlines()
    return {record["key"]: record["output_sha256"] for record in map(json.loads, lines)}


def test_generate_on_ray_equals_one_process_and_a_rerun_adds_only_new_items(tmp_path, capsys):
    common = ["generate", "--model", "dit-digits", "--steps", "4", "--seeds", "0,1"]
    assert main([*common, "--classes", "0,5", "-o", str(tmp_path / "local")]) == 0
    assert main([*common, "--classes", "0,5", "--ray", "--workers", "2", "-o", str(tmp_path / "ray")]) == 0
    assert _digests(tmp_path / "ray") == _digests(tmp_path / "local")
    assert len(_digests(tmp_path / "ray")) == 4
    capsys.readouterr()
    assert main([*common, "--classes", "0,5,7", "--ray", "--workers", "2", "-o", str(tmp_path / "ray")]) == 0
    out = capsys.readouterr().out
    assert "wrote 2 image(s)" in out and "(4 already there)" in out
    assert sorted(_digests(tmp_path / "ray")) == sorted(f"class{c}-seed{s}" for c in (0, 5, 7) for s in (0, 1))


def test_calibrate_on_ray_writes_the_single_process_plan(tmp_path):
    common = ["calibrate", "--model-config", "dit-tiny", "--classes", "1,2,3", "--steps", "6", "--preset", "fast"]
    common += ["--batch-size", "1"]
    assert main([*common, "-o", str(tmp_path / "single.json")]) == 0
    assert main([*common, "--ray", "--workers", "2", "-o", str(tmp_path / "ray.json")]) == 0
    assert (tmp_path / "ray.json").read_bytes() == (tmp_path / "single.json").read_bytes()


def test_workers_without_ray_is_refused(tmp_path, capsys):
    assert main(["generate", "--model", "dit-digits", "--classes", "1", "--workers", "2", "-o", str(tmp_path)]) == 2
    assert "need --ray" in capsys.readouterr().err


@pytest.fixture
def bounded():
    """A hang fails the test after 3 minutes instead of stopping the suite."""

    def hang(*_):
        raise TimeoutError("the command hung")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(180)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--gpus-per-worker", "1000"], "1 Ray worker(s) with 1000 GPU(s) each need 1000 GPU(s), but the Ray cluster"),
        (["--workers", "999"], "999 Ray worker(s) with 1 CPU(s) each need 999 CPU(s), but the Ray cluster has"),
    ],
)
def test_workers_beyond_the_cluster_are_refused_at_once(options, says, tmp_path, capsys, bounded):
    argv = ["generate", "--model", "dit-digits", "--classes", "1", "--ray", *options, "-o", str(tmp_path / "out")]
    code, err = run(argv, capsys)
    assert code == 2 and says in one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_a_video_model_on_ray_writes_the_clips_of_one_process(tmp_path, bounded):
    (tmp_path / "prompts.txt").write_text("a red square moving down slow\na blue circle moving left slow\n")
    common = ["generate", "--model", "wan-motion", "--steps", "2", "--prompts", str(tmp_path / "prompts.txt")]
    assert main([*common, "-o", str(tmp_path / "local")]) == 0
    assert main([*common, "--ray", "--workers", "2", "-o", str(tmp_path / "ray")]) == 0
    assert _digests(tmp_path / "ray") == _digests(tmp_path / "local") and len(_digests(tmp_path / "ray")) == 2
    for gif in (tmp_path / "local").glob("*.gif"):
        assert (tmp_path / "ray" / gif.name).read_bytes() == gif.read_bytes()


def test_actors_that_cannot_be_placed_time_out(tmp_path, bounded):
    from invardiff.scale import PipelineSource
    from invardiff.scale.actors import Workers
    from invardiff.scale.ray_pool import GenerationPool

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False)
    held = ray.util.placement_group([{"CPU": ray.cluster_resources()["CPU"]}])  # another job holds every CPU
    ray.get(held.ready(), timeout=60)
    try:
        with pytest.raises(TimeoutError, match=r"1 of 1 Ray worker\(s\) did not start within 3 s \(free now: 0 CPU"):
            GenerationPool(PipelineSource("bundled", "dit-digits"), Workers(1, timeout=3))
    finally:
        ray.util.remove_placement_group(held)
