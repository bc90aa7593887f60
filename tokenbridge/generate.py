"""The sampling entry point for every generator family: load a generator and the VAE it was trained on, sample,
decode, write files.

    result = generate("fmnist", labels=[0, 1, 2], cfg=3.0)   # images [3, 1, 32, 32] in [-1, 1]
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .checkpoint import load_generator
from .files import atomic_path
from .generators import check_sample_options
from .images import grid_row_labels, save_image_grid, save_labelled_grid, to_uint8
from .progress import bar, progress_option, wanted
from .vae import VAE, load_vae, vae_fingerprint


def sampling_defaults(model: nn.Module, sampler: str | None = None) -> dict[str, Any]:
    """The sampling options a generator records (its run config's ``sample`` section), validated.

    sampler "paper": the options recorded for the sampler as it was before the toolbox (``sample_paper``), where
    the generator records them: a generator whose defaults moved to a faster setting keeps the old ones there, so
    that ``sampler="paper"`` still runs today's sampler with today's step counts."""
    record = getattr(model, "provenance", {})
    paper = record.get("sample_paper") if sampler == "paper" else None
    return check_sample_options(type(model), (record.get("sample") if paper is None else paper) or {})


def with_defaults(model: nn.Module, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` (validated, naming a bad one) over the generator's recorded defaults for the sampler they ask
    for (`sampling_defaults`)."""
    given = check_sample_options(type(model), options, prefix="sampling option")
    return {**sampling_defaults(model, given.get("sampler")), **given}


def resolve_vae(model: nn.Module, vae: str | VAE | None = None, device: str | torch.device = "cpu",
                allow_other_vae: bool = False) -> VAE:
    """The VAE to decode ``model``'s latents: the recorded one when ``vae`` is None. A VAE whose weights differ
    from the recorded fingerprint is refused (its latents mean something else) unless ``allow_other_vae``."""
    record = getattr(model, "provenance", {})
    recorded, fingerprint = record.get("vae"), record.get("vae_fingerprint")
    if vae is None:
        if recorded is None:
            raise ValueError("this generator does not record its VAE: name one (--vae / vae=)")
        vae = recorded
    name = vae if isinstance(vae, str) else type(vae).__name__
    vae = load_vae(vae, device=device) if isinstance(vae, str) else vae.to(device)
    if fingerprint and not allow_other_vae:
        found = vae_fingerprint(vae)
        if found != fingerprint:
            raise ValueError(f"the generator was trained on the VAE {recorded!r} (weights fingerprint {fingerprint}), "
                             f"but the VAE {name!r} has fingerprint {found}: its latents would decode to garbage. "
                             "Use the recorded VAE, or pass --allow-other-vae (allow_other_vae=True) to insist")
    return vae.eval()


@torch.no_grad()
def generate(model: str | os.PathLike | nn.Module, labels: Sequence[int], vae: str | VAE | None = None,
             seed: int = 0, device: str | torch.device = "cpu", batch_size: int = 256,
             allow_other_vae: bool = False, progress: bool = False, **options: Any) -> dict[str, torch.Tensor]:
    """Sample class-conditional images from a generator of any family.

    model: a generator or a spec for `load_generator` ("fmnist", a checkpoint.pt, an exported .safetensors).
    labels: one class index per image. vae: None = the VAE the generator was trained on (`resolve_vae`).
    options: the family's sampling options (e.g. num_iter, cfg, temperature); unset ones take the generator's
    recorded defaults, then its ``sample`` signature's. progress: bars with ETA on stderr (each batch's steps;
    the images, when there are several batches). Returns dict(images [N, Ci, H, W] in [-1, 1], labels [N],
    plus the family's per-sample outputs such as indices and confidence), on the CPU.
    """
    model = load_generator(model, device) if not isinstance(model, nn.Module) else model.to(device).eval()
    options = with_defaults(model, options)
    vae = resolve_vae(model, vae, device, allow_other_vae)
    labels = torch.as_tensor(list(labels), dtype=torch.long)
    if labels.numel() == 0:
        raise ValueError("no labels given: pass at least one class index")
    generator = torch.Generator(device=device).manual_seed(seed)
    chunks = []
    several = wanted(progress) and len(labels) > batch_size  # one batch: its step bar says it all
    images_bar = bar(total=len(labels), desc="images", unit="img", requested=several)
    for start in range(0, len(labels), batch_size):
        out = model.sample(labels[start:start + batch_size].to(device), generator=generator,
                           **progress_option(model.sample, progress), **options)
        out["images"] = vae.decode(out.pop("latents")).clamp(-1, 1)
        chunks.append({k: v.cpu() for k, v in out.items()})
        images_bar.update(len(out["images"]))
    images_bar.close()
    result = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
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
                 npz: bool = False, class_names: Sequence[str] | None = None) -> list[Path]:
    """Write samples.png (and confidence.png when the family reports confidence, samples.npz); returns the paths.
    class_names: name each grid row by its class in a left margin (the images themselves are unchanged); the
    confidence map then also gets a colour bar whose ends give the batch's lowest and highest log-probability."""
    out_dir = Path(out_dir)
    images = result["images"]
    rows = grid_row_labels(result["labels"].tolist(), class_names, nrow) if class_names is not None else None
    if rows is None:
        written = [save_image_grid(images, out_dir / "samples.png", nrow=nrow, scale=3)]
    else:
        written = [save_labelled_grid(images, out_dir / "samples.png", rows, nrow=nrow, scale=3)]
    if show_confidence and "confidence" in result:
        maps = confidence_images(result["confidence"], images.shape[-1])
        if images.shape[1] == 3:
            maps = maps.expand(-1, 3, -1, -1)
        if rows is None:
            written.append(save_image_grid(maps, out_dir / "confidence.png", nrow=nrow, scale=3))
        else:
            low, high = float(result["confidence"].min()), float(result["confidence"].max())
            written.append(save_labelled_grid(maps, out_dir / "confidence.png", rows, nrow=nrow, scale=3,
                                              colour_bar=(f"least sure: log p {low:.2f}",
                                                          f"most sure: log p {high:.2f}")))
    if npz:
        path = out_dir / "samples.npz"
        arrays = {"images": to_uint8(images), "labels": result["labels"].numpy()}
        if "indices" in result:
            arrays["indices"] = result["indices"].numpy().astype(np.uint8 if result["indices"].max() < 256 else np.int32)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
        written.append(path)
    return written
