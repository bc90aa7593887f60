"""`tokenbridge repro NAME`: the paper's tables and Fig. 8 at a stated budget, one markdown table + one PNG each.

    run_repro("table2a", out_dir="docs/results", scale="small", overrides=["train.steps=400"])

Every table writes ``<out_dir>/<name>.md`` (our numbers next to the paper's, the exact command, the budget, parameter
counts, wall time, seed) and ``<out_dir>/<name>.png``, prints the table and returns it. Budgets live in ``SCALES``:

- ``tiny``: a few steps on a few hundred images, for tests (the numbers mean nothing);
- ``small``: the embedded Fashion-MNIST setting on 2 CPU cores, one generator variant in ~10-15 min;
- ``paper``: the paper's head sizes, batch and sampling settings (TokenBridge-L), for GPUs.

``overrides`` are dotted ``key=value`` edits of the chosen budget (``train.steps=2000``, ``model.backbone.width=256``,
``eval.per_class=500``, ``table2e.heads=[[64,2],[128,4]]``); values are parsed as YAML.

Generator ablations (table2a-e) train one generator per variant with ``train.train`` on cached tokens, all with the
same budget and seed, then measure (1) the held-out token NLL: cross-entropy of the masked test tokens at a fixed
mask ratio and seed (nats per channel, low noise even at small scale) and (2) classifier metrics of class-conditional
samples (FD_cls vs the test split, IS_cls, class accuracy, precision/recall). A variant with the same config as one
trained before (same tokens, model, budget) is reused from ``work_dir`` (default runs/repro), so ``all`` trains the
shared baseline once; delete ``work_dir`` to start over.

Our numbers are Fashion-MNIST classifier metrics; the paper's are ImageNet 256x256 Inception FID. Compare the
ordering of the variants, never the values.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .files import atomic_path
from .model import DEFAULT_FMNIST_CONFIG
from .train import apply_overrides

REPRO_NAMES = ("table1", "table2a", "table2b", "table2c", "table2d", "table2e", "table5", "fig8")

TITLES = {
    "table1": "Table 1: reconstruction through the dimension-wise quantizer",
    "table2a": "Table 2a: parallel vs dimension-wise autoregressive head",
    "table2b": "Table 2b: frequency-based vs natural channel order",
    "table2c": "Table 2c: quantization levels B for generation",
    "table2d": "Table 2d: channel grouping (channels predicted jointly per head step)",
    "table2e": "Table 2e: autoregressive head width x depth",
    "table5": "Table 5: per-token prediction time, dimension-wise AR head vs MAR diffusion head",
    "fig8": "Fig. 8: confidence-guided vs random-order generation",
}

# The paper's numbers (ImageNet 256x256; gFID / rFID are Inception FID-50k; Table 5 on an A100 at batch 1).
PAPER = {
    "table1_vae": 1.11,
    "table1_levels": {8: 3.69, 16: 1.33, 32: 1.12, 64: 1.11},  # at range +-5
    "table1_range": {2: 2.26, 3: 1.22, 4: 1.13, 5: 1.11},  # at B = 64
    "table2a": {"parallel": 15.7, "ar": 1.94},
    "table2b": {"frequency": 1.89, "natural": 1.94},
    "table2c": {16: 2.03, 32: 1.98, 64: 1.94},
    "table2d": {1: 2.28, 2: 2.45, 4: 3.24},
    "table2e": {(256, 3): 2.88, (512, 3): 2.72, (512, 4): 2.65, (1024, 4): 2.03, (1024, 6): 1.94},
    "table5_ms": {"diffusion": 311.25, "ar_uncached": 52.42},  # the official AR head re-runs the prefix (no cache)
}
PAPER_GEN_NOTE = ("paper gFID: ImageNet 256x256, Inception FID-50k of TokenBridge-L (paper Table 2). Ours: "
                  "Fashion-MNIST; NLL = held-out token cross-entropy (nats per channel, masked positions); FD_cls, "
                  "IS_cls, accuracy, precision, recall from the embedded classifier (tokenbridge.metrics). They are "
                  "not comparable in value with FID: compare how the variants are ordered.")

_SMALL_MODEL = copy.deepcopy(DEFAULT_FMNIST_CONFIG)
_SMALL_MODEL["head"]["order"] = "frequency"  # resolved per token file by train.train (paper Sec. 3.2)

_TINY_MODEL = copy.deepcopy(_SMALL_MODEL)
_TINY_MODEL["backbone"].update(width=32, encoder_depth=1, decoder_depth=1, num_heads=2, buffer_size=2)
_TINY_MODEL["head"].update(width=16, depth=1, num_heads=2)

_PAPER_MODEL = copy.deepcopy(_SMALL_MODEL)  # TokenBridge-L sizes (MAR-L backbone, head 1024 x 4, 8 heads)
_PAPER_MODEL["backbone"].update(width=1024, encoder_depth=16, decoder_depth=16, num_heads=16, buffer_size=64,
                                dropout=0.1, attn_dropout=0.1)
_PAPER_MODEL["head"].update(width=1024, depth=4, num_heads=8, dropout=0.1)

# One place for every budget. train: tokenbridge.train keys; model: tokenbridge.model.build_generator config;
# eval: sampling + metrics settings shared by table2* and fig8 (eval.seed: sampling and NLL-mask seed, None = the
# run's seed; another value re-evaluates the same trained generators, which measures the evaluation's own noise).
# head_width_to_paper maps our head widths onto the paper's Table 2e widths (our sweep is the paper's with widths
# divided by that factor).
SCALES: dict[str, dict[str, Any]] = {
    "tiny": {
        "seed": 0,
        "data": {"train_images": 256, "test_images": 64},
        "model": _TINY_MODEL,
        "train": {"steps": 2, "global_batch": 32, "lr": 1e-3, "min_lr": 0.0, "warmup_steps": 0, "ema": 0.9,
                  "grad_clip": 3.0, "ckpt_every": 0, "log_every": 1},
        "eval": {"per_class": 2, "num_iter": 4, "cfg": 3.0, "cfg_schedule": "linear", "temperature": 1.0,
                 "real_images": 64, "nll_images": 64, "nll_mask_ratio": 0.875, "batch_size": 64, "seed": None},
        "table1": {"images": 32, "fit_images": 32, "levels": [8, 64], "ranges": [3, 5]},
        "table2c": {"levels": [16, 64]},
        "table2d": {"levels": 16, "group_sizes": [1, 2]},
        "table2e": {"heads": [[8, 1], [16, 1]], "head_width_to_paper": 32},
        "table5": {"args": ["--quick", "--repeats", "1", "--warmup", "0", "--budget", "0.1", "--batches", "1",
                            "--diffusion-steps", "4", "--threads", "1"]},
        "fig8": {"show_per_class": 1},
    },
    "small": {
        "seed": 0,
        "data": {"train_images": None, "test_images": None},  # None: the whole split (60,000 / 10,000)
        "model": _SMALL_MODEL,
        # ~0.9 s per step on 2 cores for the default head (64 x 2): ~6 min per variant plus ~1.5 min of evaluation
        "train": {"steps": 400, "global_batch": 128, "lr": 1e-3, "min_lr": 1e-5, "warmup_steps": 80, "ema": 0.995,
                  "grad_clip": 3.0, "ckpt_every": 200, "log_every": 20},
        "eval": {"per_class": 100, "num_iter": 16, "cfg": 3.0, "cfg_schedule": "linear", "temperature": 1.0,
                 "real_images": 10000, "nll_images": 10000, "nll_mask_ratio": 0.875, "batch_size": 100, "seed": None},
        "table1": {"images": 10000, "fit_images": 2000, "levels": [8, 16, 32, 64], "ranges": [2, 3, 4, 5]},
        "table2c": {"levels": [16, 32, 64]},
        # g = 4 at B = 16 is one 65,536-way output per token: ~10 s per step on 2 cores, hence half the steps
        "table2d": {"levels": 16, "group_sizes": [1, 2, 4], "train_steps": 200},
        # the paper's first four sizes / 8 (1024 x 6 / 8 = 128 x 6 would take ~45 min here)
        "table2e": {"heads": [[32, 3], [64, 3], [64, 4], [128, 4]], "head_width_to_paper": 8},
        "table5": {"args": ["--quick"]},
        "fig8": {"show_per_class": 2},
    },
    "paper": {
        "seed": 0,
        "data": {"train_images": None, "test_images": None},
        "model": _PAPER_MODEL,
        # batch 2048, blr 1e-4 -> lr 8e-4, ~400 epochs of Fashion-MNIST (the paper: 800 epochs of ImageNet)
        "train": {"steps": 12000, "global_batch": 2048, "lr": None, "blr": 1e-4, "min_lr": 0.0, "warmup_steps": 1000,
                  "ema": 0.9999, "grad_clip": 1.0, "bf16": True, "ckpt_every": 1000, "log_every": 50},
        "eval": {"per_class": 1000, "num_iter": 64, "cfg": 3.1, "cfg_schedule": "linear", "temperature": 0.97,
                 "real_images": 10000, "nll_images": 10000, "nll_mask_ratio": 0.875, "batch_size": 500, "seed": None},
        "table1": {"images": 10000, "fit_images": 10000, "levels": [8, 16, 32, 64], "ranges": [2, 3, 4, 5]},
        "table2c": {"levels": [16, 32, 64]},
        "table2d": {"levels": 16, "group_sizes": [1, 2, 4]},
        "table2e": {"heads": [[256, 3], [512, 3], [512, 4], [1024, 4], [1024, 6]], "head_width_to_paper": 1},
        "table5": {"args": []},  # the paper's L sizes: AR head 1024 x 4, diffusion head 1024 x 3, 100 steps
        "fig8": {"show_per_class": 2},
    },
}
# Sections whose keys are checked downstream (build_generator, train.train): overrides may add new keys there.
_OPEN_SECTIONS = ("model", "train")
BENCHMARK_HEADS = Path(__file__).resolve().parent.parent / "benchmarks" / "heads.py"


# ----------------------------------------------------------------------------------------------------------------
# Shared inputs and context


class Resources:
    """What the tables run on; each is loaded on first use. Defaults: the shipped Fashion-MNIST VAE, classifier
    and generator, and the Fashion-MNIST splits. Tests pass tiny stand-ins.

    dataset: split name -> Dataset of (image [1, 32, 32] in [-1, 1], label); generator: () -> TokenBridgeGenerator.
    """

    def __init__(self, device: str | torch.device = "cpu", vae: nn.Module | None = None,
                 classifier: nn.Module | None = None, dataset: Callable[[str], Any] | None = None,
                 generator: Callable[[], nn.Module] | None = None, vae_spec: str = "fmnist"):
        self.device, self.vae_spec = device, vae_spec
        self._vae, self._classifier, self._dataset_fn, self._generator_fn = vae, classifier, dataset, generator
        self._datasets: dict[str, Any] = {}
        self._fingerprints: dict[str, str] = {}

    @property
    def vae(self) -> nn.Module:
        if self._vae is None:
            from .vae import load_vae

            self._vae = load_vae(self.vae_spec, device=self.device)
        return self._vae.eval()

    @property
    def classifier(self) -> nn.Module:
        if self._classifier is None:
            from .metrics import load_classifier

            self._classifier = load_classifier(device=self.device)
        return self._classifier.eval()

    def generator(self) -> nn.Module:
        if self._generator_fn is not None:
            return self._generator_fn().to(self.device).eval()
        from .generate import load_generator

        return load_generator("fmnist", device=self.device)

    def dataset(self, split: str):
        if split not in self._datasets:
            if self._dataset_fn is not None:
                self._datasets[split] = self._dataset_fn(split)
            else:
                from .data import FashionMNIST

                self._datasets[split] = FashionMNIST(split)
        return self._datasets[split]

    def images(self, split: str, count: int | None) -> torch.Tensor:
        """The first `count` images of a split (all for None): `[N, 1, 32, 32]` in [-1, 1]."""
        ds = self.dataset(split)
        n = len(ds) if count is None else min(int(count), len(ds))
        if isinstance(getattr(ds, "images", None), torch.Tensor):
            return ds.images[:n]
        return torch.stack([ds[i][0] for i in range(n)])

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
class _Ctx:
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
        parts = ["tokenbridge", "repro", self.name, "--scale", self.scale]
        if self.out_dir != Path("docs/results"):
            parts += ["--out", str(self.out_dir)]
        if self.device != "cpu":
            parts += ["--device", self.device]
        return shlex.join(parts + list(self.overrides))


def _short_hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, default=str))


def resolve_budget(scale: str, overrides: tuple[str, ...] | list[str] = ()) -> dict:
    """The budget of `scale` with dotted overrides applied; unknown keys outside model/train raise ValueError."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose from {sorted(SCALES)}")
    budget = SCALES[scale]
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        parts = key.split(".")
        node: Any = budget
        for depth, part in enumerate(parts):
            if parts[0] in _OPEN_SECTIONS and depth > 0:
                break
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"override {item!r}: no budget key {'.'.join(parts[:depth + 1])!r} in scale "
                                 f"{scale!r}; top-level keys: {sorted(budget)}")
            node = node[part]
    return apply_overrides(budget, list(overrides))


