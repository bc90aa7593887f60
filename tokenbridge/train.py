"""Token caching and the generic trainer (DDP, AdamW, warmup + cosine, EMA, grad clipping, atomic resumable checkpoints).

Config layout (YAML, see configs/fmnist.yaml)::

    out_dir: runs/fmnist          # checkpoint.pt, log.jsonl, config.yaml (and TensorBoard events if installed)
    seed: 0
    data:  {source: tokens, tokens: runs/fmnist/tokens_train.safetensors}
    model: {...}                  # tokenbridge.model.build_generator(model, quantizer of the token file)
    train: {steps: ..., global_batch: ..., lr or blr, ...}   # keys and defaults: DEFAULT_TRAIN

The learning rate is ``train.lr`` when given (absolute), else ``train.blr * global_batch / 256`` (MAR's rule; the
paper's 8e-4 at batch 2048 is blr 1e-4). It warms up linearly and then follows a cosine to ``train.min_lr``.

Launch on several GPUs with ``torchrun --nproc_per_node N -m tokenbridge.cli train ...``: the same code path runs
with one process, and N processes with global_batch / N samples each reproduce one process's updates.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm.auto import tqdm

from .files import atomic_path

TOKENS_FORMAT = "tokenbridge-tokens"
CKPT_FORMAT = "tokenbridge-train-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"

DEFAULT_TRAIN: dict[str, Any] = {
    "steps": None,  # total optimizer steps; or give "epochs" instead
    "epochs": None,
    "global_batch": 128,  # summed over all processes
    "lr": None,  # absolute peak learning rate; None -> blr * global_batch / 256
    "blr": 1e-4,
    "min_lr": 0.0,
    "warmup_steps": None,  # or "warmup_epochs"; neither -> no warmup
    "warmup_epochs": None,
    "weight_decay": 0.02,
    "betas": [0.9, 0.95],
    "eps": 1e-8,
    "ema": 0.9999,  # EMA decay per step
    "grad_clip": 3.0,  # max global grad norm (official code 3.0, paper 1.0); 0 or None -> no clipping
    "bf16": True,  # autocast to bfloat16, CUDA only
    "grad_checkpointing": False,  # forwarded to the model config as model.grad_checkpointing
    "compile": False,  # torch.compile the training module
    "ckpt_every": 1000,
    "log_every": 50,
    "num_workers": 0,
    "device": "auto",  # auto -> cuda:LOCAL_RANK if available, else cpu
    "find_unused_parameters": False,
}
DEFAULT_DATA: dict[str, Any] = {
    "source": "tokens",  # tokens: a cache_latents file | images: encode and quantize each batch on the fly
    "tokens": None,
    "dataset": "fmnist",  # images source: fmnist | folder:/path
    "split": "train",
    "limit": None,
    "vae": "fmnist",
    "resolution": 32,
    "channels": 3,  # images of a folder dataset
    "quantizer": {},
    "sample_posterior": False,
}


# ----------------------------------------------------------------------------------------------------------------
# Config


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.1 needs ``1.0e-4``; easy to get wrong in configs)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)


def _set_dotted(config: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if not all(parts):
        raise ValueError(f"bad override key {key!r}")
    node = config
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        elif not isinstance(child, dict):
            raise ValueError(f"override {key!r}: {p!r} is a {type(child).__name__}, not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(config: dict, overrides: Sequence[str]) -> dict:
    """Return a copy of ``config`` with ``key.sub=value`` overrides applied; values are parsed as YAML."""
    config = copy.deepcopy(config)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        _set_dotted(config, key.strip(), _yaml(raw) if raw.strip() else None)
    return config


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> dict:
    """Read a YAML config and apply dotted overrides (``train.lr=3e-4``, ``model.depth=4``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    with open(path) as f:
        config = _yaml(f.read()) or {}
    if not isinstance(config, dict):
        raise ValueError(f"config {path} must be a YAML mapping, got {type(config).__name__}")
    return apply_overrides(config, overrides)


def _section(config: dict, name: str, defaults: dict) -> dict:
    given = config.get(name) or {}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {name} config keys {unknown}; known: {sorted(defaults)}")
    return {**defaults, **given}


# ----------------------------------------------------------------------------------------------------------------
# Token caching


def _make_quantizer(quantizer: Any):
    if isinstance(quantizer, dict) or quantizer is None:
        from tokenbridge.quantizer import DimensionwiseQuantizer

        return DimensionwiseQuantizer(**(quantizer or {})), dict(quantizer or {})
    return quantizer, {}


def _quantizer_config(quantizer: Any, given: dict) -> dict:
    """JSON-able description of the quantizer (constructor kwargs when known, plus levels)."""
    cfg = dict(quantizer.config()) if hasattr(quantizer, "config") and callable(quantizer.config) else dict(given)
    for attr in ("levels", "value_range", "std_range", "kind", "tails"):
        if attr not in cfg and hasattr(quantizer, attr):
            v = getattr(quantizer, attr)
            cfg[attr] = list(v) if isinstance(v, tuple) else v
    return json.loads(json.dumps(cfg, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _image_dataset(data: str, split: str, resolution: int, channels: int, limit: int | None) -> Dataset:
    from tokenbridge import data as tbdata

    if data == "fmnist":
        return tbdata.FashionMNIST(split, limit=limit)
    if data.startswith("folder:"):
        ds = tbdata.ImageFolder(data[len("folder:"):], resolution=resolution, channels=channels)
        if limit is not None:
            ds = torch.utils.data.Subset(ds, range(min(limit, len(ds))))
        return ds
    raise ValueError(f"data must be 'fmnist' or 'folder:/path', got {data!r}")


@torch.no_grad()
def encode_to_tokens(
    vae: nn.Module, quantizer: Any, images: torch.Tensor, sample_posterior: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """images [B, Ci, H, W] in [-1, 1] -> (indices long [B, h, w, C], latents float [B, C, h, w] (scaled))."""
    latents = vae.encode(images, sample=True) if sample_posterior else vae.encode(images)
    if latents.ndim != 4:
        raise ValueError(f"vae.encode returned shape {tuple(latents.shape)}, expected [B, C, h, w]")
    indices = quantizer.quantize(latents.float().permute(0, 2, 3, 1).contiguous())
    return indices, latents


def cache_latents(
    vae_spec: str,
    out_path: str | os.PathLike,
    data: str = "fmnist",
    split: str = "train",
    quantizer: dict | Any | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    resolution: int = 32,
    channels: int = 3,
    limit: int | None = None,
    sample_posterior: bool = False,
    store_latents: bool = False,
    seed: int = 0,
    fit_samples: int = 10000,
    vae: nn.Module | None = None,
    dataset: Dataset | None = None,
) -> Path:
    """Encode a dataset with a VAE, quantize it and write one safetensors file atomically.

    The file holds ``indices`` [N, h, w, C] (uint8 when levels <= 256, else int16; channel-last), ``labels`` int64 [N],
    optionally ``latents`` float32 [N, C, h, w] (scaled, channel-first; for channel-order computation), and string
    metadata: format, version, vae, quantizer (JSON), levels, scaling_factor, data, split, num_classes, sample_posterior.
    ``vae``/``dataset`` override ``vae_spec``/``data`` (the spec is still recorded); ``quantizer`` is a dict of
    DimensionwiseQuantizer kwargs or a ready quantizer object. The posterior mean is used unless ``sample_posterior``.
    A quantizer with a data calibration that is not fitted yet (``fitted`` False) is first fitted on the latents of
    ``fit_samples`` evenly spaced images. An nn.Module quantizer's state is stored as ``quantizer.<buffer>`` tensors,
    so that training and sampling dequantize with exactly the quantizer that made the tokens.
    """
    from safetensors.torch import save_file

    device = torch.device(device)
    if vae is None:
        from tokenbridge.vae import load_vae

        vae = load_vae(vae_spec, device)
    vae = vae.to(device).eval()
    quant, quant_kwargs = _make_quantizer(quantizer)
    if isinstance(quant, nn.Module):
        quant = quant.to(device)
    levels = int(getattr(quant, "levels", quant_kwargs.get("levels", 0)))
    if levels <= 0:
        raise ValueError("quantizer has no positive 'levels'")
    index_dtype = torch.uint8 if levels <= 256 else torch.int16
    if levels > 32768:
        raise ValueError(f"levels={levels} does not fit int16 token storage")
    if dataset is None:
        dataset = _image_dataset(data, split, resolution, channels, limit)
    elif limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    if len(dataset) == 0:
        raise ValueError("dataset is empty")

    all_idx, all_lab, all_lat = [], [], []
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # posterior sampling draws from the global RNG; make the cache reproducible
    try:
        if not getattr(quant, "fitted", True):
            n_fit = min(len(dataset), int(fit_samples))
            subset = torch.utils.data.Subset(dataset, torch.linspace(0, len(dataset) - 1, n_fit).long().tolist())
            fit_lat = [
                (vae.encode(x.to(device), sample=True) if sample_posterior else vae.encode(x.to(device))).float().cpu()
                for x, _ in tqdm(DataLoader(subset, batch_size=batch_size), desc="fitting quantizer", disable=None)
            ]
            quant.fit(torch.cat(fit_lat).permute(0, 2, 3, 1))
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False)
        for images, labels in tqdm(loader, desc=f"caching {data}:{split}", disable=None):
            idx, lat = encode_to_tokens(vae, quant, images.to(device), sample_posterior)
            if int(idx.min()) < 0 or int(idx.max()) >= levels:
                raise ValueError(f"quantizer returned indices outside [0, {levels})")
            all_idx.append(idx.to("cpu", index_dtype))
            all_lab.append(torch.as_tensor(labels).to("cpu", torch.int64))
            if store_latents:
                all_lat.append(lat.float().cpu())
    finally:
        torch.random.set_rng_state(rng_state)
    tensors = {"indices": torch.cat(all_idx).contiguous(), "labels": torch.cat(all_lab).contiguous()}
    if store_latents:
        tensors["latents"] = torch.cat(all_lat).contiguous()
    if isinstance(quant, nn.Module):
        tensors.update({f"quantizer.{k}": v.detach().cpu().contiguous() for k, v in quant.state_dict().items()})
    scaling = getattr(vae, "scaling_factor", None)
    classes = getattr(dataset, "classes", None)
    num_classes = len(classes) if classes is not None else int(tensors["labels"].max()) + 1
    metadata = {
        "format": TOKENS_FORMAT,
        "version": str(FORMAT_VERSION),
        "vae": str(vae_spec),
        "quantizer": json.dumps(_quantizer_config(quant, quant_kwargs)),
        "levels": str(levels),
        "scaling_factor": json.dumps(None if scaling is None else float(scaling)),
        "data": str(data),
        "split": str(split),
        "num_classes": str(num_classes),
        "sample_posterior": json.dumps(bool(sample_posterior)),
    }
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return out_path


class CachedTokens(Dataset):
    """A cache_latents file as (indices long [h, w, C], label long scalar) items.

    Attributes: indices (stored dtype, [N, h, w, C]), labels int64 [N], latents (float [N, C, h, w] or None),
    levels, num_classes, grid_shape (h, w, C), metadata (str -> str), quantizer_config (dict), scaling_factor,
    quantizer_state (the quantizer's buffers, {} when the file was written with a non-module quantizer).
    """

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"token file {self.path} does not exist (create it with cache_latents)")
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for truncated/garbled files
            raise ValueError(f"token file {self.path} is corrupt or not a safetensors file: {e}") from e
        if meta.get("format") != TOKENS_FORMAT:
            raise ValueError(f"{self.path} is not a tokenbridge token file (metadata format={meta.get('format')!r})")
        for key in ("indices", "labels"):
            if key not in tensors:
                raise ValueError(f"token file {self.path} has no '{key}' tensor")
        idx, lab = tensors["indices"], tensors["labels"]
        if idx.dtype not in (torch.uint8, torch.int16) or idx.ndim != 4:
            raise ValueError(f"{self.path}: indices must be uint8/int16 [N, h, w, C], got {idx.dtype} {list(idx.shape)}")
        if lab.dtype != torch.int64 or lab.shape != (idx.shape[0],):
            raise ValueError(f"{self.path}: labels must be int64 [{idx.shape[0]}], got {lab.dtype} {list(lab.shape)}")
        try:
            self.levels = int(meta["levels"])
            self.quantizer_config = json.loads(meta["quantizer"])
            self.scaling_factor = json.loads(meta.get("scaling_factor", "null"))
            self.num_classes = int(meta.get("num_classes", int(lab.max()) + 1 if len(lab) else 0))
        except (KeyError, ValueError) as e:
            raise ValueError(f"token file {self.path} has bad metadata: {e}") from e
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.levels):
            raise ValueError(f"{self.path}: indices outside [0, {self.levels})")
        lat = tensors.get("latents")
        if lat is not None and (lat.ndim != 4 or lat.shape[0] != idx.shape[0] or lat.shape[1] != idx.shape[3]):
            raise ValueError(f"{self.path}: latents shape {list(lat.shape)} does not match indices {list(idx.shape)}")
        self.indices, self.labels, self.latents, self.metadata = idx, lab, lat, meta
        self.quantizer_state = {k[len("quantizer."):]: v for k, v in tensors.items() if k.startswith("quantizer.")}
        self.grid_shape = tuple(idx.shape[1:])

    def __len__(self) -> int:
        return self.indices.shape[0]

    def make_quantizer(self):
        """The DimensionwiseQuantizer that made these tokens (fitted calibration included), or None if unknown."""
        if not self.quantizer_state:
            return None
        from tokenbridge.quantizer import DimensionwiseQuantizer

        try:
            quant = DimensionwiseQuantizer(**self.quantizer_config)
            quant.load_state_dict(self.quantizer_state)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"token file {self.path}: cannot rebuild its quantizer: {e}") from e
        return quant

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.indices[i].long(), self.labels[i]


