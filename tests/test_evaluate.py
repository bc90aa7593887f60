"""tokenbridge.evaluate: reading `tokenbridge sample --npz` files and evaluating them, with a clear error for each
bad input (written here with numpy) before any work starts."""

import numpy as np
import pytest
import torch

from tokenbridge import evaluate as E
from tokenbridge.classifier import check_classifier_images, load_classifier
from tokenbridge.data import as_tensors, fashion_mnist_root, to_model_images
from tokenbridge.generate import save_samples
from tokenbridge.images import from_uint8, to_uint8


@pytest.fixture(scope="module")
def clf():
    return load_classifier()


@pytest.fixture(scope="module")
def test_split():
    """The first 300 test images and labels: a small stand-in for the 10,000 real images evaluate uses."""
    if not fashion_mnist_root().joinpath("t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed")
    return as_tensors("test", limit=300)


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def gray_uint8(n=4, size=32, channel_axis=True):
    shape = (n, size, size, 1) if channel_axis else (n, size, size)
    return np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------- round trip


def test_round_trip_through_save_samples(tmp_path, test_split, monkeypatch):
    images, labels = test_split
    asked = []  # the real images evaluate loads by default: the test split (here its first 300, to be quick)
    monkeypatch.setattr(E, "as_tensors", lambda *args, **kw: asked.append((args, kw)) or test_split)
    result = {"images": images[:20], "labels": labels[:20].long()}
    (path,) = [p for p in save_samples(result, tmp_path, npz=True) if p.suffix == ".npz"]
    read, read_labels = E.read_samples(path)
    assert read.shape == (20, 1, 32, 32) and read.dtype == torch.float32
    assert torch.equal(read, from_uint8(to_uint8(images[:20])))  # only the uint8 rounding differs
    assert (read - images[:20]).abs().max() <= 1 / 127.5 + 1e-6
    assert read_labels.dtype == torch.int64 and torch.equal(read_labels, labels[:20])
    out = E.evaluate_samples(read, read_labels, device="cpu", source=path)  # default: the whole test split
    assert asked == [(("test",), {})]
    assert set(out) == {"is_cls", "class_accuracy", "fd_cls", "precision", "recall", "num_samples"}
    assert out["num_samples"] == 20 and out["class_accuracy"] >= 0.8


def test_samples_without_labels_or_channel_axis(tmp_path, test_split, clf):
    real, _ = test_split
    raw = gray_uint8(8, channel_axis=False)  # [N, H, W]: accepted as grayscale (the raw Fashion-MNIST layout)
    images, labels = E.read_samples(write_npz(tmp_path / "s.npz", images=raw))
    assert labels is None and torch.equal(images, from_uint8(raw[..., None]))
    out = E.evaluate_samples(images, None, classifier=clf, real_images=real)
    assert "class_accuracy" not in out and out["num_samples"] == 8


def test_28x28_samples_are_padded_like_the_training_data(tmp_path, test_split, clf):
    real, _ = test_split
    raw = gray_uint8(6, size=28)
    images, _ = E.read_samples(write_npz(tmp_path / "s.npz", images=raw, labels=np.arange(6)))
    assert images.shape == (6, 1, 28, 28)
    assert torch.equal(check_classifier_images(images), to_model_images(raw[..., 0]))
    padded = E.evaluate_samples(to_model_images(raw[..., 0]), torch.arange(6), classifier=clf, real_images=real)
    assert E.evaluate_samples(images, torch.arange(6), classifier=clf, real_images=real) == pytest.approx(padded)


# ---------------------------------------------------------------------------------------------------- bad files


def test_float_images_are_refused(tmp_path):
    path = write_npz(tmp_path / "f.npz", images=np.random.default_rng(0).random((4, 32, 32, 1)).astype(np.float32))
    with pytest.raises(ValueError, match=r"f\.npz: 'images' has dtype float32 with values in \[0\.\d+, 0\.\d+\]: "
                                         r"the \.npz must hold uint8 images in \[0, 255\]"):
        E.read_samples(path)


def test_missing_npy_text_and_folder_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz does not exist"):
        E.read_samples(tmp_path / "nope.npz")
    np.save(tmp_path / "images.npy", gray_uint8())
    with pytest.raises(ValueError, match=r"images\.npy is a single \.npy array, not an \.npz"):
        E.read_samples(tmp_path / "images.npy")
    (tmp_path / "samples.txt").write_text("0 1 2\n")
    with pytest.raises(ValueError, match=r"samples\.txt is not an \.npz \(zip\) archive"):
        E.read_samples(tmp_path / "samples.txt")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(ValueError, match="broken.npz could not be read"):
        E.read_samples(tmp_path / "broken.npz")
    with pytest.raises(ValueError, match="is not a file"):
        E.read_samples(tmp_path)


