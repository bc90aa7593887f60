"""Training the embedded Fashion-MNIST evaluation classifier (`tokenbridge.classifier.FMNISTClassifier`): what
``tokenbridge train-classifier`` runs, and how the shipped ``weights/fmnist_classifier.safetensors`` were made."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from ..classifier import FMNISTClassifier, class_accuracy
from ..data import as_tensors
from ..files import atomic_path
from ..optim import ScheduledAdamW, one_cycle
from ..progress import disable


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 2 pixels (padding with the background -1)."""
    b = x.shape[0]
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
    dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    x = F.pad(x, (2, 2, 2, 2), value=-1.0)
    return x[..., 2 + dy : 34 + dy, 2 + dx : 34 + dx]


def _atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def _train_epoch(
    model: FMNISTClassifier,
    opt: ScheduledAdamW,
    first_step: int,
    data: tuple[torch.Tensor, torch.Tensor],
    batch_size: int,
    gen: torch.Generator,
    desc: str,
) -> float:
    """One pass over ``data`` = (images float [N, 1, 32, 32] in [-1, 1], labels long [N]) in a ``gen``-seeded
    random order, with augmentation, one update per batch (the first has index ``first_step``). Returns the last
    batch's loss."""
    images, labels = data
    device = next(model.parameters()).device
    model.train()
    perm = torch.randperm(len(labels), generator=gen)
    bar = tqdm(range(math.ceil(len(labels) / batch_size)), desc=desc, disable=disable())
    for step in bar:
        idx = perm[step * batch_size : (step + 1) * batch_size]
        x = _augment(images[idx], gen).to(device)
        loss = F.cross_entropy(model(x), labels[idx].to(device))
        opt.zero_grad()
        loss.backward()
        opt.step(first_step + step)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return loss.item()


def train_classifier(
    out_path: str | os.PathLike,
    epochs: int = 4,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    widths: tuple[int, int, int] = (16, 32, 64),
    feature_dim: int = 128,
    threads: int | None = 2,
    data_root: str | os.PathLike | None = None,
) -> dict[str, float]:
    """Train the evaluation classifier on the Fashion-MNIST train split (60k images; random flips and 2-pixel
    shifts), with AdamW and a one-cycle learning rate, then measure accuracy on the 10k held-out test split and
    save the weights (safetensors, atomically) with the test accuracy and architecture in the metadata.

    Returns {"test_accuracy", "train_seconds", "params"}.
    """
    if threads is not None and torch.device(device).type == "cpu":
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train_x, train_y = as_tensors("train", root=data_root)
    test_x, test_y = as_tensors("test", root=data_root)
    model = FMNISTClassifier(widths, feature_dim).to(device)
    steps_per_epoch = math.ceil(len(train_y) / batch_size)
    opt = ScheduledAdamW(model.parameters(), one_cycle(lr, epochs * steps_per_epoch, pct_start=0.2),
                         betas=(0.9, 0.999), weight_decay=5e-4)
    start = time.time()
    for epoch in range(epochs):
        desc = f"classifier epoch {epoch + 1}/{epochs}"
        loss = _train_epoch(model, opt, epoch * steps_per_epoch, (train_x, train_y), batch_size, gen, desc)
        print(f"{desc}: last loss {loss:.3f}, {time.time() - start:.0f} s", flush=True)
    train_seconds = time.time() - start
    acc = class_accuracy(test_x, test_y, classifier=model)
    meta = {
        "test_accuracy": f"{acc:.4f}",
        "widths": ",".join(str(w) for w in model.widths),
        "feature_dim": str(model.feature_dim),
        "num_classes": str(model.num_classes),
        "epochs": str(epochs),
        "seed": str(seed),
        "dataset": "fashion-mnist",
        "input": "[B,1,32,32] in [-1,1], 28x28 padded with -1",
    }
    _atomic_save_safetensors(model.state_dict(), Path(out_path), meta)
    params = sum(p.numel() for p in model.parameters())
    return {"test_accuracy": acc, "train_seconds": train_seconds, "params": float(params)}
