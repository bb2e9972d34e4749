"""DiCache under context parallelism: two gloo processes on CPU each hold half of every sample's tokens.

The model is the one-file toy family (tests/toy_family.py) with its token mixer sharded by hand: each rank computes
queries for its own tokens and all-gathers keys and values over the context-parallel group, as ring / Ulysses
attention would. (diffusers' ``enable_parallelism`` / ``ContextParallelConfig`` needs attention backends that run on
CUDA, so the test shards the toy itself.) Because the deep blocks hold collectives, a rank that skipped them alone
would hang the other: the test runs under a deadline and fails instead of hanging.
"""

from __future__ import annotations

import datetime
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import invardiff
from invardiff.dicache import DECISIONS, DiCacheConfig

from toy_family import ToyTransformer


WORLD, STEPS, TOKENS, BATCH = 2, 12, 16, 2
NAN_STEP = 7  # rank 1 poisons sample 1's tokens before this step in the NaN run
CONFIG = DiCacheConfig(threshold=0.12, num_inference_steps=STEPS, warmup_ratio=0.2)


class ShardedMixer(torch.nn.Module):
    """ToyMixer on a token shard: local queries against the keys and values of every rank's tokens."""

    def __init__(self, mixer, group):
        super().__init__()
        self.qkv, self.out, self.group = mixer.qkv, mixer.out, group

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (B, N / world, D) each
        k, v = _gather_tokens(k, self.group), _gather_tokens(v, self.group)  # (B, N, D)
        weights = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)  # (B, N / world, N)
        return self.out(weights @ v)


def _gather_tokens(x, group):
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def _model():
    torch.manual_seed(0)
    return ToyTransformer(in_channels=4, dim=32, num_layers=3).eval()


def _latents():
    return torch.randn(BATCH, TOKENS, 4, generator=torch.Generator().manual_seed(1))


def _sample(transformer, latents, poison=None):
    """A manual Euler loop; returns DiCache's (T, B) decision names and errors."""
    x = latents
    with torch.no_grad():
        for step in range(STEPS):
            if poison is not None and step == NAN_STEP:
                x = poison(x)
            t = torch.full((BATCH,), 1.0 - step / STEPS)
            with invardiff.cache_context(transformer, "cond", step_index=step):
                x = x - transformer(x, t, return_dict=False)[0] / STEPS
    probe = invardiff.summary(transformer).branches["cond"].probe
    return np.array(DECISIONS)[probe["decision"]], probe["error"]


def _rank(rank: int, init_file: str, results: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    from invardiff.scale.distributed import enable_context_parallel

    group = dist.new_group(list(range(WORLD)))  # the context-parallel group (here every rank)
    transformer = _model()
    for block in transformer.blocks:
        block.attn = ShardedMixer(block.attn, group)
    shard = slice(rank * TOKENS // WORLD, (rank + 1) * TOKENS // WORLD)
    out = {}
    enable_context_parallel(transformer, CONFIG, group)
    out["decisions"], out["errors"] = _sample(transformer, _latents()[:, shard])

    def poison(x):  # sample 1 turns NaN on rank 1's shard only
        if rank == 1:
            x = x.clone()
            x[1] = float("nan")
        return x

    out["nan_decisions"], _ = _sample(transformer, _latents()[:, shard], poison)
    invardiff.disable(transformer)
    other = DiCacheConfig(threshold=CONFIG.threshold * (1 + rank), num_inference_steps=STEPS)
    try:
        enable_context_parallel(transformer, other, group)
    except ValueError as error:
        out["mismatch"] = str(error)
    try:
        enable_context_parallel(transformer, CONFIG, dist.group.WORLD)
    except ValueError as error:
        out["world"] = str(error)
    torch.save(out, f"{results}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cp")
    context = mp.start_processes(
        _rank, args=(str(directory / "init"), str(directory)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the context-parallel ranks hung (a collective one rank skipped?)")
    return [torch.load(directory / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


@pytest.fixture(scope="module")
def unsharded():
    transformer = _model()
    invardiff.enable(transformer, CONFIG)
    try:
        return _sample(transformer, _latents())
    finally:
        invardiff.disable(transformer)


@pytest.mark.slow
def test_ranks_decide_alike_and_as_the_unsharded_run(ranks, unsharded):
    decisions, errors = unsharded
    assert {"skipped", "computed", "warmup"} <= set(decisions.ravel())  # the test exercises every path
    for result in ranks:
        assert (result["decisions"] == decisions).all()
        # sums of per-shard float32 sums against one float32 mean: equal to float32 rounding
        np.testing.assert_allclose(result["errors"], errors, rtol=1e-5, equal_nan=True)
    assert (ranks[0]["errors"] == ranks[1]["errors"])[~np.isnan(errors)].all()  # bit-identical across ranks


@pytest.mark.slow
def test_a_nan_sample_on_one_shard_makes_every_rank_compute_it(ranks, unsharded):
    clean, _ = unsharded
    first, second = (result["nan_decisions"] for result in ranks)
    assert (first == second).all()
    assert first[NAN_STEP, 1] == "non_finite" and (first[NAN_STEP:, 1] != "skipped").all()
    assert (first[:, 0] == clean[:, 0]).all()  # the other sample is untouched


@pytest.mark.slow
def test_a_policy_mismatch_or_the_world_group_is_a_clear_error_on_every_rank(ranks):
    for result in ranks:
        assert "enable different cache policies" in result["mismatch"]
        assert "got WORLD or None" in result["world"]
