"""Editing images with any generator family: inpainting, outpainting and class-guided regeneration of a region.

    latents = encode_images(model, images)                       # [N, C, h, w] with the generator's recorded VAE
    result = edit(model, images, keep_region("left", *token_grid(model)[0]), labels=[7] * len(images))

The kept region is given on the *token grid* (a MAR token is a p x p patch of latents): ``keep`` [N, gh, gw] or
[gh, gw] bool, True = keep. Presets (`keep_region`): left, right, top, bottom (that half kept), center (the middle
half of each side kept: outpainting) and border (all but the center: inpainting). A painted mask at image
resolution becomes a token mask by `image_mask_to_tokens`: a token is kept only when every pixel under it is kept,
so that anything painted over is regenerated. The `tokenbridge edit` command (`run_edit`) reads images from any
image source, edits them and writes a labelled grid and, with ``npz``, ``edits.npz``.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from .checkpoint import load_generator
from .data import FASHION_MNIST_CLASSES
from .files import atomic_path, check_writable
from .generate import resolve_vae, with_defaults
from .generators import check_sample_options
from .images import image_grid, to_uint8
from .progress import progress_option
from .sources import decode_image, image_source
from .vae import VAE

KEEP_PRESETS = ("left", "right", "top", "bottom", "center", "border")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def token_grid(model: nn.Module) -> tuple[tuple[int, int], int]:
    """((gh, gw) token grid, patch size p) of a generator of any family (D2C: its stage 2)."""
    body = getattr(model, "stage2", model)
    p = int(body.patch_size)
    h, w = body.grid_size
    return (h // p, w // p), p


def keep_region(name: str, gh: int, gw: int) -> torch.Tensor:
    """A preset kept region on a gh x gw token grid: bool [gh, gw], True = keep (see the module docstring)."""
    keep = torch.zeros(gh, gw, dtype=torch.bool)
    if name == "left":
        keep[:, : gw // 2] = True
    elif name == "right":
        keep[:, gw // 2:] = True
    elif name == "top":
        keep[: gh // 2] = True
    elif name == "bottom":
        keep[gh // 2:] = True
    elif name in ("center", "border"):
        keep[gh // 4: gh - gh // 4, gw // 4: gw - gw // 4] = True
        keep = ~keep if name == "border" else keep
    else:
        raise ValueError(f"unknown kept region {name!r}: expected one of {KEEP_PRESETS} or a mask image")
    return keep


def image_mask_to_tokens(mask: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """A mask at image resolution [..., R, R'] bool (True = keep) -> the token grid [..., gh, gw]: a token is kept
    only when every pixel under it is kept. R and R' must be multiples of gh and gw."""
    r, c = mask.shape[-2:]
    if r % gh or c % gw:
        raise ValueError(f"a {r}x{c} mask does not divide into the {gh}x{gw} token grid")
    cells = mask.reshape(*mask.shape[:-2], gh, r // gh, gw, c // gw)
    return cells.all(-1).all(-2)


def read_mask(path: str | os.PathLike, gh: int, gw: int, resolution: int) -> torch.Tensor:
    """MASK.png (white = keep, black = regenerate; grey levels >= 128 count as white) -> token mask [gh, gw].
    The image is either the token grid's size or the images' resolution."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--keep {path}: no such mask image (or give one of {KEEP_PRESETS})")
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L"))
    except Exception as e:  # PIL raises many kinds for a bad file
        raise ValueError(f"--keep {path}: cannot read the mask image ({e})") from None
    if arr.shape not in ((gh, gw), (resolution, resolution)):
        raise ValueError(f"mask image {path} is {arr.shape[1]}x{arr.shape[0]}; expected the token grid "
                         f"({gw}x{gh}) or the image resolution ({resolution}x{resolution})")
    return image_mask_to_tokens(torch.from_numpy(arr >= 128), gh, gw)


def token_mask_to_latent(keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Token mask [N, gh, gw] -> latent mask [N, gh * p, gw * p] (every latent of a kept patch kept)."""
    return keep.repeat_interleave(patch_size, -2).repeat_interleave(patch_size, -1)


def check_images(images: torch.Tensor, vae: VAE, grid: tuple[int, int]) -> None:
    """images must be float [N, Ci, R, R'] in [-1, 1] with the VAE's channels and the size that encodes to the
    generator's latent grid."""
    size = (grid[0] * vae.stride, grid[1] * vae.stride)
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise ValueError(f"images must be a float tensor [N, {vae.image_channels}, {size[0]}, {size[1]}] in [-1, 1], "
                         f"got {getattr(images, 'dtype', type(images).__name__)} (uint8 pictures: "
                         f"tokenbridge.images.from_uint8)")
    if images.dim() != 4 or images.shape[1] != vae.image_channels:
        raise ValueError(f"images must be [N, {vae.image_channels}, {size[0]}, {size[1]}] (the VAE's "
                         f"{vae.image_channels} channel(s)), got shape {tuple(images.shape)}")
    if tuple(images.shape[2:]) != size:
        raise ValueError(f"images must be {size[0]}x{size[1]} (this generator's {grid[0]}x{grid[1]} latent grid "
                         f"x the VAE's stride {vae.stride}), got {images.shape[2]}x{images.shape[3]}")
    if not bool(torch.isfinite(images).all()) or images.numel() and float(images.abs().max()) > 1.0:
        raise ValueError("images must be finite and lie in [-1, 1]")


@torch.no_grad()
def encode_images(model: nn.Module, images: torch.Tensor, vae: str | VAE | None = None,
                  device: str | torch.device = "cpu", batch_size: int = 256,
                  allow_other_vae: bool = False) -> torch.Tensor:
    """images float [N, Ci, R, R'] in [-1, 1] -> latents [N, C, h, w] by the generator's recorded VAE (posterior
    mean, as the token caches it was trained on), ready for ``sample(known=...)``."""
    vae = resolve_vae(model, vae, device, allow_other_vae)
    body = getattr(model, "stage2", model)
    check_images(images, vae, tuple(body.grid_size))
    return torch.cat([vae.encode(images[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(images), batch_size)])


def _batches(keep: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Row indices grouped by the number of kept tokens (one MAR schedule per call), cut to batch_size."""
    counts = keep.flatten(1).sum(1)
    groups = [torch.nonzero(counts == c)[:, 0] for c in counts.unique()]
    return [g[i:i + batch_size] for g in groups for i in range(0, len(g), batch_size)]


@torch.no_grad()
def edit(model: str | os.PathLike | nn.Module, images: torch.Tensor, keep: torch.Tensor,
         labels: Sequence[int] | torch.Tensor, per_image: int = 1, vae: str | VAE | None = None, seed: int = 0,
         device: str | torch.device = "cpu", batch_size: int = 256, allow_other_vae: bool = False,
         progress: bool = False, **options: Any) -> dict[str, torch.Tensor]:
    """Regenerate the region of ``images`` [N, Ci, R, R'] (in [-1, 1]) outside ``keep`` (token grid [N, gh, gw]
    or [gh, gw] bool, True = keep) under ``labels`` [N], ``per_image`` times each.

    options: the family's sampling options (unset ones: the generator's recorded defaults). Returns dict(images
    [N * K, Ci, R, R'] in [-1, 1] (image i's K results at rows i*K .. i*K+K-1), labels [N * K], keep [N * K, gh, gw],
    source_index [N * K], latents [N * K, C, h, w], originals [N, ...], reconstructions [N, ...] (the VAE's)),
    on the CPU. Deterministic under ``seed``. progress: each batch's sampling bar on stderr.
    """
    model = load_generator(model, device) if not isinstance(model, nn.Module) else model.to(device).eval()
    options = with_defaults(model, options)
    (gh, gw), p = token_grid(model)
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    keep = keep.expand(len(images), gh, gw) if keep.dim() == 2 else keep
    if keep.dtype != torch.bool or tuple(keep.shape) != (len(images), gh, gw) or len(labels) != len(images):
        raise ValueError(f"keep must be bool [N={len(images)}, {gh}, {gw}] (or [{gh}, {gw}]) and labels [N], got "
                         f"keep {keep.dtype} {tuple(keep.shape)}, labels {tuple(labels.shape)}")
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) <= model.num_classes:
        raise ValueError(f"labels must lie in [0, {model.num_classes}] ({model.num_classes} = unconditional), got "
                         f"range [{int(labels.min())}, {int(labels.max())}]")
    decoder = resolve_vae(model, vae, device, allow_other_vae)
    known = encode_images(model, images, decoder, device, batch_size)
    rows = torch.arange(len(images)).repeat_interleave(int(per_image))
    keep_rows = keep[rows].contiguous()
    generator = torch.Generator(device=device).manual_seed(seed)
    latents = torch.empty(len(rows), *known.shape[1:])
    for batch in _batches(keep_rows, batch_size):
        src = rows[batch]
        out = model.sample(labels[src].to(device), generator=generator, known=known[src].to(device),
                           known_mask=token_mask_to_latent(keep_rows[batch], p).to(device),
                           **progress_option(model.sample, progress), **options)
        latents[batch] = out["latents"].float().cpu()
    return {"images": decode(decoder, latents, device, batch_size), "labels": labels[rows], "keep": keep_rows,
            "source_index": rows, "latents": latents, "originals": images.float().cpu(),
            "reconstructions": decode(decoder, known, device, batch_size)}


@torch.no_grad()
def decode(vae: VAE, latents: torch.Tensor, device: str | torch.device, batch_size: int) -> torch.Tensor:
    """latents [N, C, h, w] -> images [N, Ci, R, R'] in [-1, 1] on the CPU, batch by batch."""
    return torch.cat([vae.decode(latents[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(latents), batch_size)]).clamp(-1, 1)


# ---------------------------------------------------------------------------------------------- command line
def class_names(model: nn.Module) -> list[str]:
    """Display names of the generator's classes: Fashion-MNIST's for a Fashion-MNIST generator, else class i."""
    fmnist = getattr(model, "provenance", {}).get("vae") == "fmnist" and model.num_classes == len(FASHION_MNIST_CLASSES)
    return list(FASHION_MNIST_CLASSES) if fmnist else [f"class {i}" for i in range(model.num_classes)]


def load_images(spec: str, resolution: int, channels: int, split: str | None = "test",
                limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images float [N, channels, R, R] in [-1, 1], labels [N] or None) from an image file or from any source
    `cache-latents --data` takes: fmnist (of ``split``), folder:PATH, wds:PATTERN, hf:PATH; ``limit`` first ones."""
    path = Path(spec)
    if ":" not in spec and path.suffix.lower() in IMAGE_SUFFIXES:
        if not path.is_file():
            raise ValueError(f"--images {spec}: no such image file")
        return decode_image(path.read_bytes(), str(path), resolution, channels)[None], None
    if ":" not in spec and path.is_dir():
        raise ValueError(f"--images {spec} is a folder: write folder:{spec} (class sub-folders give the labels)")
    source = image_source(spec, resolution, channels, split=split, limit=limit)
    if len(source) == 0:
        raise ValueError(f"--images {spec}: the source holds no images")
    items = [source[i] for i in range(len(source))]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


def _picture(image: np.ndarray, scale: int) -> Image.Image:
    im = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).convert("RGB")
    return im.resize((im.width * scale, im.height * scale), Image.NEAREST)


def edit_grid(result: dict[str, torch.Tensor], names: list[str], scale: int = 3, titles: list[str] | None = None,
              row_labels: list[str] | None = None) -> Image.Image:
    """The labelled grid: one row per source image, original | kept region (the rest grey) | its K results, the
    class each row was generated under on its left (or ``row_labels``); ``titles``: the K result columns'."""
    n, k = len(result["originals"]), len(result["images"]) // len(result["originals"])
    size = result["originals"].shape[-1]
    shown = result["keep"][::k].float()[:, None]
    shown = torch.nn.functional.interpolate(shown, size=tuple(result["originals"].shape[-2:]), mode="nearest")
    kept = result["originals"] * shown  # regenerated part at 0: mid grey
    cell, pad, left, top = size * scale, 4, 110, 18
    canvas = Image.new("RGB", (left + (k + 2) * (cell + pad), top + n * (cell + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    titles = titles or [f"result {i + 1}" for i in range(k)]
    for j, title in enumerate(["original", "kept region", *titles]):
        draw.text((left + j * (cell + pad), 3), title, fill="black")
    pictures = [to_uint8(result["originals"]), to_uint8(kept), to_uint8(result["images"])]
    for i in range(n):
        y = top + i * (cell + pad)
        label = int(result["labels"][i * k])
        text = row_labels[i] if row_labels else f"-> {names[label] if label < len(names) else 'unconditional'}"
        draw.text((4, y + cell // 2 - 6), text, fill="black")
        row = [pictures[0][i], pictures[1][i], *pictures[2][i * k:(i + 1) * k]]
        for j, image in enumerate(row):
            canvas.paste(_picture(image, scale), (left + j * (cell + pad), y))
    return canvas


def save_edits(result: dict[str, torch.Tensor], out_dir: str | os.PathLike, names: list[str],
               npz: bool = False) -> list[Path]:
    """Write edits.png (`edit_grid`) and with ``npz`` edits.npz: images uint8 [N, H, W, C] (the results), labels
    [N], keep [N, gh, gw] bool (the token-grid mask), source_index [N]; atomically. Returns the paths."""
    out_dir = Path(out_dir)
    written = [out_dir / "edits.png"]
    with atomic_path(written[0]) as tmp:
        edit_grid(result, names).save(tmp, format="PNG")
    if npz:
        written.append(out_dir / "edits.npz")
        with atomic_path(written[1]) as tmp, open(tmp, "wb") as f:
            np.savez(f, images=to_uint8(result["images"]), labels=result["labels"].numpy(),
                     keep=result["keep"].numpy(), source_index=result["source_index"].numpy())
    return written


def run_edit(model: str, images: str, keep: str, out: str | os.PathLike, labels: Sequence[int] | None = None,
             per_image: int = 1, split: str = "test", limit: int | None = 8, npz: bool = False,
             vae: str | None = None, device: str = "cpu", seed: int = 0, batch_size: int = 256,
             allow_other_vae: bool = False, progress: bool = False, **options: Any) -> list[Path]:
    """`tokenbridge edit`: everything checked (output folder, model, kept region, labels) before the images are
    encoded. labels: one class for every image or one per image (default: the source's). Returns the written
    paths."""
    check_writable(Path(out) / "edits.png", "edit output")
    generator = load_generator(model, device)
    options = check_sample_options(type(generator), options, prefix="sampling option")
    decoder = resolve_vae(generator, vae, device, allow_other_vae)
    (gh, gw), p = token_grid(generator)
    resolution = gh * p * decoder.stride
    region = keep_region(keep, gh, gw) if keep in KEEP_PRESETS else read_mask(keep, gh, gw, resolution)
    if labels is not None and not all(0 <= int(y) <= generator.num_classes for y in labels):
        raise ValueError(f"--labels must lie in [0, {generator.num_classes}] ({generator.num_classes} = "
                         f"unconditional), got {list(labels)}")
    pictures, source_labels = load_images(images, resolution, decoder.image_channels, split, limit)
    if labels is None and source_labels is None:
        raise ValueError(f"--images {images} has no labels: give the class to generate with --labels")
    if labels is not None and len(labels) not in (1, len(pictures)):
        raise ValueError(f"--labels gives {len(labels)} classes for {len(pictures)} images: give one, or one per image")
    target = (source_labels if labels is None else torch.tensor(list(labels)).expand(len(pictures)))
    result = edit(generator, pictures, region, target, per_image=per_image, vae=decoder, seed=seed, device=device,
                  batch_size=batch_size, progress=progress, **options)
    return save_edits(result, out, class_names(generator), npz=npz)
