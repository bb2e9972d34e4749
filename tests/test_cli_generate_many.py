"""`invardiff generate` over many items without Ray, and output paths checked before any command works: a resume
with other settings is refused (it used to keep the images of the other settings and report them as done),
`--seeds` with one `--class` makes one image per seed (it used to be ignored), a video model writes its clips (it
used to raise AttributeError), and an output path that cannot be written is refused before the work starts."""

from __future__ import annotations

import json

import pytest
from test_cli_errors import one_error_line, run

from invardiff.cli import commands
from invardiff.cli.main import main


DIT = ["generate", "--model", "dit-digits", "--steps", "2"]


def _keys(directory) -> list[str]:
    return sorted(json.loads(line)["key"] for line in (directory / "manifest.jsonl").read_text().splitlines())


def test_a_resume_with_other_settings_is_refused_and_one_with_the_same_settings_skips(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main([*DIT, "--classes", "3", "-o", out]) == 0
    first = (tmp_path / "out" / "class3-seed0.png").read_bytes()
    capsys.readouterr()
    code, err = run([*DIT[:-1], "3", "--classes", "3", "-o", out], capsys)  # 3 steps instead of 2
    line = one_error_line(err)
    assert code == 2 and "holds 1 output(s) made with other settings" in line
    assert "call.num_inference_steps: 2 there, 3 now" in line and "--overwrite" in line and "-o DIR" in line
    code, err = run([*DIT, "--classes", "3", "--policy", "dicache", "-o", out], capsys)
    assert code == 2 and "policy: None there, DiCacheConfig(...) now" in one_error_line(err)
    assert main([*DIT, "--classes", "3,5", "-o", out]) == 0  # the same settings: a resume
    assert "wrote 1 image(s)" in capsys.readouterr().out
    assert _keys(tmp_path / "out") == ["class3-seed0", "class5-seed0"]
    assert (tmp_path / "out" / "class3-seed0.png").read_bytes() == first
    assert main([*DIT[:-1], "3", "--classes", "3", "--overwrite", "-o", out]) == 0
    assert "wrote 1 image(s)" in capsys.readouterr().out and _keys(tmp_path / "out") == ["class3-seed0"]
    assert (tmp_path / "out" / "class3-seed0.png").read_bytes() != first  # 3 steps now


def test_seeds_with_one_class_make_one_image_per_seed(tmp_path):
    assert main([*DIT, "--class", "3", "--seeds", "0,1", "-o", str(tmp_path / "many")]) == 0
    assert _keys(tmp_path / "many") == ["class3-seed0", "class3-seed1"]
    assert main([*DIT, "--class", "3", "--seed", "1", "-o", str(tmp_path / "one")]) == 0
    one = (tmp_path / "one" / "dit-digits-seed1.png").read_bytes()
    assert (tmp_path / "many" / "class3-seed1.png").read_bytes() == one


def test_a_video_model_over_many_prompts_writes_the_clips_of_single_generation(tmp_path):
    prompt = "a red square moving down slow"
    (tmp_path / "prompts.txt").write_text(prompt + "\n")
    common = ["generate", "--model", "wan-motion", "--steps", "2"]
    assert main([*common, "--prompts", str(tmp_path / "prompts.txt"), "-o", str(tmp_path / "many")]) == 0
    assert main([*common, "--prompt", prompt, "-o", str(tmp_path / "one")]) == 0
    [record] = [json.loads(line) for line in (tmp_path / "many" / "manifest.jsonl").read_text().splitlines()]
    assert record["file"].endswith("-seed0.gif")
    one = (tmp_path / "one" / "wan-motion-seed0.gif").read_bytes()
    assert (tmp_path / "many" / record["file"]).read_bytes() == one


def _file(tmp_path):
    (tmp_path / "a-file").write_text("keep")
    return "a-file"


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["demo", "--out", "a-file"], "--out a-file is a file; expected a directory"),
        (["generate", "--model", "dit-digits", "--class", "3", "-o", "a-file"], "-o a-file is a file"),
        (["generate", "--model", "dit-digits", "--classes", "3", "-o", "a-file"], "-o a-file is a file"),
        (["bench", "--out", "a-file"], "--out a-file is a file"),
        (["bench-engine", "--out", "a-file"], "--out a-file is a file"),
        (
            ["calibrate", "--model", "dit-digits", "--classes", "1", "--preset", "fast", "-o", "."],
            "-o . is a directory; expected a file name",
        ),
        (["resample-plan", "p.json", "--steps", "4", "-o", "a-file/plan.json"], "a-file is a file, so a-file/plan"),
        (["build-plan", "r.npz", "-o", "a-file/sub/plan.json"], "a-file is a file"),
        (["plot", "p.json", "-o", "a-file/x.png"], "a-file is a file"),
        (["convert-official", "b.json", "--family", "flux", "-o", "a-file/plan.json"], "a-file is a file"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_an_output_path_that_cannot_be_written_is_refused_before_the_work(argv, says, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _file(tmp_path)
    handler = {"bench-engine": "bench_engine", "build-plan": "build_plan", "resample-plan": "resample_plan",
               "convert-official": "convert_official", "generate": "generate"}.get(argv[0], argv[0])  # fmt: skip

    def work(args):
        raise AssertionError("the command started its work")

    monkeypatch.setattr(commands, handler, work)
    code, err = run(argv, capsys)
    assert code == 2 and says in one_error_line(err)
    assert (tmp_path / "a-file").read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_steps_other_than_the_plans_are_refused_before_the_work(tmp_path, monkeypatch, capsys):
    from invardiff import CachePlan, ModelFacts
    from invardiff.models import get
    from invardiff.scale import runner

    layers = json.loads((get("dit-digits").directory / "config.json").read_text())["num_layers"]
    facts = ModelFacts.for_family("dit", {"transformer_blocks": layers})  # the plan fits: only its steps are wrong
    CachePlan.reuse_nothing(facts, 4).save(tmp_path / "plan.json")
    monkeypatch.setattr(runner, "ItemRunner", None)  # a worker would be a started work
    argv = [*DIT[:-1], "5", "--classes", "3", "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "out")]
    code, err = run(argv, capsys)
    assert code == 2 and "--steps 5 does not match the plan's 4 steps" in one_error_line(err)


def test_an_unwritable_output_directory_is_refused_before_the_work(tmp_path, monkeypatch, capsys):
    from invardiff.cli import outputs

    monkeypatch.chdir(tmp_path)
    # permission bits do not bind root (these tests may run as root): the check's access test is what is replaced
    monkeypatch.setattr(outputs.os, "access", lambda path, mode: False)
    monkeypatch.setattr(commands, "demo", lambda args: pytest.fail("the demo started its work"))
    code, err = run(["demo", "--out", "reports/demo"], capsys)
    assert code == 2 and f"--out reports/demo: {tmp_path} is not writable (permission denied)" in one_error_line(err)
