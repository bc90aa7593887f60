import pytest
import torch

from tokenbridge import classifier as C
from tokenbridge import metrics
from tokenbridge.training import classifier as classifier_training
from tokenbridge.data import as_tensors

CLASSIFIER_ACCURACY_BOUND = 0.88  # on 2,000 held-out test images; the shipped weights measure >= 0.90 on all 10k


@pytest.fixture(scope="module")
def test_split():
    try:
        return as_tensors("test", limit=2000)
    except FileNotFoundError as e:
        pytest.skip(f"Fashion-MNIST not installed: {e}")


@pytest.fixture(scope="module")
def clf():
    return C.load_classifier()


# ---------------------------------------------------------------------------------------------------- classifier


def test_shipped_classifier_accuracy(clf, test_split):
    images, labels = test_split
    assert C.DEFAULT_CLASSIFIER_PATH.stat().st_size < 2_000_000
    assert clf.test_accuracy >= 0.90  # recorded at training time on all 10,000 test images
    acc = C.class_accuracy(images, labels, classifier=clf)
    assert acc >= CLASSIFIER_ACCURACY_BOUND
    assert C.class_accuracy(images, labels) == pytest.approx(acc)  # default = the shipped weights
    feats = C.classifier_features(images[:10], classifier=clf)
    assert feats.shape == (10, clf.feature_dim) and feats.dtype == torch.float32
    # 28x28 inputs are padded with the background like the training data.
    assert C.class_accuracy(images[:200, :, 2:30, 2:30], labels[:200], classifier=clf) == pytest.approx(
        C.class_accuracy(images[:200], labels[:200], classifier=clf))


def test_classifier_inception_score(clf, test_split):
    images, labels = test_split
    is_real = C.classifier_inception_score(images, classifier=clf)
    single = images[labels == 1]  # only trousers
    is_single = C.classifier_inception_score(single, classifier=clf)
    assert 6.0 < is_real <= 10.0
    assert 1.0 <= is_single < 2.0 < is_real
    assert C.classifier_inception_score(images, splits=4, classifier=clf) <= 10.0


def test_classifier_fd(clf, test_split):
    images, _ = test_split
    a, b = images[:500], images[500:1000]
    same = C.classifier_fd(a, a, classifier=clf)
    held_out = C.classifier_fd(a, b, classifier=clf)
    g = torch.Generator().manual_seed(0)
    noisy = C.classifier_fd(a, (b + 0.5 * torch.randn(b.shape, generator=g)).clamp(-1, 1), classifier=clf)
    assert same == pytest.approx(0.0, abs=1e-6)
    assert held_out < noisy


def test_classifier_metrics_bundle(clf, test_split, tmp_path):
    images, labels = test_split
    fake, real = images[:500], images[500:1500]
    out = C.classifier_metrics(fake, labels[:500], real_images=real, classifier=clf)
    assert set(out) == {"is_cls", "class_accuracy", "fd_cls", "precision", "recall"}
    assert out["precision"] > 0.5 and out["recall"] > 0.5
    path = tmp_path / "fmnist_test_cls.npz"
    metrics.save_reference_stats(path, *C.classifier_statistics(real, classifier=clf))
    out_ref = C.classifier_metrics(fake, reference=path, classifier=clf)
    assert out_ref["fd_cls"] == pytest.approx(out["fd_cls"], rel=1e-9)
    assert out_ref["is_cls"] == pytest.approx(out["is_cls"])


def test_classifier_input_errors(clf, tmp_path):
    with pytest.raises(ValueError, match="1 channel"):
        C.classifier_features(torch.zeros(2, 3, 32, 32), classifier=clf)
    with pytest.raises(ValueError, match="32, 32"):
        C.classifier_features(torch.zeros(2, 1, 64, 64), classifier=clf)
    with pytest.raises(ValueError, match="NaN"):
        C.classifier_features(torch.full((2, 1, 32, 32), float("nan")), classifier=clf)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        C.classifier_features(torch.full((2, 1, 32, 32), 3.0), classifier=clf)
    with pytest.raises(ValueError, match="labels"):
        C.class_accuracy(torch.zeros(2, 1, 32, 32), torch.tensor([0, 1, 2]), classifier=clf)
    with pytest.raises(ValueError, match="0..9"):
        C.class_accuracy(torch.zeros(2, 1, 32, 32), torch.tensor([0, 10]), classifier=clf)
    with pytest.raises(FileNotFoundError, match="train-classifier"):
        C.load_classifier(tmp_path / "nope.safetensors")


