"""Tiny token caches in the cache-latents format, written directly (shared by the tests of the latent families)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from tokenbridge.tokens import TOKENS_FORMAT


def write_token_file(path: Path, latents: torch.Tensor | None, n: int = 20) -> Path:
    """A cache_latents-format file (VAE "fmnist") with latents [n, C, 8, 8] (or none) and matching indices."""
    c = latents.shape[1] if latents is not None else 4
    tensors = {"indices": torch.randint(0, 64, (n, 8, 8, c), dtype=torch.uint8),
               "labels": torch.randint(0, 10, (n,), dtype=torch.int64)}
    if latents is not None:
        tensors["latents"] = latents
    meta = {"format": TOKENS_FORMAT, "version": "1", "levels": "64", "quantizer": "{}", "num_classes": "10",
            "vae": "fmnist"}
    save_file(tensors, str(path), metadata=meta)
    return path
