"""Pure evaluation metrics: reconstruction (PSNR, SSIM, latent MSE), feature statistics and Frechet distance,
reference statistics files, k-NN precision/recall, and the Inception Score formula on logits.

Nothing here holds a network or weights. The networks that turn images into features live in
``tokenbridge.classifier`` (the embedded Fashion-MNIST classifier: FD_cls, IS_cls, class accuracy; offline, only
comparable within this project) and ``tokenbridge.inception`` (the standard FID Inception network: FID and IS
comparable with papers at their scale). The two families' numbers must never be mixed.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

from .files import atomic_path


# ----------------------------------------------------------------------------------------------------------------
# Input checks


def check_images(x: torch.Tensor, name: str = "images", channels: int | None = None) -> None:
    """Raise TypeError/ValueError unless ``x`` is a non-empty finite float tensor [B, C, H, W] (values meant to be
    in [-1, 1]; the range itself is not checked), with ``channels`` channels when given."""
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
    check_images(a, "a")
    check_images(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def as_float64(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """``x`` (any shape) as a float64 numpy array on the CPU; ValueError naming ``name`` if it holds NaN or Inf."""
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
    f = as_float64(features, "features")
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
    mu1, mu2 = np.atleast_1d(as_float64(mu1, "mu1")), np.atleast_1d(as_float64(mu2, "mu2"))
    s1, s2 = np.atleast_2d(as_float64(sigma1, "sigma1")), np.atleast_2d(as_float64(sigma2, "sigma2"))
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
    mu, sigma = as_float64(mu, "mu"), as_float64(sigma, "sigma")
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
    mu, sigma = as_float64(mu, f"{path}:mu"), as_float64(sigma, f"{path}:sigma")
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
    real = torch.as_tensor(as_float64(real_feats, "real_feats"))
    fake = torch.as_tensor(as_float64(fake_feats, "fake_feats"))
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be [N, D] and [M, D] with the same D, got {tuple(real.shape)} and "
                         f"{tuple(fake.shape)}")
    if k < 1 or min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"need k >= 1 and more than k={k} samples in each set, got {real.shape[0]} and "
                         f"{fake.shape[0]}")
    real_r, fake_r = _knn_radii(real, k, chunk), _knn_radii(fake, k, chunk)
    return _coverage(fake, real, real_r, chunk), _coverage(real, fake, fake_r, chunk)


# ----------------------------------------------------------------------------------------------------------------
# Inception Score formula


def inception_score_from_logits(logits: torch.Tensor, splits: int) -> float:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) of class logits [N, K] (any float dtype; softmax is taken here),
    averaged over ``splits`` equal chunks (1 <= splits <= N), computed in float64. Returns a float in [1, K]."""
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
