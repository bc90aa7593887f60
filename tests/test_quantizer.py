"""Tests of the dimension-wise quantizer (paper Sec. 3.1, Eq. 1-5) and its exact CPU lookup."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy import stats

from tokenbridge.quantizer import DimensionwiseQuantizer, gaussian_bins, uniform_bins

LEVELS = (2, 8, 16, 64, 256)


@pytest.fixture(autouse=True, params=["numba kernel", "torch ops"])
def cpu_lookup(request, monkeypatch):
    """Every test runs on both CPU lookups: the fused numba kernel and the torch-op fallback."""
    if request.param == "numba kernel":
        pytest.importorskip("numba", reason="the fused kernel needs numba (pip install tokenbridge[fast])")
    monkeypatch.setattr(DimensionwiseQuantizer, "use_fused_kernel", request.param == "numba kernel")
    return request.param
A_MIN, A_MAX, R = -5.0, 5.0, 3.0
LATENT_PER_STD = (A_MAX - A_MIN) / (2 * R)  # latent units per normalised unit (Eq. 1)


def reference_bucketize(q: DimensionwiseQuantizer, x: torch.Tensor) -> torch.Tensor:
    """The definition the quantizer implements: #{float32 latent midpoints of x's channel < float32(x)}."""
    x = x.float()
    mids = q._midpoints
    if mids.shape[0] == 1:
        return torch.bucketize(x, mids[0])
    return torch.stack([torch.bucketize(x[..., c].contiguous(), mids[c]) for c in range(x.shape[-1])], -1)