# ----------------------------------------------------------------------------------------------------------------
# Token caches, variant training and evaluation


def _quantizer_kwargs(model_cfg: dict) -> dict:
    return {"levels": int(model_cfg["levels"]), "value_range": list(model_cfg["value_range"]),
            "std_range": model_cfg["std_range"], "kind": model_cfg["quantizer_kind"],
            "tails": model_cfg["quantizer_tails"], "calibration": model_cfg["quantizer_calibration"]}


def token_file(ctx: _Ctx, model_cfg: dict, split: str) -> Path:
    """Path of the cached tokens of `split` for the model's quantizer; made with train.cache_latents if missing."""
    from .train import cache_latents

    quantizer = _quantizer_kwargs(model_cfg)
    limit = ctx.budget["data"][f"{split}_images"]
    key = _short_hash({"vae": ctx.res.fingerprint("vae"), "quantizer": quantizer, "limit": limit})
    path = ctx.work_dir / f"tokens_B{quantizer['levels']}_{split}_{limit or 'all'}_{key}.safetensors"
    if not path.is_file():
        cache_latents(ctx.res.vae_spec, path, split=split, quantizer=quantizer, device=ctx.device, limit=limit,
                      store_latents=split == "train", seed=ctx.seed, vae=ctx.res.vae,
                      dataset=ctx.res.dataset(split))
    return path


