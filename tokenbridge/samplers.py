"""The sampling toolbox: the sampling options every family declares, logit filtering, the temperature contract,
guidance, and cheaper settings of the MAR loop (no retraining).

Declared options (`Temperature`, `GuidanceScale`, `TopK`, `TopP`, ...): the families' ``sample()`` signatures
annotate their keywords with these types, and the generator base class (generators/base.py) validates a call's
options against the signature once, at the public entry; the layers below (heads, diffusion head, GPT) trust it.

One temperature contract for every family and head: logits are divided by ``temperature`` > 0 before filtering
and sampling; ``temperature = 0`` is greedy (the argmax; for a diffusion head, the noise-free mean path).
`filter_logits` (top-k, then top-p) and `pick` (Gumbel-max draw and its log-probability) implement it for the
discrete heads and the GPT. Guidance: `guide` mixes stacked [cond; uncond] rows u + cfg (c - u); `cfg_rows` splits
them (both from tokenbridge.layers, the tensor primitives the heads use).

The MAR-loop settings:

Every option is a keyword of the families' ``sample()`` (so it is a CLI flag, a config key and a recorded export
default); its default, the value that reproduces the sampler as it was before the toolbox, lives once in
`Toolbox`. ``sampler="paper"`` runs that sampler whatever the toolbox options say (`resolve`).

- cfg_interval (lo, hi): classifier-free guidance only on the MAR steps whose mask ratio (the fraction of
  positions still masked when the step starts, in (0, 1]) lies in [lo, hi]; the other steps run the conditional
  rows alone (half the batch through backbone and head). None: every step is guided.
- uncond_every k: feature reuse between MAR steps (LazyMAR's condition redundancy): the unconditional rows run
  through the backbone on every k-th guided step only; on the others their features are the conditional ones
  plus the difference z_u - z_c of the last guided step that ran both. 1: no reuse. `record_reuse_error`
  measures what the reuse costs.
- num_sampling_steps_end / sampling_steps_anneal (MAR, D2C): diffusion steps per token annealed across the MAR
  steps (DiSA, arXiv 2505.20297) from ``num_sampling_steps`` at the first MAR step to ``num_sampling_steps_end``
  at the last, "linear" or "cosine" in the step's progress; None: the same count at every step.
- diffusion_sampler (MAR, D2C): "ddpm" (respaced DDPM, MAR's) or "ddim" (deterministic DDIM, eta = 0: the only
  randomness is the starting noise, so ``temperature`` has no effect).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace

from typing import Annotated, Literal, get_args

import torch
from pydantic import AfterValidator, Field, NonNegativeInt, PositiveInt

from .layers import cfg_rows, guide

__all__ = ["CfgInterval", "GuidanceScale", "SamplingSteps", "Temperature", "TopK", "TopP", "cfg_rows",
           "filter_logits", "guide", "pick"]

DEFAULT_SAMPLER = "toolbox"  # the families' sample(sampler=...) default


@dataclass(frozen=True)
class Toolbox:
    """One setting of the toolbox; the defaults are the sampler as it was before it (``sampler="paper"``)."""

    cfg_interval: tuple[float, float] | None = None
    uncond_every: int = 1
    num_sampling_steps_end: int | None = None
    sampling_steps_anneal: str = "linear"
    diffusion_sampler: str = "ddpm"


PAPER = Toolbox()


# ----------------------------------------------------------------------------------------------------------------
# the declared sampling options (pydantic types of the families' sample() keywords; non-finite floats are refused)


def _ordered_interval(interval: tuple[float, float]) -> tuple[float, float]:
    if not 0.0 <= interval[0] <= interval[1] <= 1.0:
        raise ValueError(f"cfg_interval must be (lo, hi) with 0 <= lo <= hi <= 1 (mask ratios), got {interval}")
    return interval


Temperature = Annotated[float, Field(ge=0)]  # 0 = greedy / the mean path; logits / temperature otherwise
GuidanceScale = Annotated[float, Field(ge=0)]  # classifier-free guidance: 1 = none, 0 = the unconditional model
TopK = NonNegativeInt  # keep the k most likely classes; 0 = off
TopP = Annotated[float, Field(gt=0, le=1)]  # nucleus: the smallest set holding top_p of the mass; 1 = off
SamplingSteps = PositiveInt  # MAR steps, diffusion steps
CfgSchedule = Literal["linear", "constant"]
CfgInterval = Annotated[tuple[float, float], AfterValidator(_ordered_interval)]
Sampler = Literal["toolbox", "paper"]
StepAnneal = Literal["linear", "cosine"]
STEP_ANNEALS = get_args(StepAnneal)
DiffusionSampler = Literal["ddpm", "ddim"]


# ----------------------------------------------------------------------------------------------------------------
# logit filtering and the temperature contract


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / top-p (nucleus) set to -inf along the last dim; never empties a row."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p  # mass before this entry already reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
         generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample from (guided) logits [..., V]. Returns (tokens [...] long, log-prob [...] of the sampled tokens).

    The log-prob is taken under the distribution actually sampled from (temperature-scaled and filtered). For
    temperature 0 the choice is the argmax and its log-prob is taken at temperature 1, so it stays a usable
    confidence rather than a constant 0.
    """
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    logits = filter_logits(logits, top_k, top_p)
    logp = logits.log_softmax(-1)
    if temperature > 0:
        # argmax(p / E), E ~ Exp(1), is an exact categorical sample (Gumbel-max); one RNG draw of fixed shape
        # per call keeps seeded runs reproducible whatever the probabilities are.
        noise = torch.empty_like(logp).exponential_(generator=generator)
        tokens = (logp.exp() / noise).argmax(-1)
    else:
        tokens = logp.argmax(-1)
    return tokens, logp.gather(-1, tokens[..., None])[..., 0]
