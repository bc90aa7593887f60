"""Engine for `tokenbridge sample`: load a generator and a VAE, sample token grids, decode, write files."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .files import atomic_path
from .images import save_image_grid
from .model import TokenBridgeGenerator, build_generator

WEIGHTS = Path(__file__).parent / "weights"
FMNIST_GENERATOR = WEIGHTS / "fmnist_generator.safetensors"


def load_generator(spec: str | os.PathLike = "fmnist", device: str | torch.device = "cpu") -> TokenBridgeGenerator:
    """Load a generator in eval mode from "fmnist" (the shipped embedded model), an exported `.safetensors`
    (model config in its metadata) or a training `checkpoint.pt` (its EMA weights)."""
    path = FMNIST_GENERATOR if str(spec) == "fmnist" else Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"generator weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if "config" not in metadata:
            raise ValueError(f"{path} has no 'config' metadata; export it with tokenbridge.train.export_weights")
        model = build_generator(json.loads(metadata["config"]))
        model.load_state_dict(load_file(str(path)))
        return model.to(device).eval()
    from .train import load_model_from_checkpoint

    return load_model_from_checkpoint(path, ema=True, device=device)


@torch.no_grad()
def generate(model: str | TokenBridgeGenerator, vae, labels: Sequence[int], num_iter: int = 16, cfg: float = 3.0,
             cfg_schedule: str = "linear", temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             order: str = "random", seed: int = 0, device: str | torch.device = "cpu",
             batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Sample class-conditional images.

    Args:
        model: a generator or a spec for `load_generator`; vae: a VAE or a spec for `tokenbridge.vae.load_vae`.
        labels: one class index per image.
    Returns:
        dict(images [N, Ci, H, W] in [-1, 1], indices [N, h, w, C], confidence [N, h, w], labels [N]), on CPU.
    """
    from .vae import load_vae

    model = load_generator(model, device) if not isinstance(model, torch.nn.Module) else model.to(device).eval()
    vae = load_vae(vae, device=device) if isinstance(vae, str) else vae.to(device).eval()
    labels = torch.as_tensor(list(labels), dtype=torch.long)
    if labels.numel() == 0:
        raise ValueError("no labels given: pass at least one class index")
    generator = torch.Generator(device=device).manual_seed(seed)
    chunks = []
    for start in range(0, len(labels), batch_size):
        out = model.sample(labels[start:start + batch_size].to(device), num_iter=num_iter, cfg=cfg,
                           cfg_schedule=cfg_schedule, temperature=temperature, top_k=top_k, top_p=top_p,
                           order=order, generator=generator)
        out["images"] = vae.decode(out["latents"]).clamp(-1, 1)
        chunks.append({k: v.cpu() for k, v in out.items()})
    result = {k: torch.cat([c[k] for c in chunks]) for k in ("images", "indices", "confidence")}
    result["labels"] = labels
    return result


def confidence_images(confidence: torch.Tensor, size: int) -> torch.Tensor:
    """Per-token confidence `[N, h, w]` (log-probabilities) -> grey images `[N, 1, size, size]` in [-1, 1],
    normalised over the whole batch so that maps can be compared (white = most confident)."""
    c = confidence.float()
    c = (c - c.min()) / (c.max() - c.min()).clamp_min(1e-8)
    maps = torch.nn.functional.interpolate(c[:, None], size=(size, size), mode="nearest")
    return maps * 2 - 1


def save_samples(result: dict, out_dir: str | Path, nrow: int = 8, show_confidence: bool = False,
                 npz: bool = False) -> list[Path]:
    """Write samples.png (and confidence.png, samples.npz); returns the written paths."""
    out_dir = Path(out_dir)
    images = result["images"]
    written = [save_image_grid(images, out_dir / "samples.png", nrow=nrow, scale=3)]
    if show_confidence:
        maps = confidence_images(result["confidence"], images.shape[-1])
        if images.shape[1] == 3:
            maps = maps.expand(-1, 3, -1, -1)
        written.append(save_image_grid(maps, out_dir / "confidence.png", nrow=nrow, scale=3))
    if npz:
        path = out_dir / "samples.npz"
        array = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        indices = result["indices"].numpy().astype(np.uint8 if result["indices"].max() < 256 else np.int32)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, images=array, labels=result["labels"].numpy(), indices=indices)
        written.append(path)
    return written