@dataclass
class Variant:
    """One generator of an ablation: `changes` are dotted edits of the budget's model config."""

    label: str
    changes: dict = field(default_factory=dict)
    paper: float | None = None


@dataclass
class VariantResult:
    variant: Variant
    run_dir: Path
    model_config: dict
    head_params: int
    total_params: int
    train: dict  # elapsed_s, loss, step, reused
    metrics: dict  # nll, fd_cls, is_cls, class_accuracy, precision, recall, confidence
    samples: torch.Tensor  # [10, C, H, W]: the first sample of each class


def class_labels(per_class: int, num_classes: int = 10) -> torch.Tensor:
    """[num_classes * per_class] labels, class-major (0, 0, ..., 1, 1, ...)."""
    return torch.arange(num_classes).repeat_interleave(int(per_class))


@torch.no_grad()
def heldout_nll(model: nn.Module, tokens, mask_ratio: float, seed: int, batch_size: int = 100,
                count: int | None = None, device: str | torch.device = "cpu") -> float:
    """Mean cross-entropy (nats per channel) of the masked positions of held-out token grids.

    tokens: a train.CachedTokens. Every grid gets round(mask_ratio * L) masked positions in a random order drawn
    from `seed` (the global RNG is restored afterwards), so all models see exactly the same masks.
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
            total += float(model(idx, labels, mask_ratio=mask_ratio)) * len(idx)
    return total / n


def evaluate_samples(ctx: _Ctx, model: nn.Module, order: str = "random") -> tuple[dict, dict]:
    """Class-conditional samples with the eval budget, and their classifier metrics against the test split.

    Returns (metrics: fd_cls, is_cls, class_accuracy, precision, recall, confidence = mean token log-prob,
    result of generate.generate)."""
    from .generate import generate
    from .metrics import classifier_metrics

    e = ctx.budget["eval"]
    labels = class_labels(e["per_class"])
    result = generate(model, ctx.res.vae, labels.tolist(), num_iter=e["num_iter"], cfg=e["cfg"],
                      cfg_schedule=e["cfg_schedule"], temperature=e["temperature"], order=order, seed=ctx.eval_seed,
                      device=ctx.device, batch_size=e["batch_size"])
    metrics = classifier_metrics(result["images"], labels, real_images=ctx.res.images("test", e["real_images"]),
                                 classifier=ctx.res.classifier, device=ctx.device)
    metrics["confidence"] = float(result["confidence"].mean())
    return metrics, result


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def run_variant(ctx: _Ctx, variant: Variant) -> VariantResult:
    """Train (or reuse) the generator of `variant` with the budget's train section, then evaluate it."""
    from safetensors.torch import load_file, save_file

    from .train import CachedTokens, load_model_from_checkpoint, train

    b = ctx.budget
    model_cfg = apply_overrides(b["model"], [f"{k}={json.dumps(v)}" for k, v in variant.changes.items()])
    train_cfg = {k: v for k, v in b["train"].items() if k != "device"}
    tokens = token_file(ctx, model_cfg, "train")
    config = {"seed": ctx.seed, "data": {"source": "tokens", "tokens": str(tokens)}, "model": model_cfg,
              "train": train_cfg}
    slug = re.sub(r"[^a-z0-9]+", "-", variant.label.lower()).strip("-")
    # the token file's name already encodes the VAE, quantizer and image count
    config_hash = _short_hash({**config, "data": tokens.name})
    # a variant shared by two tables (the default head is table2a's AR row, table2b's frequency row and table2c's
    # B=64 row) is trained once: any finished run with the same configuration is reused
    finished = sorted((ctx.work_dir / "runs").glob(f"*-{config_hash}/repro_train.json"))
    run_dir = finished[0].parent if finished else ctx.work_dir / "runs" / f"{slug}-{config_hash}"
    info_path = run_dir / "repro_train.json"
    if info_path.is_file():
        info = {**json.loads(info_path.read_text()), "reused": True}
    else:
        metrics = train({**config, "out_dir": str(run_dir), "train": {**train_cfg, "device": ctx.device}})
        info = {k: metrics[k] for k in ("elapsed_s", "loss", "step")}
        _write_json(info_path, info)
        info["reused"] = False
    model = load_model_from_checkpoint(run_dir / "checkpoint.pt", device=ctx.device)

    e = b["eval"]
    test_tokens = token_file(ctx, model_cfg, "test")
    eval_settings = {k: v for k, v in e.items() if v is not None}  # eval.seed=None: the key it had before
    eval_key = _short_hash({"eval": eval_settings, "seed": ctx.seed, "tokens": test_tokens.name,
                            "classifier": ctx.res.fingerprint("classifier")})
    metrics_path, samples_path = run_dir / f"repro_eval_{eval_key}.json", run_dir / f"repro_eval_{eval_key}.safetensors"
    if metrics_path.is_file() and samples_path.is_file():
        metrics, samples = json.loads(metrics_path.read_text()), load_file(str(samples_path))["samples"]
    else:
        start = time.time()
        metrics, result = evaluate_samples(ctx, model)
        metrics["nll"] = heldout_nll(model, CachedTokens(test_tokens), e["nll_mask_ratio"], ctx.eval_seed,
                                     e["batch_size"], e["nll_images"], ctx.device)
        metrics["eval_s"] = time.time() - start
        samples = result["images"][::int(e["per_class"])].contiguous()
        save_file({"samples": samples}, str(samples_path))
        _write_json(metrics_path, metrics)
    return VariantResult(variant, run_dir, model.config, _count(model.head), _count(model), info, metrics, samples)


