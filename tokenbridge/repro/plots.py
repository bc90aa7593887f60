"""The PNG next to each repro table (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import files
from ..checkpoint import training_trajectory
from ..images import image_grid
from .runs import VariantResult
from .stats import mean_sd
from .speed import HeadTiming


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    files.save_figure(fig, path)
    pyplot().close(fig)


def _gray(images: torch.Tensor, nrow: int) -> np.ndarray:
    return np.array(image_grid(images, nrow=nrow, scale=2).convert("L"))


def plot_variants(results: list[list[VariantResult]], path: Path, title: str) -> None:
    """Training loss curves (first seed), NLL / FD_cls / accuracy bars (mean, error bar = sd over the training
    seeds) and one sample per class (first seed) for every variant."""
    plt = pyplot()
    n = len(results)
    fig = plt.figure(figsize=(15, 3.6 + 0.75 * n))
    grid = fig.add_gridspec(2, 4, height_ratios=[3.6, 0.75 * n])
    labels = [seeds[0].variant.label for seeds in results]
    ax = fig.add_subplot(grid[0, 0])
    for seeds in results:
        r = seeds[0]
        trajectory = training_trajectory(r.run_dir) or {"step": [], "loss": []}
        ax.plot(trajectory["step"], trajectory["loss"], label=r.variant.label)
    ax.set(title=f"training loss (nats/channel), seed {results[0][0].seed}", xlabel="step")
    ax.legend(fontsize=7)
    for k, (key, name) in enumerate([("density_nll", "density NLL (lower = better)"), ("fd_cls", "FD_cls (lower)"),
                                     ("class_accuracy", "class accuracy (higher)")]):
        ax = fig.add_subplot(grid[0, k + 1])
        stats = [mean_sd([r.metrics[key] for r in seeds]) for seeds in results]
        ax.bar(range(n), [m for m, _ in stats], yerr=[sd for _, sd in stats], capsize=4,
               color=[f"C{i}" for i in range(n)])
        ax.set_xticks(range(n), labels, rotation=20, fontsize=7)
        ax.set_title(f"{name}, mean +- sd over {len(results[0])} seeds", fontsize=8)
    ax = fig.add_subplot(grid[1, :])
    strips = [_gray(seeds[0].samples, len(seeds[0].samples)) for seeds in results]
    ax.imshow(np.concatenate(strips, axis=0), cmap="gray", vmin=0, vmax=255)
    ax.set_yticks([(i + 0.5) * strips[0].shape[0] for i in range(n)], labels, fontsize=8)
    ax.set_xticks([])
    ax.set_title("one sample per class (0-9), same sampling seed, first training seed", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def plot_trajectories(records: list[dict[str, Any]], path: Path, labels: dict[str, str], key: str = "row") -> None:
    """Training loss against step of every run, one panel per row (``records``: key, seed, trajectory as written
    by tokenbridge.checkpoint.training_trajectory; the families' losses differ in kind, so panels do not share y)."""
    plt = pyplot()
    rows = list(dict.fromkeys(r[key] for r in records if r.get("trajectory")))
    if not rows:
        return
    fig, axes = plt.subplots(1, len(rows), figsize=(3.6 * len(rows), 3.2), squeeze=False)
    for ax, row in zip(axes[0], rows):
        for r in records:
            if r[key] == row and r.get("trajectory"):
                ax.plot(r["trajectory"]["step"], r["trajectory"]["loss"], label=f"seed {r['seed']}", linewidth=1)
        ax.set(title=labels.get(row, row), xlabel="training step", ylabel="training loss")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=7)
    fig.suptitle("Training trajectories (each family's own objective: compare seeds and shapes, not values)",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def plot_head_times(timing: HeadTiming, path: Path) -> None:
    """Table 5: ms per token of every method at every batch size (log scale)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    batches = sorted({r.batch for r in timing.rows})
    methods = list(dict.fromkeys(r.method for r in timing.rows))
    for k, method in enumerate(methods):
        per_token = [timing.row(method, b).per_token for b in batches]
        ax.bar(np.arange(len(batches)) + (k - 1) * 0.27, per_token, width=0.27, label=method)
    ax.set_xticks(range(len(batches)), [f"{b} token(s) per call" for b in batches])
    ax.set_yscale("log")
    ax.set_ylabel("ms per token (log)")
    ax.set_title("head prediction time (lower = faster)")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def plot_orders(images: dict[str, torch.Tensor], maps: dict[str, torch.Tensor], path: Path) -> None:
    """Fig. 8: per order (columns) its samples and their confidence maps (rows), ten per grid row."""
    plt = pyplot()
    rows = len(next(iter(images.values())))
    fig, axes = plt.subplots(2, 2, figsize=(12, 2.6 + 1.3 * rows / 10))
    for col, order in enumerate(images):
        for row, (grid, name) in enumerate([(images[order], "samples"), (maps[order], "confidence (white = high)")]):
            axes[row][col].imshow(_gray(grid, 10), cmap="gray", vmin=0, vmax=255)
            axes[row][col].set_title(f"{order} order: {name}", fontsize=10)
            axes[row][col].axis("off")
    fig.suptitle("Fig. 8: confidence-guided vs random-order generation (same labels and seed; classes 0-9 per row)")
    fig.tight_layout()
    save_figure(fig, path)
