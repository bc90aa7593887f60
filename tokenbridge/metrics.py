"""Pure evaluation metrics: reconstruction (PSNR, SSIM, latent MSE), feature statistics and Frechet distance,
reference statistics files, k-NN precision/recall, and the Inception Score formula on logits.

The input checks shared by every metric family live here too (``check_images``, ``check_labels``,
``check_gaussian``, ``check_knn_sizes``, ``check_splits``, ``read_npz``), so each check has one place: public
functions refuse empty, NaN/Inf or mismatched inputs with a ValueError naming the argument, before any work.

Nothing here holds a network or weights. The networks that turn images into features live in
``tokenbridge.classifier`` (the embedded Fashion-MNIST classifier: FD_cls, IS_cls, class accuracy; offline, only
comparable within this project) and ``tokenbridge.inception`` (the standard FID Inception network: FID and IS
comparable with papers at their scale). The two families' numbers must never be mixed.
"""

from __future__ import annotations

import math
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

from .files import atomic_path


# ----------------------------------------------------------------------------------------------------------------
# Input checks


def _check_finite(x: torch.Tensor, name: str) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf values")


def check_images(x: torch.Tensor, name: str = "images", channels: int | None = None) -> None:
    """Raise TypeError/ValueError naming ``name`` unless ``x`` is a non-empty finite float tensor [B, C, H, W]
    (values meant to be in [-1, 1]; the range itself is not checked), with ``channels`` channels when given."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape [B, C, H, W], got {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channel(s), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a float tensor in [-1, 1], got dtype {x.dtype}")
    _check_finite(x, name)


def check_labels(
    labels: np.ndarray | torch.Tensor | list[int], n: int, name: str = "labels", num_classes: int | None = None
) -> torch.Tensor:
    """Class labels of ``n`` images (an integer tensor, array or list of shape [n]) as an int64 CPU tensor [n].

    ValueError naming ``name`` for a non-integer dtype (floats and bools are refused rather than truncated), another
    shape or length, a negative label, or a label >= ``num_classes`` when that is given."""
    array = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if array.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integer class labels, got dtype {array.dtype}")
    if array.shape != (n,):
        raise ValueError(f"{name} must hold one label per image: shape [{n}] for {n} images, got shape "
                         f"{tuple(array.shape)}")
    if n and (array.min() < 0 or (num_classes is not None and array.max() >= num_classes)):
        allowed = f"in 0..{num_classes - 1}" if num_classes is not None else ">= 0"
        raise ValueError(f"{name} must be {allowed}, got values in [{array.min()}, {array.max()}]")
    return torch.from_numpy(array.astype(np.int64))


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


def check_gaussian(
    mu: np.ndarray | torch.Tensor, sigma: np.ndarray | torch.Tensor, mu_name: str = "mu", sigma_name: str = "sigma"
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian statistics (mu [D], sigma [D, D], D >= 1; a scalar mu/sigma counts as D = 1) as finite float64
    arrays; ValueError naming ``mu_name``/``sigma_name`` otherwise."""
    mu, sigma = np.atleast_1d(as_float64(mu, mu_name)), np.atleast_2d(as_float64(sigma, sigma_name))
    if mu.ndim != 1 or mu.shape[0] == 0:
        raise ValueError(f"{mu_name} must be a non-empty vector [D], got shape {mu.shape}")
    d = mu.shape[0]
    if sigma.shape != (d, d):
        raise ValueError(f"{sigma_name} must be [{d}, {d}] to match {mu_name}, got shape {sigma.shape}")
    return mu, sigma


def check_knn_sizes(k: int, **counts: int) -> None:
    """k-NN precision/recall needs k >= 1 and more than k points in each set: ValueError naming the set (the keyword,
    e.g. ``check_knn_sizes(3, real_images=n)``) otherwise. Checked before any features are computed."""
    if k < 1:
        raise ValueError(f"k-NN precision/recall needs k >= 1, got k={k}")
    for name, count in counts.items():
        if count <= k:
            raise ValueError(f"k-NN precision/recall with k={k} needs more than k={k} samples in each set, "
                             f"got {count} in {name}")


def check_splits(splits: int, n: int, name: str = "images") -> None:
    """The Inception Score averages over ``splits`` chunks of ``n`` items: ValueError unless 1 <= splits <= n."""
    if splits < 1 or n < splits:
        raise ValueError(f"need splits >= 1 and at least one of the {name} per split, got {n} {name} and "
                         f"splits={splits}")


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
    if a.numel() == 0:
        raise ValueError(f"a and b are empty (shape {tuple(a.shape)})")
    _check_finite(a, "a")
    _check_finite(b, "b")
    return (a.double() - b.double()).square().reshape(a.shape[0], -1).mean(1)


