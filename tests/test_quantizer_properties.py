"""Property-based tests of DimensionwiseQuantizer (hypothesis) over any finite latents, float dtype and levels.

For every drawn (quantizer, latents [n, C]): indices are int64 in [0, B); both CPU lookups (numba kernel and torch
ops) and the binary search of other devices give the same indices; each index is that of a nearest latent-scale
reconstruction value (ties either way, up to float32 rounding of the midpoints); dequantize -> quantize is the
identity; and inside the range of the reconstruction values the error is at most half the local spacing.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tokenbridge import quantizer as quantizer_module
from tokenbridge.quantizer import DimensionwiseQuantizer

# deadline=None: a drawn quantizer of 2**16 levels takes ~10 ms to build, more than hypothesis' default allows
# database=None: no .hypothesis folder in the working tree (replays come from the failure report instead)
SETTINGS = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
EPS32 = float(torch.finfo(torch.float32).eps)
# float32 rounding of the latent values and their midpoints moves a tie point by a few ulp of the values involved
TIE_ULPS = 4


@functools.lru_cache(maxsize=128)
def build(levels: int, kind: str, tails: str, value_range: tuple[float, float], std_range: float,
          calibration: str = "none", channels: int = 3) -> DimensionwiseQuantizer:
    q = DimensionwiseQuantizer(levels, value_range, std_range, kind, tails, calibration)
    if calibration != "none":  # fixed data per config: the same quantizer whenever hypothesis replays it
        g = torch.Generator().manual_seed(levels)
        q.fit(torch.randn(4 * levels, channels, generator=g) * torch.linspace(0.5, 2.0, channels) + 0.3)
    return q


LEVELS = st.one_of(st.integers(2, 300), st.integers(2, 4096), st.sampled_from([32768, 65536]))
RANGES = st.sampled_from([(-5.0, 5.0), (-4.0, 6.0), (0.0, 1.0), (-1000.0, 1000.0), (1000.0, 1010.0)])


@st.composite
def shared_quantizers(draw) -> DimensionwiseQuantizer:
    kind, tails = draw(st.sampled_from([("gaussian", "paper"), ("gaussian", "clamped"), ("uniform", "paper")]))
    levels = draw(LEVELS)
    std_range = draw(st.sampled_from([3.0, 2.5, 1.0]))
    if tails == "clamped":  # beyond 1 / P(N(0,1) < -r) levels its outer bins are empty (the constructor says so)
        levels = min(levels, int(0.99 / float(torch.special.ndtr(torch.tensor(-std_range)))))
    try:
        return build(levels, kind, tails, draw(RANGES), std_range)
    except ValueError as e:  # a range float32 cannot split into this many levels (e.g. 65536 over 1000..1010)
        assert "float32" in str(e)
        assume(False)


@st.composite
def fitted_quantizers(draw) -> DimensionwiseQuantizer:
    calibration = draw(st.sampled_from(["standardize", "quantile"]))
    return build(draw(st.integers(2, 256)), "gaussian", "paper", (-5.0, 5.0), 3.0, calibration)


@st.composite
def latents(draw, q: DimensionwiseQuantizer) -> torch.Tensor:
    """[n, C] finite latents of a drawn float dtype: anything finite, values around the range, and values at and
    next to the midpoints and reconstruction values."""
    dtype = draw(st.sampled_from(DTYPES))
    channels = q.num_channels or draw(st.integers(1, 4))
    n = draw(st.integers(1, 16))
    lo, hi = float(q._latent_values.min()), float(q._latent_values.max())
    width = hi - lo
    special = torch.cat([q._midpoints.flatten(), q._latent_values.flatten()])
    special = torch.cat([special, torch.nextafter(special, special + 1), torch.nextafter(special, special - 1)])
    special = special.double().numpy()
    elements = st.one_of(
        st.floats(allow_nan=False, allow_infinity=False),
        st.floats(lo - 0.3 * width - 1, hi + 0.3 * width + 1),
        st.integers(0, len(special) - 1).map(lambda i: float(special[i])),  # not sampled_from: B may be 65536
    )
    x = torch.tensor(draw(st.lists(elements, min_size=n * channels, max_size=n * channels)), dtype=torch.float64)
    big = torch.finfo(dtype).max  # clamp first: the cast itself must not overflow to inf
    return x.clamp(-big, big).to(dtype).view(n, channels)


def lookups(q: DimensionwiseQuantizer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """forward()'s (values, indices), checked to agree across the CPU lookups, quantize() and the binary search."""
    results = []
    for fused in ([True, False] if quantizer_module.numba is not None else [False]):
        variant = copy.copy(q)
        variant.use_fused_kernel = fused
        results.append((*variant(x), variant.quantize(x)))
    values, indices, _ = results[0]
    for other_values, other_indices, quantized in results:
        assert torch.equal(other_indices, indices) and torch.equal(quantized, indices)
        assert torch.equal(other_values, values)
    assert torch.equal(q._search(x), indices)
    return values, indices


