import math
import os

import numpy as np
import pytest
import torch

from tokenbridge import metrics as M

CLASSIFIER_ACCURACY_BOUND = 0.88  # on 2,000 held-out test images; the shipped weights measure >= 0.90 on all 10k


@pytest.fixture(scope="module")
def test_split():
    from tokenbridge.data import as_tensors

    try:
        return as_tensors("test", limit=2000)
    except FileNotFoundError as e:
        pytest.skip(f"Fashion-MNIST not installed: {e}")


@pytest.fixture(scope="module")
def clf():
    return M.load_classifier()


# ---------------------------------------------------------------------------------------------------------- PSNR/SSIM


def test_psnr_identical_is_inf_and_known_mse():
    a = torch.rand(3, 1, 32, 32) * 1.6 - 0.8
    assert torch.isinf(M.psnr(a, a)).all()
    b = a + 0.1  # MSE 0.01 -> 10 log10(2^2 / 0.01)
    assert torch.allclose(M.psnr(a, b), torch.full((3,), 10 * math.log10(4 / 0.01), dtype=torch.float64))
    assert torch.allclose(M.psnr(a, b, data_range=1.0), torch.full((3,), 20.0, dtype=torch.float64))


def test_ssim_identical_is_one_and_decreases_with_noise():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    assert torch.equal(M.ssim(a, a), torch.ones(4, dtype=torch.float64))
    noise = torch.randn(a.shape, generator=g)
    values = [M.ssim(a, (a + s * noise).clamp(-1, 1)).mean().item() for s in (0.05, 0.2, 0.8)]
    assert 1 > values[0] > values[1] > values[2]


def test_ssim_constant_images_closed_form():
    a, b = torch.full((1, 1, 16, 16), 0.5), torch.full((1, 1, 16, 16), -0.25)
    c1 = (0.01 * 2.0) ** 2
    expected = (2 * 0.5 * -0.25 + c1) / (0.5**2 + 0.25**2 + c1)  # zero variances: the structure term is 1
    assert M.ssim(a, b).item() == pytest.approx(expected, rel=1e-9)


def test_latent_mse():
    a = torch.zeros(2, 4, 8, 8)
    b = torch.ones(2, 4, 8, 8) * torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)
    assert torch.allclose(M.latent_mse(a, b), torch.tensor([1.0, 4.0], dtype=torch.float64))


def test_reconstruction_metric_errors():
    a = torch.zeros(2, 1, 32, 32)
    with pytest.raises(ValueError, match="same shape"):
        M.psnr(a, torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        M.ssim(a[0], a[0])
    with pytest.raises(ValueError, match="NaN"):
        M.psnr(a, torch.full_like(a, float("nan")))
    with pytest.raises(ValueError, match="at least 11x11"):
        M.ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="same shape"):
        M.latent_mse(torch.zeros(2, 4), torch.zeros(2, 5))


# ---------------------------------------------------------------------------------------------------- Frechet distance


def test_fd_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 32))
    mu, sigma = M.feature_statistics(x)
    assert mu.dtype == np.float64 and sigma.shape == (32, 32)
    assert M.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)


def test_fd_grows_with_noise():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 16)) @ rng.normal(size=(16, 16))
    noise = rng.normal(size=x.shape)
    stats = M.feature_statistics(x)
    fds = [M.frechet_distance(*stats, *M.feature_statistics(x + s * noise)) for s in (0.1, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(fds, fds[1:])), fds


def test_fd_gaussian_closed_form():
    # Commuting (diagonal) covariances: FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    # Rotated (non-diagonal) versions of the same covariances give the same distance.
    q, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(3, 3)))
    got = M.frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-6)
    # Sampled estimate agrees with the closed form.
    rng = np.random.default_rng(3)
    x = mu1 + rng.normal(size=(200_000, 3)) * np.sqrt(a)
    y = mu2 + rng.normal(size=(200_000, 3)) * np.sqrt(b)
    assert M.frechet_distance(*M.feature_statistics(x), *M.feature_statistics(y)) == pytest.approx(expected, rel=0.02)


