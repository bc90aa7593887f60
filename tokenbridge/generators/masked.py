"""What the masked-autoregressive (MAR) families share: the config's mask ratio, the training mask, generation
orders and the generation loop (the contract every family shares is `base.Generator`'s).

Both the TokenBridge generator (discrete tokens, a categorical head) and the continuous MAR generator (latent
tokens, a diffusion head) run the same MAR backbone the same way; they differ in what a token is and in the head
that draws it. A family subclasses `MaskedGenerator`, sets ``backbone``, ``seq_len``, ``patch_size`` and
``mask_ratio_min`` (the shapes come from `Generator.__init__`), and gives `_generate` two functions: how its stored
values become backbone inputs, and how its head draws the values of some positions from z.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn as nn
from pydantic import Field
from tqdm import tqdm

from ..backbone import random_masking, sample_orders
from ..sampling import MASK_RATIO_MIN, cfg_schedule as cfg_at, mask_schedule_list, num_masked_for_ratio
from ..sampling import truncnorm_mask_ratio
from ..samplers import PAPER, GuidancePlan, Toolbox
from .base import Generator, ShapesConfig

# predict(z_sel [n*m (2n*m with cfg), W], step cfg or None, generator) -> (values [n*m, D], score [n*m] or None)
NUM_ITER = 64  # MAR steps per sample: the MAR-style families' sample(num_iter=...) default (MAR's is 64)
Predict = Callable[[torch.Tensor, float | None, torch.Generator | None], tuple[torch.Tensor, torch.Tensor | None]]


class MaskedConfig(ShapesConfig):
    """The model config fields every MAR-style family starts with."""

    mask_ratio_min: float = Field(default=MASK_RATIO_MIN, ge=0, lt=1)  # training mask ratio ~ truncnorm on [it, 1]


class MaskedGenerator(Generator):
    """Base of the MAR-style families (not registered itself). Label `num_classes` means unconditional."""

    Config = MaskedConfig
    backbone: nn.Module
    seq_len: int
    patch_size: int
    mask_ratio_min: float

    # ------------------------------------------------------------------ checks (public entry points only)
    def _check_orders(self, orders: torch.Tensor | None, n: int, random_order: bool = True) -> torch.Tensor | None:
        """``orders`` [N, L] (each row a permutation of range(L)) as a long tensor on the model's device, or None."""
        if orders is None:
            return None
        if not random_order:
            raise ValueError("orders= sets the random generation order: it needs order='random'")
        if not isinstance(orders, torch.Tensor) or orders.is_floating_point() or orders.dtype == torch.bool:
            raise ValueError(f"orders must be an integer tensor [N={n}, L={self.seq_len}], got "
                             f"{getattr(orders, 'dtype', type(orders).__name__)}")
        if tuple(orders.shape) != (n, self.seq_len):
            raise ValueError(f"orders must have shape [N={n}, L={self.seq_len}], got {tuple(orders.shape)}")
        orders = orders.to(next(self.parameters()).device).long()
        identity = torch.arange(self.seq_len, device=orders.device).expand(n, -1)
        if not torch.equal(orders.sort(dim=1).values, identity):
            raise ValueError(f"every row of orders must be a permutation of range({self.seq_len})")
        return orders

    # ------------------------------------------------------------------ training
    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, mask_ratio: float | None = None) -> torch.Tensor:
        """Same as ``loss((tokens, labels), mask_ratio)`` (the family's token grid: indices or latents)."""
        return self.loss((tokens, labels), mask_ratio)

    def _masked_features(self, tokens: torch.Tensor, labels: torch.Tensor, mask_ratio: float | None,
                         context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """MAR training input: tokens [B, L, D] float, labels [B] -> (z [B, L, W], mask [B, L] bool, True = the
        positions the loss is taken on). mask_ratio None draws one ratio for the batch from the truncated normal.
        context: the backbone's extra conditioning (D2C's fusion context), passed on as ``context=``."""
        if mask_ratio is None:
            mask_ratio = float(truncnorm_mask_ratio(1, low=self.mask_ratio_min)[0])
        num_masked = num_masked_for_ratio(mask_ratio, self.seq_len)
        mask = random_masking(sample_orders(tokens.shape[0], self.seq_len, device=tokens.device), num_masked)
        return self._backbone(context)(tokens, labels, mask), mask

    def _backbone(self, context: torch.Tensor | None) -> Callable[..., torch.Tensor]:
        """backbone(tokens, labels, mask) with ``context`` passed explicitly when there is one."""
        return self.backbone if context is None else functools.partial(self.backbone, context=context)

    # ------------------------------------------------------------------ generation
    @staticmethod
    def _positions(mask: torch.Tensor, orders: torch.Tensor | None, remaining: int, prev: int) -> torch.Tensor:
        """Positions [N, m] to sample at one step: the next chunk of the random order, or (confidence order) every
        still-masked position (argsort puts the masked ones, True, first)."""
        if orders is not None:
            return orders[:, remaining:prev]
        return torch.argsort(mask.to(torch.int8), dim=1, descending=True, stable=True)[:, :prev]

    def _loop_orders(self, orders: torch.Tensor | None, known: torch.Tensor | None, n: int, random_order: bool,
                     gen: torch.Generator | None, device: torch.device) -> torch.Tensor | None:
        """The loop's generation orders [N, L] (given, drawn from ``gen``, or None for the confidence order), with
        an edit's unknown positions first, each row keeping its order among them."""
        if orders is None and random_order:
            orders = sample_orders(n, self.seq_len, device=device, generator=gen)
        if orders is not None and known is not None:
            orders = orders.gather(1, torch.argsort(known.gather(1, orders).to(torch.int8), dim=1, stable=True))
        return orders

    def _generate(self, labels: torch.Tensor, values: torch.Tensor, to_tokens: Callable[[torch.Tensor], torch.Tensor],
                  predict: Predict, num_iter: int, cfg: float | None, cfg_schedule: str, random_order: bool,
                  gen: torch.Generator | None, progress: bool,
                  callback: Callable[[dict[str, torch.Tensor]], None] | None,
                  released_cfg: bool = False, orders: torch.Tensor | None = None,
                  sorted_positions: bool = False, box: Toolbox = PAPER,
                  known: torch.Tensor | None = None,
                  context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The MAR loop: ``num_iter`` steps on the cosine mask schedule; each step runs the backbone on the values
        so far and lets ``predict`` draw the values of the next positions (the random order's next chunk, or with
        ``random_order`` False every masked position, keeping the highest-scoring ones). With cfg != 1 the
        unconditional rows run in the same 2N batch and ``predict`` gets [cond; uncond] features.

        labels [N] on the model's device; values [N, L, D] (zeros, the dtype the family stores) is filled in
        place. Returns (values, score [N, L] float: each position's score when it was drawn, 0 without scores).
        released_cfg: the linear cfg schedule counts at least one masked position, as MAR's released sampler does
        (its mask length never drops below 1), so the last step's scale is 1 + (cfg - 1)(L - 1)/L, not cfg.
        orders: [N, L] generation orders (checked by `_check_orders`) in place of random ones drawn from ``gen``.
        sorted_positions: a step's positions reach ``predict`` in ascending position order, as the released code's
        ``nonzero`` hands them to its head (then equal seeds and orders draw equal noise per position); False: in
        generation order.
        box: the sampler toolbox's setting (tokenbridge.samplers); its guidance interval and feature reuse decide
        which rows the backbone runs (a step outside the interval gives ``predict`` N rows and cfg None).
        known [N, L] bool (editing; every row the same count): positions whose ``values`` are given and kept; the
        loop starts with them unmasked and spreads its steps over the others (none left: no step runs). context:
        [N, ...] the backbone's extra conditioning (D2C's fusion context; both guidance halves share it)."""
        n, seq_len, device = labels.shape[0], self.seq_len, labels.device
        todo = seq_len if known is None else seq_len - int(known[0].sum())
        if todo == 0:
            return values, torch.zeros(n, seq_len, device=device)
        num_iter = min(int(num_iter), todo)
        schedule = mask_schedule_list(num_iter, todo)
        use_cfg = cfg is not None and float(cfg) != 1.0
        if use_cfg:
            labels = torch.cat([labels, torch.full_like(labels, self.num_classes)])
        tdim = values.shape[-1]
        score = torch.zeros(n, seq_len, device=device)
        mask = torch.ones(n, seq_len, dtype=torch.bool, device=device) if known is None else ~known
        orders = self._loop_orders(orders, known, n, random_order, gen, device)
        backbone = self._backbone(context)
        plan = GuidancePlan(backbone, box) if use_cfg and box != PAPER else None
        was_training = self.training
        self.eval()
        try:
            prev = todo
            for step in tqdm(range(num_iter), disable=not progress, desc="sampling"):
                remaining = schedule[step]
                tokens = to_tokens(values)
                if plan is not None:
                    z = plan.features(tokens, labels, mask, prev / seq_len, step)
                else:
                    z = backbone(torch.cat([tokens, tokens]) if use_cfg else tokens, labels,
                                 torch.cat([mask, mask]) if use_cfg else mask)
                pos = self._positions(mask, orders, remaining, prev)
                if sorted_positions:
                    pos = pos.sort(dim=1).values
                m = pos.shape[1]
                gather = pos.unsqueeze(-1).expand(n, m, z.shape[-1])
                z_sel = torch.gather(z[:n], 1, gather).reshape(n * m, -1)
                step_cfg = None
                if z.shape[0] > n:  # a guided step
                    z_sel = torch.cat([z_sel, torch.gather(z[n:], 1, gather).reshape(n * m, -1)])
                    step_cfg = cfg_at(float(cfg), cfg_schedule, max(remaining, int(released_cfg)) / seq_len)
                new, new_score = predict(z_sel, step_cfg, gen)
                new = new.reshape(n, m, tdim)
                new_score = new_score.reshape(n, m).float() if new_score is not None else score.new_zeros(n, m)
                keep = prev - remaining
                if keep < m:  # confidence order: keep the most likely of the sampled positions
                    top = new_score.topk(keep, dim=1).indices
                    pos, new_score = pos.gather(1, top), new_score.gather(1, top)
                    new = new.gather(1, top.unsqueeze(-1).expand(n, keep, tdim))
                values.scatter_(1, pos.unsqueeze(-1).expand(n, keep, tdim), new.to(values.dtype))
                score.scatter_(1, pos, new_score)
                mask.scatter_(1, pos, False)
                prev = remaining
                if callback is not None:
                    callback(self._partial(values, score, mask, step + 1, num_iter))
        finally:
            self.train(was_training)
        return values, score

    def _outputs(self, values: torch.Tensor, score: torch.Tensor) -> dict[str, torch.Tensor]:
        """The family's sample() outputs (with ``latents [N, C, H, W]``) from the loop's values and scores."""
        raise NotImplementedError

    def _partial(self, values: torch.Tensor, score: torch.Tensor, mask: torch.Tensor, step: int,
                 num_iter: int) -> dict[str, torch.Tensor]:
        """The outputs after ``step`` of ``num_iter`` steps, with not-yet-generated latents at 0 (the prior mean)."""
        out = self._outputs(values, score)
        p, (h, w) = self.patch_size, self.grid_size
        grid_mask = mask.reshape(-1, h // p, w // p).repeat_interleave(p, 1).repeat_interleave(p, 2)
        out["latents"] = out["latents"].masked_fill(grid_mask[:, None], 0.0)
        return {**out, "mask": grid_mask, "step": torch.tensor(step), "num_iter": torch.tensor(num_iter)}
