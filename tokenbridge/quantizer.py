"""Post-training dimension-wise quantization (TokenBridge Sec. 3.1, Eq. 1-5).

Every latent channel is quantized on its own with the same B levels:

1. map [a_min, a_max] linearly to [-r, r] and clip                                  (Eq. 1)
2. split N(0, 1) into B bins of equal probability                                   (Eq. 2)
3. each bin's reconstruction value gamma_i is the mean of N(0, 1) inside the bin   (Eq. 3)
4. a value's index is that of the nearest reconstruction value                      (Eq. 4)
5. dequantization maps gamma back to the latent range                               (Eq. 5)

Because steps 1 and 4 are monotone, the index of a latent is the number of midpoints between consecutive
reconstruction values, mapped back to latent scale (float32), that lie below the latent (as float32): a
`bucketize` of the *raw* latent. The clip in Eq. 1 needs no pass of its own: every gamma lies inside [-r, r], so a
clipped value and the unclipped one have the same nearest gamma (the outermost one). On the CPU that count comes
from small lookup tables keyed by the float's top 16 bits plus one comparison (`_cell_tables`), which gives the
same integers as the binary search at several times its speed; other devices use `searchsorted`. With numba
installed (`pip install tokenbridge[fast]`) the CPU lookup is one fused pass per element (`_fused_lookup`);
without it, a few torch ops per cache-sized chunk compute the same integers.

Usage::

    quantizer = DimensionwiseQuantizer(levels=64)
    latents_hat, indices = quantizer(latents)   # latents [..., C] -> indices [..., C] in [0, 64)
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

try:  # optional (`pip install tokenbridge[fast]`): one fused pass per element instead of ~8 torch ops per chunk
    import numba
except ImportError:
    numba = None

KINDS = ("gaussian", "uniform")
TAILS = ("paper", "official")
CALIBRATIONS = ("none", "standardize", "quantile")


def gaussian_bins(levels: int, std_range: float = 3.0, tails: str = "paper") -> tuple[torch.Tensor, torch.Tensor]:
    """Equal-probability bins of N(0, 1) and the conditional mean inside each bin (paper Eq. 2-3).

    Returns (boundaries [B+1], reconstruction_values [B]) in float64. With tails="paper" the outer boundaries are
    -inf/+inf; with tails="official" every boundary is clamped to [-std_range, std_range] before the means are
    taken (the official implementation's behaviour: outer values +-2.437 for B=64 instead of +-2.510).
    """
    probs = torch.linspace(0.0, 1.0, levels + 1, dtype=torch.float64)
    boundaries = torch.special.ndtri(probs)  # -inf and +inf at the ends
    if tails == "official":
        boundaries = boundaries.clamp(-std_range, std_range)
    lo, hi = boundaries[:-1], boundaries[1:]
    density = torch.exp(-0.5 * boundaries.clamp(-40, 40) ** 2) / math.sqrt(2 * math.pi)  # phi(+-inf) = 0
    mass = torch.special.ndtr(hi) - torch.special.ndtr(lo)
    values = (density[:-1] - density[1:]) / mass
    return boundaries, values


def uniform_bins(levels: int, std_range: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """B equal-width bins over [-r, r] and their centres. Returns (boundaries [B+1], values [B]) in float64."""
    boundaries = torch.linspace(-std_range, std_range, levels + 1, dtype=torch.float64)
    return boundaries, 0.5 * (boundaries[:-1] + boundaries[1:])


# CPU lookup: elements per step. Working buffers stay in L2 cache, and torch runs ops this small on the calling
# thread (its parallel grain is 32768), so there is no thread hand-off per op, which is slow on a busy machine.
_CHUNK = 1 << 15
# A float32 is looked up by its top 16 bits (sign, exponent, 7 mantissa bits): key = (int32 bits >> 16) + 2**15.
_KEY_SHIFT = 16
_KEYS = 1 << (32 - _KEY_SHIFT)  # table entries per row
_KEY_OFFSET = _KEYS // 2


def _cell_tables(midpoints: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables that count the midpoints below a float32 x from x's top 16 bits and at most a few comparisons.

    Every 16-bit key covers a closed interval [lo, hi] of float32 values (same sign, exponent and leading
    mantissa bits). For x in that interval, #{m < x} = #{m < lo} + #{m in [lo, x)}, and the midpoints that can lie
    in [lo, x) are the ones in [lo, hi): so count(x) = base[key] + sum_j (cell_mids[j, key] < x), exactly, with no
    arithmetic on x. Keys are relative cells, so they are finest where the Gaussian bins are: one comparison
    (depth 1) suffices up to B = 256 levels; more levels get more comparisons, still exact.

    Args:
        midpoints: `[R, B-1]` float32, ascending along each row (one row per channel, or one shared row).
    Returns:
        base `[R * 2**16]` (uint8 for B <= 256, else int32) and cell_mids `[depth, R * 2**16]` float32 (+inf where
        a cell has fewer midpoints than depth). Row r's entries start at r * 2**16.
    """
    # Built with numpy: 2**16-element torch ops would each start a thread pool, which costs more than the work.
    mids = midpoints.detach().cpu().float().numpy()
    rows, count = mids.shape
    top = np.arange(-_KEY_OFFSET, _KEY_OFFSET, dtype=np.int32) << _KEY_SHIFT  # the bits of each key's floats
    ends = np.stack([top.view(np.float32), (top | ((1 << _KEY_SHIFT) - 1)).view(np.float32)])
    lo, hi = ends.min(0), ends.max(0)
    finite = np.isfinite(lo) & np.isfinite(hi)  # the inf/NaN keys: any entry will do, finite input never uses them
    lo, hi = np.where(finite, lo, 0), np.where(finite, hi, 0)
    base = np.stack([np.searchsorted(row, lo) for row in mids])  # midpoints below the whole cell
    inside = np.stack([np.searchsorted(row, hi) for row in mids]) - base  # midpoints in [lo, hi)
    depth = max(int(inside.max()), 1)
    padded = np.concatenate([mids, np.full((rows, depth), np.inf, dtype=np.float32)], 1)
    cell_mids = np.stack([np.take_along_axis(padded, base + j, 1).reshape(-1) for j in range(depth)])
    base = base.reshape(-1).astype(np.uint8 if count < 256 else np.int32)
    return torch.from_numpy(base), torch.from_numpy(cell_mids)


def _fused_lookup(x, base, cell_mids, latent_values, channels, indices, values) -> bool:
    """The `_cell_tables` lookup of a float32 slice `x` (starting at channel 0) in one pass: writes the int64
    `indices` and, when `values` is non-empty, the float32 latents at them. Returns False if x holds NaN or inf."""
    rows, depth = latent_values.shape[0], cell_mids.shape[0]
    with_values = values.size > 0
    bits = x.view(np.int32)
    nonfinite = 0
    for i in range(x.size):
        nonfinite |= (bits[i] & 0x7F800000) == 0x7F800000  # exponent all ones: inf or NaN
        row = i % channels if rows > 1 else 0
        key = (bits[i] >> _KEY_SHIFT) + _KEY_OFFSET + row * _KEYS
        index = np.int64(base[key])
        for j in range(depth):
            index += np.int64(cell_mids[j, key] < x[i])
        indices[i] = index
        if with_values:
            values[i] = latent_values[row, index]
    return nonfinite == 0


def _fused_lookup_shared(x, base, cell_mids, latent_values, channels, indices, values) -> bool:
    """`_fused_lookup` for the default quantizer (one shared row, one comparison per value, with values): the
    same integers, about 20% faster without the per-element branches."""
    bits, mids, row_values = x.view(np.int32), cell_mids[0], latent_values[0]
    nonfinite = 0
    for i in range(x.size):
        nonfinite |= (bits[i] & 0x7F800000) == 0x7F800000
        key = (bits[i] >> _KEY_SHIFT) + _KEY_OFFSET
        index = np.int64(base[key]) + np.int64(mids[key] < x[i])
        indices[i] = index
        values[i] = row_values[index]
    return nonfinite == 0


if numba is not None:
    # nogil: the threads of `_lookup_fused` each run one on their own slice; cache: compiled once per install
    _fused_lookup = numba.njit(nogil=True, cache=True)(_fused_lookup)
    _fused_lookup_shared = numba.njit(nogil=True, cache=True)(_fused_lookup_shared)


class DimensionwiseQuantizer(nn.Module):
    """Per-channel scalar quantizer of continuous VAE latents (channel-last: `x` is `[..., C]`).

    Args:
        levels: B, the number of levels per channel (>= 2; indices lie in [0, B)).
        value_range: (a_min, a_max), the latent range mapped to [-std_range, std_range] (paper: (-5, 5)).
        std_range: r, the half-width of the normalised range in standard deviations (paper: 3).
        kind: "gaussian" (equal-probability N(0,1) bins, paper) or "uniform" (equal-width bins over [-r, r]).
        tails: "paper" (open outer bins) or "official" (boundaries clamped to +-r, as the released code).
        calibration: a data-calibrated option that the paper does not have, fitted by `fit()` on real latents:
            "standardize" replaces the fixed map of Eq. 1 by a per-channel (x - mean_c) / std_c, so that the
            N(0,1) bins are equiprobable on latents that really are Gaussian but not unit-variance;
            "quantile" keeps Eq. 1 but puts each channel's boundaries at its empirical quantiles and its
            reconstruction values at the empirical conditional means (so that the bins are close to equiprobable on
            the data; with nearest-value indices the outermost bins hold somewhat less).
    """

    def __init__(
        self,
        levels: int = 64,
        value_range: tuple[float, float] = (-5.0, 5.0),
        std_range: float = 3.0,
        kind: str = "gaussian",
        tails: str = "paper",
        calibration: str = "none",
    ) -> None:
        super().__init__()
        if int(levels) != levels or levels < 2:
            raise ValueError(f"levels (B) must be an integer >= 2, got {levels}")
        a_min, a_max = (float(v) for v in value_range)
        if not a_min < a_max:
            raise ValueError(f"value_range must satisfy a_min < a_max, got {value_range}")
        if not std_range > 0:
            raise ValueError(f"std_range must be > 0, got {std_range}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if tails not in TAILS:
            raise ValueError(f"tails must be one of {TAILS}, got {tails!r}")
        if calibration not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")
        self.levels = int(levels)
        self.value_range = (a_min, a_max)
        self.std_range = float(std_range)
        self.kind = kind
        self.tails = tails
        self.calibration = calibration

        if kind == "gaussian":
            _, values = gaussian_bins(self.levels, self.std_range, tails)
        else:
            _, values = uniform_bins(self.levels, self.std_range)
        # Eq. 1 as x_hat = scale * x + shift; shape [1] (shared) or [C] once a per-channel calibration is fitted.
        scale = 2 * self.std_range / (a_max - a_min)
        self.register_buffer("scale", torch.tensor([scale], dtype=torch.float64))
        self.register_buffer("shift", torch.tensor([-a_min * scale - self.std_range], dtype=torch.float64))
        # Normalised-space reconstruction values gamma: [B] shared, or [C, B] after a quantile fit.
        self.register_buffer("reconstruction_values", values)
        # C once fit() has run on a per-channel calibration, 0 otherwise (saved so a loaded module knows it). It is
        # mirrored in a Python int so that no call has to read a tensor (a device sync, impossible on "meta").
        self.register_buffer("fitted_channels", torch.tensor(0))
        self._channels = 0
        self._refresh_lookup()

    # CPU lookup by the numba kernel when numba is installed; False (on the class or an instance) forces the
    # torch-op lookup, which gives the same integers more slowly
    use_fused_kernel = True

    # ------------------------------------------------------------------ configuration
    @property
    def num_channels(self) -> int | None:
        """C for a fitted (per-channel) quantizer, None when every channel shares the same map."""
        return self._channels or None

    @property
    def fitted(self) -> bool:
        return self.calibration == "none" or self._channels > 0

    def config(self) -> dict:
        return dict(levels=self.levels, value_range=list(self.value_range), std_range=self.std_range,
                    kind=self.kind, tails=self.tails, calibration=self.calibration)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config().items())

    def _refresh_lookup(self) -> None:
        """Derive the latent-scale tables from (scale, shift, reconstruction_values)."""
        values = self.reconstruction_values
        if values.dim() == 1:
            values = values.expand(self.scale.numel(), -1)
        scale, shift = self.scale[:, None].double(), self.shift[:, None].double()
        latent_values = (values.double() - shift) / scale  # Eq. 5, one row per channel (or one shared row)
        midpoints = (0.5 * (latent_values[:, 1:] + latent_values[:, :-1])).float()
        rows, device = latent_values.shape[0], values.device
        self._latent_values = latent_values.float().contiguous()  # [R, B]
        self._flat_latent_values = self._latent_values.reshape(-1)
        self._midpoints = midpoints.contiguous()  # [R, B-1]
        base, cell_mids = _cell_tables(midpoints)
        self._cell_base, self._cell_mids = base.to(device), cell_mids.to(device)
        self._key_offsets = torch.arange(rows, dtype=torch.int32, device=device) * _KEYS + _KEY_OFFSET
        self._value_offsets = torch.arange(rows, dtype=torch.int64, device=device) * self.levels

    _DERIVED = ("_latent_values", "_flat_latent_values", "_midpoints", "_cell_base", "_cell_mids", "_key_offsets",
                "_value_offsets")
    _FLOAT64 = ("scale", "shift", "reconstruction_values")

    def _apply(self, fn, recurse=True):
        # Buffers and derived tables follow device moves, but .half()/.to(dtype) must not coarsen the bins: the
        # float64 buffers and the float32 tables keep their dtypes.
        before = {name: getattr(self, name) for name in self._FLOAT64}
        super()._apply(fn, recurse)
        for name, tensor in before.items():
            if getattr(self, name).dtype != tensor.dtype:
                setattr(self, name, tensor.to(getattr(self, name).device))
        device = self.scale.device
        for name in self._DERIVED:  # from "meta" (to_empty) only the shapes can move; load_state_dict refills them
            table = getattr(self, name)
            setattr(self, name, torch.empty_like(table, device=device) if table.is_meta else table.to(device))
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A fitted quantizer has per-channel buffers; resize ours so that it can be loaded into a fresh module.
        for name in ("scale", "shift", "reconstruction_values"):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                setattr(self, name, torch.empty(state_dict[key].shape, dtype=torch.float64, device=self.scale.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "fitted_channels" in state_dict:
            self._channels = int(state_dict[prefix + "fitted_channels"])
        if self.scale.device.type != "meta":
            self._refresh_lookup()

    # ------------------------------------------------------------------ calibration
    @torch.no_grad()
    def fit(self, latents: torch.Tensor) -> "DimensionwiseQuantizer":
        """Fit the per-channel calibration on a sample of latents `[..., C]` (channel-last). Returns self."""
        if self.calibration == "none":
            raise ValueError("fit() needs calibration='standardize' or 'quantile'")
        if latents.dim() < 2:
            raise ValueError(f"latents must be [..., C] with at least 2 dims, got shape {tuple(latents.shape)}")
        self._check_finite(latents)
        x = latents.reshape(-1, latents.shape[-1]).double().cpu()
        if x.shape[0] < 2 * self.levels:
            raise ValueError(
                f"fit needs at least {2 * self.levels} latent vectors for B={self.levels}, got {x.shape[0]}"
            )
        device = self.scale.device
        if self.calibration == "standardize":
            std = x.std(0).clamp_min(1e-8)
            self.scale = (1.0 / std).to(device)
            self.shift = (-x.mean(0) / std).to(device)
        else:
            channels = x.shape[1]
            x_hat = (x * self.scale.cpu() + self.shift.cpu()).clamp(-self.std_range, self.std_range)
            probs = torch.linspace(0, 1, self.levels + 1, dtype=torch.float64)[1:-1]
            inner = torch.quantile(x_hat.T.contiguous()[:, : 2**24], probs, dim=1).T  # [C, B-1]
            bins = torch.searchsorted(inner.contiguous(), x_hat.T.contiguous())  # [C, N]
            sums = torch.zeros(channels, self.levels, dtype=torch.float64).scatter_add_(1, bins, x_hat.T)
            counts = torch.zeros_like(sums).scatter_add_(1, bins, torch.ones_like(x_hat.T))
            edges = torch.cat([inner.new_full((channels, 1), -self.std_range), inner,
                               inner.new_full((channels, 1), self.std_range)], 1)
            centres = 0.5 * (edges[:, 1:] + edges[:, :-1])  # for bins that no sample fell in (ties)
            values = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
            values, _ = values.sort(dim=1)
            self.scale = self.scale.expand(channels).clone()
            self.shift = self.shift.expand(channels).clone()
            self.reconstruction_values = values.to(device)
        self.fitted_channels.fill_(x.shape[1])
        self._channels = x.shape[1]
        self._refresh_lookup()
        return self

    # ------------------------------------------------------------------ quantize / dequantize
    @staticmethod
    def _check_finite(x: torch.Tensor) -> None:
        # One reduction instead of an elementwise isfinite pass: NaN and inf propagate into the sum. A sum that
        # overflows on finite inputs is told apart by the exact check, which then runs only in that rare case.
        if x.device.type != "meta" and not torch.isfinite(x.float().sum()) and not torch.isfinite(x).all():
            raise ValueError("latents contain NaN or inf; the quantizer needs finite values")

    def _check_channels(self, channels: int) -> None:
        if not self.fitted:
            raise ValueError(f"calibration={self.calibration!r} needs fit(latents) before use")
        expected = self.num_channels
        if expected is not None and channels != expected:
            raise ValueError(f"this quantizer was fitted on {expected} channels, got input with {channels} (last dim)")

    def _check_latents(self, x: torch.Tensor) -> None:
        if not torch.is_floating_point(x):
            raise ValueError(f"quantize expects a float tensor, got {x.dtype}")
        if x.dim() == 0:
            raise ValueError("quantize expects a tensor [..., C], got a scalar")
        self._check_channels(x.shape[-1])

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Latents `[..., C]` (any float dtype, any device) -> indices `[..., C]` (int64 in [0, B))."""
        self._check_latents(x)
        if x.device.type == "cpu":
            return self._lookup_cpu(x, with_values=False)[0]
        return self._search(x)

    def dequantize(self, indices: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Indices `[..., C]` (integer in [0, B)) -> latents `[..., C]` at the reconstruction values (Eq. 5)."""
        if torch.is_floating_point(indices) or indices.is_complex() or indices.dtype == torch.bool:
            raise ValueError(f"dequantize expects an integer tensor of indices, got {indices.dtype}")
        if indices.dim() == 0:
            raise ValueError("dequantize expects a tensor [..., C], got a scalar")
        self._check_channels(indices.shape[-1])
        if indices.numel() and indices.device.type != "meta":
            low, high = (int(v) for v in torch.aminmax(indices))
            if low < 0 or high >= self.levels:
                raise ValueError(f"indices must lie in [0, {self.levels}), got range [{low}, {high}]")
        return self._values_at(indices).to(dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents `[..., C]` -> (dequantized latents `[..., C]` in x's dtype, indices `[..., C]` int64)."""
        self._check_latents(x)
        if x.device.type == "cpu":
            indices, values = self._lookup_cpu(x, with_values=True)
        else:
            indices = self._search(x)
            values = self._values_at(indices)
        return values.to(x.dtype), indices

    def _values_at(self, indices: torch.Tensor) -> torch.Tensor:
        """Valid indices `[..., C]` -> float32 latents (Eq. 5), by index_select (single-threaded it is ~3x faster
        than [] indexing; on a large tensor with idle cores [] parallelizes a little better)."""
        flat = indices if indices.dtype in (torch.int32, torch.int64) else indices.long()
        if self._latent_values.shape[0] > 1:
            flat = flat + self._value_offsets
        out = torch.index_select(self._flat_latent_values, 0, flat.reshape(-1))
        return out.view(indices.shape)

    def _search(self, x: torch.Tensor) -> torch.Tensor:
        """Indices by binary search over the midpoints (devices other than the CPU)."""
        self._check_finite(x)
        x = x.float()
        if self._midpoints.shape[0] == 1:
            return torch.bucketize(x, self._midpoints[0])
        rows = x.reshape(-1, x.shape[-1]).T.contiguous()  # [C, N]: each channel against its own midpoints
        return torch.searchsorted(self._midpoints, rows).T.reshape(x.shape)

    def _lookup_cpu(self, x: torch.Tensor, with_values: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Indices (and float32 latents at them) of CPU latents `[..., C]`, in cache-sized chunks (`_cell_tables`)."""
        channels = x.shape[-1]
        flat = x.detach().reshape(-1)
        n = flat.numel()
        indices = torch.empty(n, dtype=torch.int64)
        values = torch.empty(n, dtype=torch.float32) if with_values else None
        if n and self.use_fused_kernel and numba is not None:
            self._lookup_fused(flat, indices, values, channels)
        elif n:
            step = max(_CHUNK // channels, 1) * channels  # chunks start at channel 0
            x_chunks = flat.split(step)
            sums = torch.empty(len(x_chunks), dtype=torch.float32)  # NaN and inf propagate into a chunk's sum
            v_chunks = values.split(step) if with_values else [None] * len(x_chunks)
            jobs = list(zip(x_chunks, indices.split(step), v_chunks, sums.unbind()))
            workers = min(torch.get_num_threads(), len(jobs))
            if workers > 1:
                # Each op releases the GIL, so threads that each take every workers-th chunk run in parallel.
                with ThreadPoolExecutor(workers) as pool:
                    list(pool.map(lambda w: self._lookup_chunks(jobs[w::workers], step), range(workers)))
            else:
                self._lookup_chunks(jobs, step)
            if not torch.isfinite(sums).all():
                self._check_finite(x)  # a sum can overflow on finite latents; this tells the two apart
        return indices.view(x.shape), None if values is None else values.view(x.shape)

    def _lookup_fused(self, flat: torch.Tensor, indices: torch.Tensor, values: torch.Tensor | None,
                      channels: int) -> None:
        """`_lookup_cpu` by the numba kernel: one contiguous slice per thread, each starting at channel 0."""
        x = flat.float().contiguous().numpy()
        out_i, out_v = indices.numpy(), (values.numpy() if values is not None else np.empty(0, np.float32))
        tables = (self._cell_base.numpy(), self._cell_mids.numpy(), self._latent_values.numpy())
        n = x.size
        workers = max(1, min(torch.get_num_threads(), n // _CHUNK))
        step = -(-(n // channels) // workers) * channels
        slices = [slice(start, min(start + step, n)) for start in range(0, n, step)]

        shared = tables[2].shape[0] == 1 and tables[1].shape[0] == 1 and out_v.size
        kernel = _fused_lookup_shared if shared else _fused_lookup

        def run(part: slice) -> bool:
            return kernel(x[part], *tables, channels, out_i[part], out_v[part] if out_v.size else out_v)

        if len(slices) > 1:
            with ThreadPoolExecutor(len(slices)) as pool:
                finite = all(pool.map(run, slices))
        else:
            finite = run(slices[0])
        if not finite:
            self._check_finite(flat)

    def _lookup_chunks(self, jobs: list, step: int) -> None:
        """Fill (indices, values, sum) of each (x, indices, values or None, sum) chunk of at most `step` elements."""
        rows = self._latent_values.shape[0]
        buffers = dict(
            keys=torch.empty(step, dtype=torch.int32),
            count=torch.empty(step, dtype=self._cell_base.dtype),
            mids=torch.empty(step, dtype=torch.float32),
            below=torch.empty(step, dtype=self._cell_base.dtype),
            x=torch.empty(step, dtype=torch.float32),
            flat=torch.empty(step if rows > 1 else 0, dtype=torch.int64),
        )
        cell_mids = self._cell_mids.unbind()
        for xc, ic, vc, total in jobs:
            b = buffers if xc.numel() == step else {k: v[: xc.numel()] for k, v in buffers.items()}  # last chunk
            if xc.dtype != torch.float32:
                xc = b["x"].copy_(xc)
            torch.sum(xc, 0, out=total)
            keys, count, mids, below = b["keys"], b["count"], b["mids"], b["below"]
            torch.bitwise_right_shift(xc.view(torch.int32), _KEY_SHIFT, out=keys)
            keys.view(-1, rows).add_(self._key_offsets)  # + row * 2**16 + 2**15
            torch.index_select(self._cell_base, 0, keys, out=count)
            for table in cell_mids:
                torch.index_select(table, 0, keys, out=mids)
                torch.lt(mids, xc, out=below)
                count.add_(below)
            ic.copy_(count)
            if vc is not None:
                if rows > 1:
                    ic = torch.add(ic.view(-1, rows), self._value_offsets, out=b["flat"].view(-1, rows))
                torch.index_select(self._flat_latent_values, 0, ic.view(-1), out=vc)

    def bin_width_at(self, indices: torch.Tensor) -> torch.Tensor:
        """Latent-scale width of each index's bin `[..., C]`: the distance between the midpoints around it.

        Every value in the bin quantizes to that index, so the round-trip error there is at most the distance to
        the farther midpoint. The two outer bins extend to -inf/+inf (nearest-value assignment), width inf.
        """
        mids = self._midpoints  # [R, B-1]
        inf = torch.full_like(mids[:, :1], float("inf"))
        widths = torch.cat([inf, mids[:, 1:] - mids[:, :-1], inf], 1)  # [R, B]
        if widths.shape[0] == 1:
            return widths[0][indices]
        channel = torch.arange(indices.shape[-1], device=indices.device).expand_as(indices)
        return widths[channel, indices]
