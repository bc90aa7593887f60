"""Evaluate generated samples from a file: read the .npz that ``tokenbridge sample --npz`` writes and compute the
offline classifier metrics of ``tokenbridge.classifier`` against the Fashion-MNIST test split.

Every input is checked before any work starts, and each bad input gets a ValueError (FileNotFoundError for a
missing file) that names the file or argument, the array and what was expected. Choices made here:

- images must be stored as uint8 [N, H, W, C] (C = 1 or 3) in [0, 255], exactly as ``sample --npz`` writes them;
  float arrays are refused, not guessed at ([0, 1] and [-1, 1] floats cannot be told apart reliably);
- uint8 [N, H, W] (no channel axis) is accepted as grayscale, the layout of the raw Fashion-MNIST files;
- 28x28 images are accepted by the classifier and padded to 32x32 with the background -1, exactly as
  ``tokenbridge.data.to_model_images`` pads the Fashion-MNIST training data;
- ``read_samples`` knows nothing of the classifier (its output also feeds the Inception metrics), so RGB images,
  other sizes and labels outside 0..9 are refused by ``evaluate_samples`` / the classifier functions.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from .classifier import FMNISTClassifier, check_classifier_images, classifier_metrics, load_classifier
from .data import as_tensors
from .images import from_uint8
from .metrics import check_knn_sizes, check_labels, read_npz
from .progress import bar

# `tokenbridge evaluate` warns below this many samples ("a few hundred"): the metrics then move with the draw
MIN_SAMPLES = 300
SAMPLES_NPZ = ("a samples .npz as `tokenbridge sample --npz` writes it: 'images' uint8 [N, H, W, C] in [0, 255] "
               "and optional 'labels' integer [N]")


def _check_images_array(where: str, array: np.ndarray) -> None:
    """ValueError naming ``where`` unless ``array`` is uint8 [N, H, W, C] (C = 1 or 3) or [N, H, W], N, H, W >= 1."""
    if array.dtype != np.uint8:
        values = f" with values in [{array.min()}, {array.max()}]" if array.size and array.dtype.kind in "biuf" else ""
        raise ValueError(f"{where} has dtype {array.dtype}{values}: the .npz must hold uint8 images in [0, 255], "
                         f"as `tokenbridge sample --npz` writes (float images in [-1, 1] convert with "
                         f"tokenbridge.images.to_uint8)")
    shape = tuple(array.shape)
    if array.ndim == 3 and shape[-1] in (1, 3):
        # [N, H, 1] or [N, H, 3] read as grayscale would be N images of width 1 or 3: surely one [H, W, C] image
        raise ValueError(f"{where} has shape {shape}, which looks like one [H, W, C] image without the batch "
                         f"axis; expected [N, H, W, C] (or [N, H, W] for grayscale)")
    if array.ndim == 4 and shape[-1] not in (1, 3):
        hint = " (it looks channels-first [N, C, H, W]: transpose it to channels-last)" if shape[1] in (1, 3) else ""
        raise ValueError(f"{where} has shape {shape}: the last axis must be the channels, 1 or 3 (channels-last "
                         f"[N, H, W, C]){hint}")
    if array.ndim not in (3, 4):
        raise ValueError(f"{where} has shape {shape}; expected uint8 [N, H, W, C] (or [N, H, W] for grayscale)")
    if array.size == 0:
        raise ValueError(f"{where} holds no images (shape {shape}); expected at least one image")


def read_samples(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read generated samples from the .npz written by ``tokenbridge sample --npz`` (``generate.save_samples``).

    The file holds 'images' uint8 [N, H, W, C] (C = 1 or 3; [N, H, W] is read as C = 1) in [0, 255] and
    optionally 'labels' integer [N] (each image's conditioning class, >= 0); other arrays ('indices') are ignored.
    Returns (images float32 [N, C, H, W] in [-1, 1], labels int64 [N] or None when the file has none).

    FileNotFoundError when ``path`` does not exist; ValueError naming the file and the array for anything else
    (a folder, an .npy or text file, no 'images', non-uint8 or misshaped images, N = 0, non-integer labels, labels
    of another length, negative labels). Whether the images fit a metric's network is checked by that metric.
    """
    arrays, names = read_npz(path, ("images", "labels"), SAMPLES_NPZ)
    if "images" not in arrays:
        raise ValueError(f"{path} has no 'images' array (it holds {sorted(names)}); expected {SAMPLES_NPZ}")
    _check_images_array(f"{path}: 'images'", arrays["images"])
    images = from_uint8(arrays["images"])
    labels = arrays.get("labels")
    if labels is not None:
        labels = check_labels(labels, images.shape[0], f"{path}: 'labels'")
    return images, labels


