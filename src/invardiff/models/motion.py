"""Procedural clips of moving shapes and their prompts: the offline training data of `wan-motion`.

Each clip is 8 frames of 32x32 RGB: one shape (circle or square) in one colour moving in one direction (left,
right, up, down) at one speed (slow: about 1 pixel a frame, fast: about 2.2) along a straight path centred in the
frame, over a dark background with faint diagonal stripes (static, so that only the shape moves). Start point,
size and the path's offset across the motion are jittered. The prompt names colour, shape, direction and speed:
"a red circle moving left fast". Motion, not only appearance, is conditioned: a model that ignores the direction
or speed words draws the right shape in the right colour and still fails :func:`detect`.
"""

from __future__ import annotations

import itertools

import torch

from .shapes import COLOURS, grid, shape_mask


SHAPES = ("circle", "square")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
SPEEDS = {"slow": 0.03, "fast": 0.07}  # centre displacement per frame, in image widths
FRAMES = 8
SIZE = 32
BACKGROUND = 0.1


def prompt_for(colour: str, shape: str, direction: str, speed: str) -> str:
    return f"a {colour} {shape} moving {direction} {speed}"


ALL_ATTRIBUTES = list(itertools.product(COLOURS, SHAPES, DIRECTIONS, SPEEDS))
ALL_PROMPTS = [prompt_for(*attributes) for attributes in ALL_ATTRIBUTES]
VOCABULARY = sorted({word for prompt in ALL_PROMPTS for word in prompt.split()})


def background() -> torch.Tensor:
    """The static textured background, (3, 32, 32) in [0, 1]."""
    x, y = grid(SIZE)
    texture = 0.05 * torch.sign(torch.sin((x + y) * 40.0))  # faint diagonal stripes
    return (BACKGROUND + texture).clamp(0, 1).expand(3, SIZE, SIZE).clone()


def path(direction: str, speed: str, jitter: torch.Tensor) -> torch.Tensor:
    """Centres of the shape in the ``FRAMES`` frames, (FRAMES, 2) as (x, y) in [0, 1]; ``jitter``: 2 values in
    [-0.5, 0.5) shifting the path along and across its direction."""
    dx, dy = DIRECTIONS[direction]
    step = SPEEDS[speed]
    offsets = (torch.arange(FRAMES) - (FRAMES - 1) / 2) * step  # centred on the middle of the clip
    along, across = float(jitter[0]) * 0.1, float(jitter[1]) * 0.2
    cx = 0.5 + (offsets + along) * dx + across * dy
    cy = 0.5 + (offsets + along) * dy + across * dx
    return torch.stack([cx, cy], dim=1)


def render(colour: str, shape: str, direction: str, speed: str, generator: torch.Generator) -> torch.Tensor:
    """One clip, (3, FRAMES, 32, 32) in [-1, 1] (channels first, then frames: WanPipeline's latent layout)."""
    jitter = torch.rand(3, generator=generator) - 0.5
    radius = 0.12 + float(jitter[2]) * 0.04
    x, y = grid(SIZE)
    base = background()
    colour_values = torch.tensor(COLOURS[colour])[:, None, None].expand(3, SIZE, SIZE)
    frames = []
    for cx, cy in path(direction, speed, jitter[:2]).tolist():
        frame = base.clone()
        mask = shape_mask(shape, cx, cy, radius, x, y)
        frame[:, mask] = colour_values[:, mask]
        frames.append(frame)
    return torch.stack(frames, dim=1) * 2 - 1


def sample_batch(batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str], list[tuple]]:
    """``batch_size`` clips (B, 3, FRAMES, 32, 32) with uniformly drawn attributes, their prompts and attributes."""
    index = torch.randint(0, len(ALL_ATTRIBUTES), (batch_size,), generator=generator).tolist()
    attributes = [ALL_ATTRIBUTES[i] for i in index]
    clips = torch.stack([render(*a, generator=generator) for a in attributes])
    return clips, [prompt_for(*a) for a in attributes], attributes


def detect(clip: torch.Tensor) -> dict:
    """What a clip shows, read back procedurally: ``clip`` (FRAMES, 3, 32, 32) in [0, 1] (the pipeline's output
    layout). The shape's pixels are those far from the background level; their colour is the nearest of
    :data:`COLOURS`, the direction the dominant axis and sign of the centroid's displacement (a least-squares
    slope over the frames), the speed the slope's size against the midpoint of the two speeds, and the position
    the mean centroid. A frame where no pixel stands out gives no centroid; with fewer than two, the motion is
    ``None``."""
    x, y = grid(clip.shape[-1])
    clip = clip.float()
    foreground = (clip - BACKGROUND).abs().amax(dim=1) > 0.3  # (F, H, W); the stripes stay within 0.05
    centroids, frames, pixels = [], [], []
    for index, mask in enumerate(foreground):
        if int(mask.sum()) >= 3:
            centroids.append(torch.stack([x[mask].mean(), y[mask].mean()]))
            frames.append(float(index))
            pixels.append(clip[index][:, mask])
    result = {"colour": None, "direction": None, "speed": None, "position": None}
    if not pixels:
        return result
    mean_colour = torch.cat(pixels, dim=1).mean(dim=1)
    names = list(COLOURS)
    distances = torch.stack([(mean_colour - torch.tensor(COLOURS[n])).abs().sum() for n in names])
    result["colour"] = names[int(distances.argmin())]
    points = torch.stack(centroids)
    result["position"] = tuple(points.mean(dim=0).tolist())
    if len(points) < 2:
        return result
    t = torch.tensor(frames)
    t = t - t.mean()
    slope = (t[:, None] * (points - points.mean(dim=0))).sum(dim=0) / (t**2).sum()  # (2,): per-frame velocity
    axis = int(slope.abs().argmax())
    result["direction"] = (("left", "right"), ("up", "down"))[axis][int(slope[axis] > 0)]
    result["speed"] = "fast" if float(slope.abs().max()) > sum(SPEEDS.values()) / 2 else "slow"
    return result


def agreement(clips: torch.Tensor, attributes: list[tuple]) -> float:
    """Fraction of ``clips`` (N, FRAMES, 3, 32, 32) in [0, 1] whose detected colour, direction and speed all equal
    the prompted ones and whose mean centroid lies within 0.15 of the centre (the paths are centred)."""
    correct = 0
    for clip, (colour, _, direction, speed) in zip(clips, attributes, strict=True):
        found = detect(clip)
        centred = found["position"] is not None and max(abs(v - 0.5) for v in found["position"]) <= 0.15
        correct += int(
            found["colour"] == colour and found["direction"] == direction and found["speed"] == speed and centred
        )
    return correct / len(clips)