# ----------------------------------------------------------------------------------------------------------------
# Optimizer, schedule, EMA


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: 1-D parameters (norm weights, biases) and names in model.no_weight_decay() get no decay.
    Embedding tables are matrices and are decayed, as in MAR."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_at(step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate for the update with 0-based index ``step``: linear warmup (peak * (step+1) / warmup) over
    ``warmup_steps`` updates, then a half cosine from ``peak_lr`` down to ``min_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of a module's parameters (fp32 copies); buffers are taken from the module."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.names = [n for n, _ in model.named_parameters()]
        self.shadow = [p.detach().float().clone() for _, p in model.named_parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [p.detach().float() for p in model.parameters()]
        # one fused multi-tensor op instead of a kernel per parameter
        torch._foreach_lerp_(self.shadow, params, 1.0 - self.decay)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The module's state dict with EMA values in place of the parameters (loadable into the model)."""
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for n, s in zip(self.names, self.shadow):
            state[n] = s.to(state[n].dtype).clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ValueError(f"EMA state lacks parameters {missing[:5]}")
        for n, s in zip(self.names, self.shadow):
            s.copy_(state[n])


# ----------------------------------------------------------------------------------------------------------------
# Distributed helpers and data order


def _init_distributed(device_cfg: str) -> tuple[int, int, torch.device, bool]:
    """(rank, world_size, device, created_group). torchrun sets RANK / WORLD_SIZE / LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_cfg in ("auto", "cuda")
    if device_cfg not in ("auto", "cuda", "cpu"):
        device = torch.device(device_cfg)
    elif use_cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device, False
    if world > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return dist.get_rank(), dist.get_world_size(), device, True
    return 0, 1, device, False


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    if _is_dist():
        dist.barrier()


class _ResumableSampler(Sampler[int]):
    """DistributedSampler order for (seed, epoch), starting after the first ``skip`` samples of this rank's shard."""

    def __init__(self, base: DistributedSampler):
        self.base, self.skip = base, 0

    def set_position(self, epoch: int, skip: int) -> None:
        self.base.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.base)[self.skip:])

    def __len__(self) -> int:
        return len(self.base) - self.skip


