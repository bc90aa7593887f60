"""Evaluation metrics: reconstruction (PSNR, SSIM, latent MSE), Frechet distance, an embedded Fashion-MNIST
classifier and the offline metric family built on it, k-NN precision/recall, and Inception FID/IS via torchmetrics.

Two families of generation metrics live here, and their numbers must never be mixed:

* Classifier metrics (``classifier_fd`` = "FD_cls", ``classifier_inception_score`` = "IS_cls", ``class_accuracy``,
  ``precision_recall`` on classifier features). They use the small CNN shipped in
  ``tokenbridge/weights/fmnist_classifier.safetensors`` (trained on Fashion-MNIST by ``train_classifier``) and run
  offline on CPU in seconds. They are comparable only between runs of this project on Fashion-MNIST that use the
  same classifier weights and the same number of samples. They are NOT comparable with the Inception FID / IS
  numbers of papers (different network, feature space, dataset and scale).
* ``InceptionFID`` (FID and IS): the standard FID Inception network (TF inception-2015-12-05, the port used by
  torch-fidelity and torchmetrics) loaded from a local weights file. Only these numbers, on
  ImageNet-scale samples (50,000 generated images against the ADM reference batch), are comparable with papers.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import pickle
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F

from .files import atomic_path

DEFAULT_CLASSIFIER_PATH = Path(__file__).resolve().parent / "weights" / "fmnist_classifier.safetensors"
# The FID Inception network (TF "inception-2015-12-05" graph, hash 6726825d) as torch-fidelity/torchmetrics load it;
# pytorch-fid ships the same TF weights as pt_inception-2015-12-05-6726825d.pth (torchvision-style keys like these;
# expected to load too, not verified offline).
INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_ALT_NAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_ENV = "TOKENBRIDGE_INCEPTION_WEIGHTS"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)


# ----------------------------------------------------------------------------------------------------------------
# Input checks


def _check_images(x: torch.Tensor, name: str = "images", channels: int | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape [B, C, H, W], got {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channel(s), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a float tensor in [-1, 1], got dtype {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf values")


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    _check_images(a, "a")
    _check_images(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def _as_float64(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf values")
    return x


# ----------------------------------------------------------------------------------------------------------------
# Reconstruction metrics


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB.

    a, b: [B, C, H, W] float images (in [-1, 1] with the default ``data_range=2.0``; pass 1.0 for [0, 1] or 255.0
    for 0..255). Returns float64 [B]; identical images give +inf.
    """
    _check_pair(a, b)
    mse = (a.double() - b.double()).square().flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float = 2.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per image.

    Gaussian window (11 taps, sigma 1.5) applied without padding ("valid" positions only), constants
    C1 = (k1 * data_range)^2 and C2 = (k2 * data_range)^2, mean over positions, then mean over channels.
    a, b: [B, C, H, W] float images with H, W >= window_size (in [-1, 1] with the default ``data_range=2.0``).
    Returns float64 [B] in [-1, 1]; identical images give exactly 1.
    """
    _check_pair(a, b)
    if min(a.shape[-2:]) < window_size:
        raise ValueError(f"images must be at least {window_size}x{window_size} for SSIM, got {tuple(a.shape)}")
    x, y = a.double(), b.double()
    c = x.shape[1]
    g = _gaussian_window(window_size, sigma, x.dtype, x.device)
    # Separable depthwise blur; every statistic goes through the same filter so identical inputs give exactly 1.
    gh = g.view(1, 1, 1, -1).expand(c, 1, 1, window_size)
    gv = g.view(1, 1, -1, 1).expand(c, 1, window_size, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, gh, groups=c), gv, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.mean(dim=(2, 3)).mean(dim=1)


def latent_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample between two latent (or token-value) tensors of the same shape [B, ...].

    Returns float64 [B].
    """
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError("latent_mse expects two torch.Tensors")
    if a.shape != b.shape or a.ndim < 1:
        raise ValueError(f"a and b must have the same shape [B, ...], got {tuple(a.shape)} and {tuple(b.shape)}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("latent_mse inputs contain NaN or Inf values")
    return (a.double() - b.double()).square().reshape(a.shape[0], -1).mean(1)


# ----------------------------------------------------------------------------------------------------------------
# Frechet distance and reference statistics


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of features [N, D] (N >= 2), both float64: (mu [D], sigma [D, D], unbiased)."""
    f = _as_float64(features, "features")
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must have shape [N, D] with N >= 2, got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance(
    mu1: np.ndarray | torch.Tensor,
    sigma1: np.ndarray | torch.Tensor,
    mu2: np.ndarray | torch.Tensor,
    sigma2: np.ndarray | torch.Tensor,
    eps: float = 1e-6,
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    The matrix square root is scipy.linalg.sqrtm in float64. When it fails (singular covariances, e.g. fewer
    samples than feature dimensions) it is retried with ``eps`` added to both diagonals; numerical imaginary parts
    are dropped, and a large imaginary part raises ValueError. Tiny negative results from rounding are clipped to 0.
    """
    mu1, mu2 = np.atleast_1d(_as_float64(mu1, "mu1")), np.atleast_1d(_as_float64(mu2, "mu2"))
    s1, s2 = np.atleast_2d(_as_float64(sigma1, "sigma1")), np.atleast_2d(_as_float64(sigma2, "sigma2"))
    d = mu1.shape[0]
    if mu1.ndim != 1 or mu2.shape != mu1.shape:
        raise ValueError(f"mu1 and mu2 must be vectors of the same length, got {mu1.shape} and {mu2.shape}")
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"sigma1 and sigma2 must be [{d}, {d}] to match mu, got {s1.shape} and {s2.shape}")

    def sqrt_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        # Singularity is detected and handled below, so scipy's warnings are noise here.
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            return np.asarray(scipy.linalg.sqrtm(a @ b))

    def usable(m: np.ndarray) -> bool:
        if not np.isfinite(m).all():
            return False
        return not np.iscomplexobj(m) or np.abs(m.imag).max() <= 1e-3 * max(1.0, np.abs(m.real).max())

    covmean = sqrt_product(s1, s2)
    if not usable(covmean):
        offset = np.eye(d) * eps
        covmean = sqrt_product(s1 + offset, s2 + offset)
        if not usable(covmean):
            raise ValueError("frechet_distance: the covariance product has no usable square root (singular or "
                             "ill-conditioned covariances even with an eps offset; use more samples)")
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean.real))
    return max(value, 0.0)