# ----------------------------------------------------------------------------------------------------------------
# Formatting and plots


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _paper(x: float | None) -> str:
    return "-" if x is None else f"{x:g}"


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def variant_table(results: list[VariantResult]) -> str:
    header = ["variant", "paper gFID", "head params", "total params", "held-out NLL", "NLL - ln B", "FD_cls",
              "IS_cls", "class acc", "precision", "recall", "train loss", "train min"]
    rows = []
    for r in results:
        m = r.metrics
        rows.append([r.variant.label, _paper(r.variant.paper), _params(r.head_params), _params(r.total_params),
                     _fmt(m["nll"], 4), _fmt(m["nll"] - math.log(r.model_config["levels"]), 4),
                     _fmt(m["fd_cls"], 2), _fmt(m["is_cls"], 2), m["class_accuracy"],
                     m["precision"], m["recall"], _fmt(r.train["loss"], 4), _fmt(r.train["elapsed_s"] / 60, 1)])
    return markdown_table(header, rows)


def plot_variants(results: list[VariantResult], path: Path, title: str) -> None:
    """Training loss curves, NLL / FD_cls / accuracy bars and one sample per class for every variant."""
    from .images import image_grid

    plt = _pyplot()
    n = len(results)
    fig = plt.figure(figsize=(15, 3.6 + 0.75 * n))
    grid = fig.add_gridspec(2, 4, height_ratios=[3.6, 0.75 * n])
    labels = [r.variant.label for r in results]
    ax = fig.add_subplot(grid[0, 0])
    for r in results:
        log = [json.loads(line) for line in (r.run_dir / "log.jsonl").read_text().splitlines() if line.strip()] \
            if (r.run_dir / "log.jsonl").is_file() else []
        ax.plot([x["step"] for x in log], [x["loss"] for x in log], label=r.variant.label)
    ax.set(title="training loss (nats/channel)", xlabel="step")
    ax.legend(fontsize=7)
    for k, (key, name) in enumerate([("nll", "held-out NLL (lower = better)"), ("fd_cls", "FD_cls (lower)"),
                                     ("class_accuracy", "class accuracy (higher)")]):
        ax = fig.add_subplot(grid[0, k + 1])
        ax.bar(range(n), [r.metrics[key] for r in results], color=[f"C{i}" for i in range(n)])
        ax.set_xticks(range(n), labels, rotation=20, fontsize=7)
        ax.set_title(name, fontsize=9)
    ax = fig.add_subplot(grid[1, :])
    strips = [np.array(image_grid(r.samples, nrow=len(r.samples), scale=2).convert("L")) for r in results]
    ax.imshow(np.concatenate(strips, axis=0), cmap="gray", vmin=0, vmax=255)
    ax.set_yticks([(i + 0.5) * strips[0].shape[0] for i in range(n)], labels, fontsize=8)
    ax.set_xticks([])
    ax.set_title("one sample per class (0-9), same seed", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    _save_figure(fig, path)


def run_variants(ctx: _Ctx, variants: list[Variant]) -> str:
    """Shared body of table2a-e: train + evaluate every variant, write the plot, return the markdown table."""
    results = [run_variant(ctx, v) for v in variants]
    plot_variants(results, ctx.out_dir / f"{ctx.name}.png", TITLES[ctx.name])
    b, e = ctx.budget, ctx.budget["eval"]
    t, bb = b["train"], b["model"]["backbone"]
    ctx.notes += [
        PAPER_GEN_NOTE,
        f"Budget per variant: {t['steps']} steps x batch {t['global_batch']} (lr {t.get('lr') or 'blr-scaled'}, "
        f"{t.get('warmup_steps', 0)} warmup steps, cosine to {t.get('min_lr', 0)}, EMA {t['ema']}, grad clip "
        f"{t['grad_clip']}); EMA weights evaluated. Backbone (all variants): MAR width {bb['width']}, "
        f"encoder/decoder depth {bb['encoder_depth']}/{bb['decoder_depth']}, {bb['num_heads']} heads, buffer "
        f"{bb['buffer_size']}.",
        f"Evaluation: {10 * e['per_class']} class-conditional samples ({e['per_class']} per class), {e['num_iter']} "
        f"MAR steps, random order, cfg {e['cfg']} ({e['cfg_schedule']}), temperature {e['temperature']}, seed "
        f"{ctx.eval_seed}; FD_cls / precision / recall against the first {e['real_images']} test images. Held-out NLL: "
        f"first {e['nll_images']} test token grids, mask ratio {e['nll_mask_ratio']}, mask seed {ctx.eval_seed}; NLL "
        "values are comparable only at the same B (more levels = more nats); NLL - ln B removes the ln B that B "
        "equal-probability bins add, leaving (for fine bins) the NLL of the latents relative to the reference "
        "Gaussian of Eq. 2, which is comparable across B.",
        "Variants:",
    ]
    reused = " (reused from an earlier run)"
    for r in results:
        h = r.model_config["head"]
        group = f", {h['group_size']} channels/group" if h["kind"] == "grouped" else ""
        ctx.notes.append(
            f"  - {r.variant.label}: head {h['kind']} width {h['width']} depth {h['depth']}{group}, channel order "
            f"{h['order'] if h['kind'] != 'parallel' else '-'}, B={r.model_config['levels']}; trained "
            f"{r.train['step']} steps in {r.train['elapsed_s']:.0f} s{reused if r.train['reused'] else ''}; "
            f"evaluation {r.metrics.get('eval_s', 0):.0f} s; run dir `{r.run_dir}`")
    train_s = sum(r.train["elapsed_s"] for r in results)
    eval_s = sum(r.metrics.get("eval_s", 0) for r in results)
    ctx.notes.append(f"Compute of all rows, measured when each was made: training {train_s / 60:.1f} min + evaluation "
                     f"{eval_s / 60:.1f} min (wall time; 'train min' and these depend on what else the machine ran, "
                     "so they are not a speed comparison between rows).")
    return variant_table(results)


# ----------------------------------------------------------------------------------------------------------------
# The tables


def table1(ctx: _Ctx) -> str:
    """Reconstruction through the quantizer: continuous VAE, B and range sweeps, calibrated quantizers."""
    from .reconstruct import quantizer_settings, reconstruction_table, save_histograms, save_reconstruction_grid

    t = ctx.budget["table1"]
    vae, classifier = ctx.res.vae, ctx.res.classifier
    images = ctx.res.images("test", t["images"])
    fit_images = ctx.res.images("train", t["fit_images"])
    with torch.no_grad():  # calibrated quantizers are fitted on training images, not on the evaluated ones
        fit_latents = torch.cat([vae.encode(fit_images[i:i + 500].to(ctx.device)).cpu()
                                 for i in range(0, len(fit_images), 500)])
    settings = quantizer_settings(tuple(t["levels"]), tuple(float(r) for r in t["ranges"]))
    rows, samples = reconstruction_table(vae, images, settings, features=classifier.features, batch_size=250,
                                         device=ctx.device, fit_latents=fit_latents, progress=False)

    def paper(row) -> float | None:
        if row.levels is None:
            return PAPER["table1_vae"]
        if row.value_range is None:
            return None
        if float(row.value_range) == 5.0:
            return PAPER["table1_levels"].get(row.levels)
        return PAPER["table1_range"].get(int(row.value_range)) if row.levels == 64 else None

    base = rows[0].psnr
    table = markdown_table(
        ["setting", "paper rFID", "FD_cls", "PSNR (dB)", "PSNR vs VAE", "SSIM", "latent MSE"],
        [[r.name, _paper(paper(r)), _fmt(r.fd, 3), _fmt(r.psnr, 2), f"{100 * (r.psnr - base) / base:+.2f}%",
          _fmt(r.ssim, 4), _fmt(r.latent_mse, 5)] for r in rows])
    save_reconstruction_grid(samples, rows, ctx.out_dir / "table1.png")
    save_histograms(samples["latents"], ctx.out_dir / "table1_histograms.png")
    ctx.notes += [
        "paper rFID: ImageNet 256x256, KL-16 VAE, Inception FID-50k (paper Table 1). Ours: the embedded Fashion-MNIST "
        f"VAE on the first {len(images)} test images; FD_cls = Frechet distance between the classifier features of "
        "reconstructions and originals (an rFID analogue, not comparable in value). PSNR on images in [-1, 1].",
        f"Calibrated quantizers are fitted on the latents of the first {len(fit_images)} training images. Rows "
        "'B=.., +-r' use the paper's fixed range [-r, r] (std range 3).",
        "Plot: table1.png = originals, continuous VAE, then B at range +-5 (paper Fig. 6); table1_histograms.png = "
        "latent densities vs the B=64 histogram (paper Fig. 3).",
    ]
    return table


def table2a(ctx: _Ctx) -> str:
    return run_variants(ctx, [Variant("parallel head", {"head.kind": "parallel"}, PAPER["table2a"]["parallel"]),
                              Variant("autoregressive head", {}, PAPER["table2a"]["ar"])])


def table2b(ctx: _Ctx) -> str:
    return run_variants(ctx, [Variant("frequency order", {"head.order": "frequency"}, PAPER["table2b"]["frequency"]),
                              Variant("natural order", {"head.order": None}, PAPER["table2b"]["natural"])])


def table2c(ctx: _Ctx) -> str:
    return run_variants(ctx, [Variant(f"B={b}", {"levels": int(b)}, PAPER["table2c"].get(int(b)))
                              for b in ctx.budget["table2c"]["levels"]])


def table2d(ctx: _Ctx) -> str:
    t = ctx.budget["table2d"]
    if t.get("train_steps"):  # this table's own step budget, for every row alike
        ctx.budget["train"]["steps"] = int(t["train_steps"])
    # g=1 is the plain dimension-wise head (GroupedHead(g=1) computes the same), so it shares table2c's B run
    variants = [Variant(f"g={g}, B={t['levels']}",
                        {"levels": int(t["levels"]), **({"head.kind": "grouped", "head.group_size": int(g)}
                                                       if int(g) > 1 else {})},
                        PAPER["table2d"].get(int(g))) for g in t["group_sizes"]]
    ctx.notes.append(f"Grouping g predicts g channels per head step as one of B^g classes (B={t['levels']}), so "
                     "the head's input embeddings and classifiers grow like B^g (see the parameter counts).")
    return run_variants(ctx, variants)


def table2e(ctx: _Ctx) -> str:
    t = ctx.budget["table2e"]
    factor = int(t["head_width_to_paper"])
    variants = [Variant(f"head {w}x{d}", {"head.width": int(w), "head.depth": int(d)},
                        PAPER["table2e"].get((int(w) * factor, int(d)))) for w, d in t["heads"]]
    ctx.notes.append(f"Head sizes are the paper's (256x3 3M, 512x3, 512x4, 1024x4 65M, 1024x6 94M parameters) with "
                     f"widths divided by {factor}; the paper column is that paper size's gFID.")
    return run_variants(ctx, variants)


# a row of benchmarks/heads.py's table: method, batch, ms/call, +-, runs, ms/token, x cached
_BENCH_ROW = re.compile(r"^(ar_cached|ar_uncached|diffusion)\s+(\d+)" + r"\s+([\d.]+)" * 2 + r"\s+(\d+)"
                        + r"\s+([\d.]+)" * 2 + "$")


def table5(ctx: _Ctx) -> str:
    """Per-token prediction time of the heads: runs benchmarks/heads.py with the budget's arguments."""
    if not BENCHMARK_HEADS.is_file():
        raise FileNotFoundError(f"{BENCHMARK_HEADS} not found: table5 needs a source checkout of tokenbridge")
    args = [sys.executable, str(BENCHMARK_HEADS), *map(str, ctx.budget["table5"]["args"]), "--device", ctx.device]
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(args)} failed:\n{done.stderr[-2000:]}")
    lines = done.stdout.splitlines()
    rows = [m.groups() for m in map(_BENCH_ROW.match, lines) if m]
    if not rows:
        raise RuntimeError(f"no timing rows in the output of {shlex.join(args)}:\n{done.stdout[-2000:]}")
    diffusion_ms = {int(b): float(ms) for name, b, ms, *_ in rows if name == "diffusion"}
    paper_ms = PAPER["table5_ms"]
    table_rows = []
    for name, batch, ms, spread, runs, per_token, _ in rows:
        batch, ms = int(batch), float(ms)
        paper = paper_ms.get(name) if batch == 1 else None
        paper_speedup = f"{paper_ms['diffusion'] / paper:.2f}x" if paper else "-"
        table_rows.append([name, batch, _fmt(ms, 2), _fmt(float(spread), 2), runs, _fmt(float(per_token), 3),
                           f"{diffusion_ms[batch] / ms:.2f}x", _paper(paper), paper_speedup])
    table = markdown_table(["method", "tokens per call", "ms per call (median)", "+-", "runs", "ms per token",
                            "speed-up vs diffusion", "paper ms (A100, batch 1)", "paper speed-up"], table_rows)

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    batches = sorted({int(r[1]) for r in rows})
    methods = list(dict.fromkeys(r[0] for r in rows))
    for k, method in enumerate(methods):
        per_token = [next(float(r[5]) for r in rows if r[0] == method and int(r[1]) == b) for b in batches]
        ax.bar(np.arange(len(batches)) + (k - 1) * 0.27, per_token, width=0.27, label=method)
    ax.set_xticks(range(len(batches)), [f"{b} token(s) per call" for b in batches])
    ax.set_yscale("log")
    ax.set_ylabel("ms per token (log)")
    ax.set_title("head prediction time (lower = faster)")
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, ctx.out_dir / "table5.png")
    ctx.notes += [
        "Paper: MAR diffusion head (100 steps) 311.25 ms vs dimension-wise AR head 52.42 ms (5.94x), A100, batch 1; "
        "the official AR head re-runs the channel prefix at every step, like our ar_uncached.",
        f"Benchmark: `{shlex.join(['python', 'benchmarks/heads.py', *map(str, ctx.budget['table5']['args'])])}`; "
        f"its setup line: `{lines[0] if lines else ''}`",
        f"Its summary: `{next((s for s in lines if s.startswith('RESULT')), '')}`",
    ]
    return table


