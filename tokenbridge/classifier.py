"""The embedded Fashion-MNIST evaluation classifier and the offline metric family built on it.

Classifier metrics (``classifier_fd`` = "FD_cls", ``classifier_inception_score`` = "IS_cls", ``class_accuracy``,
``precision_recall`` on classifier features, all at once with ``classifier_metrics``) use the small CNN shipped in
``tokenbridge/weights/fmnist_classifier.safetensors`` (trained on Fashion-MNIST by ``train_classifier``) and run
offline on CPU in seconds. They are comparable only between runs of this project on Fashion-MNIST that use the
same classifier weights and the same number of samples. They are NOT comparable with the Inception FID / IS numbers
of papers (different network, feature space, dataset and scale): those come from ``tokenbridge.inception``.
"""

from __future__ import annotations

import functools
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .data import as_tensors
from .files import atomic_path
from .metrics import (
    check_gaussian,
    check_images,
    check_knn_sizes,
    check_labels,
    check_splits,
    feature_statistics,
    frechet_distance,
    inception_score_from_logits,
    load_reference_stats,
    precision_recall,
)
from .progress import disable

DEFAULT_CLASSIFIER_PATH = Path(__file__).resolve().parent / "weights" / "fmnist_classifier.safetensors"
CLASSIFIER_SIZE = 32  # input side of the classifier: Fashion-MNIST's 28x28 zero-padded to 32x32 (data.to_model_images)
FASHION_MNIST_SIZE = 28


class FMNISTClassifier(nn.Module):
    """Small CNN for Fashion-MNIST: images [B, 1, 32, 32] in [-1, 1] (28x28 zero-padded with -1) -> 10 logits.

    Three conv(3x3)-BN-ReLU-maxpool stages (widths ``widths``) then a ``feature_dim`` penultimate layer whose
    ReLU activations are the evaluation features (``features``), then a linear classifier.
    """

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), feature_dim: int = 128, num_classes: int = 10):
        super().__init__()
        self.widths, self.feature_dim, self.num_classes = tuple(int(w) for w in widths), int(feature_dim), num_classes
        layers: list[nn.Module] = []
        c_in = 1
        for w in self.widths:
            layers += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c_in = w
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in * 4 * 4, self.feature_dim)
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, 32, 32] in [-1, 1] -> penultimate features [B, feature_dim] (non-negative)."""
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, 32, 32] in [-1, 1] -> logits [B, num_classes]."""
        return self.head(self.dropout(self.features(x)))


def check_classifier_images(images: torch.Tensor, name: str = "images", min_count: int = 1) -> torch.Tensor:
    """Check that ``images`` fit the Fashion-MNIST classifier and return them as float [N, 1, 32, 32] in [-1, 1].

    Accepted: a finite float tensor [N, 1, 32, 32] or [N, 1, 28, 28] (raw Fashion-MNIST size, padded here to 32x32
    with the background -1 exactly as ``tokenbridge.data.to_model_images`` pads the training data) with values in
    [-1, 1] (up to 0.05 of rounding outside, clamped) and N >= ``min_count``. Anything else (RGB, other sizes,
    0..255 or NaN values, too few images) raises a ValueError naming ``name``. Images in [0, 1] cannot be told
    apart from dark [-1, 1] images here: convert them with ``x * 2 - 1`` first.
    """
    check_images(images, name)
    if images.shape[1] != 1:
        raise ValueError(f"{name} must have 1 channel: the evaluation classifier takes grayscale Fashion-MNIST "
                         f"[N, 1, 32, 32], got shape {tuple(images.shape)} (RGB samples need the Inception "
                         f"metrics, tokenbridge.inception)")
    side = (CLASSIFIER_SIZE - FASHION_MNIST_SIZE) // 2
    if tuple(images.shape[2:]) == (FASHION_MNIST_SIZE, FASHION_MNIST_SIZE):
        images = F.pad(images, (side, side, side, side), value=-1.0)
    elif tuple(images.shape[2:]) != (CLASSIFIER_SIZE, CLASSIFIER_SIZE):
        raise ValueError(f"{name} must be [N, 1, 32, 32] or Fashion-MNIST's raw [N, 1, 28, 28] (padded to 32), "
                         f"got shape {tuple(images.shape)}")
    if images.shape[0] < min_count:
        raise ValueError(f"{name} must hold at least {min_count} images here, got {images.shape[0]}")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1.05 or hi > 1.05:
        hint = " (0..255 pixel values? convert uint8 with tokenbridge.images.from_uint8)" if hi > 2 else ""
        raise ValueError(f"{name} must be in [-1, 1], got values in [{lo:.3f}, {hi:.3f}]{hint}")
    return images.clamp(-1.0, 1.0)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 2 pixels (padding with the background -1)."""
    b = x.shape[0]
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
    dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    x = F.pad(x, (2, 2, 2, 2), value=-1.0)
    return x[..., 2 + dy : 34 + dy, 2 + dx : 34 + dx]


@torch.no_grad()
def _classifier_outputs(
    images: torch.Tensor, classifier: FMNISTClassifier, batch_size: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features float32 [N, D], logits float32 [N, 10]) on CPU, computed in batches on the classifier's device,
    for images [N, 1, 32, 32] in [-1, 1] already checked by check_classifier_images."""
    classifier.eval()
    device = next(classifier.parameters()).device
    feats, logits = [], []
    for i in range(0, images.shape[0], batch_size):
        f = classifier.features(images[i : i + batch_size].to(device, torch.float32))
        feats.append(f.float().cpu())
        logits.append(classifier.head(f).float().cpu())
    return torch.cat(feats), torch.cat(logits)