def test_fd_singular_covariance_is_finite():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(20, 64)), rng.normal(size=(20, 64)) + 1.0  # N < D: rank-deficient covariances
    fd = M.frechet_distance(*M.feature_statistics(x), *M.feature_statistics(y))
    assert math.isfinite(fd) and fd > 0
    sigma = np.zeros((4, 4))
    assert M.frechet_distance(np.zeros(4), sigma, np.ones(4), sigma) == pytest.approx(4.0)


def test_fd_errors():
    mu, sigma = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="same length"):
        M.frechet_distance(mu, sigma, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"\[3, 3\]"):
        M.frechet_distance(mu, sigma, mu, np.eye(2))
    with pytest.raises(ValueError, match="NaN"):
        M.frechet_distance(np.array([0.0, np.nan, 0.0]), sigma, mu, sigma)
    with pytest.raises(ValueError, match="N >= 2"):
        M.feature_statistics(np.zeros((1, 3)))


def test_reference_stats_roundtrip_and_errors(tmp_path):
    mu, sigma = M.feature_statistics(np.random.default_rng(5).normal(size=(50, 4)))
    path = tmp_path / "ref.npz"
    M.save_reference_stats(path, mu, sigma)
    assert sorted(os.listdir(tmp_path)) == ["ref.npz"]  # atomic write leaves no temporary file
    mu2, sigma2 = M.load_reference_stats(path)
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    np.savez(tmp_path / "images.npz", np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="arr_0"):
        M.load_reference_stats(tmp_path / "images.npz")
    np.savez(tmp_path / "other.npz", foo=np.zeros(3))
    with pytest.raises(ValueError, match="no 'mu' and 'sigma'"):
        M.load_reference_stats(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        M.load_reference_stats(tmp_path / "missing.npz")


# ---------------------------------------------------------------------------------------------------- precision/recall


def test_precision_recall_identical_disjoint_and_partial():
    rng = np.random.default_rng(6)
    real = rng.normal(size=(600, 8))
    assert M.precision_recall(real, real.copy(), k=3, chunk=128) == (1.0, 1.0)
    assert M.precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)
    # Half of the fake set on the real manifold, half far away: precision ~0.5, recall stays high.
    fake = np.concatenate([rng.normal(size=(300, 8)), rng.normal(size=(300, 8)) + 100.0])
    precision, recall = M.precision_recall(real, fake, k=3)
    assert 0.4 < precision < 0.6 and recall > 0.5
    with pytest.raises(ValueError, match="same D"):
        M.precision_recall(real, real[:, :4])
    with pytest.raises(ValueError, match="more than k"):
        M.precision_recall(real[:3], real, k=3)


# ---------------------------------------------------------------------------------------------------- classifier


def test_shipped_classifier_accuracy(clf, test_split):
    images, labels = test_split
    assert M.DEFAULT_CLASSIFIER_PATH.stat().st_size < 2_000_000
    assert clf.test_accuracy >= 0.90  # recorded at training time on all 10,000 test images
    acc = M.class_accuracy(images, labels, classifier=clf)
    assert acc >= CLASSIFIER_ACCURACY_BOUND
    assert M.class_accuracy(images, labels) == pytest.approx(acc)  # default = the shipped weights
    feats = M.classifier_features(images[:10], classifier=clf)
    assert feats.shape == (10, clf.feature_dim) and feats.dtype == torch.float32
    # 28x28 inputs are padded with the background like the training data.
    assert M.class_accuracy(images[:200, :, 2:30, 2:30], labels[:200], classifier=clf) == pytest.approx(
        M.class_accuracy(images[:200], labels[:200], classifier=clf))


def test_classifier_inception_score(clf, test_split):
    images, labels = test_split
    is_real = M.classifier_inception_score(images, classifier=clf)
    single = images[labels == 1]  # only trousers
    is_single = M.classifier_inception_score(single, classifier=clf)
    assert 6.0 < is_real <= 10.0
    assert 1.0 <= is_single < 2.0 < is_real
    assert M.classifier_inception_score(images, splits=4, classifier=clf) <= 10.0


def test_classifier_fd(clf, test_split):
    images, _ = test_split
    a, b = images[:1000], images[1000:]
    same = M.classifier_fd(a, a, classifier=clf)
    held_out = M.classifier_fd(a, b, classifier=clf)
    g = torch.Generator().manual_seed(0)
    noisy = M.classifier_fd(a, (b + 0.5 * torch.randn(b.shape, generator=g)).clamp(-1, 1), classifier=clf)
    assert same == pytest.approx(0.0, abs=1e-6)
    assert held_out < noisy


