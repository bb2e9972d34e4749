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


def _run_ranks(function, world: int, directory, what: str) -> list[dict]:
    """``function(rank, init_file, results)`` on ``world`` spawned processes; each rank's saved results. Fails
    instead of hanging when the ranks do not finish within 240 s (a collective one rank skipped)."""
    context = mp.start_processes(
        function, args=(str(directory / "init"), str(directory)), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {what} ranks hung (a collective one rank skipped?)")
    return [torch.load(directory / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return _run_ranks(_rank, WORLD, tmp_path_factory.mktemp("cp"), "context-parallel")


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


# CFG parallelism: four ranks, the two guidance branches on two context-parallel groups of two. Ranks 0 and 1 run
# the conditional branch, ranks 2 and 3 the unconditional one, each pair sharding the tokens; after every call the
# ranks that hold the same shard exchange their branch's prediction (as diffusers' CFG-parallel does) and take the
# same guided Euler step. Each group's reduction must stay inside the group: the branches see different inputs and
# decide differently.

CFG_WORLD, GUIDANCE = 4, 3.0
CFG_CONFIG = DiCacheConfig(threshold=0.1, num_inference_steps=STEPS, warmup_ratio=0.2)


def _condition():
    """What the conditional branch adds to the latents (the toy has no text input)."""
    return 0.8 * torch.randn(BATCH, TOKENS, 4, generator=torch.Generator().manual_seed(2))


def _guided_sample(transformer, latents, condition, branches, exchange=None):
    """A guided Euler loop. ``branches``: the branch names this process computes ("cond", "uncond" or both);
    ``exchange(prediction)`` returns (cond, uncond) when each process computes one branch. Returns each computed
    branch's (T, B) decision names."""
    x = latents
    with torch.no_grad():
        for step in range(STEPS):
            t = torch.full((BATCH,), 1.0 - step / STEPS)
            predictions = {}
            for branch in branches:
                with invardiff.cache_context(transformer, branch, step_index=step):
                    inputs = x + condition if branch == "cond" else x
                    predictions[branch] = transformer(inputs, t, return_dict=False)[0]
            cond, uncond = (
                exchange(predictions[branches[0]]) if exchange else (predictions["cond"], predictions["uncond"])
            )
            x = x - (uncond + GUIDANCE * (cond - uncond)) / STEPS
    result = invardiff.summary(transformer).branches
    return {branch: np.array(DECISIONS)[result[branch].probe["decision"]] for branch in branches}


def _cfg_rank(rank: int, init_file: str, results: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=CFG_WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    from invardiff.scale.distributed import enable_context_parallel

    # Every rank creates every group, in the same order (torch.distributed's rule).
    branch_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # context parallel: one per branch
    shard_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]  # CFG exchange: one per token shard
    everyone = dist.new_group(list(range(CFG_WORLD)))
    branch_index, shard_index = divmod(rank, 2)
    branch = ("cond", "uncond")[branch_index]
    shard = slice(shard_index * TOKENS // 2, (shard_index + 1) * TOKENS // 2)

    def exchange(prediction):  # (cond, uncond) of this shard from the rank of the other branch
        parts = [torch.empty_like(prediction) for _ in range(2)]
        dist.all_gather(parts, prediction.contiguous(), group=shard_groups[shard_index])
        return parts[0], parts[1]

    out = {"branch": branch}
    for name, group in (("decisions", branch_groups[branch_index]), ("world_decisions", everyone)):
        transformer = _model()
        for block in transformer.blocks:
            block.attn = ShardedMixer(block.attn, branch_groups[branch_index])
        enable_context_parallel(transformer, CFG_CONFIG, group)
        out[name] = _guided_sample(transformer, _latents()[:, shard], _condition()[:, shard], [branch], exchange)[
            branch
        ]
        invardiff.disable(transformer)
    torch.save(out, f"{results}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def cfg_ranks(tmp_path_factory):
    return _run_ranks(_cfg_rank, CFG_WORLD, tmp_path_factory.mktemp("cfg"), "CFG-parallel")


@pytest.mark.slow
def test_cfg_parallel_groups_keep_each_branch_decision(cfg_ranks):
    transformer = _model()
    invardiff.enable(transformer, CFG_CONFIG)
    try:  # one process, full tokens, both branches under their own cache contexts
        reference = _guided_sample(transformer, _latents(), _condition(), ["cond", "uncond"])
    finally:
        invardiff.disable(transformer)
    assert (reference["cond"] != reference["uncond"]).any()  # the branches decide differently, so mixing shows
    for branch in ("cond", "uncond"):
        assert {"skipped", "computed"} <= set(reference[branch].ravel())
    for result in cfg_ranks:
        assert (result["decisions"] == reference[result["branch"]]).all(), result["branch"]
    # The control: a reduction over all four ranks ties the branches together and departs from the reference.
    assert any((result["world_decisions"] != reference[result["branch"]]).any() for result in cfg_ranks)
