"""Pretrained folders: ``save_pretrained(dir)`` / ``from_pretrained(dir)`` for every generator family.

A folder holds ``config.json`` (the family, the resolved model config, the sampling defaults and the provenance:
VAE spec and fingerprint, token file, step, EMA or raw weights, the training recipe and loss trajectory where
exported from a run, and where converted weights came from) and
``model.safetensors`` (the state dict), the diffusers / huggingface_hub convention. Loading is offline, from a
local path only. `base.Generator` gives every family both methods; `tokenbridge.checkpoint.load_generator` (and
so every command with ``--model``) reads such a folder too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..files import CONFIG_NAME, WEIGHTS_NAME, atomic_path, tensor_bytes
from ..reading import check_generator_file

__all__ = [
    "CONFIG_NAME",
    "PRETRAINED_FORMAT",
    "WEIGHTS_NAME",
    "build_generator",
    "from_pretrained",
    "is_pretrained_folder",
    "read_pretrained",
    "save_pretrained",
]

PRETRAINED_FORMAT = "tokenbridge-pretrained"
_RECORD_KEYS = ("sample", "sample_paper", "vae", "vae_fingerprint", "tokens", "step", "ema", "source", "train",
                "trajectory")


def is_pretrained_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding config.json (a pretrained folder, possibly incomplete)."""
    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


def save_pretrained(model: nn.Module, directory: str | os.PathLike, **record: Any) -> Path:
    """Write ``model`` as a pretrained folder (created if needed; both files written atomically). The record is
    ``model.provenance`` (sampling defaults, VAE, ...) with ``record``'s keys over it. Returns the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    provenance = {**getattr(model, "provenance", {}), **record}
    config = {"format": PRETRAINED_FORMAT, "version": 1, "family": model.family, "config": model.config,
              **{k: provenance.get(k) for k in _RECORD_KEYS}}
    config["sample"] = config["sample"] or {}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS_NAME, PRETRAINED_FORMAT, needed=tensor_bytes(state)) as tmp:
        save_file(state, str(tmp), metadata={"format": PRETRAINED_FORMAT})
    with atomic_path(directory / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return directory


def read_pretrained(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(record, state dict) of a pretrained folder; the record holds family, config, sample, vae, ... ."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{directory} is not a pretrained folder: {path.name} is missing")
    try:
        record = json.loads(config_path.read_text())
    except ValueError as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(record, dict) or record.get("format") != PRETRAINED_FORMAT or "family" not in record:
        raise ValueError(f"{config_path} is not a tokenbridge pretrained config (format {PRETRAINED_FORMAT!r})")
    try:
        state = load_file(str(weights_path))
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise ValueError(f"{weights_path} is corrupt or not a safetensors file: {e}") from None
    record = {k: v for k, v in record.items() if k not in ("format", "version")}
    return record, state


def from_pretrained(cls: type[nn.Module], directory: str | os.PathLike,
                    device: str | torch.device = "cpu") -> nn.Module:
    """A generator of family ``cls`` in eval mode from a pretrained folder (strict load; ``provenance`` set)."""
    record, state = read_pretrained(directory)
    if record["family"] != cls.family:
        raise ValueError(f"{directory} holds a {record['family']!r} generator, not a {cls.family!r} one")
    return build_generator(cls, record, state, directory, device)


def build_generator(cls: type[nn.Module], record: dict[str, Any], state: dict[str, torch.Tensor],
                    where: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """``cls`` built from ``record["config"]`` with ``state`` loaded strictly and ``provenance = record``, in eval
    mode on ``device``; a state that does not fit (or is over the size budget, or holds NaN / inf / integer
    weights) is a ValueError naming ``where``, before the generator is allocated."""
    recorded = getattr(cls, "recorded_config", None)  # fills what older records leave out (a family's choice)
    config = recorded(record["config"]) if recorded else record["config"]
    check_generator_file(cls, config, state, where)
    model = cls.from_config(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{where}: weights do not fit the recorded {record['family']} config: {e}") from e
    model.provenance = record
    return model.to(device).eval()
