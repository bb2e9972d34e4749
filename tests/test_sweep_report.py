"""Equal-speed interpolation and Pareto fronts of the speed-quality sweep, on hand-made points."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from invardiff.bench.sweep_report import at_speedup, equal_speed_table, markdown_table, pareto_front


def _p(speedup, lpips, psnr, method="m"):
    return {
        "method": method,
        "label": f"{speedup}",
        "measured_speedup": speedup,
        "lpips": lpips,
        "psnr": psnr,
        "ssim": 0.9,
        "ideal_speedup": speedup,
        "worst": {"lpips": lpips, "psnr": psnr, "ssim": 0.9},
    }


POINTS = [_p(1.5, 0.01, 35.0), _p(2.2, 0.05, 30.0), _p(2.0, 0.08, 28.0), _p(3.0, 0.09, 25.0)]


def test_pareto_front_drops_dominated_points():
    # (2.0, 0.08) is slower and worse than (2.2, 0.05): dominated.
    assert [p["measured_speedup"] for p in pareto_front(POINTS, "lpips")] == [1.5, 2.2, 3.0]
    assert [p["measured_speedup"] for p in pareto_front(POINTS, "psnr")] == [1.5, 2.2, 3.0]


def test_at_speedup_interpolates_linearly_along_the_front():
    # 2.0x lies 5/7 of the way from 1.5x (0.01) to 2.2x (0.05): 0.01 + 0.04 * 5/7.
    assert at_speedup(POINTS, "lpips", 2.0) == pytest.approx(0.01 + 0.04 * 5 / 7)
    # 2.5x lies 3/8 of the way from 2.2x (30 dB) to 3.0x (25 dB).
    assert at_speedup(POINTS, "psnr", 2.5) == pytest.approx(30.0 - 5.0 * 3 / 8)
    assert at_speedup(POINTS, "lpips", 3.5) is None  # never that fast: no extrapolation


def test_tables_say_when_a_peer_cannot_run():
    results = POINTS + [{"method": "peer", "label": "x", "settings": {}, "error": "TypeError('no CacheMixin')"}]
    meta = {"date": "d", "torch": "t", "device": "cpu", "threads": 2, "images": 8, "rounds": 3}
    assert "cannot run: TypeError('no CacheMixin')" in markdown_table("model", results, meta)
    table = equal_speed_table("model", results)
    assert "| m | 0.0386 | 31.43 | 0.0650 | 28.12 |" in table


def test_a_front_faster_than_the_target_shows_its_slowest_point():
    fast = [_p(2.3, 0.005, 39.0, "capped"), _p(2.6, 0.007, 37.0, "capped")]
    table = equal_speed_table("model", fast)
    # Below the slow end (2.3x) the 2x cells show that point; 2.5x interpolates: 0.005 + 0.002 * 2/3.
    assert "| capped | 0.0050 (at 2.30x) | 39.00 (at 2.30x) | 0.0063 | 37.67 |" in table
    slow = [_p(1.2, 0.001, 45.0, "slow"), _p(1.6, 0.002, 41.0, "slow")]
    assert "| slow | — | — | — | — |" in equal_speed_table("model", slow)


def test_the_sweep_table_shows_each_points_round_spread_and_timing_warnings():
    measured = {**_p(2.0, 0.01, 35.0), "spread": 0.11, "timing_warnings": ["2.0 on model: the rounds disagree"]}
    meta = {"date": "d", "torch": "t", "device": "cpu", "threads": 2, "images": 8, "rounds": 3}
    table = markdown_table("model", [measured, _p(3.0, 0.02, 30.0)], meta)
    assert "| m | 2.0 | 2.00x | 11% | 2.00x |" in table
    assert "| m | 3.0 | 3.00x | n/a | 3.00x |" in table  # a point recorded before spreads were
    assert "2.0 on model: the rounds disagree" in table


def test_a_resumed_sweep_reports_the_kept_points_too(tmp_path, monkeypatch):
    from invardiff.cli import commands
    from invardiff.cli.main import main

    committed = Path(__file__).parents[1] / "benchmarks/results/sweep/sweep-dit-digits.jsonl"
    kept = [json.loads(line) for line in committed.read_text().splitlines()[:3]]
    (tmp_path / "sweep-dit-digits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept[:2]))

    def run_one_point(args, target, inputs, jsonl, run):  # the run measures only the point it was asked for
        with open(jsonl, "a") as handle:
            handle.write(json.dumps(kept[2]) + "\n")
        return [kept[2]]

    monkeypatch.setattr(commands, "_run_bench", run_one_point)
    assert main(["bench", "--model", "dit-digits", "--resume", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "sweep-dit-digits.md").read_text()
    assert all(f"| {r['label']} |" in report for r in kept)


def test_points_from_several_runs_say_which_run_measured_them():
    first = {
        "date": "2026-11-30",
        "torch": "t",
        "device": "cpu",
        "threads": 2,
        "rounds": 3,
        "command": "invardiff bench",
    }
    second = {**first, "date": "2026-12-06", "threads": 1, "command": "invardiff bench --resume"}
    points = [{**_p(2.0, 0.01, 35.0), "run": first}, {**_p(3.0, 0.02, 30.0), "run": second}, _p(4.0, 0.03, 28.0)]
    meta = {"date": "now", "torch": "t", "device": "cpu", "threads": 2, "images": 8, "rounds": 3}
    table = markdown_table("model", points, meta)
    assert "The points come from 3 runs (column run): 1: 2026-11-30, torch t, cpu, 2 threads, 3 rounds, " in table
    assert "2: 2026-12-06, torch t, cpu, 1 threads, 3 rounds, `invardiff bench --resume`; 3: not recorded" in table
    assert "| m | 2.0 | 2.00x | n/a | 2.00x |" in table and table.count("| 1 |") == 1
    assert "| m | 3.0 | 3.00x |" in table and table.split("| m | 3.0 |")[1].split("\n")[0].endswith("| 2 |")
    assert table.split("| m | 4.0 |")[1].split("\n")[0].endswith("| 3 |")
    # One run: its own facts in the header (not the report's), no run column.
    single = markdown_table("model", points[:1], meta)
    assert "2026-11-30, torch t, cpu, 2 threads; 8 images per run; speedups are medians of 3 rounds" in single
    assert "Command: `invardiff bench`." in single and "| run |" not in single


def test_a_new_sweep_point_records_the_run_and_command_and_its_plan_is_saved(tmp_path, monkeypatch):
    from invardiff.bench import bundled, sweep
    from invardiff.bench.points import plan_point
    from invardiff.cli.main import main
    from invardiff.plan import CachePlan, ModelFacts

    plan = CachePlan.reuse_nothing(ModelFacts.for_family("dit", {"transformer_blocks": 2}), 4)
    point = plan_point("invardiff-frontier 4.5x", plan, {}, method="invardiff-frontier")

    def measure_the_point(inputs, points, rounds, on_result, done):  # the sweep's loop, without the sampling
        assert points == [point]
        result = {**_p(2.0, 0.01, 35.0), "label": point.label, "settings": {}}
        on_result(result)
        return [result]

    monkeypatch.setattr(bundled, "sweep_points", lambda *args: [point])
    monkeypatch.setattr(sweep, "run_sweep", measure_the_point)
    argv = ["bench", "--model", "dit-digits", "--rounds", "2", "--threads", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    result = json.loads((tmp_path / "sweep-dit-digits.jsonl").read_text())
    run = result["run"]
    assert run["command"] == "invardiff " + " ".join(argv) and (run["threads"], run["rounds"]) == (1, 2)
    assert f"Command: `{run['command']}`." in (tmp_path / "sweep-dit-digits.md").read_text()
    evaluation = run["evaluation"]
    assert (evaluation["steps"], evaluation["batch"], len(evaluation["cases"])) == (50, 1, 4)
    assert evaluation["calibration"] == [[1, 0], [2, 1], [4, 2], [6, 3], [7, 4], [9, 5]]
    assert result["plan_file"] == "plans/sweep-dit-digits/invardiff-frontier-4.5x.json"
    assert CachePlan.load(tmp_path / result["plan_file"]) == plan


def test_a_resume_refuses_points_evaluated_otherwise_before_any_work(tmp_path, monkeypatch, capsys):
    """--resume keeps a point only when it was evaluated on the same cases, batch, steps, sampling arguments and
    calibration runs (recorded in its run); the refusal names the setting and comes before any calibration."""
    from invardiff.bench import bundled, sweep
    from invardiff.bench.targets import bundled_target
    from invardiff.cli.main import main

    calibrated = []
    monkeypatch.setattr(bundled, "sweep_points", lambda *args: calibrated.append(1) or [])
    monkeypatch.setattr(sweep, "run_sweep", lambda inputs, points, rounds, on_result, done: [])
    argv = ["bench", "--model", "dit-digits", "--threads", "1", "--out", str(tmp_path), "--resume"]

    def kept_point(seeds: list[int]) -> dict:
        target = bundled_target("dit-digits")
        evaluation = bundled.sweep_evaluation(target, bundled.sweep_inputs(target, seeds))
        run = {"date": "d", "torch": "t", "device": "cpu", "threads": 1, "rounds": 3, "command": "invardiff bench"}
        run["evaluation"] = json.loads(json.dumps(evaluation))  # as the file holds it
        return {**_p(2.0, 0.01, 35.0), "settings": {}, "run": run}

    jsonl = tmp_path / "sweep-dit-digits.jsonl"
    jsonl.write_text(json.dumps(kept_point([0, 1])) + "\n")
    assert main(argv) == 2  # this run evaluates seed 0 only (the default --seeds)
    error = capsys.readouterr().err
    assert "holds '2.0', evaluated with cases = " in error and "--resume keeps points only under the same" in error
    assert calibrated == []
    assert main([*argv, "--seeds", "0,1"]) == 0 and calibrated == [1]  # the same settings: resumed
    jsonl.write_text(json.dumps({**_p(2.0, 0.01, 35.0), "settings": {}}) + "\n")  # no run record: kept unchecked
    assert main(argv) == 0 and calibrated == [1, 1]


def test_the_per_entry_cost_is_measured_once_by_the_run_and_never_by_a_report(tmp_path, monkeypatch):
    """The sweep's note on extrapolating points quotes the per-entry cost the run measured (in the points' run
    records); rewriting the report (--report-only) reads it back and times nothing."""
    from invardiff.bench import bundled, extrapolation_cost, sweep
    from invardiff.bench.points import plan_point
    from invardiff.cli.main import main
    from invardiff.plan import CachePlan, ModelFacts

    plan = CachePlan.reuse_nothing(ModelFacts.for_family("dit", {"transformer_blocks": 2}), 4)
    points = [plan_point(f"p{i}", plan, {}, method="invardiff-frontier") for i in range(3)]
    work = [None, {"steps": 3, "units": 0, "second_order_steps": 1}, {"steps": 0, "units": 2}]
    costs = {"step": {"elements": 10, "plain_us": 1.0, "extrapolated_us": 2.5}}
    measured = []

    def measure(target, device):
        measured.append(target.name)
        return costs

    def measure_the_points(inputs, points, rounds, on_result, done):  # the sweep's loop, without the sampling
        results = []
        for point, count in zip(points, work, strict=True):
            result = {**_p(2.0, 0.01, 35.0), "label": point.label, "settings": {"extrapolated_entries": count}}
            on_result(result)
            results.append(result)
        return results

    monkeypatch.setattr(bundled, "sweep_points", lambda *args: points)
    monkeypatch.setattr(sweep, "run_sweep", measure_the_points)
    monkeypatch.setattr(extrapolation_cost, "entry_costs", measure)
    assert main(["bench", "--model", "dit-digits", "--rounds", "1", "--out", str(tmp_path)]) == 0
    assert measured == ["dit-digits"]  # once, at the first extrapolating point
    records = [json.loads(line) for line in (tmp_path / "sweep-dit-digits.jsonl").read_text().splitlines()]
    assert ["entry_costs" in r for r in records] == [False, True, True] and records[1]["entry_costs"] == costs
    assert records[0]["run"] == records[1]["run"] == records[2]["run"]  # one run, one record of it
    report = (tmp_path / "sweep-dit-digits.md").read_text()
    line = f"Reused entry on dit-digits (one transformer call; the run of {records[1]['run']['date']}), measured: "
    assert line + "step (10 elements) 1.0 us plain, 2.5 us extrapolated." in report
    assert "- p1: 3 step-cached steps (1 at second order, two lerps each) and 0 unit reuses extrapolate" in report
    assert "- p2: 0 step-cached steps and 2 unit reuses extrapolate per run" in report and "- p0" not in report

    monkeypatch.setattr(extrapolation_cost, "extrapolation_costs", lambda *a, **k: pytest.fail("a report timed"))
    (tmp_path / "sweep-dit-digits.md").unlink()
    assert main(["bench", "--model", "dit-digits", "--report-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "sweep-dit-digits.md").read_text() == report  # the same report, from the records alone
    # Points whose runs recorded no cost (before the record existed) say so instead of timing anything.
    for record in records:
        record.pop("entry_costs", None)
    (tmp_path / "sweep-dit-digits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["bench", "--model", "dit-digits", "--report-only", "--out", str(tmp_path)]) == 0
    rewritten = (tmp_path / "sweep-dit-digits.md").read_text()
    assert "Per-entry cost of a reused entry: not recorded by the runs of these points." in rewritten
    assert "Reused entry on" not in rewritten


def test_every_committed_sweep_points_plan_file_is_committed_beside_it():
    # A point's plan file (relative to its sweep's folder) is what the audit (benchmarks/sweep_audit.py) and a reader
    # make the point from again: sweep-aggressive/ once held frontier points copied from sweep/ without their plans.
    results = Path(__file__).parents[1] / "benchmarks/results"
    sweeps = sorted(results.glob("sweep*/sweep-*.jsonl"))
    assert len(sweeps) >= 9  # the bundled models' sweeps, their aggressive settings and the few-step sweeps
    for sweep in sweeps:
        for line in sweep.read_text().splitlines():
            record = json.loads(line)
            if record.get("plan_file"):
                assert (sweep.parent / record["plan_file"]).is_file(), (sweep.name, record["label"])


def test_sweep_folder_and_name_find_the_committed_sweeps():
    # benchmarks/frontier.py and sweep_audit.py read the committed sweeps through these two rules.
    from invardiff.bench.bundled import sweep_folder, sweep_name

    root = Path(__file__).parents[1]
    assert (root / sweep_folder() / f"sweep-{sweep_name('flux-shapes')}.jsonl").is_file()
    assert (root / sweep_folder(8) / f"sweep-{sweep_name('wan-motion', 8)}.jsonl").is_file()
    assert sweep_folder(4) == "benchmarks/results/sweep-few-step"
