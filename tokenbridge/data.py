"""Datasets: the embedded Fashion-MNIST default and users' own image folders.

Fashion-MNIST is read from the four standard idx ``.gz`` files (Debian package ``dataset-fashion-mnist`` installs
them in /usr/share/datasets/fashion-mnist). Images come out as float tensors in [-1, 1], 28x28 zero-padded to
32x32 with the background value -1 so that an f4 VAE gives an 8x8 latent grid.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import from_uint8

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "TOKENBRIDGE_FASHION_MNIST"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IMAGE_MAGIC, _LABEL_MAGIC = 2051, 2049
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def fashion_mnist_root(root: str | os.PathLike | None = None) -> Path:
    """Folder holding the idx files: ``root``, else $TOKENBRIDGE_FASHION_MNIST, else the Debian location."""
    if root is None:
        root = os.environ.get(FASHION_MNIST_ENV) or DEFAULT_FASHION_MNIST_ROOT
    return Path(root)


def _read_idx(path: Path, magic: int, header_ints: int) -> tuple[np.ndarray, tuple[int, ...]]:
    try:
        raw = gzip.open(path, "rb").read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable gzip idx file ({e})") from e
    header = 4 * header_ints
    if len(raw) < header:
        raise ValueError(f"{path}: file too short for an idx header ({len(raw)} bytes)")
    fields = struct.unpack(f">{header_ints}i", raw[:header])
    if fields[0] != magic:
        raise ValueError(f"{path}: bad idx magic number {fields[0]} (expected {magic})")
    dims = fields[1:]
    expected = int(np.prod(dims)) + header
    if len(raw) != expected:
        raise ValueError(f"{path}: size {len(raw)} bytes does not match header dims {dims} ({expected} bytes)")
    return np.frombuffer(raw, np.uint8, offset=header), dims


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load a Fashion-MNIST split.

    Returns (images uint8 [N, 28, 28] in 0..255, labels int64 [N] in 0..9). Works with the same idx files from any
    folder (pass ``root`` or set $TOKENBRIDGE_FASHION_MNIST).
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = fashion_mnist_root(root)
    paths = [folder / name for name in _FILES[split]]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files missing in {folder}: {', '.join(missing)}. Install them with "
            f"`sudo apt-get install dataset-fashion-mnist`, or download the idx .gz files and pass root= "
            f"(or set ${FASHION_MNIST_ENV})."
        )
    images, (n, h, w) = _read_idx(paths[0], _IMAGE_MAGIC, 4)
    labels, (m,) = _read_idx(paths[1], _LABEL_MAGIC, 2)
    if n != m:
        raise ValueError(f"{paths[0].name} has {n} images but {paths[1].name} has {m} labels")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{paths[1]}: label {labels.max()} out of range 0..9")
    return images.reshape(n, h, w).copy(), labels.astype(np.int64)


def to_model_images(images: np.ndarray | torch.Tensor, pad_to: int = 32) -> torch.Tensor:
    """uint8 [N, H, W] -> float [N, 1, pad_to, pad_to] in [-1, 1], padded with -1 (the black background)."""
    x = from_uint8(images)
    h, w = x.shape[-2:]
    if h > pad_to or w > pad_to:
        raise ValueError(f"images {h}x{w} are larger than pad_to={pad_to}")
    top, left = (pad_to - h) // 2, (pad_to - w) // 2
    return torch.nn.functional.pad(x, (left, pad_to - w - left, top, pad_to - h - top), value=-1.0)


def as_tensors(
    split: str = "train", limit: int | None = None, root: str | os.PathLike | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole split in memory: (images float [N, 1, 32, 32] in [-1, 1], labels long [N]); first ``limit`` items."""
    images, labels = load_fashion_mnist(split, root)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return to_model_images(images), torch.from_numpy(labels)


class FashionMNIST(Dataset):
    """Fashion-MNIST as (image float [1, 32, 32] in [-1, 1], label int). Kept in memory (60k x 32x32 floats)."""

    classes = FASHION_MNIST_CLASSES

    def __init__(self, split: str = "train", root: str | os.PathLike | None = None, limit: int | None = None):
        self.images, self.labels = as_tensors(split, limit, root)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


class ImageFolder(Dataset):
    """Users' own images: ``root/<class>/*.png`` (class = sorted sub-folder name) or images directly in ``root``
    (class 0). Items are (image float [channels, R, R] in [-1, 1], label int); center crop to square, bicubic resize.
    """

    def __init__(self, root: str | os.PathLike, resolution: int = 256, channels: int = 3):
        from PIL import Image  # noqa: F401  (fail early if pillow is missing)

        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.root, self.resolution, self.channels = Path(root), int(resolution), channels
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        subdirs = sorted(p for p in self.root.iterdir() if p.is_dir())
        top = sorted(p for p in self.root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        self.classes: list[str] = [d.name for d in subdirs]
        self.samples: list[tuple[Path, int]] = [(p, 0) for p in top]
        if top and not subdirs:
            self.classes = [self.root.name]
        for label, d in enumerate(subdirs):
            files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            self.samples += [(p, label) for p in files]
        if not self.samples:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {self.root} or its sub-folders")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as im:
            im = im.convert("RGB" if self.channels == 3 else "L")
            w, h = im.size
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s)).resize((self.resolution,) * 2, Image.BICUBIC)
            arr = np.array(im)[None]  # uint8 [1, R, R] ("L") or [1, R, R, 3] ("RGB"), writable
        return from_uint8(arr)[0], label
