"""Schedules and small sampling helpers for masked-autoregressive (MAR) generation.

- `truncnorm_mask_ratio`: training mask ratio ~ normal(loc, scale) truncated to [low, high] (MAR: [0.7, 1], loc 1,
  scale 0.25).
- `mask_schedule` / `mask_schedule_list`: how many positions stay masked after each of `num_iter` generation steps
  (MAR cosine schedule cos(pi/2 * (step+1)/num_iter)), adjusted so that every step predicts at least one position
  and every position is predicted exactly once.
- `cfg_schedule`: classifier-free-guidance scale per step ("linear": 1 + (cfg-1) * (L - mask_len)/L, "constant").
"""

from __future__ import annotations

import math

import torch

CFG_SCHEDULES = ("linear", "constant")
MASK_RATIO_MIN = 0.7  # MAR's training mask ratio ~ truncnorm on [0.7, 1] (the families' mask_ratio_min default)


def truncnorm_mask_ratio(
    num: int = 1,
    low: float = MASK_RATIO_MIN,
    high: float = 1.0,
    loc: float = 1.0,
    scale: float = 0.25,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw `num` mask ratios from normal(loc, scale) truncated to [low, high] (inverse-CDF sampling).

    Returns a float64 CPU tensor [num] with values in [low, high].
    """
    if not (0.0 <= low < high <= 1.0):
        raise ValueError(f"mask ratio bounds must satisfy 0 <= low < high <= 1, got low={low}, high={high}")
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    a = torch.tensor((low - loc) / scale, dtype=torch.float64)
    b = torch.tensor((high - loc) / scale, dtype=torch.float64)
    cdf_a, cdf_b = torch.special.ndtr(a), torch.special.ndtr(b)
    u = torch.rand(num, dtype=torch.float64, generator=generator)
    ratio = loc + scale * torch.special.ndtri(cdf_a + u * (cdf_b - cdf_a))
    # ndtri can land a hair outside [a, b] in floating point.
    return ratio.clamp(low, high)


def truncnorm_mean(low: float = MASK_RATIO_MIN, high: float = 1.0, loc: float = 1.0, scale: float = 0.25) -> float:
    """Mean of normal(loc, scale) truncated to [low, high] (expected training mask ratio)."""
    a, b = (low - loc) / scale, (high - loc) / scale

    def pdf(t: float) -> float:
        return math.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)

    def cdf(t: float) -> float:
        return 0.5 * (1 + math.erf(t / math.sqrt(2)))

    return loc + scale * (pdf(a) - pdf(b)) / (cdf(b) - cdf(a))


def num_masked_for_ratio(mask_ratio: float, seq_len: int) -> int:
    """Number of masked positions for a mask ratio: ceil(L * ratio), at least 1 (MAR convention)."""
    return max(1, min(seq_len, math.ceil(seq_len * float(mask_ratio))))


def mask_schedule_list(num_iter: int, seq_len: int) -> list[int]:
    """Masked count after each step 0..num_iter-1 (strictly decreasing, last entry 0).

    Cosine target floor(L * cos(pi/2 * (step+1)/num_iter)), clamped so that this step predicts at least one
    position (< masked count before the step) and each remaining step can still predict at least one
    (>= num_iter - 1 - step). Requires 1 <= num_iter <= seq_len.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if not (1 <= num_iter <= seq_len):
        raise ValueError(f"num_iter must be in [1, seq_len={seq_len}], got {num_iter}")
    remaining = []
    prev = seq_len
    for step in range(num_iter):
        target = math.floor(seq_len * math.cos(math.pi / 2.0 * (step + 1) / num_iter))
        cur = max(num_iter - 1 - step, min(prev - 1, target))
        remaining.append(cur)
        prev = cur
    return remaining


def mask_schedule(step: int, num_iter: int, seq_len: int) -> int:
    """Number of positions still masked after generation step `step` (0-based) of `num_iter` on `seq_len` tokens.

    At least 1 while steps remain, 0 after the last step; see `mask_schedule_list`.
    """
    if not (0 <= step < num_iter):
        raise ValueError(f"step must be in [0, num_iter={num_iter}), got {step}")
    return mask_schedule_list(num_iter, seq_len)[step]


def cfg_schedule(cfg: float, kind: str = "linear", masked_fraction: float = 0.0) -> float:
    """Guidance scale for one generation step.

    masked_fraction: fraction of positions still masked after this step (mask_len / L), in [0, 1].
    "linear": 1 + (cfg - 1) * (1 - masked_fraction), rising from ~1 to cfg (MAR/TokenBridge default);
    "constant": cfg.
    """
    if kind not in CFG_SCHEDULES:
        raise ValueError(f"cfg schedule must be one of {CFG_SCHEDULES}, got {kind!r}")
    if not (0.0 <= masked_fraction <= 1.0):
        raise ValueError(f"masked_fraction must be in [0, 1], got {masked_fraction}")
    if kind == "constant":
        return float(cfg)
    return 1.0 + (float(cfg) - 1.0) * (1.0 - masked_fraction)
