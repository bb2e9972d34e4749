"""Loading or building a model leaves the caller's random state alone; plotting leaves matplotlib's backend alone."""

import random

import numpy as np
import pytest
import torch

from invardiff import CachePlan
from invardiff.model_configs import MODEL_CONFIGS
from invardiff.models import load
from invardiff.toy_components import text_encoders

from helpers import facts_for, tiny_pipeline


def _random_states():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def _assert_same(before, after):
    assert torch.equal(before[0], after[0]), "torch's global generator moved"
    assert np.array_equal(before[1], after[1]) and before[2] == after[2]


@pytest.mark.parametrize(
    "build",
    [
        lambda: load("flux-shapes"),
        lambda: load("dit-digits"),
        lambda: MODEL_CONFIGS["flux-tiny"].build_transformer(seed=3),
        lambda: text_encoders(40, 40, 16, seed=5),
    ],
    ids=["load flux-shapes", "load dit-digits", "build flux-tiny", "text encoders"],
)
def test_building_a_model_leaves_the_global_random_state_unchanged(build):
    torch.manual_seed(1234)
    before = _random_states()
    build()
    _assert_same(before, _random_states())


def test_seeded_builds_are_still_reproducible():
    first = MODEL_CONFIGS["flux-tiny"].build_transformer(seed=3).state_dict()
    torch.manual_seed(99)  # the caller's state must not matter either
    second = MODEL_CONFIGS["flux-tiny"].build_transformer(seed=3).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_plotting_leaves_the_backend_and_pyplot_alone(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from invardiff.plot import plot_plan

    previous = matplotlib.get_backend()
    matplotlib.use("svg")  # a backend other than the Agg the plots render with
    try:
        figures = plt.get_fignums()
        _, pipe = tiny_pipeline("flux")
        plot_plan(CachePlan.reuse_nothing(facts_for(pipe.transformer, "flux"), 4), tmp_path / "plan.png")
        assert (tmp_path / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == figures  # no pyplot figure left open
    finally:
        matplotlib.use(previous)
