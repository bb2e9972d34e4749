"""``invardiff generate --classes ... [--ray --workers 2]`` and ``invardiff calibrate --ray``: the Ray runs give the
single-process outputs, a rerun generates only the missing items. About 1-2 min on 2 busy cores (two Ray pools):
python -m pytest -q tests/test_scale_cli.py"""

from __future__ import annotations

import json

import pytest

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
