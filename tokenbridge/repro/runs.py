"""What the tables run on: the shared inputs (`Resources`), one command's context (`Context`), token caches, and
the training + evaluation of one generator variant.

A variant is the budget's model config with dotted changes; it is trained with tokenbridge.train.train on cached
tokens, then measured: (1) the held-out token NLL, cross-entropy of the masked test tokens at a fixed mask ratio
and seed (nats per channel, low noise even at small scale), and (2) classifier metrics of class-conditional samples
(FD_cls vs the test split, IS_cls, class accuracy, precision/recall). A variant with the same run config as one
trained before (same tokens, model, budget) is reused from the work_dir, and so is an evaluation with the same
settings.
"""
from __future__ import annotations

import hashlib
import json
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from ..checkpoint import load_generator
from ..classifier import classifier_metrics, load_classifier
from ..cli_options import REPRO_OUT
from ..config import DataConfig, apply_overrides, validate
from ..data import FashionMNIST
from ..files import atomic_path
from ..generate import generate
from ..generators import TokenBridgeGenerator, apply_preset
from ..generators.tokenbridge import HEAD_CONFIGS, QuantizerConfig
from ..tokens import CachedTokens, cache_latents
from ..train import train
from ..vae import load_vae


class Resources:
    """What the tables run on; each is loaded on first use. Defaults: the shipped Fashion-MNIST VAE, classifier
    and generator, and the Fashion-MNIST splits. Tests pass tiny stand-ins.

    dataset: split name -> Dataset of (image [1, 32, 32] in [-1, 1], label); generator: () -> generator module.
    """

    def __init__(self, device: str | torch.device = "cpu", vae: nn.Module | None = None,
                 classifier: nn.Module | None = None, dataset: Callable[[str], Dataset] | None = None,
                 generator: Callable[[], nn.Module] | None = None, vae_spec: str = "fmnist"):
        self.device, self.vae_spec = device, vae_spec
        self._vae, self._classifier, self._dataset_fn, self._generator_fn = vae, classifier, dataset, generator
        self._datasets: dict[str, Dataset] = {}
        self._fingerprints: dict[str, str] = {}

    @property
    def vae(self) -> nn.Module:
        if self._vae is None:
            self._vae = load_vae(self.vae_spec, device=self.device)
        return self._vae.eval()

    @property
    def classifier(self) -> nn.Module:
        if self._classifier is None:
            self._classifier = load_classifier(device=self.device)
        return self._classifier.eval()

    def generator(self, spec: str = "fmnist") -> nn.Module:
        """The stand-in generator, or else the generator `spec` names (load_generator; default: the shipped one)."""
        if self._generator_fn is not None:
            return self._generator_fn().to(self.device).eval()
        return load_generator(spec, device=self.device)

    def dataset(self, split: str) -> Dataset:
        if split not in self._datasets:
            self._datasets[split] = self._dataset_fn(split) if self._dataset_fn is not None else FashionMNIST(split)
        return self._datasets[split]

    def images(self, split: str, count: int | None) -> torch.Tensor:
        """The first `count` images of a split (all for None): `[N, 1, 32, 32]` in [-1, 1]."""
        ds = self.dataset(split)
        n = len(ds) if count is None else min(int(count), len(ds))
        if isinstance(getattr(ds, "images", None), torch.Tensor):
            return ds.images[:n]
        return torch.stack([ds[i][0] for i in range(n)])

    def labels(self, split: str) -> torch.Tensor:
        """The class labels [N] (int64) of a split, in dataset order."""
        ds = self.dataset(split)
        if isinstance(getattr(ds, "labels", None), torch.Tensor):
            return ds.labels
        return torch.as_tensor([int(ds[i][1]) for i in range(len(ds))])

    def fingerprint(self, which: str) -> str:
        """Short hash of the weights of "vae" or "classifier": token caches and evaluations in work_dir are reused
        only with the very networks that made them."""
        if which not in self._fingerprints:
            digest = hashlib.sha1()
            for name, tensor in sorted(getattr(self, which).state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
            self._fingerprints[which] = digest.hexdigest()[:8]
        return self._fingerprints[which]


@dataclass
class Context:
    """One table of one `run_repro` call: its budget (a private copy), folders, device and resources."""

    name: str
    scale: str
    overrides: tuple[str, ...]
    budget: dict
    out_dir: Path
    work_dir: Path
    device: str
    res: Resources
    notes: list[str] = field(default_factory=list)  # extra lines for the markdown, filled by the table

    @property
    def seed(self) -> int:
        return int(self.budget["seed"])

    @property
    def eval_seed(self) -> int:
        seed = self.budget["eval"].get("seed")
        return self.seed if seed is None else int(seed)

    def command(self) -> str:
        """The `tokenbridge repro` command line that repeats this table."""
        parts = ["tokenbridge", "repro", self.name, "--scale", self.scale]
        if self.out_dir != Path(REPRO_OUT):
            parts += ["--out", str(self.out_dir)]
        if self.device != "cpu":
            parts += ["--device", self.device]
        return shlex.join(parts + list(self.overrides))


def short_hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, default=str))


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Token caches