def save_reference_stats(
    path: str | os.PathLike, mu: np.ndarray | torch.Tensor, sigma: np.ndarray | torch.Tensor
) -> None:
    """Write reference statistics to an ``.npz`` with keys ``mu`` [D] and ``sigma`` [D, D] (float64), atomically."""
    mu, sigma = _as_float64(mu, "mu"), _as_float64(sigma, "sigma")
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"mu must be [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
        np.savez(f, mu=mu, sigma=sigma)


def load_reference_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read (mu [D], sigma [D, D]) float64 from an ``.npz`` holding ``mu`` and ``sigma`` (this project's files, or
    ADM/guided-diffusion reference batches such as VIRTUAL_imagenet256_labeled.npz, whose ``mu``/``sigma`` are
    Inception pool3 statistics and so only go with ``InceptionFID``, not with classifier features)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics file {path} does not exist")
    with np.load(path, allow_pickle=False) as data:
        keys = set(data.files)
        if {"mu", "sigma"} <= keys:
            mu, sigma = data["mu"], data["sigma"]
        elif "arr_0" in keys:
            raise ValueError(f"{path} holds only images (arr_0), no 'mu'/'sigma' statistics: compute features of "
                             f"those images and save them with save_reference_stats first")
        else:
            raise ValueError(f"{path} has no 'mu' and 'sigma' arrays (keys: {sorted(keys)})")
    mu, sigma = _as_float64(mu, f"{path}:mu"), _as_float64(sigma, f"{path}:sigma")
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu must be [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
    return mu, sigma


# ----------------------------------------------------------------------------------------------------------------
# k-NN precision / recall (Kynkaanniemi et al. 2019)


def _pairwise_sq_dists(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((x * x).sum(1, keepdim=True) - 2.0 * x @ y.T + (y * y).sum(1)).clamp_min_(0.0)


def _knn_radii(feats: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Squared distance from each row to its k-th nearest other row."""
    out = []
    for i in range(0, feats.shape[0], chunk):
        d = _pairwise_sq_dists(feats[i : i + chunk], feats)
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, -1])  # +1: the row itself is at distance 0
    return torch.cat(out)


def _coverage(queries: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    """Fraction of queries inside at least one ball (center, radius)."""
    inside = 0
    for i in range(0, queries.shape[0], chunk):
        d = _pairwise_sq_dists(queries[i : i + chunk], centers)
        inside += int((d <= radii).any(dim=1).sum())
    return inside / queries.shape[0]


def precision_recall(
    real_feats: np.ndarray | torch.Tensor,
    fake_feats: np.ndarray | torch.Tensor,
    k: int = 3,
    chunk: int = 1024,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) from features [N, D] and [M, D].

    Each set's manifold is the union of balls around its points with radius = distance to the k-th nearest
    neighbour in the same set. Precision = fraction of fake points inside the real manifold (fidelity); recall =
    fraction of real points inside the fake manifold (coverage). Distances are computed in float64 in chunks of
    ``chunk`` rows, so memory is O(chunk * max(N, M)). Returns (precision, recall), each in [0, 1].
    The paper uses VGG-16 features and 50k samples; values on other features/sizes are only comparable within
    this project.
    """
    real = torch.as_tensor(_as_float64(real_feats, "real_feats"))
    fake = torch.as_tensor(_as_float64(fake_feats, "fake_feats"))
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be [N, D] and [M, D] with the same D, got {tuple(real.shape)} and "
                         f"{tuple(fake.shape)}")
    if k < 1 or min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"need k >= 1 and more than k={k} samples in each set, got {real.shape[0]} and "
                         f"{fake.shape[0]}")
    real_r, fake_r = _knn_radii(real, k, chunk), _knn_radii(fake, k, chunk)
    return _coverage(fake, real, real_r, chunk), _coverage(real, fake, fake_r, chunk)


# ----------------------------------------------------------------------------------------------------------------
# Embedded Fashion-MNIST classifier


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


def _prepare_fmnist_images(images: torch.Tensor) -> torch.Tensor:
    """Validate generated/real Fashion-MNIST images; 28x28 inputs are padded to 32x32 with the background -1."""
    _check_images(images, "images", channels=1)
    size = tuple(images.shape[-2:])
    if size == (28, 28):
        images = F.pad(images, (2, 2, 2, 2), value=-1.0)
    elif size != (32, 32):
        raise ValueError(f"classifier images must be [B, 1, 32, 32] (or 28x28), got {tuple(images.shape)}")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1.05 or hi > 1.05:
        raise ValueError(f"classifier images must be in [-1, 1], got values in [{lo:.3f}, {hi:.3f}]")
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
    """(features float32 [N, D], logits float32 [N, 10]) on CPU, computed in batches on the classifier's device."""
    images = _prepare_fmnist_images(images)
    classifier.eval()
    device = next(classifier.parameters()).device
    feats, logits = [], []
    for i in range(0, images.shape[0], batch_size):
        f = classifier.features(images[i : i + batch_size].to(device, torch.float32))
        feats.append(f.float().cpu())
        logits.append(classifier.head(f).float().cpu())
    return torch.cat(feats), torch.cat(logits)


def _atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def train_classifier(
    out_path: str | os.PathLike = DEFAULT_CLASSIFIER_PATH,
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
    from tqdm import tqdm

    from tokenbridge.data import as_tensors

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
        model.train()
        perm = torch.randperm(len(train_y), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"classifier epoch {epoch + 1}/{epochs}", disable=None)
        for step in bar:
            idx = perm[step * batch_size : (step + 1) * batch_size]
            x = _augment(train_x[idx], gen).to(device)
            loss = F.cross_entropy(model(x), train_y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        print(f"classifier epoch {epoch + 1}/{epochs}: last loss {loss.item():.3f}, "
              f"{time.time() - start:.0f} s", flush=True)
    train_seconds = time.time() - start
    _, logits = _classifier_outputs(test_x, model)
    acc = float((logits.argmax(1) == test_y).float().mean())
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
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path) if path is not None else DEFAULT_CLASSIFIER_PATH
    if not path.is_file():
        raise FileNotFoundError(
            f"classifier weights {path} not found; train them with `python -m tokenbridge.metrics "
            f"train-classifier --out {path}`")
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


def classifier_features(
    images: torch.Tensor, classifier: FMNISTClassifier | None = None, device: str | torch.device = "cpu",
    batch_size: int = 500,
) -> torch.Tensor:
    """Penultimate features [N, D] (float32, CPU) of the Fashion-MNIST classifier for images [N, 1, 32, 32]."""
    return _classifier_outputs(images, _resolve_classifier(classifier, device), batch_size)[0]


def classifier_statistics(
    images: torch.Tensor, classifier: FMNISTClassifier | None = None, device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) float64 of classifier features, e.g. to save FD_cls reference stats of the test split."""
    return feature_statistics(classifier_features(images, classifier, device))


def classifier_fd(
    images_a: torch.Tensor, images_b: torch.Tensor, classifier: FMNISTClassifier | None = None,
    device: str | torch.device = "cpu",
) -> float:
    """FD_cls: Frechet distance between two image sets [N, 1, 32, 32] in [-1, 1] in the feature space of the
    embedded Fashion-MNIST classifier (``feature_dim``-d penultimate layer).

    This is FID's formula with a different network: it is comparable only between runs of this project on
    Fashion-MNIST with the same classifier weights and the same sample counts (FD is biased upward for small N).
    It is NOT comparable with the Inception FID numbers reported in papers.
    """
    clf = _resolve_classifier(classifier, device)
    mu1, s1 = feature_statistics(_classifier_outputs(images_a, clf)[0])
    mu2, s2 = feature_statistics(_classifier_outputs(images_b, clf)[0])
    return frechet_distance(mu1, s1, mu2, s2)


def class_accuracy(
    images: torch.Tensor, labels: torch.Tensor, classifier: FMNISTClassifier | None = None,
    device: str | torch.device = "cpu",
) -> float:
    """Fraction of images [N, 1, 32, 32] that the embedded classifier assigns to their conditioning class
    ``labels`` [N] (0..9). Measures class-conditional fidelity; its ceiling is the classifier's own test accuracy
    on real images (about 0.9), so it is comparable only within this project."""
    labels = torch.as_tensor(labels).long().flatten()
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {labels.shape[0]} labels")
    if labels.numel() and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"labels must be in 0..9, got range [{int(labels.min())}, {int(labels.max())}]")
    _, logits = _classifier_outputs(images, _resolve_classifier(classifier, device))
    return float((logits.argmax(1) == labels).float().mean())


def _inception_score_from_logits(logits: torch.Tensor, splits: int) -> float:
    """exp(E_x KL(p(y|x) || p(y))) averaged over ``splits`` equal chunks, computed in float64."""
    n = logits.shape[0]
    if splits < 1 or n < splits:
        raise ValueError(f"need splits >= 1 and at least one image per split, got {n} images and splits={splits}")
    log_p = torch.log_softmax(logits.double(), dim=1)
    scores = []
    for chunk in torch.tensor_split(log_p, splits):
        log_py = torch.logsumexp(chunk, dim=0) - math.log(chunk.shape[0])
        kl = (chunk.exp() * (chunk - log_py)).sum(1).mean()
        scores.append(math.exp(max(float(kl), 0.0)))  # KL >= 0; clip rounding error so IS >= 1
    return float(np.mean(scores))


def classifier_inception_score(
    images: torch.Tensor, splits: int = 1, classifier: FMNISTClassifier | None = None,
    device: str | torch.device = "cpu",
) -> float:
    """IS_cls: Inception Score formula exp(E_x KL(p(y|x) || p(y))) with the embedded Fashion-MNIST classifier's
    softmax instead of Inception's. Range [1, 10]: high when each image is confidently one class and all 10
    classes are used equally. Mean over ``splits`` chunks.

    Comparable only between runs of this project on Fashion-MNIST with the same classifier weights; NOT
    comparable with Inception Score numbers in papers (1000 ImageNet classes, different network).
    """
    _, logits = _classifier_outputs(images, _resolve_classifier(classifier, device))
    return _inception_score_from_logits(logits, splits)


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

    fake_images [N, 1, 32, 32] in [-1, 1]; fake_labels [N] (their conditioning classes) adds "class_accuracy";
    real_images adds "fd_cls" and "precision"/"recall" (k-NN, classifier features); alternatively ``reference``
    (an .npz path from save_reference_stats, or (mu, sigma)) gives "fd_cls" only. Always returns "is_cls".
    See classifier_fd / classifier_inception_score for what these numbers are comparable with.
    """
    clf = _resolve_classifier(classifier, device)
    feats, logits = _classifier_outputs(fake_images, clf)
    out = {"is_cls": _inception_score_from_logits(logits, 1)}
    if fake_labels is not None:
        labels = torch.as_tensor(fake_labels).long().flatten()
        if labels.shape[0] != feats.shape[0]:
            raise ValueError(f"got {feats.shape[0]} images but {labels.shape[0]} labels")
        out["class_accuracy"] = float((logits.argmax(1) == labels).float().mean())
    if real_images is not None and reference is not None:
        raise ValueError("pass either real_images or reference, not both")
    if real_images is not None:
        real_feats = _classifier_outputs(real_images, clf)[0]
        out["fd_cls"] = frechet_distance(*feature_statistics(feats), *feature_statistics(real_feats))
        out["precision"], out["recall"] = precision_recall(real_feats, feats, k=k)
    elif reference is not None:
        mu, sigma = reference if isinstance(reference, tuple) else load_reference_stats(reference)
        out["fd_cls"] = frechet_distance(*feature_statistics(feats), mu, sigma)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Inception FID / IS (paper scale) through torchmetrics


def _images_to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """[B, 1 or 3, H, W] in [-1, 1] -> uint8 [B, 3, H, W] (grey repeated to 3 channels), as the FID network wants."""
    _check_images(images)
    if images.shape[1] not in (1, 3):
        raise ValueError(f"Inception metrics need 1- or 3-channel images, got shape {tuple(images.shape)}")
    x = ((images.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def load_fid_inception(weights_path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """The FID Inception-v3 network (torchmetrics' NoTrainInceptionV3, torch-fidelity's TF-compatible port, with
    TF1-style bilinear resizing to 299x299) loaded from a local ``weights-inception-2015-12-05-6726825d.pth``
    (torch-fidelity's file; pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` holds the same TF weights).

    Input uint8 [B, 3, H, W]; output pool3 features [B, 2048]; ``.fc`` gives the 1008-way logits used for IS.
    ``weights_path`` defaults to $TOKENBRIDGE_INCEPTION_WEIGHTS. Nothing is downloaded.
    """
    if weights_path is None:
        weights_path = os.environ.get(INCEPTION_WEIGHTS_ENV)
    how = (f"download the FID Inception weights {INCEPTION_WEIGHTS_NAME} ({INCEPTION_WEIGHTS_URL}; pytorch-fid's "
           f"{INCEPTION_WEIGHTS_ALT_NAME} holds the same weights) on a machine with internet access, then pass its "
           f"path (InceptionFID(weights_path=...), `--inception-weights PATH`) or set ${INCEPTION_WEIGHTS_ENV}")
    if weights_path is None:
        raise FileNotFoundError(f"Inception FID/IS needs the local FID Inception weights file: {how}")
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise FileNotFoundError(f"FID Inception weights {weights_path} not found: {how}")
    if importlib.util.find_spec("torchmetrics") is None:
        raise ImportError("Inception FID/IS needs torchmetrics: `pip install 'tokenbridge[metrics]'` "
                          "(or `pip install torchmetrics torch-fidelity`)")
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ImportError("torchmetrics' FID Inception network needs torch-fidelity (which imports torchvision): "
                          "`pip install torch-fidelity torchvision` matching your torch build")
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                 feature_extractor_weights_path=str(weights_path), antialias=False)
    except (RuntimeError, KeyError, pickle.UnpicklingError) as e:
        raise ValueError(f"{weights_path} is not a usable FID Inception state dict ({e}); expected "
                         f"{INCEPTION_WEIGHTS_NAME} or {INCEPTION_WEIGHTS_ALT_NAME}") from e
    return net.to(device)


class InceptionFID:
    """Paper-scale FID (and IS) with the standard FID Inception network, loaded offline from a local weights file
    through torchmetrics (see load_fid_inception).

    Usage: ``m = InceptionFID(weights_path)``; ``m.update(images, real=True/False)`` in batches (images
    [B, 1 or 3, H, W] in [-1, 1]); or ``m.set_reference(*load_reference_stats("VIRTUAL_imagenet256_labeled.npz"))``
    for the ADM reference batch instead of real images; then ``m.compute()`` -> FID and ``m.inception_score()``.
    Statistics accumulate as float64 running sums, so 50k images need O(D^2) memory, not O(N D).
    The network is torch-fidelity's port of the TF FID Inception graph that ADM's evaluator uses (tiny numeric
    differences from the TF evaluator remain). Compare with papers only at their scale (typically 50,000 samples
    on ImageNet 256x256 against the ADM reference batch); on small sample sets FID is biased upward.

    ``feature_extractor`` replaces the Inception network by any module mapping uint8 [B, 3, H, W] to [B, D]
    features (with an ``fc`` Linear for IS); then no weights file is needed.
    """

    def __init__(
        self,
        weights_path: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        feature_extractor: nn.Module | None = None,
        batch_size: int = 50,
    ):
        self.device = torch.device(device)
        self.net = feature_extractor.to(self.device) if feature_extractor is not None else load_fid_inception(
            weights_path, self.device)
        self.net.eval()
        self.batch_size = batch_size
        self._sums: dict[bool, list] = {True: [0, 0.0, 0.0], False: [0, 0.0, 0.0]}  # n, sum f, sum f f^T
        self._reference: tuple[np.ndarray, np.ndarray] | None = None
        self._fake_logits: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, images: torch.Tensor, real: bool) -> None:
        """Add a batch of real or generated images [B, 1 or 3, H, W] in [-1, 1]."""
        x = _images_to_uint8_rgb(images)
        for i in range(0, x.shape[0], self.batch_size):
            f = self.net(x[i : i + self.batch_size].to(self.device))
            f = f.reshape(f.shape[0], -1)
            if not real and hasattr(self.net, "fc"):
                self._fake_logits.append((f.double() @ self.net.fc.weight.double().T).cpu())
            f = f.double().cpu()
            s = self._sums[real]
            s[0] += f.shape[0]
            s[1] = s[1] + f.sum(0)
            s[2] = s[2] + f.T @ f

    def set_reference(self, mu: np.ndarray, sigma: np.ndarray) -> None:
        """Use precomputed real statistics (e.g. an ADM reference batch's mu/sigma) instead of real images."""
        self._reference = (_as_float64(mu, "mu"), _as_float64(sigma, "sigma"))

    def statistics(self, real: bool) -> tuple[np.ndarray, np.ndarray]:
        """(mu [D], sigma [D, D]) float64 of the real or generated images seen so far (save with
        save_reference_stats to reuse real statistics)."""
        n, s1, s2 = self._sums[real]
        if n < 2:
            raise ValueError(f"need at least 2 {'real' if real else 'generated'} images, got {n}")
        mu = s1 / n
        sigma = (s2 - n * torch.outer(mu, mu)) / (n - 1)
        return mu.numpy(), sigma.numpy()

    def compute(self) -> float:
        """FID between generated images and the real images (or the reference statistics)."""
        real = self._reference if self._reference is not None else self.statistics(True)
        return frechet_distance(*self.statistics(False), *real)

    def inception_score(self, splits: int = 10) -> float:
        """Inception Score of the generated images (torch-fidelity's unbiased logits, mean over ``splits``)."""
        if not self._fake_logits:
            raise ValueError("no generated images with logits: call update(images, real=False) first (the feature "
                             "extractor needs an `fc` layer)")
        return _inception_score_from_logits(torch.cat(self._fake_logits), splits)
