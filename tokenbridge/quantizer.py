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
from small lookup tables keyed by the float's top 16 bits plus one comparison (`_lookup.cell_tables`), which gives
the same integers as the binary search at several times its speed; other devices (and levels whose tables would
be too large) use `searchsorted`. With numba installed (`pip install tokenbridge[fast]`) the CPU lookup is one
fused pass per element (`_lookup.fused_lookup`); without it, a few torch ops per cache-sized chunk compute the same
integers. Latents are compared as float32: a finite float64 beyond the float32 range becomes +-inf, which counts
all midpoints or none, so it still gets the nearest (outermost) reconstruction value.

`arithmetic="float32"`: the released code's tokens (Eq. 1 in float32 as it computes it on the GPU, `released_map`,
then its nearest float32 value, the first index on ties); they differ only at float-rounding ties of a midpoint.

Usage::

    quantizer = DimensionwiseQuantizer(levels=64)
    latents_hat, indices = quantizer(latents)   # latents [..., C] -> indices [..., C] in [0, 64)
"""
from __future__ import annotations

import math
import operator

import torch
from torch import nn

from ._lookup import KEY_OFFSET, KEYS, Tables, cell_tables, lookup, numba  # noqa: F401 (numba: benchmarks ask)
from ._lookup import released_map, released_search, released_values  # noqa: F401 (released_map: public here)
from .layout import channel_mismatch

KINDS = ("gaussian", "uniform")
TAILS = ("paper", "clamped")
CALIBRATIONS = ("none", "standardize", "quantile")
ARITHMETICS = ("midpoints", "float32")


def gaussian_bins(levels: int, std_range: float = 3.0, tails: str = "paper") -> tuple[torch.Tensor, torch.Tensor]:
    """Equal-probability bins of N(0, 1) and the conditional mean inside each bin (paper Eq. 2-3).

    Returns (boundaries [B+1], reconstruction_values [B]) in float64. With tails="paper" the outer boundaries are
    -inf/+inf; with tails="clamped" every boundary is clamped to [-std_range, std_range] before the means are
    taken (the official implementation's behaviour: outer values +-2.437 for B=64 instead of +-2.510).
    """
    probs = torch.linspace(0.0, 1.0, levels + 1, dtype=torch.float64)
    boundaries = torch.special.ndtri(probs)  # -inf and +inf at the ends
    if tails == "clamped":
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


# The largest B. Every use lies far below it (the paper's B = 64, Table 2d's grouped heads quantize at 16, int16
# token files hold at most 32768 levels); the tables grow with B (2**24 levels took 16 GB before any check ran),
# and at 2**16 they still take a few tens of MB.
MAX_LEVELS = 1 << 16


def _checked_config(levels: int, value_range: tuple[float, float],
                    std_range: float) -> tuple[int, tuple[float, float], float]:
    """(levels, value_range, std_range) as (int, (float, float), float), or ValueError naming the bad argument."""
    try:
        if isinstance(levels, bool):  # bool is an int subclass: levels=True would be B = 1 by accident
            raise TypeError
        b = operator.index(levels)  # ints of any kind (numpy, 0-d tensors), never a float such as 2.5 or 64.0
    except TypeError:
        raise ValueError(f"levels (B) must be an integer >= 2, got {levels!r} ({type(levels).__name__})") from None
    if b < 2:
        raise ValueError(f"levels (B) must be an integer >= 2, got {b}")
    if b > MAX_LEVELS:
        raise ValueError(f"levels (B) must be at most {MAX_LEVELS} (its tables grow with B; int16 token files hold "
                         f"at most 32768 levels), got {b}")
    try:
        a_min, a_max = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise ValueError(f"value_range must be a pair of numbers (a_min, a_max), got {value_range!r}") from None
    if not (math.isfinite(a_min) and math.isfinite(a_max)):
        raise ValueError(f"value_range must be finite, got {value_range!r}")
    if not a_min < a_max:
        raise ValueError(f"value_range must satisfy a_min < a_max, got {value_range!r}")
    try:
        r = float(std_range)
    except (TypeError, ValueError):
        raise ValueError(f"std_range must be a number, got {std_range!r}") from None
    if not (math.isfinite(r) and r > 0):
        raise ValueError(f"std_range must be finite and > 0, got {std_range!r}")
    return b, (a_min, a_max), r


def _fixed_buffers(levels: int, value_range: tuple[float, float], std_range: float, kind: str,
                   tails: str) -> tuple[float, float, torch.Tensor]:
    """(scale, shift, values): Eq. 1 as x_hat = scale * x + shift, and the bins' reconstruction values `[B]`
    (float64) of Eq. 2-3."""
    if kind == "gaussian":
        _, values = gaussian_bins(levels, std_range, tails)
    else:
        _, values = uniform_bins(levels, std_range)
    a_min, a_max = value_range
    scale = 2 * std_range / (a_max - a_min)
    return scale, -a_min * scale - std_range, values


def _close(state: torch.Tensor, expected: torch.Tensor | float) -> bool:
    """Whether a loaded buffer equals the one this config computes (up to float64 rounding across versions)."""
    expected = torch.as_tensor(expected, dtype=torch.float64)
    return bool(torch.allclose(state.detach().double().cpu(), expected.expand(state.shape), rtol=1e-9, atol=1e-12))


class DimensionwiseQuantizer(nn.Module):
    """Per-channel scalar quantizer of continuous VAE latents (channel-last: `x` is `[..., C]`).

    Args:
        levels: B, the number of levels per channel (>= 2; indices lie in [0, B)).
        value_range: (a_min, a_max), the latent range mapped to [-std_range, std_range] (paper: (-5, 5)).
        std_range: r, the half-width of the normalised range in standard deviations (paper: 3).
        kind: "gaussian" (equal-probability N(0,1) bins, paper) or "uniform" (equal-width bins over [-r, r]).
        tails: "paper" (open outer bins) or "clamped" (boundaries clamped to +-r, as the released code).
        arithmetic: "midpoints" (default: the float64-exact nearest value by a fast lookup) or "float32" (the
            released code's float32 map `released_map` and values `released_values`, the first index on ties: its
            tokens, for data fed to a converted checkpoint; needs calibration="none").
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
        arithmetic: str = "midpoints",
    ) -> None:
        super().__init__()
        self.levels, self.value_range, self.std_range = _checked_config(levels, value_range, std_range)
        for name, value, options in (("kind", kind, KINDS), ("tails", tails, TAILS),
                                     ("calibration", calibration, CALIBRATIONS),
                                     ("arithmetic", arithmetic, ARITHMETICS)):
            if value not in options:
                raise ValueError(f"{name} must be one of {options}, got {value!r}")
        if arithmetic == "float32" and calibration != "none":
            raise ValueError(f"arithmetic='float32' (on the fixed map of Eq. 1) needs calibration='none', got "
                             f"{calibration!r}")
        self.kind = kind
        self.tails = tails
        self.calibration = calibration
        self.arithmetic = arithmetic

        scale, shift, values = _fixed_buffers(self.levels, self.value_range, self.std_range, kind, tails)
        # Eq. 1 as x_hat = scale * x + shift; shape [1] (shared) or [C] once a per-channel calibration is fitted.
        self.register_buffer("scale", torch.tensor([scale], dtype=torch.float64))
        self.register_buffer("shift", torch.tensor([shift], dtype=torch.float64))
        # Normalised-space reconstruction values gamma: [B] shared, or [C, B] after a quantile fit.
        self.register_buffer("reconstruction_values", values)
        # C once fit() has run on a per-channel calibration, 0 otherwise (saved so a loaded module knows it). It is
        # mirrored in a Python int so that no call has to read a tensor (a device sync, impossible on "meta").
        self.register_buffer("fitted_channels", torch.tensor(0))
        self._channels = 0
        self._refresh_lookup(check=True)

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
                    kind=self.kind, tails=self.tails, calibration=self.calibration, arithmetic=self.arithmetic)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config().items())

    def _refresh_lookup(self, check: bool = False) -> None:
        """Derive the latent-scale tables from (scale, shift, reconstruction_values); with `check`, first make
        sure that float32 tables can hold them (`_check_resolution`)."""
        values = self.reconstruction_values
        if values.dim() == 1:
            values = values.expand(self.scale.numel(), -1)
        scale, shift = self.scale[:, None].double(), self.shift[:, None].double()
        latent_values = (values.double() - shift) / scale  # Eq. 5, one row per channel (or one shared row)
        midpoints = (0.5 * (latent_values[:, 1:] + latent_values[:, :-1])).float()
        rows, device = latent_values.shape[0], values.device
        if check:
            self._check_resolution(latent_values.float(), midpoints)
        self._latent_values = latent_values.float().contiguous()  # [R, B]
        self._flat_latent_values = self._latent_values.reshape(-1)
        self._midpoints = midpoints.contiguous()  # [R, B-1]
        tables = cell_tables(midpoints)  # None: too large, the CPU then uses the binary search as other devices do
        self._cell_base, self._cell_mids = (None, None) if tables is None else (t.to(device) for t in tables)
        self._key_offsets = torch.arange(rows, dtype=torch.int32, device=device) * KEYS + KEY_OFFSET
        self._value_offsets = torch.arange(rows, dtype=torch.int64, device=device) * self.levels
        self._refresh_released(device)

    def _refresh_released(self, device: torch.device) -> None:
        """arithmetic="float32": its float32 values [B] and the released dequantization of Eq. 5."""
        self._released_values = None
        if self.arithmetic != "float32":
            return
        values = (released_values(self.levels, self.std_range, self.tails) if self.kind == "gaussian"
                  else uniform_bins(self.levels, self.std_range)[1].float())  # the released code: Gaussian only
        r, (a_min, a_max) = self.std_range, self.value_range
        inverse = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(2 * r, dtype=torch.float32)  # as released_map
        latent = ((values + r) * inverse) * (a_max - a_min) + a_min
        self._released_values = values.to(device)
        self._latent_values, self._flat_latent_values = latent[None].to(device), latent.to(device)

    def _check_resolution(self, latent: torch.Tensor, midpoints: torch.Tensor) -> None:
        """ValueError unless every float32 latent reconstruction value `latent` `[R, B]` is finite and lies between
        its float32 `midpoints` `[R, B-1]` (m[i-1] < v[i] <= m[i]): then each index dequantizes to a value that
        quantizes back to it. Fails for bins with no mass (official tails, too many levels) and for a value_range
        too wide or too narrow (for its offset) for float32."""
        if not torch.isfinite(self.reconstruction_values).all():  # tails="clamped": clamped bins of zero mass
            tail = float(torch.special.ndtr(torch.tensor(-self.std_range, dtype=torch.float64)))
            raise ValueError(
                f"tails='clamped' with std_range={self.std_range:g} allows at most about {math.ceil(1 / tail) - 1} "
                f"levels, got levels={self.levels}: the outer bins lie wholly beyond +-std_range, where the clamped "
                "boundaries leave them no mass (use tails='paper' or a larger std_range)")
        finite = bool(torch.isfinite(latent).all() and torch.isfinite(midpoints).all())
        if not finite or not bool((latent[:, :-1] <= midpoints).all() and (midpoints < latent[:, 1:]).all()):
            problem = "exceed the float32 range" if not finite else "lie closer together than float32 can resolve"
            raise ValueError(
                f"value_range={self.value_range} with std_range={self.std_range:g} and levels={self.levels}: the "
                f"latent reconstruction values {problem} (the lookup tables are float32); use a value_range that "
                "float32 can split into this many levels")

    _DERIVED = ("_latent_values", "_flat_latent_values", "_midpoints", "_cell_base", "_cell_mids", "_key_offsets",
                "_value_offsets", "_released_values")
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
            if table is None:  # no cell tables (too large: the binary search is used), or not released arithmetic
                continue
            setattr(self, name, torch.empty_like(table, device=device) if table.is_meta else table.to(device))
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._check_state({name: state_dict[prefix + name] for name in self._STATE if prefix + name in state_dict})
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

    _STATE = ("scale", "shift", "reconstruction_values", "fitted_channels")

    def _check_state(self, state: dict) -> None:
        """ValueError naming what differs unless the buffers in `state` (name -> tensor, those present) can come
        from a quantizer of this config (levels, value_range, std_range, kind, tails, calibration): a mismatch
        would give indices beyond [0, B) or silently other bins. Runs before any buffer is replaced."""
        for name, tensor in state.items():
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"quantizer state: {name} must be a tensor, got {type(tensor).__name__}")
        mine = {name: state.get(name, getattr(self, name)) for name in self._STATE}
        scale, shift, values, fitted = (mine[name] for name in self._STATE)
        if values.dim() not in (1, 2) or values.shape[-1] != self.levels:
            raise ValueError(f"quantizer state does not match levels: its reconstruction_values have shape "
                             f"{list(values.shape)} (levels = the last dim), this quantizer has levels={self.levels}")
        if fitted.numel() != 1 or torch.is_floating_point(fitted) or fitted.dtype == torch.bool:
            raise ValueError(f"quantizer state: fitted_channels must be one integer, got {fitted!r}")
        channels = max(scale.numel(), shift.numel()) if fitted.is_meta else int(fitted)
        fitted_as = "quantile" if values.dim() == 2 else "standardize" if channels or scale.numel() > 1 else "none"
        if fitted_as != "none" and fitted_as != self.calibration:
            raise ValueError(f"quantizer state does not match calibration: it is a fitted {fitted_as!r} quantizer, "
                             f"this one has calibration={self.calibration!r}")
        rows = max(channels, 1)
        if (channels < 0 or scale.shape != (rows,) or shift.shape != (rows,)
                or (values.dim() == 2 and values.shape[0] != channels)):
            raise ValueError(f"quantizer state: inconsistent buffers for fitted_channels={channels}: scale "
                             f"{list(scale.shape)}, shift {list(shift.shape)}, reconstruction_values "
                             f"{list(values.shape)}")
        if not any(tensor.is_meta for tensor in (scale, shift, values)):
            self._check_state_values(scale, shift, values, fitted_as)

    def _check_state_values(self, scale: torch.Tensor, shift: torch.Tensor, values: torch.Tensor,
                            fitted_as: str) -> None:
        """`_check_state` for the values: finite, Eq. 1's map of value_range/std_range (not where a 'standardize'
        fit replaced it), and the bins of kind/tails/std_range (not where a 'quantile' fit replaced them)."""
        for name, tensor in (("scale", scale), ("shift", shift), ("reconstruction_values", values)):
            if not torch.isfinite(tensor).all():
                raise ValueError(f"quantizer state: {name} contains NaN or inf")
        if not (scale > 0).all():
            raise ValueError("quantizer state: scale must be > 0")
        r = self.std_range
        scale0, shift0, values0 = _fixed_buffers(self.levels, self.value_range, r, self.kind, self.tails)
        if fitted_as != "standardize" and not (_close(scale, scale0) and _close(shift, shift0)):
            s, t = float(scale.flatten()[0]), float(shift.flatten()[0])
            raise ValueError(
                f"quantizer state does not match value_range/std_range: its map x_hat = {s:g} * x + ({t:g}) is that of "
                f"value_range=({-(t + r) / s:g}, {(r - t) / s:g}) at std_range={r:g}; this quantizer's "
                f"value_range={self.value_range} and std_range={r:g} give {scale0:g} * x + ({shift0:g})")
        if fitted_as == "quantile":  # data-fitted values: x_hat was clipped to [-r, r], and they were sorted
            if (values.abs() > r * (1 + 1e-9)).any() or (values[:, 1:] < values[:, :-1]).any():
                raise ValueError(f"quantizer state: quantile reconstruction_values must be ascending in "
                                 f"[-std_range, std_range] = [{-r:g}, {r:g}]")
        elif not _close(values, values0):
            named = [f"kind={k!r}, tails={t!r}" for k in KINDS for t in TAILS
                     if _close(values, _fixed_buffers(self.levels, self.value_range, r, k, t)[2])]
            raise ValueError(
                "quantizer state does not match kind/tails/std_range: its reconstruction_values are "
                + (f"those of {named[0]}" if named else f"not those of any kind/tails at std_range={r:g}")
                + f"; this quantizer has kind={self.kind!r}, tails={self.tails!r}, std_range={r:g}")

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

    def _check_channels(self, shape: tuple[int, ...]) -> None:
        if not self.fitted:
            raise ValueError(f"calibration={self.calibration!r} needs fit(latents) before use")
        if self.num_channels is not None and shape[-1] != self.num_channels:  # fitted per channel: C known
            raise ValueError(channel_mismatch(f"this quantizer (fitted on {self.num_channels} channels)", shape,
                                              self.num_channels, False))

    def _check_latents(self, x: torch.Tensor) -> None:
        if not torch.is_floating_point(x):
            raise ValueError(f"quantize expects a float tensor, got {x.dtype}")
        if x.dim() == 0:
            raise ValueError("quantize expects a tensor [..., C], got a scalar")
        self._check_channels(tuple(x.shape))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Latents `[..., C]` (any float dtype, any device) -> indices `[..., C]` (int64 in [0, B))."""
        self._check_latents(x)
        if x.device.type == "cpu" and self._cell_base is not None and self.arithmetic == "midpoints":
            return self._lookup_cpu(x, with_values=False)[0]
        return self._search(x)

    def dequantize(self, indices: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Indices `[..., C]` (integer in [0, B)) -> latents `[..., C]` at the reconstruction values (Eq. 5)."""
        if torch.is_floating_point(indices) or indices.is_complex() or indices.dtype == torch.bool:
            raise ValueError(f"dequantize expects an integer tensor of indices, got {indices.dtype}")
        if indices.dim() == 0:
            raise ValueError("dequantize expects a tensor [..., C], got a scalar")
        self._check_channels(tuple(indices.shape))
        if indices.numel() and indices.device.type != "meta":
            low, high = (int(v) for v in torch.aminmax(indices))
            if low < 0 or high >= self.levels:
                raise ValueError(f"indices must lie in [0, {self.levels}), got range [{low}, {high}]")
        return self._values_at(indices).to(dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents `[..., C]` -> (dequantized latents `[..., C]` in x's dtype, indices `[..., C]` int64)."""
        self._check_latents(x)
        if x.device.type == "cpu" and self._cell_base is not None and self.arithmetic == "midpoints":
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
        """Indices by binary search over the midpoints (devices other than the CPU, and CPU without cell tables);
        with arithmetic="float32" by `_lookup.released_search`."""
        self._check_finite(x)
        if self.arithmetic == "float32":
            return released_search(x, self._released_values, self.value_range, self.std_range,
                                   self.use_fused_kernel)
        x = x.float()
        if self._midpoints.shape[0] == 1:
            return torch.bucketize(x, self._midpoints[0])
        rows = x.reshape(-1, x.shape[-1]).T.contiguous()  # [C, N]: each channel against its own midpoints
        return torch.searchsorted(self._midpoints, rows).T.reshape(x.shape)

    def _lookup_cpu(self, x: torch.Tensor, with_values: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Indices (and float32 latents at them) of CPU latents `[..., C]` by the `_lookup.cell_tables` lookup."""
        flat = x.detach().reshape(-1)
        indices = torch.empty(flat.numel(), dtype=torch.int64)
        values = torch.empty(flat.numel(), dtype=torch.float32) if with_values else None
        tables = Tables(self._cell_base, self._cell_mids, self._latent_values, self._flat_latent_values,
                        self._key_offsets, self._value_offsets)
        if flat.numel() and not lookup(flat, indices, values, x.shape[-1], tables, self.use_fused_kernel):
            self._check_finite(x)  # NaN/inf, or only a finite float64 beyond float32 (right index) or a sum overflow
        return indices.view(x.shape), None if values is None else values.view(x.shape)

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

    def finite_bin_width_at(self, indices: torch.Tensor) -> torch.Tensor:
        """`bin_width_at` with the two unbounded outer bins given a finite width: twice the distance from their
        reconstruction value to their inner midpoint (the value sits near the middle of the bin's mass). For
        densities over the latents implied by a discrete model (tokenbridge.repro.runs.mean_log_bin_width)."""
        mids, values = self._midpoints, self._latent_values  # [R, B-1], [R, B]
        first, last = 2 * (mids[:, :1] - values[:, :1]).abs(), 2 * (values[:, -1:] - mids[:, -1:]).abs()
        widths = torch.cat([first, mids[:, 1:] - mids[:, :-1], last], 1)  # [R, B]
        if widths.shape[0] == 1:
            return widths[0][indices]
        channel = torch.arange(indices.shape[-1], device=indices.device).expand_as(indices)
        return widths[channel, indices]
