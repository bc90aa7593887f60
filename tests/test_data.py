import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from tokenbridge import data
from tokenbridge.data import FASHION_MNIST_CLASSES, FashionMNIST, ImageFolder, as_tensors, load_fashion_mnist

REAL = data.fashion_mnist_root(None)
has_real = pytest.mark.skipif(
    not (REAL / "t10k-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST not installed (dataset-fashion-mnist)"
)


def write_idx(folder, split, images, labels, image_magic=2051):
    names = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}[split]
    n, h, w = images.shape
    with gzip.open(folder / names[0], "wb") as f:
        f.write(struct.pack(">4i", image_magic, n, h, w) + images.astype(np.uint8).tobytes())
    with gzip.open(folder / names[1], "wb") as f:
        f.write(struct.pack(">2i", 2049, len(labels)) + labels.astype(np.uint8).tobytes())


@has_real
def test_real_test_split():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [1000] * 10
    assert len(FASHION_MNIST_CLASSES) == 10


@has_real
def test_as_tensors_padding_and_range():
    x, y = as_tensors("test", limit=16)
    assert x.shape == (16, 1, 32, 32) and y.shape == (16,) and y.dtype == torch.long
    assert x.min() >= -1 and x.max() <= 1
    # The 2-pixel border is padding with the background value -1.
    assert torch.all(x[..., :2, :] == -1) and torch.all(x[..., -2:, :] == -1)
    assert torch.all(x[..., :, :2] == -1) and torch.all(x[..., :, -2:] == -1)
    ds = FashionMNIST("test", limit=5)
    img, label = ds[3]
    assert len(ds) == 5 and img.shape == (1, 32, 32) and isinstance(label, int)
    assert torch.equal(img, x[3])


def test_tiny_idx_files_from_root(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 1])
    write_idx(tmp_path, "train", images, labels)
    got_x, got_y = load_fashion_mnist("train", root=tmp_path)
    assert np.array_equal(got_x, images) and np.array_equal(got_y, labels)
    x, _ = as_tensors("train", root=tmp_path)
    assert torch.allclose(x[:, 0, 2:30, 2:30], torch.from_numpy(images).float() / 127.5 - 1)


def test_env_variable_root(tmp_path, monkeypatch):
    write_idx(tmp_path, "test", np.zeros((2, 28, 28), np.uint8), np.array([1, 2]))
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(tmp_path))
    assert load_fashion_mnist("test")[1].tolist() == [1, 2]


def test_missing_files_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz.*apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("val", root=tmp_path)


def test_corrupt_files(tmp_path):
    write_idx(tmp_path, "test", np.zeros((2, 28, 28), np.uint8), np.array([1, 2]), image_magic=1234)
    with pytest.raises(ValueError, match="magic"):
        load_fashion_mnist("test", root=tmp_path)
    write_idx(tmp_path, "test", np.zeros((2, 28, 28), np.uint8), np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="2 images but .* 3 labels"):
        load_fashion_mnist("test", root=tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="gzip"):
        load_fashion_mnist("test", root=tmp_path)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:  # truncated payload
        f.write(struct.pack(">4i", 2051, 2, 28, 28) + bytes(100))
    with pytest.raises(ValueError, match="does not match"):
        load_fashion_mnist("test", root=tmp_path)


def test_image_folder(tmp_path):
    for cls, color in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (40 + 10 * i, 30), color).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dogs" / "notes.txt").write_text("ignored")
    ds = ImageFolder(tmp_path, resolution=16)
    assert ds.classes == ["cats", "dogs"] and len(ds) == 4
    x, label = ds[0]
    assert x.shape == (3, 16, 16) and label == 0
    assert torch.allclose(x[0], torch.ones(16, 16)) and torch.allclose(x[2], -torch.ones(16, 16))
    x, label = ds[3]
    assert label == 1 and torch.allclose(x[2], torch.ones(16, 16))
    grey, _ = ImageFolder(tmp_path, resolution=8, channels=1)[0]
    assert grey.shape == (1, 8, 8) and grey.min() >= -1 and grey.max() <= 1


def test_image_folder_flat_and_errors(tmp_path):
    Image.new("L", (10, 10), 128).save(tmp_path / "a.jpg")
    ds = ImageFolder(tmp_path, resolution=4)
    assert len(ds) == 1 and ds[0][1] == 0 and ds[0][0].shape == (3, 4, 4)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path / "empty")
