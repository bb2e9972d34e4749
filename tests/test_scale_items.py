"""Work items and the manifest of a batch generation (no Ray needed): an item is done only with the settings it was
made with, and a resume with other settings is refused naming what differs."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest

from invardiff import ModelFacts
from invardiff.dicache import DiCacheConfig, PlanProbeConfig
from invardiff.policies.plan import PlanConfig
from invardiff.scale import Manifest, PipelineSource, WorkItem, actors, work_items
from invardiff.scale.actors import Workers
from invardiff.scale.items import SettingsMismatch
from invardiff.scale.runner import output_settings

from helpers import plan_from_bits


SETTINGS = {"model": {"name": "toy"}, "call": {"num_inference_steps": 4}, "policy": None}


def test_item_ids_come_from_the_input_and_duplicates_are_dropped():
    items = work_items(["a cat", 3, "a cat"], seeds=[0, 1])
    assert [item.key for item in items] == [
        "prompt-51e467415607-seed0",  # sha256("a cat")[:12]
        "prompt-51e467415607-seed1",
        "class3-seed0",
        "class3-seed1",
    ]
    assert WorkItem("a cat", 0).id == items[0].id  # whatever the position in the list


def test_work_items_need_inputs_and_seeds():
    with pytest.raises(ValueError, match="at least one input and one seed"):
        work_items([], seeds=[0])


def test_manifest_records_once_and_a_new_manifest_reads_what_is_done(tmp_path):
    item, other = WorkItem(3, 0), WorkItem(4, 0)
    image = np.full((2, 2, 1), 7, np.uint8)
    manifest = Manifest(tmp_path, SETTINGS)
    manifest.record(item, image, {"output_sha256": "x"})
    manifest.record(item, image + 1, {"output_sha256": "y"})  # a late duplicate: ignored
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(line)["output_sha256"] for line in lines] == ["x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["class3-seed0.png", "manifest.jsonl"]
    again = Manifest(tmp_path, SETTINGS)
    assert again.pending([item, other]) == [other]
    (tmp_path / "class3-seed0.png").unlink()  # a recorded item whose image is gone is generated again
    assert Manifest(tmp_path, SETTINGS).pending([item, other]) == [item, other]


def test_a_resume_with_other_settings_is_refused_naming_the_fields(tmp_path):
    Manifest(tmp_path, SETTINGS).record(WorkItem(3, 0), np.zeros((2, 2, 1), np.uint8), {})
    other = {**SETTINGS, "call": {"num_inference_steps": 50}, "policy": {"type": "PlanConfig", "step_reuse": "state"}}
    with pytest.raises(SettingsMismatch) as caught:
        Manifest(tmp_path, other)
    assert caught.value.differences == [("call.num_inference_steps", 4, 50), ("policy", None, other["policy"])]
    assert "(call.num_inference_steps: 4 there, 50 now; policy: None there, PlanConfig(...) now)" in str(caught.value)
    fresh = Manifest(tmp_path, other, overwrite=True)  # starts afresh: the item is pending again
    assert fresh.pending([WorkItem(3, 0)]) == [WorkItem(3, 0)]
    assert (tmp_path / "manifest.jsonl").read_text() == ""
    fresh.record(WorkItem(3, 0), np.ones((2, 2, 1), np.uint8), {})
    assert Manifest(tmp_path, other).pending([WorkItem(3, 0)]) == []  # the same settings resume
    residual = {**other, "policy": {"type": "PlanConfig", "step_reuse": "residual"}}
    with pytest.raises(SettingsMismatch, match=r"\(policy.step_reuse: 'state' there, 'residual' now\)"):
        Manifest(tmp_path, residual)


def test_a_manifest_without_settings_is_not_resumed(tmp_path):
    (tmp_path / "class3-seed0.png").write_bytes(b"")
    record = {"key": "class3-seed0", "id": "class3", "input": 3, "seed": 0, "file": "class3-seed0.png"}
    (tmp_path / "manifest.jsonl").write_text(json.dumps(record) + "\n")  # as an earlier invardiff wrote it
    with pytest.raises(SettingsMismatch, match="not recorded"):
        Manifest(tmp_path, SETTINGS)


def test_output_settings_hold_everything_that_changes_an_output():
    source = PipelineSource("bundled", "dit-digits")
    facts = ModelFacts.for_family("dit", {"transformer_blocks": 4})
    plan, other_plan = plan_from_bits(facts, "0010"), plan_from_bits(facts, "0100")
    settings = {
        "full": output_settings(source, None),
        "steps": output_settings(source, None, steps=5),
        "plan": output_settings(source, PlanConfig(plan)),
        "other plan": output_settings(source, PlanConfig(other_plan)),
        "residual": output_settings(source, PlanConfig(plan, step_reuse="residual")),
        "probe": output_settings(source, PlanProbeConfig(plan, threshold=0.3)),
        "probe inf": output_settings(source, PlanProbeConfig(plan, threshold=float("inf"))),
        "dicache": output_settings(source, DiCacheConfig.preset("flux", threshold=0.5)),
        "dicache warmup": output_settings(source, DiCacheConfig.preset("flux", threshold=0.5, warmup_ratio=0.1)),
    }
    digests = {name: json.dumps(value, sort_keys=True) for name, value in settings.items()}
    assert len(set(digests.values())) == len(digests)  # every change of settings is a change of key
    full = settings["full"]
    assert full["call"] == {"num_inference_steps": 50, "guidance_scale": 1.5, "output_type": "np"}
    assert full["model"]["name"] == "dit-digits" and len(full["model"]["files_sha256"]) == 64
    assert settings["plan"]["call"]["num_inference_steps"] == 4  # the plan's step count
    assert settings["probe inf"]["policy"]["threshold"] == "inf"  # JSON has no infinity
    assert output_settings(source, PlanConfig(plan)) == settings["plan"]  # the same settings: the same key


class FakeRay:
    """The few calls of Ray an actor pool makes before its actors run: a cluster of ``cluster`` resources whose
    actors never become ready (they wait for resources held elsewhere)."""

    def __init__(self, cluster: dict):
        self.cluster, self.started, self.killed = cluster, [], []

    def cluster_resources(self) -> dict:
        return self.cluster

    def available_resources(self) -> dict:
        return {"CPU": 0.0}

    def remote(self, **resources):
        fake = self

        class Actor:
            def __init__(self):
                self.ready = SimpleNamespace(remote=lambda: object())
                fake.started.append(self)

        return lambda actor_class: SimpleNamespace(remote=lambda *args: Actor())

    def wait(self, refs, num_returns=1, timeout=None):
        return [], refs

    def kill(self, actor):
        self.killed.append(actor)


@pytest.mark.parametrize(
    ("workers", "says"),
    [
        (
            Workers(1, gpus=1),
            "1 Ray worker(s) with 1 GPU(s) each need 1 GPU(s), but the Ray cluster has 2 CPU(s) and 0",
        ),
        (Workers(999), "999 Ray worker(s) with 1 CPU(s) each need 999 CPU(s), but the Ray cluster has 2 CPU(s)"),
        (Workers(3, cpus=0.75), "3 Ray worker(s) with 0.75 CPU(s) each need 2.25 CPU(s)"),
    ],
)
def test_workers_the_cluster_cannot_hold_are_refused_before_any_actor_starts(workers, says, monkeypatch):
    fake = FakeRay({"CPU": 2.0})
    monkeypatch.setattr(actors, "init_ray", lambda *args, **kwargs: fake)
    with pytest.raises(ValueError, match=re.escape(says)):
        actors.ActorPool(object, (), workers)
    assert fake.started == []


def test_actors_that_never_start_time_out_and_are_killed(monkeypatch):
    fake = FakeRay({"CPU": 2.0})
    monkeypatch.setattr(actors, "init_ray", lambda *args, **kwargs: fake)
    monkeypatch.setattr(actors, "import_ray", lambda: fake)
    monkeypatch.setattr(actors, "POLL_SECONDS", 0.001)
    seen = []
    with pytest.raises(TimeoutError, match=r"2 of 2 Ray worker\(s\) did not start within 0.05 s \(free now: 0 CPU"):
        actors.ActorPool(object, (), Workers(2, timeout=0.05), on_start=lambda *args: seen.append(args))
    assert seen == [(0, 2)] and fake.killed == fake.started and len(fake.started) == 2