def evaluate_samples(
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    *,
    classifier: FMNISTClassifier | None = None,
    real_images: torch.Tensor | None = None,
    k: int = 3,
    source: str | os.PathLike | None = None,
) -> dict[str, float]:
    """Offline classifier metrics of generated Fashion-MNIST samples, as ``tokenbridge evaluate`` reports them.

    images: float [N, 1, 32, 32] (or [N, 1, 28, 28], padded to 32 like the training data) in [-1, 1], N > k;
    labels: integer [N] in 0..9 (the conditioning classes) or None. ``real_images`` (float [M, 1, 32, 32] in
    [-1, 1]) defaults to the Fashion-MNIST test split (10,000 images); ``classifier`` to the shipped weights;
    ``source`` (e.g. the .npz path) prefixes the names in error messages.

    Shape, channels, range, sample count and label classes are all checked (ValueError) before the test split
    is loaded or the classifier runs. Returns classifier_metrics' "is_cls", "fd_cls", "precision", "recall"
    (+ "class_accuracy" with labels) and "num_samples" = N.
    """
    prefix = f"{source}: " if source is not None else ""
    images = check_classifier_images(images, f"{prefix}images")
    # FD needs two samples and k-NN precision/recall more than k: say so now, not after the test split is loaded
    check_knn_sizes(k, **{f"{prefix}images": images.shape[0]})
    clf = classifier if classifier is not None else load_classifier(device=device)
    if labels is not None:
        labels = check_labels(labels, images.shape[0], f"{prefix}labels", clf.num_classes)
    if real_images is None:
        real_images = as_tensors("test")[0]
    result: dict[str, float] = classifier_metrics(images, labels, real_images=real_images, classifier=clf,
                                                  device=device, k=k)
    result["num_samples"] = images.shape[0]
    return result


def evaluate_with_noise(images: torch.Tensor, labels: torch.Tensor | None = None, device: str | torch.device = "cpu",
                        *, source: str | os.PathLike | None = None, progress: bool = False,
                        classifier: FMNISTClassifier | None = None, real_images: torch.Tensor | None = None,
                        k: int = 3) -> dict[str, Any]:
    """`evaluate_samples`, plus "noise": each metric's half-split spread, |metric(half A) - metric(half B)| / 2 over
    one fixed random split (seed 0) of the N samples into halves, a rough standard error of the metric at N (for an
    average, the halves' difference has twice the full set's standard deviation). FD is biased upwards at small N,
    so its halves read higher than the full set. "noise" is None when a half holds k samples or fewer.
    progress: a bar over the three evaluations (full set, two halves) on stderr."""
    prefix = f"{source}: " if source is not None else ""
    images = check_classifier_images(images, f"{prefix}images")  # bad input fails before the test split is read
    check_knn_sizes(k, **{f"{prefix}images": images.shape[0]})
    classifier = classifier if classifier is not None else load_classifier(device=device)
    real_images = real_images if real_images is not None else as_tensors("test")[0]
    n = images.shape[0]
    halves = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tensor_split(2)
    split = n // 2 > k
    with bar(total=3 if split else 1, desc="evaluate", unit="set", requested=progress) as steps:
        result: dict[str, Any] = evaluate_samples(images, labels, device, classifier=classifier,
                                                  real_images=real_images, k=k, source=source)
        steps.update()
        parts = []
        for half in halves if split else ():
            parts.append(evaluate_samples(images[half], None if labels is None else labels[half], device,
                                          classifier=classifier, real_images=real_images, k=k, source=source))
            steps.update()
    result["noise"] = ({key: abs(parts[0][key] - parts[1][key]) / 2 for key in parts[0] if key != "num_samples"}
                       if split else None)
    result["noise_method"] = "half-split spread |A - B| / 2 (one random split, seed 0)"
    return result
