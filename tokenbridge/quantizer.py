"""Post-training dimension-wise quantization (TokenBridge Sec. 3.1, Eq. 1-5).

Every latent channel is quantized on its own with the same B levels:

1. map [a_min, a_max] linearly to [-r, r] and clip                                  (Eq. 1)
2. split N(0, 1) into B bins of equal probability                                   (Eq. 2)
3. each bin's reconstruction value gamma_i is the mean of N(0, 1) inside the bin   (Eq. 3)
4. a value's index is that of the nearest reconstruction value                      (Eq. 4)
5. dequantization maps gamma back to the latent range                               (Eq. 5)

Because steps 1 and 4 are monotone, the nearest-value search is a single `bucketize` of the *raw* latent
against the midpoints between consecutive reconstruction values, mapped back to latent scale. The clip in
Eq. 1 needs no separate pass: every gamma lies inside [-r, r], so a clipped value and the unclipped one have
the same nearest gamma (the outermost one).

Usage::

    quantizer = DimensionwiseQuantizer(levels=64)
    latents_hat, indices = quantizer(latents)   # latents [..., C] -> indices [..., C] in [0, 64)
"""
from __future__ import annotations

import math

import torch
from torch import nn

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
            reconstruction values at the empirical conditional means (equiprobable on the data by construction).
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
        # C once fit() has run on a per-channel calibration, 0 otherwise (saved so a loaded module knows it).
        self.register_buffer("fitted_channels", torch.tensor(0))
        self._refresh_lookup()

    # ------------------------------------------------------------------ configuration
    @property
    def num_channels(self) -> int | None:
        """C for a fitted (per-channel) quantizer, None when every channel shares the same map."""
        return int(self.fitted_channels) or None

    @property
    def fitted(self) -> bool:
        return self.calibration == "none" or int(self.fitted_channels) > 0

    def config(self) -> dict:
        return dict(levels=self.levels, value_range=list(self.value_range), std_range=self.std_range,
                    kind=self.kind, tails=self.tails, calibration=self.calibration)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config().items())

    def _refresh_lookup(self) -> None:
        """Derive the latent-scale lookup tables from (scale, shift, reconstruction_values)."""
        values = self.reconstruction_values
        if values.dim() == 1:
            values = values.expand(self.scale.numel(), -1)
        scale, shift = self.scale[:, None].double(), self.shift[:, None].double()
        latent_values = (values.double() - shift) / scale  # Eq. 5, one row per channel (or one shared row)
        midpoints = 0.5 * (latent_values[:, 1:] + latent_values[:, :-1])
        # Per-channel rows are searched with one bucketize: channel c is clamped to its own outermost values
        # (which leaves its nearest value unchanged) and lifted by c * stride, so the flattened midpoints of all
        # channels stay sorted and cannot interleave.
        lowest, highest = latent_values[:, 0], latent_values[:, -1]
        stride = (highest.max() - lowest.min()).item() + 1.0
        offsets = torch.arange(latent_values.shape[0], dtype=torch.float64, device=values.device) * stride
        self._latent_values = latent_values.float().contiguous()
        self._flat_latent_values = self._latent_values.reshape(-1)
        self._flat_midpoints = (midpoints + offsets[:, None]).reshape(-1).float().contiguous()
        self._offsets, self._lowest, self._highest = offsets.float(), lowest.float(), highest.float()

    _DERIVED = ("_latent_values", "_flat_latent_values", "_flat_midpoints", "_offsets", "_lowest", "_highest")

    def _apply(self, fn, recurse=True):
        # The derived tables follow the buffers' device but stay float32: .half() must not coarsen the bins.
        super()._apply(fn, recurse)
        for name in self._DERIVED:
            setattr(self, name, getattr(self, name).to(self.scale.device))
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A fitted quantizer has per-channel buffers; resize ours so that it can be loaded into a fresh module.
        for name in ("scale", "shift", "reconstruction_values"):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                setattr(self, name, torch.empty(state_dict[key].shape, dtype=torch.float64, device=self.scale.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
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
            raise ValueError(f"fit needs at least {2 * self.levels} latent vectors for B={self.levels}, got {x.shape[0]}")
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
            counts = torch.zeros(channels, self.levels, dtype=torch.float64).scatter_add_(1, bins, torch.ones_like(x_hat.T))
            edges = torch.cat([inner.new_full((channels, 1), -self.std_range), inner,
                               inner.new_full((channels, 1), self.std_range)], 1)
            centres = 0.5 * (edges[:, 1:] + edges[:, :-1])  # for bins that no sample fell in (ties)
            values = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
            values, _ = values.sort(dim=1)
            self.scale = self.scale.expand(channels).clone()
            self.shift = self.shift.expand(channels).clone()
            self.reconstruction_values = values.to(device)
        self.fitted_channels.fill_(x.shape[1])
        self._refresh_lookup()
        return self

    # ------------------------------------------------------------------ quantize / dequantize
    @staticmethod
    def _check_finite(x: torch.Tensor) -> None:
        # One reduction instead of an elementwise isfinite pass: NaN and inf propagate into the sum. A sum that
        # overflows on finite inputs is told apart by the exact check, which then runs only in that rare case.
        if not torch.isfinite(x.float().sum()) and not torch.isfinite(x).all():
            raise ValueError("latents contain NaN or inf; the quantizer needs finite values")

    def _check_channels(self, channels: int) -> None:
        if not self.fitted:
            raise ValueError(f"calibration={self.calibration!r} needs fit(latents) before use")
        expected = self.num_channels
        if expected is not None and channels != expected:
            raise ValueError(f"this quantizer was fitted on {expected} channels, got input with {channels} (last dim)")

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Latents `[..., C]` (any float dtype, any device) -> indices `[..., C]` (int64 in [0, B))."""
        if not torch.is_floating_point(x):
            raise ValueError(f"quantize expects a float tensor, got {x.dtype}")
        if x.dim() == 0:
            raise ValueError("quantize expects a tensor [..., C], got a scalar")
        self._check_channels(x.shape[-1])
        self._check_finite(x)
        x = x.float()
        if self._offsets.numel() > 1:
            x = torch.clamp(x, self._lowest, self._highest) + self._offsets
        return torch.bucketize(x, self._flat_midpoints) - self._row_starts(x.shape[-1])

    def _row_starts(self, channels: int) -> torch.Tensor | int:
        if self._offsets.numel() == 1:
            return 0
        return torch.arange(channels, device=self._offsets.device) * (self.levels - 1)

    def dequantize(self, indices: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Indices `[..., C]` (integer in [0, B)) -> latents `[..., C]` at the reconstruction values (Eq. 5)."""
        if torch.is_floating_point(indices) or indices.dtype == torch.bool:
            raise ValueError(f"dequantize expects an integer tensor of indices, got {indices.dtype}")
        if indices.dim() == 0:
            raise ValueError("dequantize expects a tensor [..., C], got a scalar")
        self._check_channels(indices.shape[-1])
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.levels):
            raise ValueError(f"indices must lie in [0, {self.levels}), got range "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        if self._offsets.numel() == 1:
            return self._flat_latent_values[indices].to(dtype)
        flat = indices + torch.arange(indices.shape[-1], device=indices.device) * self.levels
        return self._flat_latent_values[flat].to(dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents `[..., C]` -> (dequantized latents `[..., C]` in x's dtype, indices `[..., C]` int64)."""
        indices = self.quantize(x)
        return self.dequantize(indices, dtype=x.dtype), indices

    def bin_width_at(self, indices: torch.Tensor) -> torch.Tensor:
        """Latent-scale distance between the midpoints around each index (inf for the open outer bins)."""
        values = self._latent_values if self._latent_values.shape[0] > 1 else self._latent_values[0]
        mids = 0.5 * (values[..., 1:] + values[..., :-1])
        inf = torch.full_like(mids[..., :1], float("inf"))
        lower = torch.cat([-inf, mids], -1)
        upper = torch.cat([mids, inf], -1)
        if values.dim() == 1:
            return upper[indices] - lower[indices]
        channel = torch.arange(indices.shape[-1], device=indices.device).expand_as(indices)
        return upper[channel, indices] - lower[channel, indices]
