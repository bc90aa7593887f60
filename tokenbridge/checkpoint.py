"""Checkpoints and exported generators, each recording what made it.

A training checkpoint (``checkpoint.pt``, torch.save of plain tensors and strings, loadable with
weights_only=True) holds the step, model / EMA / optimizer state, RNG states and the full run config. An exported
generator (``.safetensors``) holds the EMA (or raw) weights and, as metadata, everything needed to rebuild and use
it: the family, the resolved model config, the sampling defaults and the provenance (the VAE spec and a fingerprint
of its weights, the token file, the step). `load_generator` reads either and returns a generator of the recorded
family with ``generator.provenance`` set.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .files import atomic_path, check_target, holds_output, tensor_bytes
from .generators import check_sample_options, get_family
from .generators.pretrained import build_generator, read_pretrained

CKPT_FORMAT = "tokenbridge-train-checkpoint"
EXPORT_FORMAT = "tokenbridge-generator"
FORMAT_VERSION = 2
CHECKPOINT_NAME = "checkpoint.pt"
WEIGHTS = Path(__file__).resolve().parent / "weights"
# names `--model` accepts besides paths: the embedded TokenBridge and continuous MAR generators
SHIPPED = {"fmnist": WEIGHTS / "fmnist_generator.safetensors",
           "fmnist-mar": WEIGHTS / "fmnist_mar_generator.safetensors",
           "fmnist-d2c": WEIGHTS / "fmnist_d2c_generator.safetensors",
           "fmnist-ar": WEIGHTS / "fmnist_ar_generator.safetensors"}

_CKPT_KEYS = ("format", "version", "step", "epoch", "batch_in_epoch", "model", "ema", "optimizer", "rng", "config")


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Atomic torch.save: a temporary file in the same folder, then os.replace; a failure keeps the old file."""
    with atomic_path(path, CKPT_FORMAT, needed=tensor_bytes(state)) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load and validate a training checkpoint (weights_only=True). ``config`` and ``provenance`` come back
    parsed (dicts)."""
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
    ckpt["provenance"] = json.loads(ckpt.get("provenance", "{}"))
    return ckpt


def _record(config: dict, provenance: dict, step: int, ema: bool) -> dict[str, Any]:
    """Everything an exported generator records, as plain values."""
    return {"family": config.get("family", "tokenbridge"), "config": config.get("model") or {},
            "sample": config.get("sample") or {}, "vae": provenance.get("vae"),
            "vae_fingerprint": provenance.get("vae_fingerprint"), "tokens": provenance.get("tokens"),
            "step": int(step), "ema": bool(ema), "train": config.get("train") or {}}


def training_trajectory(run_dir: str | os.PathLike) -> dict[str, list[float]] | None:
    """The training loss at every logged step of the run in ``run_dir`` (its log.jsonl: {"step": [...],
    "loss": [...]}), or None where the run has no log."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return None
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    entries = [e for e in entries if "loss" in e and "step" in e]
    return {"step": [int(e["step"]) for e in entries], "loss": [round(float(e["loss"]), 5) for e in entries]}


