import importlib.util

import pytest
import torch

from tokenbridge import inception as I
from tokenbridge.images import to_uint8


# ---------------------------------------------------------------------------------------------------- Inception FID


def test_inception_weights_missing_errors(tmp_path, monkeypatch):
    monkeypatch.delenv(I.INCEPTION_WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        I.InceptionFID()
    with pytest.raises(FileNotFoundError, match=I.INCEPTION_WEIGHTS_ENV):
        I.InceptionFID(tmp_path / "missing.pth")
    monkeypatch.setenv(I.INCEPTION_WEIGHTS_ENV, str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        I.load_fid_inception()


def test_inception_missing_torchmetrics_error(tmp_path, monkeypatch):
    weights = tmp_path / I.INCEPTION_WEIGHTS_NAME
    weights.write_bytes(b"not used")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchmetrics" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match=r"tokenbridge\[metrics\]"):
        I.InceptionFID(weights)


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
    m = I.InceptionFID(feature_extractor=_TinyExtractor(), batch_size=64)
    m.update(real[:100], real=True)
    m.update(real[100:], real=True)
    m.update(real, real=False)
    assert m.compute() == pytest.approx(0.0, abs=1e-9)
    assert 1.0 <= m.inception_score(splits=2) <= 5.0
    other = I.InceptionFID(feature_extractor=_TinyExtractor())
    other.set_reference(*m.statistics(real=True))
    other.update(real * 0.5, real=False)
    assert other.compute() > 1e-3
    with pytest.raises(ValueError, match="1- or 3-channel"):
        m.update(torch.zeros(2, 2, 16, 16), real=True)
    with pytest.raises(ValueError, match="at least 2"):
        I.InceptionFID(feature_extractor=_TinyExtractor()).compute()


def test_images_to_uint8_rgb_matches_images_to_uint8():
    grey = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 1.2]).view(1, 1, 2, 3)
    x = I._images_to_uint8_rgb(grey)
    assert x.dtype == torch.uint8 and x.shape == (1, 3, 2, 3)
    assert x[0, 0].flatten().tolist() == [0, 64, 128, 191, 255, 255]  # round half to even, clamped
    assert torch.equal(x[:, 0], x[:, 2])
    rgb = torch.rand(2, 3, 5, 5) * 2 - 1
    assert torch.equal(I._images_to_uint8_rgb(rgb), torch.from_numpy(to_uint8(rgb)).permute(0, 3, 1, 2))
