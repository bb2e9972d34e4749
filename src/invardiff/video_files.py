"""Video outputs as files: clips side by side as an animated GIF, and as a frame-strip PNG (Pillow only).

Clips are (N, F, C, H, W) in [0, 1], WanPipeline's ``output_type="pt"`` layout. The side-by-side files put full
compute in the top row and the cached run under it, one column per clip, so that a frozen or jittering frame shows
against its reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .files import atomic_path


def save_gif(clip: torch.Tensor, path: Path, scale: int = 4, frame_ms: int = 150) -> None:
    """One clip (F, C, H, W) in [0, 1] as a looping GIF, each pixel ``scale`` x ``scale``."""
    frames = [to_pil(frame, scale) for frame in clip]
    with atomic_path(path) as temporary:
        frames[0].save(temporary, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)


def save_side_by_side_gif(
    rows: list[tuple[str, torch.Tensor]], path: Path, title: str = "", scale: int = 4, frame_ms: int = 150
) -> None:
    """An animated GIF of labelled rows of clips, ``rows`` = [(label, (N, F, C, H, W)), ...], all of one shape:
    frame f of the GIF shows frame f of every clip."""
    from PIL import Image

    frames = [
        _sheet([(label, clips[:, index]) for label, clips in rows], title, scale) for index in range(_frames(rows))
    ]
    frames = [frame.convert("P", palette=Image.Palette.ADAPTIVE, colors=255) for frame in frames]
    with atomic_path(path) as temporary:
        frames[0].save(temporary, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)


def save_frame_strip(rows: list[tuple[str, torch.Tensor]], path: Path, title: str = "", scale: int = 3) -> None:
    """A PNG: for each clip, one strip of its frames left to right per row of ``rows`` (full compute, then the
    cached run), clips one under the other."""
    sheets = []
    count = rows[0][1].shape[0]
    for clip in range(count):
        # one sheet per clip: its rows' frames as the columns
        sheets.append(_sheet([(f"{label} #{clip}", clips[clip]) for label, clips in rows], "", scale))
    from PIL import Image, ImageDraw, ImageFont

    header = 24 if title else 0
    width = max(sheet.width for sheet in sheets)
    canvas = Image.new("RGB", (width, header + sum(sheet.height for sheet in sheets)), "white")
    if title:
        ImageDraw.Draw(canvas).text((8, 4), title, fill="black", font=ImageFont.load_default(size=14))
    y = header
    for sheet in sheets:
        canvas.paste(sheet, (0, y))
        y += sheet.height
    with atomic_path(path) as temporary:
        canvas.save(temporary)


def _frames(rows) -> int:
    counts = {clips.shape[1] for _, clips in rows}
    if len(counts) != 1:
        raise ValueError(f"Rows of clips need one frame count, got {sorted(counts)}.")
    return counts.pop()


def _sheet(rows: list[tuple[str, torch.Tensor]], title: str, scale: int):
    """Labelled rows of images (each (N, C, H, W)) on a white canvas."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=12)
    height, width = rows[0][1].shape[-2:]
    tile_h, tile_w, gap, left = height * scale, width * scale, 4, 120
    header = 22 if title else 4
    columns = max(images.shape[0] for _, images in rows)
    canvas = Image.new("RGB", (left + columns * (tile_w + gap), header + len(rows) * (tile_h + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((6, 4), title, fill="black", font=font)
    for row, (label, images) in enumerate(rows):
        y = header + row * (tile_h + gap)
        draw.text((6, y + tile_h // 2 - 6), label, fill="black", font=font)
        for column, image in enumerate(images):
            canvas.paste(to_pil(image, scale), (left + column * (tile_w + gap), y))
    return canvas


def to_pil(image: torch.Tensor, scale: int):
    """A (C, H, W) image in [0, 1] as a PIL image, each pixel ``scale`` x ``scale``."""
    from PIL import Image

    image = torch.nn.functional.interpolate(image[None].float().cpu(), scale_factor=scale, mode="nearest")[0]
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).convert("RGB")