def quantizer_kwargs(model_cfg: dict) -> dict[str, Any]:
    """Every DimensionwiseQuantizer argument of a model config (defaults filled in)."""
    return validate(QuantizerConfig, model_cfg.get("quantizer") or {}, "model.quantizer").model_dump(mode="json")


def token_file(ctx: Context, model_cfg: dict, split: str) -> Path:
    """Path of the cached tokens of `split` for the model's quantizer; made with cache_latents if missing."""
    quantizer = quantizer_kwargs(model_cfg)
    limit = ctx.budget["data"][f"{split}_images"]
    key = short_hash({"vae": ctx.res.fingerprint("vae"), "quantizer": quantizer, "limit": limit})
    path = ctx.work_dir / f"tokens_B{quantizer['levels']}_{split}_{limit or 'all'}_{key}.safetensors"
    if not path.is_file():
        data = DataConfig(vae=ctx.res.vae_spec, split=split, limit=limit, store_latents=split == "train")
        cache_latents(data, path, quantizer=quantizer, device=ctx.device, seed=ctx.seed, vae=ctx.res.vae,
                      dataset=ctx.res.dataset(split))
    return path


# ----------------------------------------------------------------------------------------------------------------
# Variants: train, evaluate


@dataclass
class Variant:
    """One generator of an ablation: `changes` are dotted edits of the budget's model config
    (``{"quantizer.levels": 16, "head.kind": "grouped", "head.group_size": 2}``)."""

    label: str
    changes: dict = field(default_factory=dict)
    paper: float | None = None


# run-folder name of the budget's own model config, shared by table2a (AR head), 2b (frequency order), 2c (B = 64),
# fig8 and table3 (TokenBridge row): trained once per seed
DEFAULT_LABEL = "default"


@dataclass
class VariantResult:
    """One training seed of one variant."""

    variant: Variant
    seed: int
    run_dir: Path
    model_config: dict  # the trained generator's resolved config
    head_params: int
    total_params: int
    train: dict  # elapsed_s, loss, step, reused
    metrics: dict  # nll, density_nll, fd_cls, is_cls, class_accuracy, precision, recall, confidence, eval_s
    samples: torch.Tensor  # [10, C, H, W]: the first sample of each class


def variant_model_config(model_cfg: dict, changes: dict) -> dict:
    """The model config (preset expanded) with a variant's dotted changes. A variant that switches the head kind
    keeps only the head options that kind takes (the parallel head has no channel order or attention heads)."""
    model = apply_overrides(apply_preset(TokenBridgeGenerator, model_cfg),
                            [f"{k}={json.dumps(v)}" for k, v in changes.items()])
    head = model.get("head") or {}
    accepted = HEAD_CONFIGS.get(head.get("kind", "ar"))
    if accepted is not None:
        model["head"] = {k: v for k, v in head.items() if k == "kind" or k in accepted.model_fields}
    return model


def class_labels(per_class: int, num_classes: int = 10) -> torch.Tensor:
    """[num_classes * per_class] labels, class-major (0, 0, ..., 1, 1, ...)."""
    return torch.arange(num_classes).repeat_interleave(int(per_class))


def first_per_class(labels: torch.Tensor, per_class: int, num_classes: int = 10) -> torch.Tensor:
    """Indices of the first ``per_class`` items of every class in ``labels`` [N], class-major (fewer where a class
    has fewer)."""
    return torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in range(num_classes)])


@torch.no_grad()
def heldout_nll(model: nn.Module, tokens: CachedTokens, mask_ratio: float, seed: int, batch_size: int = 100,
                count: int | None = None, device: str | torch.device = "cpu") -> float:
    """Mean cross-entropy (nats per channel) of the masked positions of held-out token grids.

    Every grid gets round(mask_ratio * L) masked positions in a random order drawn from `seed` (the global RNG is
    restored afterwards), so all models see exactly the same masks.
    """
    model = model.to(device).eval()
    n = len(tokens) if count is None else min(int(count), len(tokens))
    total = 0.0
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, n, batch_size):
            idx = tokens.indices[start:min(n, start + batch_size)].long().to(device)
            labels = tokens.labels[start:min(n, start + batch_size)].to(device)
            total += float(model.loss((idx, labels), mask_ratio=mask_ratio)) * len(idx)
    return total / n


def evaluate_samples(ctx: Context, model: nn.Module, order: str = "random") -> tuple[dict, dict]:
    """Class-conditional samples with the eval budget, and their classifier metrics against the test split.

    Returns (metrics: fd_cls, is_cls, class_accuracy, precision, recall, confidence = mean token log-prob,
    result of generate.generate)."""
    e = ctx.budget["eval"]
    labels = class_labels(e["per_class"])
    result = generate(model, labels.tolist(), vae=ctx.res.vae, seed=ctx.eval_seed, device=ctx.device,
                      batch_size=e["batch_size"], num_iter=e["num_iter"], cfg=e["cfg"],
                      cfg_schedule=e["cfg_schedule"], temperature=e["temperature"], order=order)
    metrics = classifier_metrics(result["images"], labels, real_images=ctx.res.images("test", e["real_images"]),
                                 classifier=ctx.res.classifier, device=ctx.device)
    metrics["confidence"] = float(result["confidence"].mean())
    return metrics, result


