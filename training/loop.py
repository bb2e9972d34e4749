"""The training loop both bundled models share: time-budgeted steps, EMA, a loss log, resumable checkpoints."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def train_for(
    minutes: float,
    out: Path,
    model,
    ema,
    optimizer,
    generator,
    loss_fn: Callable[[], torch.Tensor],
    ema_decay: float,
    clip_grad: float | None = None,
    decay_from: float | None = None,
) -> list[dict]:
    """Run optimizer steps on ``loss_fn()`` until ``minutes`` of training (across restarts) have passed.

    ``decay_from``: a fraction of ``minutes`` after which the learning rate falls from its initial value to zero
    along a half cosine (a warmup-free "stable, then decay" schedule; the schedule follows elapsed time, as the
    budget does); ``None`` keeps it constant.

    A checkpoint (weights, EMA, optimizer, data generator, loss log) is written every 3 minutes and at the end, and
    picked up again on restart, so a killed run continues where it stopped.
    """
    checkpoint = out / "checkpoint.pt"
    step, losses, elapsed = 0, [], 0.0
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        step, losses, elapsed = state["step"], state["losses"], state["elapsed"]
    start, last_save, running = time.time() - elapsed, time.time(), []
    base_lrs = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        group["initial_lr"] = base  # kept in the checkpoint: a resumed run decays from the same value
    while time.time() - start < minutes * 60:
        if decay_from is not None:
            progress = (time.time() - start) / (minutes * 60)
            factor = (
                1.0
                if progress < decay_from
                else 0.5 * (1 + np.cos(np.pi * (progress - decay_from) / (1 - decay_from)))
            )
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * factor
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        with torch.no_grad():
            for target, source in zip(ema.parameters(), model.parameters(), strict=True):
                target.lerp_(source, 1 - ema_decay)
        step += 1
        running.append(loss.item())
        if step % 50 == 0:
            losses.append({"step": step, "loss": float(np.mean(running)), "minutes": (time.time() - start) / 60})
            running = []
            print(json.dumps(losses[-1]), flush=True)
        if time.time() - last_save > 180:
            _save(checkpoint, model, ema, optimizer, generator, step, losses, time.time() - start)
            last_save = time.time()
    _save(checkpoint, model, ema, optimizer, generator, step, losses, time.time() - start)
    return losses


def _save(path: Path, model, ema, optimizer, generator, step, losses, elapsed) -> None:
    state = {
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "step": step,
        "losses": losses,
        "elapsed": elapsed,
    }
    torch.save(state, str(path) + ".tmp")
    Path(str(path) + ".tmp").replace(path)