def test_classifier_metrics_bundle(clf, test_split, tmp_path):
    images, labels = test_split
    fake, real = images[:500], images[500:1500]
    out = M.classifier_metrics(fake, labels[:500], real_images=real, classifier=clf)
    assert set(out) == {"is_cls", "class_accuracy", "fd_cls", "precision", "recall"}
    assert out["precision"] > 0.5 and out["recall"] > 0.5
    path = tmp_path / "fmnist_test_cls.npz"
    M.save_reference_stats(path, *M.classifier_statistics(real, classifier=clf))
    out_ref = M.classifier_metrics(fake, reference=path, classifier=clf)
    assert out_ref["fd_cls"] == pytest.approx(out["fd_cls"], rel=1e-9)
    assert out_ref["is_cls"] == pytest.approx(out["is_cls"])


def test_classifier_input_errors(clf, tmp_path):
    with pytest.raises(ValueError, match="1 channel"):
        M.classifier_features(torch.zeros(2, 3, 32, 32), classifier=clf)
    with pytest.raises(ValueError, match="32, 32"):
        M.classifier_features(torch.zeros(2, 1, 64, 64), classifier=clf)
    with pytest.raises(ValueError, match="NaN"):
        M.classifier_features(torch.full((2, 1, 32, 32), float("nan")), classifier=clf)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        M.classifier_features(torch.full((2, 1, 32, 32), 3.0), classifier=clf)
    with pytest.raises(ValueError, match="labels"):
        M.class_accuracy(torch.zeros(2, 1, 32, 32), torch.tensor([0, 1, 2]), classifier=clf)
    with pytest.raises(ValueError, match="0..9"):
        M.class_accuracy(torch.zeros(2, 1, 32, 32), torch.tensor([0, 10]), classifier=clf)
    with pytest.raises(FileNotFoundError, match="train-classifier"):
        M.load_classifier(tmp_path / "nope.safetensors")


# ---------------------------------------------------------------------------------------------------- Inception FID


def test_inception_weights_missing_errors(tmp_path, monkeypatch):
    monkeypatch.delenv(M.INCEPTION_WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        M.InceptionFID()
    with pytest.raises(FileNotFoundError, match=M.INCEPTION_WEIGHTS_ENV):
        M.InceptionFID(tmp_path / "missing.pth")
    monkeypatch.setenv(M.INCEPTION_WEIGHTS_ENV, str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        M.load_fid_inception()


def test_inception_missing_torchmetrics_error(tmp_path, monkeypatch):
    weights = tmp_path / M.INCEPTION_WEIGHTS_NAME
    weights.write_bytes(b"not used")
    real_find_spec = M.importlib.util.find_spec
    monkeypatch.setattr(M.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchmetrics" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match=r"tokenbridge\[metrics\]"):
        M.InceptionFID(weights)


class _TinyExtractor(torch.nn.Module):
    """Stand-in for the Inception network: uint8 [B, 3, H, W] -> [B, 6] features, plus an fc for IS logits."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 5)

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        x = x.float() / 255
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


def test_inception_fid_pipeline_with_custom_extractor():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    real = torch.rand(200, 1, 16, 16, generator=g) * 2 - 1
    m = M.InceptionFID(feature_extractor=_TinyExtractor(), batch_size=64)
    m.update(real[:100], real=True)
    m.update(real[100:], real=True)
    m.update(real, real=False)
    assert m.compute() == pytest.approx(0.0, abs=1e-9)
    assert 1.0 <= m.inception_score(splits=2) <= 5.0
    other = M.InceptionFID(feature_extractor=_TinyExtractor())
    other.set_reference(*m.statistics(real=True))
    other.update(real * 0.5, real=False)
    assert other.compute() > 1e-3
    with pytest.raises(ValueError, match="1- or 3-channel"):
        m.update(torch.zeros(2, 2, 16, 16), real=True)
    with pytest.raises(ValueError, match="at least 2"):
        M.InceptionFID(feature_extractor=_TinyExtractor()).compute()