def fig8(ctx: _Ctx) -> str:
    """Random-order vs confidence-ordered samples of the shipped generator: same labels, same seed."""
    from .generate import confidence_images
    from .images import image_grid

    model = ctx.res.generator()
    e, show = ctx.budget["eval"], int(ctx.budget["fig8"]["show_per_class"])
    per_class = int(e["per_class"])
    results = {order: evaluate_samples(ctx, model, order) for order in ("random", "confidence")}
    table = markdown_table(
        ["order", "paper", "mean token log-prob", "FD_cls", "IS_cls", "class acc", "precision", "recall"],
        [[order, "qualitative", _fmt(m["confidence"], 3), _fmt(m["fd_cls"], 2), _fmt(m["is_cls"], 2),
          m["class_accuracy"], m["precision"], m["recall"]] for order, (m, _) in results.items()])

    picks = torch.tensor([c * per_class + k for k in range(min(show, per_class)) for c in range(10)])
    images = {order: r["images"][picks] for order, (_, r) in results.items()}
    conf = torch.cat([r["confidence"][picks] for _, r in results.values()])
    maps = confidence_images(conf, images["random"].shape[-1]).chunk(2)  # one scale for both orders
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 2.6 + 1.3 * len(picks) / 10))
    for col, (order, conf_maps) in enumerate(zip(images, maps)):
        for row, (grid, name) in enumerate([(images[order], "samples"), (conf_maps, "confidence (white = high)")]):
            axes[row][col].imshow(np.array(image_grid(grid, nrow=10, scale=2).convert("L")), cmap="gray",
                                  vmin=0, vmax=255)
            axes[row][col].set_title(f"{order} order: {name}", fontsize=10)
            axes[row][col].axis("off")
    fig.suptitle("Fig. 8: confidence-guided vs random-order generation (same labels and seed; classes 0-9 per row)")
    fig.tight_layout()
    _save_figure(fig, ctx.out_dir / "fig8.png")
    cfg = getattr(model, "config", None) or {}
    ctx.notes += [
        "The paper's Fig. 8 is qualitative (no numbers); confidence-guided generation is not in the official code.",
        f"Generator: {_params(_count(model))} parameters (head {_params(_count(model.head))}), config "
        f"backbone {cfg.get('backbone', {}).get('width')} wide, head {cfg.get('head', {}).get('kind')} "
        f"{cfg.get('head', {}).get('width')}x{cfg.get('head', {}).get('depth')}.",
        f"Sampling: {10 * per_class} samples ({per_class} per class), {e['num_iter']} MAR steps, cfg {e['cfg']} "
        f"({e['cfg_schedule']}), temperature {e['temperature']}, seed {ctx.eval_seed}, both orders with the same "
        f"labels and seed. Confidence = the head's log-probability of each sampled token (summed over its channels); "
        f"'mean token log-prob' averages it over all tokens. FD_cls / precision / recall against the first "
        f"{e['real_images']} test images.",
        "confidence order: at every step all masked positions are sampled and the most confident ones are kept; "
        "random order: a random permutation's next chunk is kept (MAR).",
    ]
    return table


