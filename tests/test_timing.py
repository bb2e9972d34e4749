"""The one timing loop (bench/timing.py): run order, warm-up, start/finish around runs, medians of per-round ratios,
device synchronization around timed regions. Steps return scripted seconds: nothing here is timed for real."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from invardiff.bench import timing
from invardiff.bench.timing import Variant, measure_rounds


def _scripted(name: str, seconds: list[float], log: list):
    """A variant whose step ``i`` of run ``r`` logs ``(name, i)`` and returns ``seconds[r]``."""
    runs = iter(seconds)
    current = {}

    def start():
        log.append(("start", name))
        current["seconds"] = next(runs)

    def step(index):
        log.append((name, index))
        return current["seconds"]

    return Variant(name, step, start, lambda: log.append(("finish", name)))


def test_alternate_runs_whole_runs_in_an_order_rotated_every_round_and_drops_the_warm_up():
    log = []
    a = _scripted("a", [100.0, 4.0, 6.0, 9.0], log)
    b = _scripted("b", [100.0, 2.0, 2.0, 3.0], log)
    times = measure_rounds([a, b], rounds=3, steps=2)
    runs = [entry[1] for entry in log if entry[0] == "start"]
    assert runs == ["a", "b", "b", "a", "a", "b", "b", "a"]  # the two-variant order flips every round
    first_run = log[:4]
    assert first_run == [("start", "a"), ("a", 0), ("a", 1), ("finish", "a")]  # start, steps, finish per run
    assert times.seconds == {"a": [8.0, 12.0, 18.0], "b": [4.0, 4.0, 6.0]}  # 2 steps per run, warm-up dropped
    assert times.ratios("a", "b") == [2.0, 3.0, 3.0]
    assert times.median_ratio("a", "b") == 3.0
    assert times.median_seconds("b") == 4.0


def test_median_of_per_round_ratios_differs_from_the_ratio_of_medians():
    log = []
    a = _scripted("a", [10.0, 1.0, 10.0, 10.0], log)
    b = _scripted("b", [10.0, 1.0, 5.0, 20.0], log)
    times = measure_rounds([a, b], rounds=3)
    assert times.ratios("a", "b") == [1.0, 2.0, 0.5]
    assert times.median_ratio("a", "b") == 1.0
    assert times.median_seconds("a") / times.median_seconds("b") == 2.0


def test_lockstep_interleaves_steps_in_an_order_rotated_every_step():
    log = []
    variants = [_scripted(name, [1.0, 1.0], log) for name in "abc"]
    measure_rounds(variants, rounds=1, steps=2, schedule="lockstep")
    steps = [entry for entry in log if entry[0] in "abc"]
    # Round 0 (warm-up): step 0 from a, step 1 from b; round 1: step 0 from c (shift 2), step 1 from a (shift 3).
    assert steps == [
        ("a", 0), ("b", 0), ("c", 0), ("b", 1), ("c", 1), ("a", 1),
        ("c", 0), ("a", 0), ("b", 0), ("a", 1), ("b", 1), ("c", 1),
    ]  # fmt: skip
    assert log[:3] == [("start", "a"), ("start", "b"), ("start", "c")]  # every variant starts before the steps


def test_finish_runs_when_a_run_fails_and_the_error_propagates():
    log = []

    def fail(index):
        raise RuntimeError("boom")

    variant = Variant("a", fail, lambda: log.append("start"), lambda: log.append("finish"))
    with pytest.raises(RuntimeError, match="boom"):
        measure_rounds([variant], rounds=1)
    assert log == ["start", "finish"]


def test_bad_arguments_are_refused():
    variant = Variant("a", lambda index: 1.0)
    with pytest.raises(ValueError, match="Unknown schedule"):
        measure_rounds([variant], rounds=1, schedule="sometimes")
    with pytest.raises(ValueError, match="unique"):
        measure_rounds([variant, variant], rounds=1)
    with pytest.raises(ValueError, match="at least 1"):
        measure_rounds([variant], rounds=0)


def test_timed_synchronizes_a_cuda_device_before_and_after_the_timed_region(monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(("sync", device)))
    seconds, result = timing.timed(lambda: events.append("run") or 7, torch.device("cuda", 0))
    assert result == 7 and isinstance(seconds, float)
    assert events == [("sync", torch.device("cuda", 0)), "run", ("sync", torch.device("cuda", 0))]
    events.clear()
    timing.timed(lambda: events.append("run"), "cpu")
    assert events == ["run"]  # nothing to wait for on the CPU


def test_speedup_figures_report_spread_and_warn_only_when_the_rounds_do_not_support_the_figure(caplog):
    from invardiff.bench.timing import speedup_figures

    quiet = speedup_figures([3.0, 3.2, 3.1], ideal=3.4, label="quiet")
    assert quiet["measured_speedup"] == 3.1 and quiet["round_speedups"] == [3.0, 3.2, 3.1]
    assert quiet["spread"] == pytest.approx(0.2 / 3.1) and quiet["timing_warnings"] == []
    # One round ran while another job took the CPU: the rounds disagree (spread 8.6 / 3.1 > 25%).
    loaded = speedup_figures([3.0, 11.7, 3.1], ideal=3.4, label="loaded")
    assert len(loaded["timing_warnings"]) == 1 and "the rounds disagree" in loaded["timing_warnings"][0]
    assert "rerun on an idle machine" in loaded["timing_warnings"][0]
    # Two of three rounds: the median itself is implausible against the FLOP-ideal 3.4x (the README's 39.71x case).
    implausible = speedup_figures([39.7, 38.9, 40.1], ideal=3.4, label="implausible")
    assert (
        implausible["timing_warnings"]
        == [w for w in implausible["timing_warnings"] if "exceeds the FLOP-ideal 3.40x" in w]
        and len(implausible["timing_warnings"]) == 1
    )
    # Within 10% above ideal is noise, not a warning; half the rounds' range widens the allowance.
    assert speedup_figures([3.7, 3.7, 3.7], ideal=3.4)["timing_warnings"] == []
    assert len(speedup_figures([3.8, 3.8, 3.8], ideal=3.4)["timing_warnings"]) == 1
    assert [r.levelname for r in caplog.records].count("WARNING") == 3  # also logged


@pytest.mark.parametrize("schedule, pins", [("lockstep", 1), ("alternate", 0)])
def test_lockstep_pins_the_host_heap_first(monkeypatch, schedule, pins):
    calls = []
    monkeypatch.setattr(timing, "pin_host_heap", lambda: calls.append(1) or True)
    measure_rounds([_scripted("a", [1.0, 1.0], [])], rounds=1, schedule=schedule)
    assert len(calls) == pins


# Allocates and frees 64 tensors of 1 MiB (after one such round), counting the minor page faults of the second
# round: with glibc's default thresholds the freed pages go back to the kernel and all 16384 are faulted in again.
_HEAP_PROBE = """
import resource, torch
from invardiff.bench.host_heap import pin_host_heap
def work():
    tensors = [torch.ones(256, 1024) for _ in range(64)]
    del tensors
def faults():
    work()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    work()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults(), pin_host_heap(), faults())
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc: Linux only")
def test_a_pinned_host_heap_keeps_its_pages_between_steps():
    # On chroma-bench the faults a plan's cheap steps caused in stock's steps made lockstep speedups 13% too high.
    done = subprocess.run([sys.executable, "-c", _HEAP_PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    default, pinned, faults = done.stdout.split()
    assert int(default) > 12000  # about 16384 pages of 4 KiB: every page faulted again
    assert pinned == "True" and int(faults) < 4096  # a few hundred: the heap kept its pages
