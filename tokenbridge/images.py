"""Image grids and plots (PIL and matplotlib; no torchvision)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

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
