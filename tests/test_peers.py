"""The peer registry (bench/peers.py): one definition per peer for the sweep and the engine loop; every peer leaves
the pipeline it ran on as it found it (the sweep's full compute runs on the same pipeline)."""

from __future__ import annotations

import os

import pytest
import torch

from invardiff.bench import peers
from invardiff.bench.points import _peer_point
from invardiff.demo import generate_cases
from invardiff.flops import flop_counter
from invardiff.models import registry


os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")


def test_every_peer_has_settings_for_both_kinds_of_target():
    for kind in peers.KINDS:
        assert set(peers.SETTINGS[kind]) == set(peers.METHODS)
        found = peers.peers(kind, num_inference_steps=28, mag_ratios=[1.0] * 28)
        labels = [peer.label for peer in found]
        assert len(labels) == len(set(labels)), labels
        assert {peer.method for peer in found} == set(peers.METHODS)
    assert "DBCache default (F8B0 thr=0.08)" in [p.label for p in peers.peers(peers.PIPELINE, 28)]
    with pytest.raises(ValueError, match="Unknown target kind"):
        peers.peers("video", 28)


@pytest.fixture(scope="module")
def flux_shapes():
    entry, pipe = registry.get("flux-shapes"), registry.load("flux-shapes")
    cases = [(entry.examples[0], 0)]
    return pipe, (lambda: generate_cases(pipe, entry, cases)), generate_cases(pipe, entry, cases)


@pytest.mark.parametrize(
    "peer",
    [peers.dbcache(0.8, 28), peers.fbcache(0.5), peers.taylorseer(3)],
    ids=lambda peer: peer.label,
)
def test_a_peer_detaches_to_exactly_full_compute(flux_shapes, peer):
    pipe, generate, full = flux_shapes
    children = [name for name, _ in pipe.transformer.named_children()]
    point = _peer_point(peer)
    for _ in range(2):  # attached twice: nothing of the first time is left for the second, or after
        detach = point.attach(pipe)
        try:
            cached = generate()
        finally:
            detach()
        assert not torch.equal(cached, full)  # it skipped work
        assert torch.equal(generate(), full)
        # In order too: cache-dit re-registers the block lists last, and FBCache's head block is the first one.
        assert [name for name, _ in pipe.transformer.named_children()] == children


def test_diffusers_hooks_on_dit_cannot_run_and_say_why():
    pipe = registry.load("dit-digits")
    with pytest.raises(TypeError, match="DiTPipeline does not set cache_context"):
        _peer_point(peers.fbcache(0.1)).attach(pipe)


def test_dbcache_with_taylorseer_extrapolates_and_detaches(flux_shapes):
    # cache-dit's calibrator must really run (the output differs from DBCache alone at the same settings) and leave
    # nothing behind; its settings and label say so, and a negative order is refused.
    pipe, generate, full = flux_shapes
    plain, calibrated = peers.dbcache(0.8, 28, 2), peers.dbcache(0.8, 28, 2, taylorseer_order=1)
    assert calibrated.label == "DBCache F1B0 thr=0.8 warm-up=2 +TaylorSeer order=1"
    assert calibrated.settings["taylorseer_order"] == 1 and "taylorseer_order" not in plain.settings
    outputs = []
    for peer in (plain, calibrated):
        detach = _peer_point(peer).attach(pipe)
        try:
            outputs.append(generate())
        finally:
            detach()
    assert not torch.equal(outputs[0], outputs[1])
    assert torch.equal(generate(), full)
    assert calibrated.label in [p.label for p in peers.peers(peers.PIPELINE, 28)]
    with pytest.raises(ValueError, match="taylorseer_order must be 0"):
        peers.dbcache(0.8, 28, taylorseer_order=-1)


def test_taylorseer_on_every_unit_caches_the_mlps_too(flux_shapes):
    # The fast end of TaylorSeer caches every unit: it must compute less than the attention-only default at the
    # same interval (the MLPs' work is skipped too), and detach to exactly full compute.
    pipe, generate, full = flux_shapes
    counts = {}
    for peer in (peers.taylorseer(8), peers.taylorseer(8, all_units=True)):
        detach = _peer_point(peer).attach(pipe)
        try:
            with flop_counter() as counter:
                generate()
        finally:
            detach()
        counts[peer.label] = counter.get_total_flops()
    # 0.63 on the sweep's 4 images (1.57x vs 2.51x ideal); 0.75 leaves room, and attention-only would give 1.0
    assert counts["TaylorSeer interval=8 all units"] < 0.75 * counts["TaylorSeer interval=8"]
    assert torch.equal(generate(), full)
    assert {"interval": 8, "all_units": True} in peers.SETTINGS[peers.PIPELINE]["diffusers-taylorseer"]
