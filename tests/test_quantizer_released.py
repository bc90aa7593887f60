"""The quantizer's released arithmetic (`arithmetic="float32"`, what converted TokenBridge checkpoints use): tokens
equal to a reference built here from the released code's published computation: float32 boundaries
Phi^-1(linspace(0, 1, B + 1)) clamped to +-r, float32 truncated-normal means, the map (x + 5) / 10 * 6 - 3 in float32
with the division done the way PyTorch's CUDA kernels divide by a Python number (times the float32 reciprocal), a
clip to +-r and `argmin` over all B distances (the first index on ties): on constructed ties and on 10^7 random
latents. The default path agrees everywhere except at such ties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from tokenbridge.generators import TokenBridgeGenerator
from tokenbridge.quantizer import DimensionwiseQuantizer

B, R, A_MIN, A_MAX = 64, 3.0, -5.0, 5.0
CHUNK = 1 << 14  # the reference's [chunk, B] distances stay in cache


def reference_values(levels: int = B) -> torch.Tensor:
    """The released reconstruction values: float32 boundaries from scipy's ppf, clamped, then per bin
    (phi(a) - phi(b)) / (Phi(b) - Phi(a)) in float32 arithmetic."""
    probs = np.linspace(0, 1, levels + 1, dtype=np.float32)
    bounds = torch.tensor(stats.norm.ppf(probs), dtype=torch.float32).clamp(-R, R)
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        phi_a, phi_b = (torch.exp(-0.5 * v**2) / math.sqrt(2 * math.pi) for v in (a, b))
        cdf_a, cdf_b = (0.5 * (1 + torch.erf(v / math.sqrt(2))) for v in (a, b))
        out.append((phi_a - phi_b) / (cdf_b - cdf_a))
    return torch.stack(out)


def reference_map(x: torch.Tensor) -> torch.Tensor:
    """(x - a_min) / (a_max - a_min) * 2r - r in float32, dividing as CUDA does: times float32(1) / float32(10)."""
    reciprocal = np.float32(1.0) / np.float32(A_MAX - A_MIN)
    return ((x.float() - np.float32(A_MIN)) * torch.tensor(reciprocal)) * np.float32(2 * R) - np.float32(R)


def reference_argmin(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """argmin_i |clip(map(x)) - values_i| over all B values, chunked."""
    x_hat = reference_map(x.reshape(-1)).clamp(-R, R)
    out = torch.empty(x_hat.shape, dtype=torch.int64)
    buffer = torch.empty(CHUNK, values.numel())
    for start in range(0, x_hat.numel(), CHUNK):
        part = x_hat[start : start + CHUNK]
        dist = torch.sub(part[:, None], values, out=buffer[: part.numel()]).abs_()
        out[start : start + CHUNK] = dist.argmin(1)
    return out.view(x.shape)


@pytest.fixture(scope="module")
def quantizers() -> tuple[DimensionwiseQuantizer, DimensionwiseQuantizer]:
    return (DimensionwiseQuantizer(B, tails="clamped", arithmetic="float32"),
            DimensionwiseQuantizer(B, tails="clamped"))


def constructed_ties(values: torch.Tensor) -> torch.Tensor:
    """Float32 latents whose mapped value is exactly as far (in float32) from two neighbouring values: near each
    midpoint, the 2 x 200 float32 latents around its preimage, kept where the two rounded distances are equal."""
    found = []
    for lo, hi in zip(values[:-1].double(), values[1:].double()):
        centre = (((lo + hi) / 2 + R) / (2 * R) * (A_MAX - A_MIN) + A_MIN).float()
        bits = centre.view(torch.int32) + torch.arange(-200, 201, dtype=torch.int32)
        if centre < 0:
            bits = centre.view(torch.int32) - torch.arange(-200, 201, dtype=torch.int32)
        x = bits.view(torch.float32)
        x_hat = reference_map(x)
        tie = (x_hat - lo.float()).abs() == (x_hat - hi.float()).abs()
        found.append(x[tie])
    return torch.cat(found)


def test_the_released_values_are_the_released_codes(quantizers):
    released, default = quantizers
    assert torch.equal(released._released_values, reference_values())
    gap = (released._released_values.double() - default.reconstruction_values).abs().max()
    assert 0 < gap < 1e-5  # float32 cancellation in Phi(b) - Phi(a): not the float64 means


def test_constructed_ties_take_the_first_index(quantizers):
    released, default = quantizers
    values = reference_values()
    ties = constructed_ties(values)
    assert ties.numel() >= 40  # most midpoints have float32 latents mapping exactly half-way
    expected = reference_argmin(ties, values)
    got = released.quantize(ties)
    assert torch.equal(got, expected)
    x_hat = reference_map(ties)
    assert torch.equal((x_hat - values[got]).abs(), (x_hat - values[got + 1]).abs())  # a tie, lower index won
    # the example of the released arithmetic: 1.56e-7 maps to exactly 0.0, between values 31 and 32
    assert float(reference_map(torch.tensor(1.56e-7))) == 0.0
    assert released.quantize(torch.tensor([1.56e-7])).item() == 31 and default.quantize(torch.tensor([1.56e-7])) == 32


def test_ten_million_random_latents_equal_the_released_argmin_and_the_default_path_but_at_ties(quantizers):
    released, default = quantizers
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10**7, generator=g) * 1.6  # KL-16 latents' spread after MAR's scaling, within +-5 mostly
    x[:1000] *= 5  # some beyond the range: clipped
    expected = reference_argmin(x, reference_values())
    got = released.quantize(x)
    assert torch.equal(got, expected)
    fast = default.quantize(x)
    differ = fast != got
    assert 0 < int(differ.sum()) < 100  # a few per million
    # every disagreement is a tie up to rounding: the two nearest values are equally far within 1e-5
    x_hat = (x[differ].double() - A_MIN) / (A_MAX - A_MIN) * 2 * R - R
    gamma = default.reconstruction_values
    gap = (x_hat - gamma[got[differ]]).abs() - (x_hat - gamma[fast[differ]]).abs()
    assert (fast[differ] - got[differ]).abs().max() == 1 and gap.abs().max() < 1e-5


def test_the_torch_op_path_gives_the_numba_kernels_integers(quantizers, monkeypatch):
    """Without numba (or with use_fused_kernel False) the chunked torch ops compute the same released indices."""
    released, _ = quantizers
    values = reference_values()
    x = torch.cat([torch.randn(200_000, generator=torch.Generator().manual_seed(2)) * 1.6, constructed_ties(values)])
    expected = reference_argmin(x, values)
    assert torch.equal(released.quantize(x), expected)
    monkeypatch.setattr(released, "use_fused_kernel", False)
    assert torch.equal(released.quantize(x), expected)


def test_forward_dequantizes_as_the_released_code_and_any_input_dtype_is_float32(quantizers):
    released, _ = quantizers
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1)) * 2
    values, indices = released(x)
    gamma = reference_values()
    expected = ((gamma[indices] + R) * (np.float32(1) / np.float32(2 * R))) * np.float32(A_MAX - A_MIN) + A_MIN
    assert torch.equal(indices, released.quantize(x)) and torch.equal(values, expected)
    assert torch.equal(released.dequantize(indices), expected)
    assert torch.equal(released.quantize(x.double().transpose(0, 1)), indices.transpose(0, 1))
    with pytest.raises(ValueError, match="NaN or inf"):
        released.quantize(torch.tensor([0.0, float("nan")]).repeat(2, 8))


def test_the_option_is_recorded_and_checked():
    q = DimensionwiseQuantizer(16, arithmetic="float32")
    assert q.config()["arithmetic"] == "float32" and "arithmetic=float32" in repr(q)
    assert DimensionwiseQuantizer(16).config()["arithmetic"] == "midpoints"
    assert DimensionwiseQuantizer(**q.config()).arithmetic == "float32"
    for bad, message in (({"arithmetic": "gpu"}, "arithmetic must be one of"),
                         ({"arithmetic": "float32", "calibration": "quantile"}, "calibration='none'")):
        with pytest.raises(ValueError, match=message):
            DimensionwiseQuantizer(16, **bad)
    model = TokenBridgeGenerator.from_config({"preset": "tiny", "quantizer": {"arithmetic": "float32"}})
    assert model.quantizer.arithmetic == "float32" and model.config["quantizer"]["arithmetic"] == "float32"

