"""Paper-scale Inception FID / IS: the standard FID Inception network (TF inception-2015-12-05, the port used by
torch-fidelity and torchmetrics) loaded from a local weights file, nothing downloaded.

Only these numbers, on ImageNet-scale samples (50,000 generated images against the ADM reference batch), are
comparable with papers. The offline Fashion-MNIST classifier metrics (``tokenbridge.classifier``) are a different
family and must never be mixed with them.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .images import to_uint8
from .metrics import as_float64, check_images, frechet_distance, inception_score_from_logits

# The FID Inception network (TF "inception-2015-12-05" graph, hash 6726825d) as torch-fidelity/torchmetrics load it;
# pytorch-fid ships the same TF weights as pt_inception-2015-12-05-6726825d.pth (torchvision-style keys like these;
# expected to load too, not verified offline).
INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_ALT_NAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_ENV = "TOKENBRIDGE_INCEPTION_WEIGHTS"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)


def _images_to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """[B, 1 or 3, H, W] float in [-1, 1] -> uint8 [B, 3, H, W] on the CPU in 0..255 (grey repeated to 3 channels),
    as the FID network wants."""
    check_images(images)
    if images.shape[1] not in (1, 3):
        raise ValueError(f"Inception metrics need 1- or 3-channel images, got shape {tuple(images.shape)}")
    x = torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).contiguous()  # NCHW layout, not channels-last
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
    from torchmetrics.image.fid import NoTrainInceptionV3  # optional dependency (tokenbridge[metrics])

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
    [B, 1 or 3, H, W] in [-1, 1]); or, for the ADM reference batch instead of real images,
    ``m.set_reference(*metrics.load_reference_stats("VIRTUAL_imagenet256_labeled.npz"))``; then ``m.compute()``
    -> FID and ``m.inception_score()``.
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
    ) -> None:
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
        self._reference = (as_float64(mu, "mu"), as_float64(sigma, "sigma"))

    def statistics(self, real: bool) -> tuple[np.ndarray, np.ndarray]:
        """(mu [D], sigma [D, D]) float64 of the real or generated images seen so far (save with
        metrics.save_reference_stats to reuse real statistics)."""
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
        return inception_score_from_logits(torch.cat(self._fake_logits), splits)