TABLES: dict[str, Callable[[_Ctx], str]] = {"table1": table1, "table2a": table2a, "table2b": table2b,
                                           "table2c": table2c, "table2d": table2d, "table2e": table2e,
                                           "table5": table5, "fig8": fig8}


# ----------------------------------------------------------------------------------------------------------------
# Entry point


def _write_markdown(ctx: _Ctx, table: str, wall_s: float) -> Path:
    lines = [f"# {TITLES[ctx.name]}", "", table, ""]
    lines += [f"- {n}" if not n.startswith("  ") else n for n in ctx.notes]
    lines += [
        "",
        f"- Command: `{ctx.command()}`",
        f"- Scale `{ctx.scale}`, seed {ctx.seed}, device {ctx.device}, torch threads {torch.get_num_threads()}; "
        f"wall time of this command {wall_s:.0f} s ({wall_s / 60:.1f} min; reused runs and token caches in "
        f"`{ctx.work_dir}` are not counted again).",
        f"- Plot: `{ctx.name}.png`",
        "",
    ]
    path = ctx.out_dir / f"{ctx.name}.md"
    path.write_text("\n".join(lines))
    return path


def run_repro(name: str, out_dir: str | os.PathLike = "docs/results", scale: str = "small",
              overrides: list[str] | tuple[str, ...] = (), device: str = "cpu",
              work_dir: str | os.PathLike = "runs/repro", resources: Resources | None = None) -> str:
    """Run one reproduction (a name in REPRO_NAMES, or "all"), write `<out_dir>/<name>.md` and `.png`, print and
    return the markdown table (for "all": every table, each under a `## name` heading).

    scale: a key of SCALES; overrides: dotted `key=value` edits of that budget; work_dir: token caches and trained
    variants (reused when their config matches); resources: VAE / classifier / data / generator (default: shipped).
    """
    names = list(REPRO_NAMES) if name == "all" else [name]
    unknown = [n for n in names if n not in TABLES]
    if unknown:
        raise ValueError(f"unknown repro name {name!r}; choose from {', '.join(REPRO_NAMES)} or all")
    budget = resolve_budget(scale, tuple(overrides))
    resources = resources or Resources(device=device)
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    tables = []
    for n in names:
        ctx = _Ctx(n, scale, tuple(overrides), copy.deepcopy(budget), out_dir, work_dir, str(device), resources)
        start = time.time()
        table = TABLES[n](ctx)
        path = _write_markdown(ctx, table, time.time() - start)
        print(f"{TITLES[n]}\n\n{table}\n\nwrote {path} and {out_dir / (n + '.png')}\n", flush=True)
        tables.append(table if name != "all" else f"## {n}\n\n{table}")
    return "\n\n".join(tables)
