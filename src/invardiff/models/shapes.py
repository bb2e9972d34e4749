"""Procedural coloured-shape images and their prompts: the offline training data of `flux-shapes`.

Each image is 32x32 RGB: one shape (circle, square, triangle) in one colour at one position (left, right, top,
bottom, center) with a little size and offset jitter, on a black or white background, with a faint diagonal
texture on the background. The prompt names all of it: "a red circle on the left, black background".
"""

from __future__ import annotations

import itertools

import torch


COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.25, 0.95), "yellow": (0.95, 0.85, 0.1)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3), "bottom": (0.5, 0.7), "center": (0.5, 0.5)}
BACKGROUNDS = {"black": 0.05, "white": 0.95}
SIZE = 32


def prompt_for(colour: str, shape: str, position: str, background: str) -> str:
    place = "in the center" if position == "center" else f"on the {position}"
    return f"a {colour} {shape} {place}, {background} background"


ALL_ATTRIBUTES = list(itertools.product(COLOURS, SHAPES, POSITIONS, BACKGROUNDS))
ALL_PROMPTS = [prompt_for(*attributes) for attributes in ALL_ATTRIBUTES]
VOCABULARY = sorted({word for prompt in ALL_PROMPTS for word in prompt.replace(",", " ,").split()})


def grid(size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates ``x, y`` in [0, 1], each (size, size)."""
    axis = (torch.arange(size) + 0.5) / size
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return x, y


def shape_mask(shape: str, cx: float, cy: float, radius: float, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The pixels of ``shape`` centred at (cx, cy) of size ``radius`` on the coordinates ``x, y`` of :func:`grid`."""
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= radius**2
    if shape == "square":
        return ((x - cx).abs() <= radius * 0.85) & ((y - cy).abs() <= radius * 0.85)
    top, bottom = cy - radius, cy + radius * 0.8  # triangle pointing up
    half_width = (y - top) / (bottom - top) * radius
    return (y >= top) & (y <= bottom) & ((x - cx).abs() <= half_width)


def render(colour: str, shape: str, position: str, background: str, generator: torch.Generator) -> torch.Tensor:
    """One image, (3, 32, 32) in [-1, 1]."""
    jitter = (torch.rand(3, generator=generator) - 0.5) * torch.tensor([0.08, 0.08, 0.06])
    cx, cy = (torch.tensor(POSITIONS[position]) + jitter[:2]).tolist()
    radius = 0.16 + float(jitter[2])
    x, y = grid()
    mask = shape_mask(shape, cx, cy, radius, x, y)
    level = BACKGROUNDS[background]
    texture = 0.06 * torch.sign(torch.sin((x + y) * 40.0)) * (1 if level < 0.5 else -1)  # faint diagonal stripes
    image = (level + texture).clamp(0, 1).expand(3, SIZE, SIZE).clone()
    colour_values = torch.tensor(COLOURS[colour])[:, None, None].expand(3, SIZE, SIZE)
    image[:, mask] = colour_values[:, mask]
    return image * 2 - 1


def sample_batch(batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str], list[tuple]]:
    index = torch.randint(0, len(ALL_ATTRIBUTES), (batch_size,), generator=generator).tolist()
    attributes = [ALL_ATTRIBUTES[i] for i in index]
    images = torch.stack([render(*a, generator=generator) for a in attributes])
    return images, [prompt_for(*a) for a in attributes], attributes