# ----------------------------------------------------------------------------------------------------------------
# Frechet distance and reference statistics


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of features [N, D] (N >= 2), both float64: (mu [D], sigma [D, D], unbiased)."""
    f = as_float64(features, "features")
    if f.ndim != 2 or f.shape[0] < 2 or f.shape[1] < 1:
        raise ValueError(f"features must have shape [N, D] with N >= 2 and D >= 1, got {f.shape}")
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
    mu1, s1 = check_gaussian(mu1, sigma1, "mu1", "sigma1")
    mu2, s2 = check_gaussian(mu2, sigma2, "mu2", "sigma2")
    if mu2.shape != mu1.shape:
        raise ValueError(f"mu1 and mu2 must be vectors of the same length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]

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
    mu, sigma = check_gaussian(mu, sigma)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
        np.savez(f, mu=mu, sigma=sigma)


def read_npz(path: str | os.PathLike, keys: tuple[str, ...], what: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """Read the arrays named ``keys`` (those present; the others are not loaded) from the .npz archive ``path``,
    and the names of all its arrays. ``what`` describes the expected file in the errors: FileNotFoundError when
    ``path`` does not exist, ValueError naming it when it is a folder, a single .npy array, not a zip archive,
    a corrupt archive, or when an array holds pickled Python objects (never unpickled)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (expected {what})")
    if not path.is_file():
        raise ValueError(f"{path} is not a file (expected {what})")
    with open(path, "rb") as f:
        head = f.read(6)
    # np.load picks the format from these magic bytes; checking them first gives a clear message instead of
    # np.load's "cannot load pickled data" for a text file or a bare ndarray for an .npy file
    if head == b"\x93NUMPY":
        raise ValueError(f"{path} is a single .npy array, not an .npz archive of named arrays (expected {what})")
    if not head.startswith(b"PK"):
        raise ValueError(f"{path} is not an .npz (zip) archive (expected {what})")
    try:
        with np.load(path, allow_pickle=False) as data:
            names = list(data.files)
            arrays = {k: data[k] for k in keys if k in names}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} could not be read as {what}: {e}") from e
    for k, v in arrays.items():
        if not isinstance(v, np.ndarray):  # np.load returns the raw bytes of zip members that are not .npy files
            raise ValueError(f"{path}: '{k}' is not a numpy array (expected {what})")
    return arrays, names


def load_reference_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read (mu [D], sigma [D, D]) float64 from an ``.npz`` holding ``mu`` and ``sigma`` (this project's files, or
    ADM/guided-diffusion reference batches such as VIRTUAL_imagenet256_labeled.npz, whose ``mu``/``sigma`` are
    Inception pool3 statistics and so only go with ``InceptionFID``, not with classifier features)."""
    arrays, names = read_npz(path, ("mu", "sigma"), "reference statistics: an .npz with 'mu' [D] and 'sigma' [D, D]")
    if len(arrays) < 2 and "arr_0" in names:
        raise ValueError(f"{path} holds only images (arr_0), no 'mu'/'sigma' statistics: compute features of "
                         f"those images and save them with save_reference_stats first")
    if len(arrays) < 2:
        raise ValueError(f"{path} has no 'mu' and 'sigma' arrays (keys: {sorted(names)})")
    return check_gaussian(arrays["mu"], arrays["sigma"], f"{path}: mu", f"{path}: sigma")


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
    check_knn_sizes(k, real_feats=real.shape[0], fake_feats=fake.shape[0])
    real_r, fake_r = _knn_radii(real, k, chunk), _knn_radii(fake, k, chunk)
    return _coverage(fake, real, real_r, chunk), _coverage(real, fake, fake_r, chunk)


def within_class_diversity(features: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """Per-class diversity: the mean over classes (with >= 2 members) of the mean pairwise Euclidean distance
    between the features [N, D] of that class's images (labels [N]). Higher = more varied within a class; compare
    with the same number of real images per class."""
    feats = torch.as_tensor(as_float64(features, "features"))
    labels = check_labels(labels, feats.shape[0])
    spreads = []
    for c in labels.unique():
        f = feats[labels == c]
        if len(f) >= 2:
            d = _pairwise_sq_dists(f, f).sqrt()
            spreads.append(float(d.sum() / (len(f) * (len(f) - 1))))
    if not spreads:
        raise ValueError("within_class_diversity needs a class with at least 2 images")
    return float(np.mean(spreads))


# ----------------------------------------------------------------------------------------------------------------
# Inception Score formula


def inception_score_from_logits(logits: torch.Tensor, splits: int) -> float:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) of class logits [N, K] (any float dtype; softmax is taken here),
    averaged over ``splits`` equal chunks (1 <= splits <= N), computed in float64. Returns a float in [1, K]."""
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be a tensor [N, K] with K >= 1, got {getattr(logits, 'shape', logits)}")
    check_splits(splits, logits.shape[0], "logits")
    _check_finite(logits, "logits")
    log_p = torch.log_softmax(logits.double(), dim=1)
    scores = []
    for chunk in torch.tensor_split(log_p, splits):
        log_py = torch.logsumexp(chunk, dim=0) - math.log(chunk.shape[0])
        kl = (chunk.exp() * (chunk - log_py)).sum(1).mean()
        scores.append(math.exp(max(float(kl), 0.0)))  # KL >= 0; clip rounding error so IS >= 1
    return float(np.mean(scores))