def check(q: DimensionwiseQuantizer, x: torch.Tensor) -> None:
    values, indices = lookups(q, x)
    levels = q.levels
    assert indices.dtype == torch.int64 and indices.shape == x.shape and values.dtype == x.dtype
    assert int(indices.min()) >= 0 and int(indices.max()) < levels
    assert torch.equal(values, q.dequantize(indices, dtype=x.dtype))
    first = first_indices(q, x.shape[-1])
    for dtype in (torch.float32, torch.float64):  # round trip; float16 values cannot hold every level apart
        assert torch.equal(q.quantize(q.dequantize(indices, dtype=dtype)), first.gather(0, indices))
    rows = q._latent_values.double()
    for c in range(x.shape[-1]):
        table, xc, ic = rows[c % rows.shape[0]], x[:, c].double(), indices[:, c]
        chosen = table[ic]
        # beyond the outermost values the nearest one is exact: even 1e300 (float32: inf) gets index B-1
        assert (chosen[xc >= table[-1]] == table[-1]).all() and (chosen[xc <= table[0]] == table[0]).all()
        assert (ic[xc > table[-1]] == levels - 1).all() and (ic[xc < table[0]] == 0).all()
        # nearest value: the two candidates around x are the ones just below and just above it
        above = torch.bucketize(xc.contiguous(), table).clamp(1, levels - 1)
        nearest = torch.minimum((xc - table[above - 1]).abs(), (xc - table[above]).abs())
        scale = torch.maximum(xc.abs(), torch.maximum(chosen.abs(), table[above].abs()))
        error = (xc - chosen).abs()
        assert (error <= nearest + TIE_ULPS * EPS32 * scale).all(), (xc, ic, chosen, nearest)
        # inside the values' range: at most half the spacing of the two values that x lies between
        inside = (xc >= table[0]) & (xc <= table[-1])
        spacing = table[above] - table[above - 1]
        assert (error[inside] <= 0.5 * spacing[inside] + TIE_ULPS * EPS32 * scale[inside]).all()


def first_indices(q: DimensionwiseQuantizer, channels: int) -> torch.Tensor:
    """`[B, C]`: the first index that holds each index's value. The identity but where a 'quantile' fit has equal
    values (the bins beyond the clip at +-r all get the value r), whose indices all quantize to the first one."""
    table = q._latent_values
    first = torch.stack([torch.searchsorted(table[c % len(table)], table[c % len(table)]) for c in range(channels)], 1)
    if q.calibration != "quantile":
        assert torch.equal(first, torch.arange(q.levels)[:, None].expand(-1, channels))
    return first


def check_all_indices(q: DimensionwiseQuantizer, channels: int) -> None:
    """dequantize -> quantize is the identity on every index of every channel (see `first_indices`)."""
    all_indices = torch.arange(q.levels)[:, None].expand(-1, channels).contiguous()
    first = first_indices(q, channels)
    for dtype in (torch.float32, torch.float64):
        assert torch.equal(lookups(q, q.dequantize(all_indices, dtype=dtype))[1], first)


@pytest.mark.parametrize("quantizers", [shared_quantizers, fitted_quantizers], ids=["shared", "fitted"])
@SETTINGS
@given(data=st.data())
def test_quantizer_properties(quantizers, data):
    q = data.draw(quantizers())
    x = data.draw(latents(q))  # a fitted quantizer's latents have its C channels
    check(q, x)
    check_all_indices(q, x.shape[-1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_finite_values_of_every_dtype(dtype):
    # the drawn latents reach these only sometimes: the largest finite values of each dtype, every quantizer path
    q = build(64, "gaussian", "paper", (-5.0, 5.0), 3.0)
    big = torch.finfo(dtype).max
    x = torch.tensor([[big, -big, 1.0], [-big, big, -1.0]], dtype=torch.float64).to(dtype)
    indices = lookups(q, x)[1]
    assert indices[:, :2].tolist() == [[63, 0], [0, 63]]
    check(q, x)