@holds_output("out_path", "export")
def export_weights(ckpt_path: str | os.PathLike, out_path: str | os.PathLike, ema: bool = True,
                   half: bool = False, sample: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint's EMA (or raw) weights as a self-describing .safetensors generator. A pretrained folder
    is also taken (its one set of weights and its record; ``ema`` does not apply). A checkpoint's record also
    holds its run's training recipe (``train``) and loss trajectory (``trajectory``, from the log.jsonl beside it).

    half: store float32 tensors as float16 (half the file; they load back into float32 parameters). Float64
    buffers such as the quantizer's tables stay exact. sample: sampling defaults to record over the run's
    (validated against the family's sampling options before anything is read)."""
    check_target(out_path, EXPORT_FORMAT, what="export")
    if Path(ckpt_path).is_dir():
        record, state = read_pretrained(ckpt_path)
    else:
        ckpt = load_checkpoint(ckpt_path)
        record, state = _record(ckpt["config"], ckpt["provenance"], ckpt["step"], ema), ckpt["ema" if ema else "model"]
        record["trajectory"] = training_trajectory(Path(ckpt_path).parent)
    if sample:
        record["sample"] = {**record.get("sample", {}),
                            **check_sample_options(get_family(record["family"]), sample, prefix="export --sample")}
    state = {k: (v.half() if half and v.dtype == torch.float32 else v).contiguous() for k, v in state.items()}
    return save_generator_weights(state, record, out_path)


def save_generator_weights(state: dict[str, torch.Tensor], record: dict[str, Any],
                           out_path: str | os.PathLike, overwrite: bool | None = None) -> Path:
    """Write ``state`` with ``record`` (family, config, sample, vae, vae_fingerprint, ...) as safetensors metadata.
    overwrite: replace a shipped generator file too (None: the `overwriting` block's setting; files.check_target)."""
    meta = {"format": EXPORT_FORMAT, "version": str(FORMAT_VERSION),
            **{k: json.dumps(v) for k, v in record.items()}}
    with atomic_path(out_path, EXPORT_FORMAT, overwrite=overwrite, needed=tensor_bytes(state)) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return Path(out_path)


def _read_export(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise ValueError(f"{path} is corrupt or not a safetensors file: {e}") from None
    if "config" not in meta:
        raise ValueError(f"{path} has no 'config' metadata: not a generator exported by `tokenbridge export`")
    try:
        if meta.get("format") == EXPORT_FORMAT:
            record = {k: json.loads(v) for k, v in meta.items() if k not in ("format", "version")}
        else:  # the first export format: a TokenBridge generator, config and step only
            record = {"family": "tokenbridge", "config": json.loads(meta["config"]), "sample": {},
                      "step": int(meta.get("step", 0)), "ema": meta.get("ema") == "True"}
    except ValueError as e:
        raise ValueError(f"{path} has malformed generator metadata: {e}") from None
    return record, state


def load_generator(spec: str | os.PathLike = "fmnist", device: str | torch.device = "cpu",
                   ema: bool = True, family: str | None = None) -> nn.Module:
    """A generator in eval mode from a shipped name ("fmnist", "fmnist-mar", "fmnist-d2c", "fmnist-ar"), an exported
    ``.safetensors``, a pretrained folder (config.json + model.safetensors, `save_pretrained`; it holds one set of
    weights, so ``ema`` does not apply) or a training ``checkpoint.pt`` (its EMA weights unless ``ema`` is False).
    ``family``: the family expected (a file holding another is refused, naming both). ``generator.provenance``
    holds the record: family, sample (the sampling defaults), vae, vae_fingerprint, tokens, step, train (the
    recipe) and, for an exported run, trajectory (its training loss per logged step)."""
    path = SHIPPED.get(str(spec), Path(spec))
    if not path.is_file() and not path.is_dir():
        raise FileNotFoundError(f"generator weights not found: {path} (give a checkpoint.pt, an exported "
                                f".safetensors, a pretrained folder or one of {sorted(SHIPPED)})")
    if path.is_dir():
        record, state = read_pretrained(path)
    elif path.suffix == ".safetensors":
        record, state = _read_export(path)
        if record.get("ema", True) != ema:
            kind = "EMA" if record.get("ema", True) else "raw"
            raise ValueError(f"{path} holds the {kind} weights only; load the training checkpoint.pt for the other "
                             "set, or export it (`tokenbridge export`, --raw for the raw weights)")
    else:
        ckpt = load_checkpoint(path)
        record, state = _record(ckpt["config"], ckpt["provenance"], ckpt["step"], ema), ckpt["ema" if ema else "model"]
    if family is not None and record["family"] != family:
        raise ValueError(f"{path} holds a {record['family']!r} generator, but a {family!r} generator is expected here")
    return build_generator(get_family(record["family"]), record, state, path, device)