def test_classifier_metrics_label_and_argument_errors(clf):
    images = torch.zeros(4, 1, 32, 32)
    with pytest.raises(ValueError, match="labels"):
        C.classifier_metrics(images, torch.tensor([0, 1]), classifier=clf)
    with pytest.raises(ValueError, match="either real_images or reference"):
        C.classifier_metrics(images, real_images=images, reference=(None, None), classifier=clf)


@pytest.mark.parametrize("call, match", [
    (lambda clf, x: C.classifier_fd(x, torch.full_like(x, float("nan")), classifier=clf), "images_b contains NaN"),
    (lambda clf, x: C.classifier_fd(x[:1], x, classifier=clf), "images_a must hold at least 2 images"),
    (lambda clf, x: C.classifier_statistics(x[:1], classifier=clf), "images must hold at least 2 images"),
    (lambda clf, x: C.classifier_features(x[:0], classifier=clf), "images is empty"),
    (lambda clf, x: C.classifier_features(x, classifier=clf, batch_size=0), "batch_size must be >= 1"),
    (lambda clf, x: C.classifier_inception_score(x, splits=5, classifier=clf), "splits=5"),
    (lambda clf, x: C.class_accuracy(x, torch.zeros(4), classifier=clf), "labels must be integer"),
    (lambda clf, x: C.class_accuracy(x, torch.tensor([0, 1, 2, -1]), classifier=clf), r"0\.\.9"),
    (lambda clf, x: C.classifier_metrics(x[:0], classifier=clf), "fake_images is empty"),
    (lambda clf, x: C.classifier_metrics(x, torch.ones(4, dtype=torch.bool), classifier=clf),
     "fake_labels must be integer class labels, got dtype bool"),
    (lambda clf, x: C.classifier_metrics(x, real_images=x.expand(-1, 3, -1, -1), classifier=clf),
     "real_images must have 1 channel"),
    (lambda clf, x: C.classifier_metrics(x[:3], real_images=x, classifier=clf), "got 3 in fake_images"),
    (lambda clf, x: C.classifier_metrics(x, reference=(torch.zeros(2048), torch.eye(2048)), classifier=clf),
     "D=2048 but the classifier's features have D=128"),
    (lambda clf, x: C.classifier_metrics(x, reference=(torch.zeros(128), torch.eye(3)), classifier=clf),
     r"reference sigma must be \[128, 128\]"),
])
def test_inputs_are_checked_before_the_classifier_runs(clf, monkeypatch, call, match):
    def fail(*args, **kwargs):
        raise AssertionError("the classifier ran before its inputs were checked")
    monkeypatch.setattr(C, "_classifier_outputs", fail)
    with pytest.raises(ValueError, match=match):
        call(clf, torch.zeros(4, 1, 32, 32))


def test_train_classifier_smoke(tmp_path, monkeypatch):
    # A tiny stand-in dataset: checks the training loop, the saved file format and that load_classifier reads it.
    g = torch.Generator().manual_seed(0)
    fake = {split: (torch.rand(n, 1, 32, 32, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g))
            for split, n in (("train", 70), ("test", 20))}
    monkeypatch.setattr(classifier_training, "as_tensors", lambda split, root=None: fake[split])
    path = tmp_path / "clf.safetensors"
    out = classifier_training.train_classifier(path, epochs=2, batch_size=32, widths=(4, 8, 8), feature_dim=16, threads=None)
    assert set(out) == {"test_accuracy", "train_seconds", "params"} and 0.0 <= out["test_accuracy"] <= 1.0
    model = C.load_classifier(path)
    assert model.widths == (4, 8, 8) and model.feature_dim == 16 and not model.training
    assert model.test_accuracy == pytest.approx(out["test_accuracy"], abs=1e-4)
    assert out["params"] == sum(p.numel() for p in model.parameters())
    feats = C.classifier_features(fake["test"][0], classifier=model)
    assert feats.shape == (20, 16) and (feats >= 0).all()