# the sample() keywords of the toolbox: the preset name, then Toolbox's fields
TOOLBOX_OPTIONS = ("sampler", *Toolbox.__dataclass_fields__)


def resolve(sampler: str, num_sampling_steps: int | None = None, **options: object) -> Toolbox:
    """The setting to run: ``options`` as given for ``sampler="toolbox"``, `PAPER` for ``"paper"``. Each option's
    own range is declared in the sample() signatures (checked at the public entry); this checks what relates two
    of them: the anneal ends at or below ``num_sampling_steps`` (MAR, D2C; None for TokenBridge)."""
    box = replace(PAPER, **options)
    if box.cfg_interval is not None:
        box = replace(box, cfg_interval=tuple(float(v) for v in box.cfg_interval))
    end = box.num_sampling_steps_end
    if end is not None and num_sampling_steps is not None and end > num_sampling_steps:
        raise ValueError(f"num_sampling_steps_end={end} is above num_sampling_steps={num_sampling_steps}: the "
                         "anneal must end at or below where it starts")
    return PAPER if sampler == "paper" else box


def diffusion_steps_schedule(num_iter: int, start: int, end: int | None = None, anneal: str = "linear") -> list[int]:
    """Diffusion steps per token for each of ``num_iter`` MAR steps: ``start`` at the first, ``end`` at the last
    (DiSA), rounded, interpolated linearly or on a half cosine in the progress p = step / (num_iter - 1);
    end None: ``start`` at every step. Needs 1 <= end <= start."""
    if int(num_iter) != num_iter or num_iter < 1 or int(start) != start or start < 1:
        raise ValueError(f"num_iter and start must be integers >= 1, got {num_iter}, {start}")
    if end is None:
        return [int(start)] * int(num_iter)
    if int(end) != end or not 1 <= end <= start:
        raise ValueError(f"the anneal must end at an integer in [1, start={start}], got end={end}")
    if anneal not in STEP_ANNEALS:
        raise ValueError(f"anneal must be one of {STEP_ANNEALS}, got {anneal!r}")
    steps = []
    for k in range(int(num_iter)):
        p = k / (num_iter - 1) if num_iter > 1 else 0.0
        w = 1.0 - p if anneal == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))  # weight of start
        steps.append(int(round(end + (start - end) * w)))
    return steps


def guided(cfg_interval: tuple[float, float] | None, mask_ratio: float) -> bool:
    """Whether a MAR step whose mask ratio (masked fraction when it starts) is ``mask_ratio`` runs guidance."""
    return cfg_interval is None or cfg_interval[0] <= mask_ratio <= cfg_interval[1]


# set by `record_reuse_error`: a list the guidance plans append their reuse errors to
_REUSE_PROBE: ContextVar[list[dict[str, float]] | None] = ContextVar("reuse_probe", default=None)


@contextmanager
def record_reuse_error() -> Iterator[list[dict[str, float]]]:
    """Within this block, every MAR step that reuses unconditional features (``uncond_every`` > 1) also runs
    the unconditional rows (the sample is unchanged: the reused features are still the ones used) and appends
    dict(step, z_u, guidance) to the yielded list: the relative L2 error of the reused z_u and of the guidance
    direction z_c - z_u against the ones the backbone gives."""
    errors: list[dict[str, float]] = []
    token = _REUSE_PROBE.set(errors)
    try:
        yield errors
    finally:
        _REUSE_PROBE.reset(token)


def _relative(approx: torch.Tensor, true: torch.Tensor) -> float:
    return float((approx - true).float().norm() / true.float().norm().clamp_min(1e-12))


class GuidancePlan:
    """Which rows run through the backbone at each MAR step (guidance interval and unconditional-feature reuse).

    backbone(tokens [R, L, D], labels [R], mask [R, L]) -> z [R, L, W]; `features` returns z for the 2N rows
    [cond; uncond] on a guided step and for the N conditional rows on an unguided one.
    """

    def __init__(self, backbone: Callable[..., torch.Tensor], box: Toolbox) -> None:
        self.backbone, self.box = backbone, box
        self.delta: torch.Tensor | None = None  # z_u - z_c of the last step that ran both halves
        self.guided_steps = 0

    def features(self, tokens: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, mask_ratio: float,
                 step: int) -> torch.Tensor:
        """tokens [N, L, D], labels [2N] (cond then uncond), mask [N, L] -> z [2N or N, L, W]."""
        n = tokens.shape[0]
        if not guided(self.box.cfg_interval, mask_ratio):
            return self.backbone(tokens, labels[:n], mask)
        reuse = self.delta is not None and self.guided_steps % self.box.uncond_every != 0
        self.guided_steps += 1
        if not reuse:
            z = self.backbone(torch.cat([tokens, tokens]), labels, torch.cat([mask, mask]))
            if self.box.uncond_every > 1:
                self.delta = z[n:] - z[:n]
            return z
        z_c = self.backbone(tokens, labels[:n], mask)
        z_u = z_c + self.delta
        probe = _REUSE_PROBE.get()
        if probe is not None:
            true_u = self.backbone(tokens, labels[n:], mask)
            probe.append({"step": float(step), "z_u": _relative(z_u, true_u),
                          "guidance": _relative(z_c - z_u, z_c - true_u)})
        return torch.cat([z_c, z_u])
