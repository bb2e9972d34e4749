"""The command line: inspect prints SPEC.md A.7's fractions, JSON for scripts, conversion, plots, bench."""

import json
import re
import struct

import pytest

from invardiff.cli.main import main
from invardiff.official import bundled_books

from test_official import EXPECTED


def _convert(book, tmp_path, capsys):
    out = tmp_path / (book.replace("/", "-") + ".json")
    assert main(["convert-official", str(bundled_books()[book]), "--family", book.split("/")[0], "-o", str(out)]) == 0
    capsys.readouterr()
    return out


@pytest.mark.parametrize("book", sorted(EXPECTED))
def test_inspect_prints_the_spec_fractions(book, tmp_path, capsys):
    plan = _convert(book, tmp_path, capsys)
    assert main(["inspect", str(plan)]) == 0
    text = capsys.readouterr().out
    steps, fractions = EXPECTED[book]
    assert f"step-cached: {len(steps)} {steps}" in text
    for key, percent in fractions.items():
        if book.startswith("dit"):
            key = key.split(".")[1]  # a single block list: kinds are not prefixed
        assert re.search(rf"^{re.escape(key)}\s+{percent:.1f}%", text, re.M), (key, text)


def test_inspect_json_with_model_config(tmp_path, capsys):
    plan = _convert("flux/fast", tmp_path, capsys)
    assert main(["inspect", str(plan), "--json", "--model-config", "flux1-dev"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["num_steps"] == 28 and data["steps_reused"] == 17
    assert round(100 * data["modules"]["transformer_blocks.context_ff"]["reuse_fraction"], 1) == 72.0
    assert round(100 * data["modules"]["transformer_blocks.attn"]["reuse_fraction_outside_step_cache"], 1) == 36.4
    assert 3.50 < data["ideal_speedup"] < 3.56


def test_inspect_rejects_a_corrupt_plan(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert main(["inspect", str(bad)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err


def test_plot_writes_a_png(tmp_path, capsys):
    plan = _convert("dit/fast", tmp_path, capsys)
    png = tmp_path / "plan.png"
    assert main(["plot", str(plan), "-o", str(png)]) == 0
    header = png.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    assert width >= 800 and height >= 300


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["lockstep", "alternate"])
def test_bench_engine_json_on_the_tiny_full_depth_models(schedule, tmp_path, capsys):
    code = main(
        [
            "bench-engine",
            "--config",
            "tiny",
            "--family",
            "flux",
            "--books",
            "flux/fast",
            "--rounds",
            "1",
            "--schedule",
            schedule,
            "--out",
            str(tmp_path),
            "--json",
        ]
    )
    assert code == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["book"] for r in results] == ["flux/fast"]
    result = results[0]
    assert set(result) >= {"book", "measured_speedup", "ideal_speedup", "efficiency", "overhead", "peak_cache_bytes"}
    assert result["efficiency"] == pytest.approx(result["measured_speedup"] / result["ideal_speedup"])
    assert result["ideal_speedup"] > 1.5  # FLOP-counted: 17 of 28 steps skip the whole block stack
    assert 0 < result["peak_cache_bytes"] <= result["all_outputs_bytes"]
    assert (tmp_path / "bench-engine-tiny-cpu.md").read_text().count("| flux/fast |") == 1


def test_version_and_help_do_not_import_the_bench_stack():
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from invardiff.cli.main import main\n"
        "for argv in (['--version'], ['--help'], ['bench', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = ('invardiff.bench', 'invardiff.metrics', 'cache_dit')\n"
        "heavy = sorted(m for m in sys.modules if m.startswith(heavy))\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "invardiff 0" in done.stdout and "--methods" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "HEAVY []"


# The least each subcommand parses (no option whose value a registry checks: those import the registry when given).
MINIMAL_ARGV = {
    "demo": [],
    "models": [],
    "generate": ["--model", "dit-digits", "--class", "1", "-o", "out"],
    "calibrate": ["--model", "dit-digits", "--classes", "1", "-o", "plan.json"],
    "build-plan": ["rates.npz", "-o", "plan.json"],
    "resample-plan": ["plan.json", "--steps", "20", "-o", "p20.json"],
    "fit-memory": ["plan.json", "--max-cache-memory", "1GB", "-o", "fit.json"],
    "inspect": ["plan.json"],
    "convert-official": ["book.json", "-o", "plan.json"],  # --family is required: checked below, on its own
    "plot": ["plan.json", "-o", "plan.png"],
    "bench": [],
    "bench-engine": [],
}


def test_every_help_and_parse_imports_neither_torch_nor_diffusers():
    """Every subcommand's --help and argument parsing, in a fresh interpreter: the README promises help without
    torch (help took 23-42 s under load when the options' choices came from the family registry)."""
    import subprocess
    import sys

    script = (
        "import contextlib, io, sys\n"
        "from invardiff.cli.main import COMMANDS, build_parser\n"
        f"minimal = {MINIMAL_ARGV!r}\n"
        "assert sorted(minimal) == sorted(name for name, *_ in COMMANDS), 'a subcommand without a minimal argv'\n"
        "for name, *_ in COMMANDS:\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as text:\n"
        "        try:\n"
        "            build_parser().parse_args([name, '--help'])\n"
        "        except SystemExit:\n"
        "            pass\n"
        "    assert 'usage: invardiff ' + name in text.getvalue(), name\n"
        "    if name != 'convert-official':\n"
        "        build_parser().parse_args([name, *minimal[name]])\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "HEAVY []"


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (
            ["bench-engine", "--family", "no-such-family"],
            "invalid choice: 'no-such-family' (families with benchmark configs: ",  # every registered family follows
        ),
        (["convert-official", "b.json", "--family", "hunyuanvideo", "-o", "p.json"], "(families with official books:"),
        (["generate", "--model", "m", "--class", "1", "--dicache-preset", "x", "-o", "o"], "(DiCache presets: flux,"),
    ],
)
def test_registry_options_are_checked_exactly_when_given(argv, says, capsys):
    from invardiff.cli.arguments import bench_families
    from invardiff.cli.main import build_parser

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert says in capsys.readouterr().err
    assert "hunyuanvideo" in bench_families()  # no official books, but a benchmark config
    assert build_parser().parse_args(["bench-engine", "--family", *bench_families()]).family == bench_families()


def test_bench_methods_are_checked_when_parsed(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--methods", "dicache", "teacache"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'teacache'" in capsys.readouterr().err


def test_demo_runs_on_the_device_given(monkeypatch, tmp_path, capsys):
    import invardiff.demo

    calls = {}

    def fake_run_demo(target, preset, seeds, rounds, device="cpu", progress=None):
        calls.update(name=target.name, device=device)
        return {"report": True}, {}

    monkeypatch.setattr(invardiff.demo, "run_demo", fake_run_demo)
    monkeypatch.setattr(invardiff.demo, "write_report", lambda report, images, out: {})
    assert main(["demo", "--model", "dit-digits", "--device", "meta", "--json", "--out", str(tmp_path)]) == 0
    assert calls == {"name": "dit-digits", "device": "meta"}
    assert json.loads(capsys.readouterr().out) == {"report": True}


def test_only_the_command_line_prints():
    import ast
    from pathlib import Path

    import invardiff

    package = Path(invardiff.__file__).parent
    printing = [
        f"{path.relative_to(package)}:{node.lineno}"
        for path in package.rglob("*.py")
        if "cli" not in path.relative_to(package).parts
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print"
    ]
    assert printing == []  # library code logs (logging.getLogger(__name__)); the CLI prints