def train_variant(ctx: Context, model_cfg: dict, label: str, seed: int) -> tuple[Path, dict]:
    """Train the generator of `model_cfg` with the budget's train section and training seed `seed` on the cached
    train tokens, or reuse a finished run of the same configuration. Returns (run_dir, info: elapsed_s, loss, step,
    reused)."""
    train_cfg = {k: v for k, v in ctx.budget["train"].items() if k != "device"}
    tokens = token_file(ctx, model_cfg, "train")
    config = {"seed": int(seed), "family": TokenBridgeGenerator.family,
              "data": {"source": "tokens", "tokens": str(tokens)}, "model": model_cfg, "train": train_cfg}
    # the token file's name already encodes the VAE, quantizer and image count
    config_hash = short_hash({**config, "data": tokens.name})
    # a variant shared by two tables (the default head is table2a's AR row, table2b's frequency row and table2c's
    # B=64 row) is trained once: any finished run with the same configuration is reused
    finished = sorted((ctx.work_dir / "runs").glob(f"*-{config_hash}/repro_train.json"))
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    run_dir = finished[0].parent if finished else ctx.work_dir / "runs" / f"{slug}-seed{seed}-{config_hash}"
    return run_dir, train_once(ctx, config, run_dir)


def train_once(ctx: Context, config: dict, run_dir: Path) -> dict:
    """Train the run ``config`` into ``run_dir`` on ctx.device, unless a finished run is there already. Returns
    info: elapsed_s, loss, step, reused."""
    info_path = run_dir / "repro_train.json"
    if info_path.is_file():
        return {**json.loads(info_path.read_text()), "reused": True}
    metrics = train({**config, "out_dir": str(run_dir), "train": {**config["train"], "device": ctx.device}})
    info = {k: metrics[k] for k in ("elapsed_s", "loss", "step")}
    _write_json(info_path, info)
    return {**info, "reused": False}


def evaluate_variant(ctx: Context, model: nn.Module, model_cfg: dict, run_dir: Path) -> tuple[dict, torch.Tensor]:
    """Held-out NLL (test tokens of `model_cfg`'s quantizer) + sample metrics of a trained variant and one sample
    per class; cached in run_dir per evaluation setting."""
    e = ctx.budget["eval"]
    test_tokens = token_file(ctx, model_cfg, "test")
    eval_settings = {k: v for k, v in e.items() if v is not None}  # eval.seed=None: the key it had before
    eval_key = short_hash({"eval": eval_settings, "seed": ctx.seed, "tokens": test_tokens.name,
                           "classifier": ctx.res.fingerprint("classifier")})
    metrics_path, samples_path = run_dir / f"repro_eval_{eval_key}.json", run_dir / f"repro_eval_{eval_key}.safetensors"
    if metrics_path.is_file() and samples_path.is_file():
        return json.loads(metrics_path.read_text()), load_file(str(samples_path))["samples"]
    start = time.time()
    metrics, result = evaluate_samples(ctx, model)
    tokens = CachedTokens(test_tokens)
    metrics["nll"] = heldout_nll(model, tokens, e["nll_mask_ratio"], ctx.eval_seed, e["batch_size"], e["nll_images"],
                                 ctx.device)
    metrics["density_nll"] = metrics["nll"] + mean_log_bin_width(model.quantizer, tokens.indices[:e["nll_images"]])
    metrics["eval_s"] = time.time() - start
    samples = result["images"][::int(e["per_class"])].contiguous()
    with atomic_path(samples_path) as tmp:
        save_file({"samples": samples}, str(tmp))
    _write_json(metrics_path, metrics)
    return metrics, samples


def run_variant(ctx: Context, variant: Variant) -> list[VariantResult]:
    """Train (or reuse) the generator of `variant` once per training seed of the budget, then evaluate each."""
    model_cfg = variant_model_config(ctx.budget["model"], variant.changes)
    label = DEFAULT_LABEL if model_cfg == variant_model_config(ctx.budget["model"], {}) else variant.label
    results = []
    for seed in ctx.budget["train_seeds"]:
        run_dir, info = train_variant(ctx, model_cfg, label, seed)
        model = load_generator(run_dir / "checkpoint.pt", device=ctx.device)
        metrics, samples = evaluate_variant(ctx, model, model_cfg, run_dir)
        results.append(VariantResult(variant, int(seed), run_dir, model.config, count_params(model.head),
                                     count_params(model), info, metrics, samples))
    return results


def mean_log_bin_width(quantizer: nn.Module, indices: torch.Tensor) -> float:
    """Mean log width (latent units) of the bins of `indices` [N, h, w, C]: added to a discrete NLL (nats per
    channel) it gives the NLL of the piecewise-uniform density the discrete model implies over the latents, which
    is comparable across B (the discrete NLL alone grows with B even for a perfect model)."""
    widths = quantizer.finite_bin_width_at(indices.long())
    return float(widths.double().log().mean())