def _atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def _train_epoch(
    model: FMNISTClassifier,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    data: tuple[torch.Tensor, torch.Tensor],
    batch_size: int,
    gen: torch.Generator,
    desc: str,
) -> float:
    """One pass over ``data`` = (images float [N, 1, 32, 32] in [-1, 1], labels long [N]) in a ``gen``-seeded
    random order, with augmentation, one optimizer and scheduler step per batch. Returns the last batch's loss."""
    images, labels = data
    device = next(model.parameters()).device
    model.train()
    perm = torch.randperm(len(labels), generator=gen)
    bar = tqdm(range(math.ceil(len(labels) / batch_size)), desc=desc, disable=disable())
    for step in bar:
        idx = perm[step * batch_size : (step + 1) * batch_size]
        x = _augment(images[idx], gen).to(device)
        loss = F.cross_entropy(model(x), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
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
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps_per_epoch = math.ceil(len(train_y) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.2)
    start = time.time()
    for epoch in range(epochs):
        desc = f"classifier epoch {epoch + 1}/{epochs}"
        loss = _train_epoch(model, opt, sched, (train_x, train_y), batch_size, gen, desc)
        print(f"{desc}: last loss {loss:.3f}, {time.time() - start:.0f} s", flush=True)
    train_seconds = time.time() - start
    acc = _accuracy(_classifier_outputs(test_x, model)[1], test_y)
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


def load_classifier(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> FMNISTClassifier:
    """Load the evaluation classifier (default: the shipped tokenbridge/weights/fmnist_classifier.safetensors),
    in eval mode on ``device``. Its test accuracy is in ``model.test_accuracy``."""
    path = Path(path) if path is not None else DEFAULT_CLASSIFIER_PATH
    if not path.is_file():
        raise FileNotFoundError(
            f"classifier weights {path} not found; train them with `tokenbridge train-classifier "
            f"--out {path}`")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    try:
        widths = tuple(int(w) for w in meta["widths"].split(","))
        model = FMNISTClassifier(widths, int(meta["feature_dim"]), int(meta["num_classes"]))
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: missing or bad classifier metadata ({e})") from e
    model.load_state_dict(load_file(str(path)))
    model.test_accuracy = float(meta.get("test_accuracy", "nan"))
    return model.to(device).eval()


@functools.lru_cache(maxsize=4)
def _default_classifier(device: str) -> FMNISTClassifier:
    return load_classifier(None, device)


def _resolve_classifier(classifier: FMNISTClassifier | None, device: str | torch.device) -> FMNISTClassifier:
    return classifier if classifier is not None else _default_classifier(str(torch.device(device)))


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows of logits [N, 10] whose argmax equals labels [N]."""
    return float((logits.argmax(1) == labels).float().mean())


def _features_fd(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets [N, D] and [M, D]."""
    return frechet_distance(*feature_statistics(feats_a), *feature_statistics(feats_b))


def classifier_features(
    images: torch.Tensor, classifier: FMNISTClassifier | None = None, device: str | torch.device = "cpu",
    batch_size: int = 500,
) -> torch.Tensor:
    """Penultimate features [N, D] (float32, CPU) of the Fashion-MNIST classifier for images [N, 1, 32, 32] (or
    28x28) in [-1, 1]; see check_classifier_images for what is accepted."""
    images = check_classifier_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return _classifier_outputs(images, _resolve_classifier(classifier, device), batch_size)[0]


def classifier_statistics(
    images: torch.Tensor, classifier: FMNISTClassifier | None = None, device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) float64 of classifier features of images [N >= 2, 1, 32, 32] in [-1, 1], e.g. to save
    FD_cls reference stats of the test split."""
    images = check_classifier_images(images, min_count=2)  # a covariance needs two samples
    return feature_statistics(_classifier_outputs(images, _resolve_classifier(classifier, device))[0])


def classifier_fd(
    images_a: torch.Tensor, images_b: torch.Tensor, classifier: FMNISTClassifier | None = None,
    device: str | torch.device = "cpu",
) -> float:
    """FD_cls: Frechet distance between two image sets [N, 1, 32, 32] and [M, 1, 32, 32] (N, M >= 2) in [-1, 1]
    in the feature space of the embedded Fashion-MNIST classifier (``feature_dim``-d penultimate layer).

    This is FID's formula with a different network: it is comparable only between runs of this project on
    Fashion-MNIST with the same classifier weights and the same sample counts (FD is biased upward for small N).
    It is NOT comparable with the Inception FID numbers reported in papers.
    """
    # both sets are checked before either goes through the network
    images_a = check_classifier_images(images_a, "images_a", min_count=2)
    images_b = check_classifier_images(images_b, "images_b", min_count=2)
    clf = _resolve_classifier(classifier, device)
    return _features_fd(_classifier_outputs(images_a, clf)[0], _classifier_outputs(images_b, clf)[0])


def class_accuracy(
    images: torch.Tensor, labels: torch.Tensor, classifier: FMNISTClassifier | None = None,
    device: str | torch.device = "cpu",
) -> float:
    """Fraction of images [N, 1, 32, 32] in [-1, 1] that the embedded classifier assigns to their conditioning
    class ``labels`` (integer [N], 0..9). Measures class-conditional fidelity; its ceiling is the classifier's own
    test accuracy on real images (about 0.9), so it is comparable only within this project."""
    images = check_classifier_images(images)
    clf = _resolve_classifier(classifier, device)
    labels = check_labels(labels, images.shape[0], "labels", clf.num_classes)
    _, logits = _classifier_outputs(images, clf)
    return _accuracy(logits, labels)


def classifier_inception_score(
    images: torch.Tensor, splits: int = 1, classifier: FMNISTClassifier | None = None,
    device: str | torch.device = "cpu",
) -> float:
    """IS_cls: Inception Score formula exp(E_x KL(p(y|x) || p(y))) with the embedded Fashion-MNIST classifier's
    softmax instead of Inception's, for images [N, 1, 32, 32] in [-1, 1]. Range [1, 10]: high when each image is
    confidently one class and all 10 classes are used equally. Mean over ``splits`` chunks (1 <= splits <= N).

    Comparable only between runs of this project on Fashion-MNIST with the same classifier weights; NOT
    comparable with Inception Score numbers in papers (1000 ImageNet classes, different network).
    """
    images = check_classifier_images(images)
    check_splits(splits, images.shape[0])
    _, logits = _classifier_outputs(images, _resolve_classifier(classifier, device))
    return inception_score_from_logits(logits, splits)


def _reference_stats(
    reference: str | os.PathLike | tuple[np.ndarray, np.ndarray], feature_dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) from an .npz path or a (mu, sigma) pair, checked to match the classifier's D."""
    if isinstance(reference, (tuple, list)):
        mu, sigma = check_gaussian(*reference, "reference mu", "reference sigma")
    else:
        mu, sigma = load_reference_stats(reference)
    if mu.shape[0] != feature_dim:
        # e.g. Inception pool3 statistics (D = 2048) given for classifier features
        raise ValueError(f"reference statistics have D={mu.shape[0]} but the classifier's features have "
                         f"D={feature_dim}: they must come from classifier_statistics with the same weights")
    return mu, sigma


def classifier_metrics(
    fake_images: torch.Tensor,
    fake_labels: torch.Tensor | None = None,
    real_images: torch.Tensor | None = None,
    reference: str | os.PathLike | tuple[np.ndarray, np.ndarray] | None = None,
    classifier: FMNISTClassifier | None = None,
    device: str | torch.device = "cpu",
    k: int = 3,
) -> dict[str, float]:
    """All classifier metrics of generated images in one pass of the classifier.

    fake_images [N, 1, 32, 32] (or 28x28) in [-1, 1]; fake_labels (integer [N] in 0..9, their conditioning
    classes) adds "class_accuracy"; real_images [M, 1, 32, 32] in [-1, 1] adds "fd_cls" and "precision"/"recall"
    (k-NN on classifier features; N and M > k); alternatively ``reference`` (an .npz path from
    save_reference_stats, or (mu, sigma) of classifier features) gives "fd_cls" only (N >= 2). Always returns
    "is_cls". Every input is checked (ValueError naming it) before the classifier runs.
    See classifier_fd / classifier_inception_score for what these numbers are comparable with.
    """
    if real_images is not None and reference is not None:
        raise ValueError("pass either real_images or reference, not both")
    fake = check_classifier_images(fake_images, "fake_images", min_count=1 if reference is None else 2)
    clf = _resolve_classifier(classifier, device)
    labels = None if fake_labels is None else check_labels(fake_labels, fake.shape[0], "fake_labels",
                                                            clf.num_classes)
    real = None if real_images is None else check_classifier_images(real_images, "real_images")
    if real is not None:
        check_knn_sizes(k, fake_images=fake.shape[0], real_images=real.shape[0])
    stats = None if reference is None else _reference_stats(reference, clf.feature_dim)
    feats, logits = _classifier_outputs(fake, clf)
    out = {"is_cls": inception_score_from_logits(logits, 1)}
    if labels is not None:
        out["class_accuracy"] = _accuracy(logits, labels)
    if real is not None:
        real_feats = _classifier_outputs(real, clf)[0]
        out["fd_cls"] = _features_fd(feats, real_feats)
        out["precision"], out["recall"] = precision_recall(real_feats, feats, k=k)
    elif stats is not None:
        out["fd_cls"] = frechet_distance(*feature_statistics(feats), *stats)
    return out
