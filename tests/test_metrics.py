import math
import os

import numpy as np
import pytest
import torch

from tokenbridge import metrics as M


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


def test_inception_score_from_logits():
    uniform_confident = torch.eye(10) * 100.0  # each image one class, all classes used: IS = number of classes
    assert M.inception_score_from_logits(uniform_confident, 1) == pytest.approx(10.0, rel=1e-6)
    same_class = torch.zeros(8, 10)
    same_class[:, 3] = 100.0  # all images the same class: IS = 1
    assert M.inception_score_from_logits(same_class, 2) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="splits"):
        M.inception_score_from_logits(same_class, 9)


def test_empty_nan_and_mismatched_inputs_name_the_argument(tmp_path):
    a = torch.zeros(2, 1, 32, 32)
    with pytest.raises(ValueError, match="a is empty"):
        M.psnr(a[:0], a[:0])
    with pytest.raises(ValueError, match="b contains NaN"):
        M.ssim(a, torch.full_like(a, float("nan")))
    with pytest.raises(ValueError, match="a and b are empty"):
        M.latent_mse(torch.zeros(0, 4), torch.zeros(0, 4))
    with pytest.raises(ValueError, match="b contains NaN"):
        M.latent_mse(torch.zeros(2, 4), torch.full((2, 4), float("inf")))
    with pytest.raises(ValueError, match="N >= 2"):
        M.feature_statistics(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="mu1 must be a non-empty vector"):
        M.frechet_distance(np.zeros(0), np.zeros((0, 0)), np.zeros(0), np.zeros((0, 0)))
    with pytest.raises(ValueError, match=r"sigma must be \[3, 3\] to match mu"):
        M.save_reference_stats(tmp_path / "ref.npz", np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="more than k=3 samples in each set, got 0 in real_feats"):
        M.precision_recall(np.zeros((0, 4)), np.zeros((10, 4)))
    with pytest.raises(ValueError, match="splits"):
        M.inception_score_from_logits(torch.zeros(0, 10), 1)
    with pytest.raises(ValueError, match="logits contains NaN"):
        M.inception_score_from_logits(torch.full((4, 10), float("nan")), 1)
    with pytest.raises(ValueError, match=r"logits must be a tensor \[N, K\]"):
        M.inception_score_from_logits(torch.zeros(10), 1)


def test_check_labels():
    assert torch.equal(M.check_labels([0, 3, 9], 3, num_classes=10), torch.tensor([0, 3, 9]))
    assert M.check_labels(np.array([1, 2], np.uint8), 2).dtype == torch.int64
    with pytest.raises(ValueError, match=r"y must hold one label per image: shape \[3\] for 3 images"):
        M.check_labels(torch.tensor([[0, 1, 2]]), 3, "y")
    with pytest.raises(ValueError, match="y must be integer class labels, got dtype float64"):
        M.check_labels(np.array([0.0, 1.0]), 2, "y")
    with pytest.raises(ValueError, match=r"y must be in 0\.\.9, got values in \[0, 10\]"):
        M.check_labels(torch.tensor([0, 10]), 2, "y", num_classes=10)
    with pytest.raises(ValueError, match=r"y must be >= 0"):
        M.check_labels(torch.tensor([-3, 1]), 2, "y")


def test_reference_stats_file_errors(tmp_path):
    np.save(tmp_path / "mu.npy", np.zeros(3))
    with pytest.raises(ValueError, match=r"mu\.npy is a single \.npy array, not an \.npz"):
        M.load_reference_stats(tmp_path / "mu.npy")
    (tmp_path / "stats.txt").write_text("mu sigma")
    with pytest.raises(ValueError, match=r"stats\.txt is not an \.npz \(zip\) archive"):
        M.load_reference_stats(tmp_path / "stats.txt")
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match=r"bad\.npz: sigma must be \[3, 3\] to match .*bad\.npz: mu"):
        M.load_reference_stats(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="is not a file"):
        M.load_reference_stats(tmp_path)


def test_metrics_module_is_pure():
    # Networks and weights live in tokenbridge.classifier / tokenbridge.inception, not here.
    assert not any(isinstance(v, type) and issubclass(v, torch.nn.Module) for v in vars(M).values())
    for name in ("FMNISTClassifier", "InceptionFID", "load_classifier", "train_classifier", "DEFAULT_CLASSIFIER_PATH"):
        assert not hasattr(M, name), name
