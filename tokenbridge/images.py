"""Image grids and plots (PIL and matplotlib; no torchvision)."""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .files import atomic_path


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images `[N, C, H, W]` in [-1, 1] (C = 1 or 3) -> uint8 array `[N, H, W, C]`."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1|3, H, W], got shape {tuple(images.shape)}")
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def from_uint8(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images `[N, H, W, C]` (or `[N, H, W]`) in [0, 255] -> float32 `[N, C, H, W]` in [-1, 1]."""
    x = torch.as_tensor(np.asarray(array))
    if x.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 in [0, 255], got {x.dtype}")
    if x.dim() == 3:
        x = x.unsqueeze(-1)
    if x.dim() != 4:
        raise ValueError(f"images must be [N, H, W, C] or [N, H, W], got shape {tuple(x.shape)}")
    # a contiguous NCHW copy: the permuted view would look channels-last to convolutions (another kernel)
    return x.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1.0)


def image_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, scale: int = 1) -> Image.Image:
    """Tile `[N, C, H, W]` images in [-1, 1] into one PIL image, `nrow` images per row, upscaled by `scale`."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    canvas = np.full((rows * (h + padding) + padding, ncol * (w + padding) + padding, c), 255, np.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + k * (w + padding)
        canvas[y:y + h, x:x + w] = arr[i]
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8, scale: int = 1) -> Path:
    """Save `[N, C, H, W]` images in [-1, 1] as one PNG grid; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image_grid(images, nrow=nrow, scale=scale).save(tmp, format="PNG")
    return path


def _text_width(draw: ImageDraw.ImageDraw, text: str) -> int:
    return int(math.ceil(draw.textlength(text)))


def labelled_grid(images: torch.Tensor, row_labels: Sequence[str], nrow: int = 8, padding: int = 2, scale: int = 1,
                  colour_bar: tuple[str, str] | None = None) -> Image.Image:
    """`image_grid` with each row's name in a white margin on its left (``row_labels``, one per row) and, with
    ``colour_bar`` = (low end's name, high end's name), a black-to-white bar on its right. The grid's own pixels
    are unchanged: it is pasted whole, so a crop of the result equals ``image_grid(images, nrow, padding, scale)``."""
    grid = image_grid(images, nrow=nrow, padding=padding, scale=scale)
    rows = math.ceil(len(images) / min(nrow, len(images)))
    if len(row_labels) != rows:
        raise ValueError(f"{rows} rows of images but {len(row_labels)} row labels")
    probe = ImageDraw.Draw(grid.copy())
    left = max(_text_width(probe, text) for text in row_labels) + 8
    bar_width = 0 if colour_bar is None else max(_text_width(probe, text) for text in colour_bar) + 24
    canvas = Image.new(grid.mode, (left + grid.width + bar_width, grid.height), "white")
    canvas.paste(grid, (left, 0))
    draw = ImageDraw.Draw(canvas)
    h = images.shape[-2]
    for r, text in enumerate(row_labels):  # vertically centred on the row's images
        draw.text((4, (padding + r * (h + padding) + h // 2) * scale - 6), text, fill="black")
    if colour_bar is not None:
        x0, top, bottom = left + grid.width + 6, 16, grid.height - 16
        for y in range(top, bottom):  # white (high) at the top, black (low) at the bottom
            shade = round(255 * (bottom - 1 - y) / max(bottom - top - 1, 1))
            draw.line([(x0, y), (x0 + 10, y)], fill=shade if grid.mode == "L" else (shade,) * 3)
        draw.text((x0, 2), colour_bar[1], fill="black")
        draw.text((x0, bottom + 2), colour_bar[0], fill="black")
    return canvas


def grid_row_labels(labels: Sequence[int], names: Sequence[str], nrow: int) -> list[str]:
    """One name per row of a grid of images with class ``labels``, ``nrow`` to a row: the class name when the row
    holds one class, else the row's class indices."""
    ncol = min(nrow, len(labels))
    rows = [list(labels[i:i + ncol]) for i in range(0, len(labels), ncol)]
    return [names[row[0]] if len(set(row)) == 1 and row[0] < len(names) else " ".join(map(str, row))
            for row in rows]


def save_labelled_grid(images: torch.Tensor, path: str | os.PathLike, row_labels: Sequence[str], nrow: int = 8,
                       scale: int = 1, colour_bar: tuple[str, str] | None = None) -> Path:
    """Save `labelled_grid` as a PNG (atomically); returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        labelled_grid(images, row_labels, nrow=nrow, scale=scale, colour_bar=colour_bar).save(tmp, format="PNG")
    return path