def test_npz_without_images(tmp_path):
    path = write_npz(tmp_path / "s.npz", samples=gray_uint8(), labels=np.arange(4))
    with pytest.raises(ValueError, match=r"s\.npz has no 'images' array \(it holds \['labels', 'samples'\]\)"):
        E.read_samples(path)
    with pytest.raises(ValueError, match="could not be read"):  # pickled objects are never unpickled
        E.read_samples(write_npz(tmp_path / "o.npz", images=np.array([None, 1], dtype=object)))


@pytest.mark.parametrize("shape, match", [
    ((0, 32, 32, 1), r"holds no images \(shape \(0, 32, 32, 1\)\)"),
    ((4, 1, 32, 32), r"last axis must be the channels.*channels-first"),
    ((32, 32, 3), r"looks like one \[H, W, C\] image"),
    ((4, 32), r"expected uint8 \[N, H, W, C\]"),
])
def test_misshaped_images(tmp_path, shape, match):
    with pytest.raises(ValueError, match=r"s\.npz: 'images' .*" + match):
        E.read_samples(write_npz(tmp_path / "s.npz", images=np.zeros(shape, np.uint8)))


@pytest.mark.parametrize("labels, match", [
    (np.arange(3), r"must hold one label per image: shape \[4\] for 4 images, got shape \(3,\)"),
    (np.zeros((4, 2), np.int64), r"must hold one label per image: shape \[4\] for 4 images, got shape \(4, 2\)"),
    (np.array([0.0, 1.5, 2.0, 3.0]), "must be integer class labels, got dtype float64"),
    (np.array([0, -1, 2, 3]), r"must be >= 0, got values in \[-1, 3\]"),
])
def test_bad_labels_in_the_file(tmp_path, labels, match):
    with pytest.raises(ValueError, match=r"s\.npz: 'labels' " + match):
        E.read_samples(write_npz(tmp_path / "s.npz", images=gray_uint8(), labels=labels))


# ---------------------------------------------------------------------------------------------------- bad inputs


@pytest.fixture
def no_test_split(monkeypatch):
    # evaluate_samples must refuse bad inputs before it loads the test split (or runs the classifier)
    def fail(*args, **kwargs):
        raise AssertionError("the test split was loaded before the inputs were checked")
    monkeypatch.setattr(E, "as_tensors", fail)


def test_rgb_samples_are_refused_by_the_classifier(tmp_path, clf, no_test_split):
    rgb = np.zeros((4, 32, 32, 3), np.uint8)
    images, labels = E.read_samples(write_npz(tmp_path / "s.npz", images=rgb, labels=np.arange(4)))
    assert images.shape == (4, 3, 32, 32)  # a valid file: fine for the Inception metrics
    with pytest.raises(ValueError, match=r"s\.npz: images must have 1 channel.*\(4, 3, 32, 32\)"):
        E.evaluate_samples(images, labels, classifier=clf, source=tmp_path / "s.npz")


def test_labels_outside_the_classes(tmp_path, clf, no_test_split):
    images, labels = E.read_samples(write_npz(tmp_path / "s.npz", images=gray_uint8(), labels=np.array([0, 3, 9, 12])))
    with pytest.raises(ValueError, match=r"s\.npz: labels must be in 0\.\.9, got values in \[0, 12\]"):
        E.evaluate_samples(images, labels, classifier=clf, source=tmp_path / "s.npz")


@pytest.mark.parametrize("images, match", [
    (torch.zeros(4, 1, 64, 64), r"images must be \[N, 1, 32, 32\] or Fashion-MNIST's raw \[N, 1, 28, 28\]"),
    (torch.rand(4, 1, 32, 32) * 255, r"images must be in \[-1, 1\].*from_uint8"),
    (torch.full((4, 1, 32, 32), float("nan")), "images contains NaN"),
    (torch.zeros(0, 1, 32, 32), "images is empty"),
    (torch.zeros(3, 1, 32, 32), "more than k=3 samples in each set, got 3 in images"),
    (torch.zeros(4, 32, 32), r"images must have shape \[B, C, H, W\]"),
])
def test_images_that_do_not_fit_the_classifier(clf, no_test_split, images, match):
    with pytest.raises(ValueError, match=match):
        E.evaluate_samples(images, None, classifier=clf)


def test_labels_that_do_not_fit_the_images(clf, no_test_split):
    images = torch.zeros(4, 1, 32, 32)
    with pytest.raises(ValueError, match=r"labels must hold one label per image: shape \[4\] for 4 images"):
        E.evaluate_samples(images, torch.arange(5), classifier=clf)
    with pytest.raises(ValueError, match="labels must be integer class labels, got dtype float32"):
        E.evaluate_samples(images, torch.zeros(4), classifier=clf)