def brute_force_nearest(q: DimensionwiseQuantizer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1 and Eq. 4 literally, in float64: (argmin index, gap between the two smallest distances)."""
    x_hat = (2 * R * (x.double() - A_MIN) / (A_MAX - A_MIN) - R).clamp(-R, R)
    dist = (x_hat[..., None] - q.reconstruction_values.double()).abs()
    two = dist.topk(2, dim=-1, largest=False).values
    return dist.argmin(-1), two[..., 1] - two[..., 0]


def hard_values(q: DimensionwiseQuantizer) -> torch.Tensor:
    """Latents at, just above and just below every midpoint and reconstruction value, plus extreme values."""
    mids, vals = q._midpoints[0], q._latent_values[0]
    up, down = torch.tensor(float("inf")), torch.tensor(float("-inf"))
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-30, -1e-30, A_MIN, A_MAX, 5.5, -5.5, 7.0, -7.0,
                            100.0, -100.0, 1e30, -1e30, 3.4e38, -3.4e38])
    return torch.cat([mids, torch.nextafter(mids, up), torch.nextafter(mids, down), vals,
                      torch.nextafter(vals, up), torch.nextafter(vals, down), special])


# ---------------------------------------------------------------------------------------------- reconstruction values
@pytest.mark.parametrize("levels", LEVELS)
def test_reconstruction_values_are_truncated_normal_means(levels):
    boundaries = stats.norm.ppf(np.linspace(0, 1, levels + 1))  # Eq. 2, open outer bins
    for tails, lo_hi in (("paper", boundaries), ("clamped", np.clip(boundaries, -R, R))):
        expected = stats.truncnorm.mean(lo_hi[:-1], lo_hi[1:])  # Eq. 3
        edges, values = gaussian_bins(levels, R, tails)
        np.testing.assert_allclose(values.numpy(), expected, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(edges.numpy(), lo_hi, rtol=1e-12, atol=1e-12)
        q = DimensionwiseQuantizer(levels, tails=tails)
        np.testing.assert_allclose(q.reconstruction_values.numpy(), expected, rtol=1e-9, atol=1e-12)
        assert q.reconstruction_values.dtype == torch.float64
        assert torch.all(q.reconstruction_values[1:] > q.reconstruction_values[:-1])
        # Eq. 5: the latent values are the normalised ones mapped back to [a_min, a_max]
        latent = (q.reconstruction_values + R) / (2 * R) * (A_MAX - A_MIN) + A_MIN
        torch.testing.assert_close(q._latent_values[0], latent.float())


def test_outer_values_paper_vs_official_tails():
    assert float(gaussian_bins(64, 3.0, "paper")[1][-1]) == pytest.approx(2.510, abs=5e-4)
    assert float(gaussian_bins(64, 3.0, "clamped")[1][-1]) == pytest.approx(2.437, abs=5e-4)
    assert float(gaussian_bins(64, 3.0, "clamped")[1][0]) == pytest.approx(-2.437, abs=5e-4)
    paper_edges = gaussian_bins(8, 3.0, "paper")[0]
    assert paper_edges[0] == float("-inf") and paper_edges[-1] == float("inf")
    assert gaussian_bins(8, 3.0, "clamped")[0].abs().max() == 3.0


def test_uniform_bins_centres_and_widths():
    edges, values = uniform_bins(16, 3.0)
    torch.testing.assert_close(edges, torch.linspace(-3, 3, 17, dtype=torch.float64))
    torch.testing.assert_close(values, torch.linspace(-3 + 3 / 16, 3 - 3 / 16, 16, dtype=torch.float64))
    q = DimensionwiseQuantizer(16, kind="uniform")
    widths = q.bin_width_at(torch.arange(1, 15))
    torch.testing.assert_close(widths, torch.full((14,), 6 / 16 * LATENT_PER_STD), rtol=1e-5, atol=1e-6)
    assert torch.isinf(q.bin_width_at(torch.tensor([0, 15]))).all()


# ---------------------------------------------------------------------------------------------- nearest value (Eq. 4)
@pytest.mark.parametrize("kind,tails", [("gaussian", "paper"), ("gaussian", "clamped"), ("uniform", "paper")])
@pytest.mark.parametrize("levels", LEVELS)
def test_indices_are_the_nearest_reconstruction_value(levels, kind, tails):
    torch.manual_seed(levels)
    q = DimensionwiseQuantizer(levels, kind=kind, tails=tails)
    x = torch.cat([torch.randn(4000) * 2.5, torch.rand(2000) * 20 - 10, hard_values(q)])
    indices = q.quantize(x[:, None])[:, 0]
    assert indices.dtype == torch.int64 and indices.min() >= 0 and indices.max() < levels
    # exactly the float32 midpoint count, on the lookup path and on the binary-search path of other devices
    assert torch.equal(indices, reference_bucketize(q, x))
    assert torch.equal(q._search(x[:, None])[:, 0], indices)
    # and the literal argmin of Eq. 4 after the clip of Eq. 1, except at float-rounding ties between two levels
    nearest, gap = brute_force_nearest(q, x)
    differ = indices != nearest
    assert (gap[differ] < 1e-5).all(), x[differ][gap[differ] >= 1e-5]
    assert differ.float().mean() < 0.2  # only the deliberately placed at-midpoint values may differ


def test_many_levels_need_several_comparisons_and_stay_exact():
    for kind in ("gaussian", "uniform"):
        q = DimensionwiseQuantizer(1024, kind=kind)
        assert q._cell_mids.shape[0] > 1  # cells of the 16-bit key hold more than one midpoint
        x = torch.cat([torch.randn(20000) * 2, hard_values(q)])
        assert torch.equal(q.quantize(x[:, None])[:, 0], reference_bucketize(q, x))


@pytest.mark.parametrize("calibration", ["none", "quantile"])
def test_large_input_uses_every_chunk_and_thread(calibration):
    torch.manual_seed(0)
    q = DimensionwiseQuantizer(64, calibration=calibration)
    x = torch.randn(3, 50_001, 5) * 1.6  # several 32768-element chunks plus a short last one
    if calibration != "none":
        q.fit(x)
    x[1, 7, 2] = float(q._midpoints[0, 20])
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # uneven slices per thread; channel 0 must stay at every slice's start
    try:
        values, indices = q(x)
        assert torch.equal(q.quantize(x), indices)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(indices, reference_bucketize(q, x))
    channel = torch.arange(x.shape[-1]).expand_as(indices)
    assert torch.equal(values, q._latent_values[channel % q._latent_values.shape[0], indices])


def test_concurrent_calls_from_python_threads():
    from concurrent.futures import ThreadPoolExecutor

    q = DimensionwiseQuantizer(16)
    inputs = [torch.randn(20_000, 4, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(q, inputs))
    for x, (values, indices) in zip(inputs, results):
        assert torch.equal(indices, reference_bucketize(q, x))


# ---------------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
@pytest.mark.parametrize("levels", [8, 64])
def test_round_trip_error_is_bounded_by_the_local_bins(levels, kind):
    q = DimensionwiseQuantizer(levels, kind=kind)
    x = torch.linspace(A_MIN, A_MAX, 20001)[:, None]
    x_hat, indices = q(x)
    error = (x_hat - x).abs()[:, 0]
    width = q.bin_width_at(indices)[:, 0]
    assert (error <= width + 1e-6).all()  # each reconstruction value lies inside its own bin
    # Nearest value: the error is at most half the spacing of the two levels that x lies between.
    vals = q._latent_values[0]
    inner = (x[:, 0] >= vals[0]) & (x[:, 0] <= vals[-1])
    j = (torch.bucketize(x[inner, 0], vals) - 1).clamp(0, levels - 2)
    assert (error[inner] <= 0.5 * (vals[j + 1] - vals[j]) + 1e-6).all()
    if kind == "uniform":  # symmetric bins: half the bin width, in the range, for every bin but the open outer ones
        finite = torch.isfinite(width)
        assert (error[finite] <= 0.5 * width[finite] + 1e-6).all()
    assert torch.equal(q.dequantize(indices), x_hat)


def test_equal_bin_occupancy_on_gaussian_latents():
    torch.manual_seed(1)
    z = torch.randn(400_000, 1, dtype=torch.float64)
    for levels in (16, 64):
        q = DimensionwiseQuantizer(levels)
        counts = torch.bincount(q.quantize((z * LATENT_PER_STD).float())[:, 0], minlength=levels).numpy()
        # Bins of the nearest-value rule are delimited by the midpoints, not by the equal-probability boundaries of
        # Eq. 2, so their N(0,1) mass differs slightly from 1/B (most in the tails): test against the exact mass...
        mids = (q._midpoints[0].double() / LATENT_PER_STD).numpy()
        mass = np.diff(np.concatenate([[0.0], stats.norm.cdf(mids), [1.0]]))
        assert stats.chisquare(counts, mass * counts.sum()).pvalue > 1e-4
        # ... and that mass against 1/B: equal within 25% everywhere, 3% but for the 2 outer bins at each end
        deviation = np.abs(mass * levels - 1)
        assert deviation.max() < 0.25 and deviation[2:-2].max() < 0.03
        assert np.abs(counts / counts.sum() * levels - 1)[levels // 4 : -levels // 4].max() < 0.05


def test_uniform_variant_equal_occupancy_on_uniform_latents():
    q = DimensionwiseQuantizer(16, kind="uniform")
    x = torch.linspace(A_MIN, A_MAX, 160_001)[:-1, None]
    counts = torch.bincount(q.quantize(x)[:, 0], minlength=16)
    assert (counts - 10_000).abs().max() <= 2


# ---------------------------------------------------------------------------------------------- calibration
def synthetic_latents(n: int = 20_000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mean = torch.tensor([1.0, -1.5, 0.0, 2.0])
    std = torch.tensor([0.3, 1.0, 2.5, 0.7])
    return torch.randn(n, 4, generator=g) * std + mean


@pytest.mark.parametrize("calibration", ["standardize", "quantile"])
def test_calibrated_quantizers_fit_and_beat_the_fixed_map(calibration):
    train, test = synthetic_latents(seed=0), synthetic_latents(seed=1).reshape(200, 100, 4)
    fixed = DimensionwiseQuantizer(16)
    q = DimensionwiseQuantizer(16, calibration=calibration)
    with pytest.raises(ValueError, match="fit"):
        q.quantize(test)
    with pytest.raises(ValueError, match="fit"):
        q.dequantize(torch.zeros(2, 4, dtype=torch.long))
    assert q.fit(train) is q and q.num_channels == 4 and q.fitted
    mse = lambda quantizer: float((quantizer(test)[0] - test).pow(2).mean())  # noqa: E731
    assert mse(q) < 0.5 * mse(fixed)
    indices = q.quantize(test)
    assert torch.equal(indices, reference_bucketize(q, test))
    assert torch.equal(q._search(test), indices)
    values = q.dequantize(indices)
    expected = torch.stack([q._latent_values[c][indices[..., c]] for c in range(4)], -1)
    assert torch.equal(values, expected) and torch.equal(q(test)[0], values)
    with pytest.raises(ValueError, match="fitted on 4 channels"):
        q.quantize(torch.randn(3, 5))
    with pytest.raises(ValueError, match="fitted on 4 channels"):
        q.dequantize(torch.zeros(3, 5, dtype=torch.long))
    # a fresh module takes the fitted per-channel buffers from a state dict
    fresh = DimensionwiseQuantizer(16, calibration=calibration)
    fresh.load_state_dict(q.state_dict())
    assert fresh.num_channels == 4
    assert torch.equal(fresh.quantize(test), indices) and torch.equal(fresh.dequantize(indices), values)


def test_quantile_bins_are_equiprobable_on_the_fitted_data():
    train = synthetic_latents(40_000)
    q = DimensionwiseQuantizer(16, calibration="quantile").fit(train)
    indices = q.quantize(train)
    fixed = DimensionwiseQuantizer(16).quantize(train)
    for c in range(4):
        share = torch.bincount(indices[:, c], minlength=16).double() / len(train) * 16
        # Boundaries at the quantiles, values at the conditional means: the nearest-value bins (between midpoints)
        # are equiprobable but for the outermost ones, which lose some mass to their neighbours.
        assert (share - 1).abs().max() < 0.25 and (share - 1)[2:-2].abs().max() < 0.06, (c, share)
        fixed_share = torch.bincount(fixed[:, c], minlength=16).double() / len(train) * 16
        assert (fixed_share - 1).abs().max() > 0.5  # the fixed map of Eq. 1 is far from it on these latents
    with pytest.raises(ValueError, match="at least"):
        DimensionwiseQuantizer(16, calibration="quantile").fit(train[:10])
    with pytest.raises(ValueError, match="calibration"):
        DimensionwiseQuantizer(16).fit(train)
    with pytest.raises(ValueError, match="NaN"):
        DimensionwiseQuantizer(16, calibration="standardize").fit(torch.full((100, 4), float("nan")))


def test_standardize_makes_gaussian_latents_equiprobable():
    q = DimensionwiseQuantizer(8, calibration="standardize").fit(synthetic_latents(40_000))
    indices = q.quantize(synthetic_latents(40_000, seed=3))
    for c in range(4):
        share = torch.bincount(indices[:, c], minlength=8).double() / 40_000 * 8
        assert (share - 1).abs().max() < 0.25  # the nearest-value bins of B=8 differ from 1/8 by up to 19%


# ---------------------------------------------------------------------------------------------- input handling
def test_errors():
    q = DimensionwiseQuantizer(8)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for n in (10, 70_000):  # one chunk and several (threaded) chunks
            x = torch.randn(n, 2)
            x[n // 2, 1] = bad
            with pytest.raises(ValueError, match="NaN or inf"):
                q.quantize(x)
            with pytest.raises(ValueError, match="NaN or inf"):
                q(x)
    with pytest.raises(ValueError, match="NaN or inf"):
        q(torch.tensor([[1.0, float("inf")]], dtype=torch.float16))
    huge = torch.full((100, 3), 3e38)  # finite, but its sum overflows: must not be mistaken for inf
    assert (q.quantize(huge) == 7).all()
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        q.dequantize(torch.tensor([[0, 8]]))
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        q.dequantize(torch.tensor([[-1, 3]]))
    for dtype in (torch.float32, torch.float16, torch.bool):
        with pytest.raises(ValueError, match="integer"):
            q.dequantize(torch.zeros(2, 3, dtype=dtype))
    with pytest.raises(ValueError, match="float"):
        q.quantize(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="scalar"):
        q.quantize(torch.tensor(1.0))
    with pytest.raises(ValueError, match="scalar"):
        q.dequantize(torch.tensor(1))
    for kwargs in (dict(levels=1), dict(levels=0), dict(levels=2.5), dict(kind="lloyd"), dict(tails="open"),
                   dict(calibration="minmax"), dict(value_range=(5, -5)), dict(std_range=0)):
        with pytest.raises(ValueError):
            DimensionwiseQuantizer(**kwargs)


@pytest.mark.parametrize("shape", [(4,), (7, 4), (2, 3, 5, 4), (1, 1, 1, 1, 4), (0, 4), (3, 1)])
def test_any_leading_shape(shape):
    torch.manual_seed(0)
    q = DimensionwiseQuantizer(16)
    x = torch.randn(shape) * 2
    values, indices = q(x)
    assert values.shape == indices.shape == x.shape
    assert torch.equal(indices, reference_bucketize(q, x))
    assert torch.equal(q.dequantize(indices), values) and torch.equal(q.quantize(x), indices)


def test_non_contiguous_and_grad_inputs():
    q = DimensionwiseQuantizer(16)
    x = torch.randn(4, 6, 5) * 2
    view = x.permute(2, 0, 1)  # [5, 4, 6], C = 6
    assert torch.equal(q.quantize(view), q.quantize(view.contiguous()))
    g = x.clone().requires_grad_()
    values, indices = q(g)
    assert not values.requires_grad and torch.equal(indices, q.quantize(x))
    for dtype in (torch.int32, torch.uint8):
        assert torch.equal(q.dequantize(indices.to(dtype)), values)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_input_dtypes(dtype):
    torch.manual_seed(0)
    q = DimensionwiseQuantizer(64)
    x = (torch.randn(70_000, 2) * 1.6).to(dtype)
    values, indices = q(x)
    assert values.dtype == dtype and indices.dtype == torch.int64
    assert torch.equal(indices, q.quantize(x.float()))  # the definition works on float32 latents
    assert torch.equal(values, q._latent_values[0][indices].to(dtype))
    assert q.dequantize(indices, dtype=dtype).dtype == dtype


def test_state_dict_config_and_module_moves():
    q = DimensionwiseQuantizer(32, value_range=(-4, 6), std_range=2.5, tails="clamped")
    state = q.state_dict()
    assert {"reconstruction_values", "scale", "shift", "fitted_channels"} <= set(state)
    torch.testing.assert_close(state["reconstruction_values"], gaussian_bins(32, 2.5, "clamped")[1])
    rebuilt = DimensionwiseQuantizer(**q.config())
    rebuilt.load_state_dict(state)
    x = torch.randn(100, 3) * 3 + 1
    assert torch.equal(rebuilt(x)[1], q(x)[1]) and "levels=32" in repr(q)
    # .half() / .to(dtype) keep the float64 buffers and float32 tables: the bins must not get coarser
    half = copy.deepcopy(q).half()
    assert half.reconstruction_values.dtype == torch.float64 and half._latent_values.dtype == torch.float32
    assert torch.equal(half(x)[1], q(x)[1])
    # "meta": shapes only, and back through to_empty + load_state_dict
    meta = copy.deepcopy(q).to("meta")
    assert meta._cell_base.is_meta and meta.scale.is_meta
    values, indices = meta(x.to("meta"))
    assert values.is_meta and indices.shape == x.shape and meta.dequantize(indices).shape == x.shape
    restored = meta.to_empty(device="cpu")
    restored.load_state_dict(state)
    assert torch.equal(restored(x)[1], q(x)[1])
    # a fitted quantizer moves too (its per-channel tables follow)
    fitted = DimensionwiseQuantizer(16, calibration="standardize").fit(synthetic_latents(2000)).to("meta")
    assert fitted(torch.randn(2, 4, device="meta"))[1].shape == (2, 4)


# ---------------------------------------------------------------------------------------------- hardening
@pytest.mark.parametrize("calibration", ["none", "quantile"])
@pytest.mark.parametrize("levels", [2, 64, 300, 1024])  # uint8 and int32 tables, one and several comparisons
def test_finite_values_beyond_float32_get_the_outer_values(levels, calibration):
    # Compared as float32, a finite float64 beyond its range is +-inf: it must still get the nearest (outermost)
    # reconstruction value, on both CPU lookups, the binary search, and in any float dtype at its largest values.
    q = DimensionwiseQuantizer(levels, calibration=calibration)
    if calibration != "none":
        q.fit(torch.randn(4 * levels, 3) * 1.6)
    top, bottom = q._latent_values[:, -1].expand(3), q._latent_values[:, 0].expand(3)
    huge = torch.tensor([1e300, 1e39, 3.5e38, float(np.finfo(np.float64).max), 3.4028234663852886e38 * (1 + 1e-15)],
                        dtype=torch.float64)[:, None].expand(-1, 3)
    for x, dtype in ((huge, torch.float64), (huge[:2].float().clamp(-3e38, 3e38), torch.float32),
                     (torch.full((2, 3), 65504.0, dtype=torch.float16), torch.float16),
                     (torch.full((2, 3), 3.38e38, dtype=torch.bfloat16), torch.bfloat16)):
        for sign, index, value in ((1, levels - 1, top), (-1, 0, bottom)):
            big = torch.cat([torch.randn(70_000, 3, dtype=dtype), sign * x])  # several chunks, threads too
            values, indices = q(big)
            assert (indices[70_000:] == index).all() and (q.quantize(big)[70_000:] == index).all(), (dtype, sign)
            assert torch.equal(values[70_000:], value.to(dtype).expand_as(values[70_000:]))
            assert torch.equal(q._search(big), indices) and torch.equal(indices, reference_bucketize(q, big))
    for bad in (float("nan"), float("inf"), float("-inf")):  # non-finite still raises, beside huge finite values
        x = torch.cat([huge, torch.full((1, 3), bad, dtype=torch.float64)])
        for fn in (q.quantize, q, q._search):
            with pytest.raises(ValueError, match="NaN or inf"):
                fn(x)


def test_limits_and_argument_checks():
    with pytest.raises(ValueError, match="levels .* at most 65536"):
        DimensionwiseQuantizer(2**24)  # would build 16 GB of tables
    for levels in (True, False, 64.0, 2.5, "64", None):
        with pytest.raises(ValueError, match="levels"):
            DimensionwiseQuantizer(levels)
    assert DimensionwiseQuantizer(np.int64(8)).levels == 8 and DimensionwiseQuantizer(torch.tensor(8)).levels == 8
    for value_range in ((-float("inf"), 5), (0, float("nan")), (1,), (1, 2, 3), "ab", None):
        with pytest.raises(ValueError, match="value_range"):
            DimensionwiseQuantizer(value_range=value_range)
    for std_range in (float("inf"), float("nan"), -1, "x"):
        with pytest.raises(ValueError, match="std_range"):
            DimensionwiseQuantizer(std_range=std_range)
    # official tails: beyond 1 / P(N(0,1) < -3) ~ 740.8 levels, the clamped outer bins have no mass (NaN values)
    DimensionwiseQuantizer(740, tails="clamped")
    with pytest.raises(ValueError, match="at most about 740 levels"):
        DimensionwiseQuantizer(741, tails="clamped")
    # float32 tables: ranges that it cannot split into the levels, or hold at all
    for value_range, std_range, problem in (((1e6, 1e6 + 1e-3), 3.0, "resolve"), ((-1e39, 1e39), 3.0, "range"),
                                             ((-1e308, 1e308), 3.0, "range"), ((-5, 5), 1e-300, "range")):
        with pytest.raises(ValueError, match=f"float32.*{problem}|{problem}.*float32"):
            DimensionwiseQuantizer(value_range=value_range, std_range=std_range)


@pytest.mark.parametrize("kwargs", [dict(levels=65536), dict(levels=65536, kind="uniform"),
                                    dict(levels=256, value_range=(1000, 1001))])
def test_tables_too_large_use_the_binary_search(kwargs):
    # More than MAX_DEPTH comparisons per cell: no cell tables, the CPU searches as other devices do (same integers)
    q = DimensionwiseQuantizer(**kwargs)
    assert q._cell_base is None and q._cell_mids is None
    levels = q.levels
    all_indices = torch.arange(levels)[:, None]
    assert torch.equal(q.quantize(q.dequantize(all_indices)), all_indices)  # every value quantizes back to itself
    a_min, a_max = q.value_range
    x = torch.cat([torch.rand(5000) * 1.4 * (a_max - a_min) + a_min - 0.2 * (a_max - a_min), hard_values(q)])
    values, indices = q(x[:, None])
    assert torch.equal(indices[:, 0], reference_bucketize(q, x)) and torch.equal(values, q.dequantize(indices))
    big = torch.tensor([[1e300], [-1e300]], dtype=torch.float64)
    assert q.quantize(big)[:, 0].tolist() == [levels - 1, 0]
    assert copy.deepcopy(q).to("meta")(x[:, None].to("meta"))[1].shape == (len(x), 1)


def other_state(**kwargs) -> dict:
    calibration = kwargs.pop("fit", None)
    q = DimensionwiseQuantizer(**{"levels": 64, **kwargs, **({"calibration": calibration} if calibration else {})})
    return q.fit(synthetic_latents(2000)).state_dict() if calibration else q.state_dict()


@pytest.mark.parametrize("calibration", ["none", "standardize", "quantile"])
def test_load_state_dict_rejects_other_configs_before_replacing_anything(calibration):
    q = DimensionwiseQuantizer(64, calibration=calibration)
    if calibration != "none":
        q.fit(synthetic_latents(3000, seed=5))
    x = synthetic_latents(500, seed=6)
    before, indices = copy.deepcopy(q.state_dict()), q.quantize(x)
    mismatches = [("levels", other_state(levels=32)), ("levels", other_state(levels=128, fit="quantile")),
                  ("kind/tails", other_state(kind="uniform")), ("kind/tails", other_state(tails="clamped"))]
    if calibration != "standardize":  # a 'standardize' fit replaces the map of Eq. 1 by its own
        mismatches += [("value_range/std_range", other_state(value_range=(-4, 6))),
                       ("value_range/std_range", other_state(std_range=2.5))]
    for other in {"none", "standardize", "quantile"} - {calibration}:
        if other != "none":
            mismatches.append(("calibration", other_state(fit=other)))
    corrupt = copy.deepcopy(before)
    corrupt["scale"] = corrupt["scale"] * float("nan")
    negative = {**copy.deepcopy(before), "scale": -before["scale"]}
    mismatches += [("NaN or inf", corrupt), ("scale must be > 0", negative),
                   ("inconsistent" if calibration != "none" else "calibration",
                    {**before, "fitted_channels": torch.tensor(7)}),
                   ("fitted_channels", {**before, "fitted_channels": torch.tensor([1, 2])}),
                   ("must be a tensor", {**before, "scale": [1.0]})]
    parent = torch.nn.Module()
    parent.quant = q
    for what, state in mismatches:
        with pytest.raises(ValueError, match=what):
            q.load_state_dict(state)
        with pytest.raises(ValueError, match=what):  # as a submodule (prefixed keys) too
            parent.load_state_dict({f"quant.{k}": v for k, v in state.items()})
        assert all(torch.equal(v, before[k]) for k, v in q.state_dict().items()), what
        assert torch.equal(q.quantize(x), indices), what
    # what does match still loads: the same state, into a fresh module, and strict=False with keys missing
    q.load_state_dict(before)
    fresh = DimensionwiseQuantizer(64, calibration=calibration)
    fresh.load_state_dict(before)
    assert torch.equal(fresh.quantize(x), indices)
    q.load_state_dict({k: v for k, v in before.items() if k != "fitted_channels"}, strict=False)
    assert torch.equal(q.quantize(x), indices)
    if calibration != "none":  # an unfitted state of the same map is the same (unfitted) quantizer
        DimensionwiseQuantizer(64, calibration=calibration).load_state_dict(other_state())
