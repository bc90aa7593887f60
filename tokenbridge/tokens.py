"""Token caches: encode a dataset once with a VAE, quantize it, and read it back for training.

`cache_latents` writes one safetensors file: ``indices`` [N, h, w, C] (uint8 when levels <= 256, else int16;
channel-last), ``labels`` int64 [N], optionally ``latents`` float32 or float16 [N, C, h, w] (scaled, channel-first;
for the data-derived channel order and the continuous-token families), the quantizer's buffers as ``quantizer.<name>`` (so that training and sampling
dequantize with exactly the quantizer that made the tokens) and string metadata: format, version, vae, vae_fingerprint,
quantizer (JSON), levels, scaling_factor, data, split, num_classes, sample_posterior. `CachedTokens` reads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from .config import DataConfig
from .budget import check_encode_request
from .files import atomic_path, check_target, holds_output, tensor_bytes
from .progress import disable
from .quantizer import DimensionwiseQuantizer
from .sources import image_source
from .vae import VAE, load_vae, vae_fingerprint

TOKENS_FORMAT = "tokenbridge-tokens"
FORMAT_VERSION = 1
LATENT_DTYPES = {"float16": torch.float16, "float32": torch.float32}  # how token caches may store latents


def image_dataset(data: DataConfig) -> Dataset:
    """The (image [Ci, H, W] in [-1, 1], label) dataset a data config names: ``fmnist``, ``folder:PATH``,
    ``wds:PATTERN`` (webdataset tar shards) or ``hf:PATH`` (a local Hugging Face datasets folder or parquet)."""
    return image_source(data.dataset, data.resolution, data.channels, split=data.split, limit=data.limit,
                        strict=data.strict_images, allow_large_images=data.allow_large_images)


@torch.no_grad()
def encode_latents(vae: VAE, images: torch.Tensor, sample_posterior: bool = False) -> torch.Tensor:
    """images [B, Ci, H, W] in [-1, 1] -> scaled latents float [B, C, h, w] (posterior mean unless sampled)."""
    latents = vae.encode(images, sample=True) if sample_posterior else vae.encode(images)
    if latents.ndim != 4:
        raise ValueError(f"vae.encode returned shape {tuple(latents.shape)}, expected [B, C, h, w]")
    return latents.float()


def index_dtype(levels: int) -> torch.dtype:
    """How token caches store indices: uint8 up to 256 levels, else int16 (up to 32768)."""
    return torch.uint8 if levels <= 256 else torch.int16


def latents_to_indices(quantizer: DimensionwiseQuantizer, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents [B, C, h, w] -> token indices long [B, h, w, C] (channel-last, as caches store them)."""
    return quantizer.quantize(latents.permute(0, 2, 3, 1).contiguous())


def fit_quantizer(quantizer: DimensionwiseQuantizer, vae: VAE, dataset: Dataset, data: DataConfig,
                   fit_samples: int, device: torch.device) -> None:
    """Fit a data-calibrated quantizer on the latents of ``fit_samples`` evenly spaced images."""
    n_fit = min(len(dataset), int(fit_samples))
    subset = Subset(dataset, torch.linspace(0, len(dataset) - 1, n_fit).long().tolist())
    loader = DataLoader(subset, batch_size=data.encode_batch)
    latents = [encode_latents(vae, x.to(device), data.sample_posterior).cpu()
               for x, _ in tqdm(loader, desc="fitting quantizer", disable=disable())]
    quantizer.fit(torch.cat(latents).permute(0, 2, 3, 1))


def _encode_all(vae: VAE, quantizer: DimensionwiseQuantizer, dataset: Dataset, data: DataConfig,
                device: torch.device) -> dict[str, torch.Tensor]:
    dtype = index_dtype(quantizer.levels)
    indices, labels, latents = [], [], []
    loader = DataLoader(dataset, batch_size=data.encode_batch, shuffle=False, drop_last=False)
    for images, label in tqdm(loader, desc=f"caching {data.dataset}:{data.split}", disable=disable()):
        lat = encode_latents(vae, images.to(device), data.sample_posterior)
        indices.append(latents_to_indices(quantizer, lat).to("cpu", dtype))
        labels.append(torch.as_tensor(label).to("cpu", torch.int64))
        if data.store_latents:
            latents.append(lat.to("cpu", LATENT_DTYPES[data.latents_dtype]))
    tensors = {"indices": torch.cat(indices).contiguous(), "labels": torch.cat(labels).contiguous()}
    if data.store_latents:
        tensors["latents"] = torch.cat(latents).contiguous()
    return tensors