# ----------------------------------------------------------------------------------------------------------------
# RNG state as plain tensors (so torch.load(weights_only=True) reads checkpoints)


def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.random.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_meta": [int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python_version": int(py_state[0]),
        "python_state": torch.tensor(py_state[1], dtype=torch.int64),
        "python_gauss": py_state[2],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.random.set_rng_state(state["torch"])
    pos, has_gauss, gauss = state["numpy_meta"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    random.setstate((state["python_version"], tuple(int(x) for x in state["python_state"].tolist()), state["python_gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Atomic torch.save: write a temporary file in the same folder, then os.replace; a failure keeps the old file."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


_CKPT_KEYS = ("format", "version", "step", "epoch", "batch_in_epoch", "model", "ema", "optimizer", "rng", "config")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load and validate a training checkpoint (weights_only=True). ``config`` is returned parsed (dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is corrupt or not a torch checkpoint: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path} is not a tokenbridge training checkpoint (no format tag {CKPT_FORMAT!r})")
    missing = [k for k in _CKPT_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {path} lacks entries {missing}")
    if ckpt["version"] > FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} has format version {ckpt['version']}, newer than {FORMAT_VERSION}")
    ckpt["config"] = json.loads(ckpt["config"])
    return ckpt


def load_model_from_checkpoint(
    path: str | os.PathLike,
    ema: bool = True,
    device: str | torch.device = "cpu",
    model_fn: Callable[[dict], nn.Module] | None = None,
) -> nn.Module:
    """Rebuild the model from the checkpoint's config['model'] and load the EMA (default) or raw weights; eval mode."""
    ckpt = load_checkpoint(path)
    model_cfg = ckpt["config"].get("model") or {}
    model = (model_fn or _default_model_fn)(copy.deepcopy(model_cfg))
    model.load_state_dict(ckpt["ema" if ema else "model"])
    return model.to(device).eval()


def export_weights(ckpt_path: str | os.PathLike, out_path: str | os.PathLike, ema: bool = True,
                   half: bool = False) -> Path:
    """Write the EMA (or raw) weights of a checkpoint as safetensors with metadata {config: model config JSON, step}.

    half: store float32 tensors as float16 (half the file; they load back into float32 parameters). Float64
    buffers such as the quantizer's tables stay exact."""
    from safetensors.torch import save_file

    ckpt = load_checkpoint(ckpt_path)
    state = {k: (v.half() if half and v.dtype == torch.float32 else v).contiguous()
             for k, v in ckpt["ema" if ema else "model"].items()}
    out_path = Path(out_path)
    meta = {"config": json.dumps(ckpt["config"].get("model") or {}), "step": str(ckpt["step"]), "ema": str(ema)}
    with atomic_path(out_path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return out_path


# ----------------------------------------------------------------------------------------------------------------
# Trainer


def _resolve_channel_order(model_cfg: dict, dataset: Dataset, quantizer: nn.Module | None,
                           max_samples: int = 10000) -> None:
    """Replace head.order "frequency" by the data-derived order (paper Sec. 3.2) of the training tokens.

    Uses the cached continuous latents when the token file has them, else the dequantized indices (whose spectra
    differ from the latents' only by the quantization noise)."""
    head = model_cfg.get("head") or {}
    if head.get("order") != "frequency":
        return
    if not isinstance(dataset, CachedTokens):
        raise ValueError("model.head.order=frequency needs a cached token file (data.source=tokens)")
    from tokenbridge.ordering import frequency_channel_order

    if dataset.latents is not None:
        latents = dataset.latents[:max_samples].float()
    else:
        latents = quantizer.dequantize(dataset.indices[:max_samples].long()).permute(0, 3, 1, 2)
    head["order"] = frequency_channel_order(latents)[0].tolist()


def _default_model_fn(model_cfg: dict, quantizer: nn.Module | None = None) -> nn.Module:
    from tokenbridge.model import build_generator

    return build_generator(model_cfg, quantizer=quantizer)


class _OnTheFlyTokens:
    """Turns an (images, labels) batch into (indices [B, h, w, C], labels) with a frozen VAE and the quantizer."""

    def __init__(self, data_cfg: dict, device: torch.device):
        from tokenbridge.vae import load_vae

        self.vae = load_vae(data_cfg["vae"], device).eval()
        for p in self.vae.parameters():
            p.requires_grad_(False)
        self.quantizer, _ = _make_quantizer(data_cfg["quantizer"])
        if not getattr(self.quantizer, "fitted", True):
            raise ValueError("data.source=images cannot fit a calibrated quantizer per batch; use cache_latents")
        if isinstance(self.quantizer, nn.Module):
            self.quantizer = self.quantizer.to(device)
        self.sample = bool(data_cfg["sample_posterior"])

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_to_tokens(self.vae, self.quantizer, images, self.sample)[0], labels


def _resolve_schedule(tcfg: dict, steps_per_epoch: int) -> tuple[int, int]:
    if (tcfg["steps"] is None) == (tcfg["epochs"] is None):
        raise ValueError("give exactly one of train.steps and train.epochs")
    total = int(tcfg["steps"]) if tcfg["steps"] is not None else int(round(float(tcfg["epochs"]) * steps_per_epoch))
    if tcfg["warmup_steps"] is not None and tcfg["warmup_epochs"] is not None:
        raise ValueError("give at most one of train.warmup_steps and train.warmup_epochs")
    if tcfg["warmup_steps"] is not None:
        warmup = int(tcfg["warmup_steps"])
    elif tcfg["warmup_epochs"] is not None:
        warmup = int(round(float(tcfg["warmup_epochs"]) * steps_per_epoch))
    else:
        warmup = 0
    if total <= 0 or warmup < 0:
        raise ValueError(f"need steps > 0 and warmup >= 0, got steps={total}, warmup={warmup}")
    return total, warmup


class _Logger:
    def __init__(self, out_dir: Path, enabled: bool, truncate_after: int | None):
        self.enabled, self.path, self.tb = enabled, out_dir / "log.jsonl", None
        if not enabled:
            return
        if truncate_after is not None and self.path.is_file():
            # entries a killed run wrote after its last checkpoint would be repeated by the resumed run
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= truncate_after:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(s + "\n" for s in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tb"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def train(
    config: dict,
    resume: bool = True,
    *,
    model_fn: Callable[[dict], nn.Module] | None = None,
    dataset: Dataset | None = None,
    stop_at: int | None = None,
) -> dict:
    """Train ``model_fn(config['model'])`` (default tokenbridge.model.build_generator) so that ``model(*batch)`` —
    batch = (indices long [B, h, w, C], labels long [B]) from ``dataset`` (default: data section) — is a scalar loss.

    resume: continue from ``out_dir/checkpoint.pt`` if it exists (bit-exact continuation in the same setting).
    stop_at: stop after this global step with a checkpoint, as if killed (the schedule still spans train.steps).
    Returns final metrics: step, epoch, loss (mean of the last log window), lr, grad_norm, elapsed_s, checkpoint.
    """
    config = copy.deepcopy(config)
    if "out_dir" not in config:
        raise ValueError("config needs 'out_dir'")
    tcfg = _section(config, "train", DEFAULT_TRAIN)
    dcfg = _section(config, "data", DEFAULT_DATA)
    config["train"] = tcfg
    if dataset is None:
        config["data"] = dcfg
    seed = int(config.setdefault("seed", 0))
    model_cfg = copy.deepcopy(config.get("model") or {})
    if tcfg["grad_checkpointing"]:
        if model_fn is None:  # the generator config keeps this flag in its backbone section
            model_cfg.setdefault("backbone", {})["grad_checkpointing"] = True
        else:
            model_cfg["grad_checkpointing"] = True
    out_dir = Path(config["out_dir"])
    ckpt_path = out_dir / CHECKPOINT_NAME

    rank, world, device, created_group = _init_distributed(str(tcfg["device"]))
    is_main = rank == 0
    try:
        global_batch = int(tcfg["global_batch"])
        if global_batch % world:
            raise ValueError(f"train.global_batch={global_batch} is not divisible by world size {world}")
        local_batch = global_batch // world

        # ---- data
        prepare = None
        if dataset is None:
            if dcfg["source"] == "tokens":
                if not dcfg["tokens"]:
                    raise ValueError("data.tokens (path of a cache_latents file) is required for data.source=tokens")
                dataset = CachedTokens(dcfg["tokens"])
            elif dcfg["source"] == "images":
                dataset = _image_dataset(
                    dcfg["dataset"], dcfg["split"], int(dcfg["resolution"]), int(dcfg["channels"]), dcfg["limit"]
                )
                prepare = _OnTheFlyTokens(dcfg, device)
            else:
                raise ValueError(f"data.source must be 'tokens' or 'images', got {dcfg['source']!r}")
        base_sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        sampler = _ResumableSampler(base_sampler)
        steps_per_epoch = len(base_sampler) // local_batch
        if steps_per_epoch == 0:
            raise ValueError(f"dataset of {len(dataset)} items is smaller than global_batch={global_batch}")
        loader_gen = torch.Generator()
        loader = DataLoader(
            dataset,
            batch_size=local_batch,
            sampler=sampler,
            drop_last=True,
            num_workers=int(tcfg["num_workers"]),
            pin_memory=device.type == "cuda",
            generator=loader_gen,  # keeps the global RNG untouched by iterator creation (exact resume)
            persistent_workers=False,
        )
        total_steps, warmup_steps = _resolve_schedule(tcfg, steps_per_epoch)
        peak_lr = float(tcfg["lr"]) if tcfg["lr"] is not None else float(tcfg["blr"]) * global_batch / 256
        min_lr = float(tcfg["min_lr"])

        # ---- model, optimizer, EMA (same init on every rank; DDP also broadcasts rank 0's weights)
        _seed_all(seed)
        if model_fn is None:
            # dequantize with the very quantizer that made the tokens; build_generator rejects a config that disagrees
            quant = dataset.make_quantizer() if isinstance(dataset, CachedTokens) else None
            if prepare is not None and isinstance(prepare.quantizer, nn.Module):
                quant = prepare.quantizer
            _resolve_channel_order(model_cfg, dataset, quant)
            model = _default_model_fn(model_cfg, quant).to(device)
            # record the fully resolved generator config (channel order, fitted quantizer settings) for rebuilding
            config["model"] = model.config
        else:
            model = model_fn(model_cfg).to(device)
        optimizer = torch.optim.AdamW(
            param_groups(model, float(tcfg["weight_decay"])),
            lr=peak_lr,
            betas=tuple(float(b) for b in tcfg["betas"]),
            eps=float(tcfg["eps"]),
            foreach=True,  # multi-tensor update; PyTorch only picks it by default on CUDA
        )
        ema = EMA(model, float(tcfg["ema"]))
        _seed_all(seed + rank)  # different randomness (masks, dropout) per rank

        start_step, rng_states, ckpt = 0, None, None
        if resume and ckpt_path.exists():
            ckpt = load_checkpoint(ckpt_path)
            try:
                model.load_state_dict(ckpt["model"])
            except RuntimeError as e:
                raise ValueError(f"checkpoint {ckpt_path} does not fit the configured model: {e}") from e
            ema.load_state_dict(ckpt["ema"])
            optimizer.load_state_dict(ckpt["optimizer"])
            start_step = int(ckpt["step"])
            rng_states = ckpt["rng"]
            if is_main and (ckpt["config"].get("model") or {}) != (config.get("model") or {}):
                warnings.warn(f"model config differs from the one in {ckpt_path}; weights loaded anyway")
            if ckpt.get("steps_per_epoch") not in (None, steps_per_epoch) and is_main:
                warnings.warn("steps per epoch changed since the checkpoint; data order will differ from that run")

        train_module: nn.Module = model
        if world > 1:
            train_module = nn.parallel.DistributedDataParallel(
                model,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=bool(tcfg["find_unused_parameters"]),
            )
        if tcfg["compile"]:
            train_module = torch.compile(train_module)
        autocast = bool(tcfg["bf16"]) and device.type == "cuda"
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        clip = float(tcfg["grad_clip"] or 0.0)
        ckpt_every = int(tcfg["ckpt_every"] or 0)
        log_every = max(1, int(tcfg["log_every"]))
        end_step = total_steps if stop_at is None else min(total_steps, int(stop_at))

        if is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            tmp = out_dir / "config.yaml.tmp"
            tmp.write_text(yaml.safe_dump(json.loads(json.dumps(config, default=str)), sort_keys=False))
            os.replace(tmp, out_dir / "config.yaml")
        if ckpt is None and is_main:
            (out_dir / "log.jsonl").unlink(missing_ok=True)  # a fresh run starts a fresh log
        logger = _Logger(out_dir, is_main, start_step if ckpt is not None else None)

        def checkpoint(step: int) -> None:
            rng = _rng_state(device)
            if _is_dist():
                gathered: list[Any] = [None] * world
                dist.all_gather_object(gathered, rng)
            else:
                gathered = [rng]
            if is_main:
                save_checkpoint(
                    ckpt_path,
                    {
                        "format": CKPT_FORMAT,
                        "version": FORMAT_VERSION,
                        "step": step,
                        "epoch": step // steps_per_epoch,
                        "batch_in_epoch": step % steps_per_epoch,
                        "steps_per_epoch": steps_per_epoch,
                        "world_size": world,
                        "model": model.state_dict(),
                        "ema": ema.state_dict(model),
                        "optimizer": optimizer.state_dict(),
                        "rng": gathered,
                        "config": json.dumps(config, default=str),
                    },
                )
            _barrier()

        if rng_states is not None:
            if len(rng_states) == world:
                _set_rng_state(rng_states[rank], device)
            else:
                if is_main:
                    warnings.warn(f"checkpoint was written by {len(rng_states)} processes, now {world}: RNG reseeded")
                _seed_all(seed + rank + 1_000_003 * start_step)

        metrics: dict[str, Any] = {"step": start_step, "loss": None, "lr": None, "grad_norm": None}
        t_start = time.time()
        t_window, n_window = time.time(), 0
        loss_sum = torch.zeros((), device=device)
        gnorm_sum = torch.zeros((), device=device)
        model.train()
        pbar = tqdm(total=total_steps, initial=start_step, disable=None if is_main else True, desc="train")
        batches: Iterator | None = None
        step = start_step
        lr = peak_lr
        while step < end_step:
            epoch, pos = divmod(step, steps_per_epoch)
            if batches is None or pos == 0:
                sampler.set_position(epoch, pos * local_batch)
                loader_gen.manual_seed(seed * 1_000_003 + epoch * 1009 + rank)
                batches = iter(loader)
            batch = next(batches)
            batch = tuple(b.to(device, non_blocking=True) if torch.is_tensor(b) else b for b in batch)
            if prepare is not None:
                batch = prepare(*batch)
            lr = lr_at(step, peak_lr, warmup_steps, total_steps, min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = train_module(*batch)
            if loss.ndim != 0:
                raise ValueError(f"model must return a scalar loss, got shape {tuple(loss.shape)}")
            optimizer.zero_grad(set_to_none=True)
            loss.float().backward()
            gnorm = nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
            optimizer.step()
            ema.update(model)
            step += 1
            loss_sum += loss.detach().float()
            gnorm_sum += gnorm.detach().float()
            n_window += 1
            pbar.update(1)

            if step % log_every == 0 or step == end_step:
                stats = torch.stack([loss_sum, gnorm_sum]) / n_window
                if _is_dist():
                    dist.all_reduce(stats)
                    stats /= world
                mean_loss, mean_gnorm = (float(x) for x in stats.tolist())
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"loss is {mean_loss} at step {step}; lower train.lr or check the data")
                dt = time.time() - t_window
                metrics = {
                    "step": step,
                    "epoch": step / steps_per_epoch,
                    "loss": mean_loss,
                    "lr": lr,
                    "grad_norm": mean_gnorm,
                    "it_s": n_window / dt if dt > 0 else None,
                    "samples_s": n_window * global_batch / dt if dt > 0 else None,
                }
                logger.log(metrics)
                pbar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
                loss_sum.zero_()
                gnorm_sum.zero_()
                t_window, n_window = time.time(), 0
            if (ckpt_every and step % ckpt_every == 0) or step == end_step:
                checkpoint(step)
        pbar.close()
        logger.close()
        if ckpt is not None and start_step >= end_step:
            metrics["step"] = start_step
        metrics.update(elapsed_s=time.time() - t_start, checkpoint=str(ckpt_path), total_steps=total_steps)
        return metrics
    finally:
        if created_group:
            dist.destroy_process_group()

