"""benchmarks/gpu_check.py: the GPU figures script, checked on the CPU (its dry run, its time budget)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from invardiff.bench import peers
from invardiff.bench.plans import bench_plan
from invardiff.flops import profile_flops
from invardiff.stats import ideal_speedup


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check as script  # noqa: E402


NA = "n/a (CPU dry run)"


def test_a_section_that_does_not_fit_the_budget_is_skipped_with_its_reason_and_reported(tmp_path):
    assert (
        script.main(["--dry-run", "--out", str(tmp_path), "--sections", "flux-compiled", "--budget-s", "0.001"]) == 0
    )
    report = json.loads((tmp_path / "gpu-check-dry-run.json").read_text())
    compiled = report["sections"]["flux-compiled"]
    assert compiled["status"] == "skipped"
    assert compiled["reason"].startswith(f"needs ~{compiled['estimate_s']:.0f} s by its FLOP-counted estimate")
    assert "| flux-compiled | skipped |" in (tmp_path / "gpu-check-dry-run.md").read_text()


def test_the_budget_turns_flops_into_seconds_at_the_assumed_then_the_measured_rate():
    now = [0.0]
    budget = script.Budget(100.0, clock=lambda: now[0])
    work = script.Work(flops=script.ASSUMED_FLOPS_PER_S / script.MARGIN * 50, calls=100, fixed_s=10)
    assert budget.seconds(work) == pytest.approx(50 + 100 * script.CALL_OVERHEAD_S + 10)
    assert budget.refusal(work) is None
    now[0] = 50.0  # 50 s left: 61 s of work no longer fits
    assert "61 s" in budget.refusal(work) and "50 s left of the 100 s budget" in budget.refusal(work)
    budget.measured(flops_per_run=4e12, seconds_per_run=2.0)  # 2 TFLOP/s measured
    assert budget.seconds(script.Work(flops=2e12)) == pytest.approx(script.MEASURED_MARGIN)


def test_peers_run_at_given_settings_only():
    chosen = peers.peers(peers.LOOP, 28, settings={"diffusers-fbcache": (0.6,), "cache-dit": (0.8,)})
    assert [p.label for p in chosen] == ["FBCache thr=0.6", "DBCache F1B0 thr=0.8"]
    with pytest.raises(ValueError, match=r"Unknown peer methods \['fbcache'\]"):
        peers.peers(peers.LOOP, 28, settings={"fbcache": (0.6,)})


@pytest.mark.slow
def test_dry_run_reports_every_section_with_well_formed_figures(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    script_path = str(ROOT / "benchmarks" / "gpu_check.py")
    # A budget no load can exhaust: the test checks every section's figures, not the machine's speed.
    command = [sys.executable, script_path, "--dry-run", "--out", str(tmp_path), "--budget-s", "3600"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-check-dry-run.json").read_text())
    markdown = (tmp_path / "gpu-check-dry-run.md").read_text()
    sections = report["sections"]
    assert list(sections) == list(script.SECTIONS)
    assert {name: s["status"] for name, s in sections.items()} == dict.fromkeys(script.SECTIONS, "done")
    assert report["environment"]["dry_run"] and report["environment"]["diffusers"]
    configs = script.configs(dry_run=True)

    for family in ("flux", "dit", "wan", "hunyuanvideo"):
        rows = sections[family]["rows"]
        config = configs[family]
        nothing, *books = rows
        assert nothing["book"] == "reuse-nothing" and nothing["ideal_speedup"] == 1.0
        assert nothing["estimated_peak_cache_bytes"] == 0
        assert [r["book"] for r in books] == sections[family]["books"]
        for row in books:
            # ideal: the plan's FLOP ratio as invardiff.stats computes it; the meta-device estimate is the engine's
            # own accounting of the real run, byte for byte
            plan = bench_plan(row["book"], config)
            assert row["ideal_speedup"] == pytest.approx(ideal_speedup(plan, profile_flops(config)), rel=1e-12)
            assert row["efficiency"] == pytest.approx(row["measured_speedup"] / row["ideal_speedup"])
            assert row["overhead"] == nothing["overhead"]
            assert row["estimated_peak_cache_bytes"] == row["peak_cache_bytes"] > 0
        for row in rows:
            assert {row[key] for key in script.MEASURED_KEYS} == {NA}

    checks = sections["flux"]["acceptance"]
    speed = [c for c in checks if c["figure"] in ("measured speedup", "efficiency", "overhead")]
    assert len(speed) == 3 and all(isinstance(c["passed"], bool) and "dry run" in c["note"] for c in speed)
    device_only = [c for c in checks if c not in speed]
    assert len(device_only) == 3 and all(c["passed"] is None and c["value"] == NA for c in device_only)
    assert "Self CPU time total" in sections["flux"]["profiles"]["flux/fast"]

    compiled = sections["flux-compiled"]["rows"]
    assert [r["method"] for r in compiled] == ["invardiff", "diffusers-fbcache"]
    assert all(r["compiled"] == "compile_repeated_blocks (eager)" and r["compiled_graphs"] > 0 for r in compiled)
    (dicache,) = sections["wan"]["dicache"]["rows"]
    assert dicache["method"] == "dicache" and dicache["settings"] == {"preset": "wan2.1"}
    methods = [r["method"] for r in sections["flux-peers"]["rows"]]
    assert methods == ["invardiff", "diffusers-fbcache", "diffusers-magcache", "diffusers-taylorseer", "cache-dit"]
    for name in ("flux", "dit", "flux-compiled", "wan", "hunyuanvideo", "flux-peers"):
        assert f"## {name}: " in markdown
    assert "| reuse-nothing | " in markdown and NA in markdown and "Profile of one run, flux/fast" in markdown