@holds_output("out_path", "token file")
def cache_latents(data: DataConfig, out_path: str | os.PathLike, quantizer: dict[str, Any] | None = None,
                  device: str | torch.device = "cpu", seed: int = 0, fit_samples: int = 10000,
                  vae: VAE | None = None, dataset: Dataset | None = None, overwrite: bool = False) -> Path:
    """Encode ``data``'s images with its VAE, quantize them and write one token file atomically (module docstring).

    quantizer: DimensionwiseQuantizer keyword arguments (a model config's ``quantizer`` section). One with a data
    calibration is first fitted on ``fit_samples`` images. ``vae``/``dataset`` replace the ones ``data`` names
    (the spec ``data.vae`` is still recorded). Posterior samples (``data.sample_posterior``) draw from ``seed``.
    An existing ``out_path`` is replaced only with ``overwrite``; the path is checked before any encoding.
    """
    check_target(out_path, TOKENS_FORMAT, overwrite, "token file")
    if Path(out_path).exists() and not overwrite:
        raise ValueError(f"token file {out_path} already exists; pass --overwrite (overwrite=True) to replace it")
    device = torch.device(device)
    quant = DimensionwiseQuantizer(**(quantizer or {})).to(device)
    if quant.levels > 32768:
        raise ValueError(f"levels={quant.levels} does not fit int16 token storage")
    if dataset is None:
        dataset = image_dataset(data)
    elif data.limit is not None:
        dataset = Subset(dataset, range(min(data.limit, len(dataset))))
    if len(dataset) == 0:
        raise ValueError(f"dataset {data.dataset}:{data.split} is empty")
    shape = tuple(dataset[0][0].shape)
    check_encode_request(data.encode_batch, shape, f"encoding batches of {data.encode_batch} images {list(shape)}",
                         "lower data.encode_batch (--batch-size) or data.resolution")
    vae = (load_vae(data.vae, device) if vae is None else vae).to(device).eval()
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # posterior sampling draws from the global RNG; make the cache reproducible
    try:
        if not quant.fitted:
            fit_quantizer(quant, vae, dataset, data, fit_samples, device)
        tensors = _encode_all(vae, quant, dataset, data, device)
    finally:
        torch.random.set_rng_state(rng_state)
    tensors.update({f"quantizer.{k}": v.detach().cpu().contiguous() for k, v in quant.state_dict().items()})
    classes = getattr(dataset.dataset if isinstance(dataset, Subset) else dataset, "classes", None)
    scaling = getattr(vae, "scaling_factor", None)
    metadata = {
        "format": TOKENS_FORMAT, "version": str(FORMAT_VERSION),
        "vae": str(data.vae), "vae_fingerprint": vae_fingerprint(vae),
        "quantizer": json.dumps(quant.config()), "levels": str(quant.levels),
        "scaling_factor": json.dumps(None if scaling is None else float(scaling)),
        "data": data.dataset, "split": data.split, "sample_posterior": json.dumps(data.sample_posterior),
        "num_classes": str(len(classes) if classes is not None else int(tensors["labels"].max()) + 1),
    }
    with atomic_path(out_path, TOKENS_FORMAT, overwrite=overwrite or None, needed=tensor_bytes(tensors)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(out_path)


def rebuild_quantizer(config: dict[str, Any], state: dict[str, torch.Tensor], source: str) -> DimensionwiseQuantizer:
    """The quantizer a token cache records (its kwargs and, when fitted, its buffers); errors name ``source``."""
    try:
        quant = DimensionwiseQuantizer(**config)
        if state:
            quant.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{source}: cannot rebuild its quantizer: {e}") from e
    return quant


class CachedTokens(Dataset):
    """A cache_latents file as (indices long [h, w, C], label long scalar) items.

    Attributes: indices (stored dtype, [N, h, w, C]), labels int64 [N], latents (float [N, C, h, w] or None),
    levels, num_classes, grid_shape (h, w, C), metadata (str -> str), quantizer_config (dict), scaling_factor,
    quantizer_state (the quantizer's buffers), vae (the spec that made the file) and vae_fingerprint (or None).
    Every index is checked to lie in [0, levels) here, once, so training steps need not check again.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"token file {self.path} does not exist (make it with `tokenbridge cache-latents`)")
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for truncated/garbled files
            raise ValueError(f"token file {self.path} is corrupt or not a safetensors file: {e}") from e
        if meta.get("format") != TOKENS_FORMAT:
            raise ValueError(f"{self.path} is not a tokenbridge token file (metadata format={meta.get('format')!r})")
        self._check_tensors(tensors)
        try:
            self.levels = int(meta["levels"])
            self.quantizer_config = json.loads(meta["quantizer"])
            self.scaling_factor = json.loads(meta.get("scaling_factor", "null"))
            self.num_classes = int(meta.get("num_classes", int(tensors["labels"].max()) + 1))
        except (KeyError, ValueError) as e:
            raise ValueError(f"token file {self.path} has bad metadata: {e}") from e
        idx = tensors["indices"]
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.levels):
            raise ValueError(f"{self.path}: indices outside [0, {self.levels})")
        self.indices, self.labels, self.latents = idx, tensors["labels"], tensors.get("latents")
        self.metadata, self.vae, self.vae_fingerprint = meta, meta.get("vae"), meta.get("vae_fingerprint")
        self.quantizer_state = {k[len("quantizer."):]: v for k, v in tensors.items() if k.startswith("quantizer.")}
        self.grid_shape = tuple(idx.shape[1:])

    def _check_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for key in ("indices", "labels"):
            if key not in tensors:
                raise ValueError(f"token file {self.path} has no '{key}' tensor")
        idx, lab, lat = tensors["indices"], tensors["labels"], tensors.get("latents")
        if idx.dtype not in (torch.uint8, torch.int16) or idx.ndim != 4:
            raise ValueError(f"{self.path}: indices must be uint8/int16 [N, h, w, C], got {idx.dtype} {list(idx.shape)}")
        if lab.dtype != torch.int64 or lab.shape != (idx.shape[0],):
            raise ValueError(f"{self.path}: labels must be int64 [{idx.shape[0]}], got {lab.dtype} {list(lab.shape)}")
        if lat is not None and (lat.ndim != 4 or lat.shape[0] != idx.shape[0] or lat.shape[1] != idx.shape[3]
                                or lat.dtype not in LATENT_DTYPES.values()):
            raise ValueError(f"{self.path}: latents {lat.dtype} {list(lat.shape)} do not match indices "
                             f"{list(idx.shape)} (expected float16/float32 [N, C, h, w])")

    def __len__(self) -> int:
        return self.indices.shape[0]

    def make_quantizer(self) -> DimensionwiseQuantizer:
        """The DimensionwiseQuantizer that made these tokens (fitted calibration included)."""
        return rebuild_quantizer(self.quantizer_config, self.quantizer_state, f"token file {self.path}")

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.indices[i].long(), self.labels[i]


class LatentTokens(Dataset):
    """The continuous latents of a token cache (CachedTokens or ShardedTokens) as (latents float32 [h, w, C]
    channel-last, label long scalar) items: what the continuous-token families train on. Every other attribute
    (grid_shape, num_classes, vae, path, ...) is the cache's. A cache without latents is refused; non-finite
    latents are refused when the cache is opened (a file in memory) or when the item is read (shards)."""

    def __init__(self, tokens: Dataset):
        if getattr(tokens, "latents", None) is None:
            raise ValueError(f"token file {tokens.path} stores no continuous latents; the continuous-token families "
                             "train on latents: make it with `tokenbridge cache-latents` and data.store_latents=true "
                             "(data.latents_dtype=float16 halves the file)")
        self.tokens = tokens
        if isinstance(tokens.latents, torch.Tensor):
            self._check_finite(tokens.latents, "")

    def _check_finite(self, latents: torch.Tensor, where: str) -> None:
        if not bool(torch.isfinite(latents).all()):
            raise ValueError(f"token file {self.tokens.path}: latents{where} hold NaN or inf values")

    def __getattr__(self, name: str) -> Any:
        if name == "tokens":  # not set yet (unpickling): no delegation loop
            raise AttributeError(name)
        return getattr(self.tokens, name)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        latents = self.tokens.latents[int(i)]
        if not isinstance(self.tokens.latents, torch.Tensor):
            self._check_finite(latents, f" of item {int(i)}")
        return latents.permute(1, 2, 0).float(), self.tokens.labels[int(i)]


class OnTheFlyTokens:
    """Turns an (images, labels) batch into (indices [B, h, w, C], labels) with a frozen VAE and a quantizer, for
    training without a token cache (``data.source: images``); with ``quantizer=None`` into the continuous
    latents (latents float [B, h, w, C], labels)."""

    def __init__(self, data: DataConfig, quantizer: dict[str, Any] | None, device: torch.device):
        self.vae = load_vae(data.vae, device).eval().requires_grad_(False)
        self.quantizer = DimensionwiseQuantizer(**quantizer).to(device) if quantizer is not None else None
        if self.quantizer is not None and not self.quantizer.fitted:
            raise ValueError("data.source=images cannot fit a calibrated quantizer per batch; use cache-latents")
        self.sample_posterior = data.sample_posterior

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        latents = encode_latents(self.vae, images, self.sample_posterior)
        if self.quantizer is None:
            return latents.permute(0, 2, 3, 1).contiguous(), labels
        return latents_to_indices(self.quantizer, latents), labels

