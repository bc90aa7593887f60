"""Optimisation pieces shared by every trainer in the package (the generic trainer `tokenbridge.train` and the
VAE, VQ-tokenizer and classifier trainers in `tokenbridge.training`): AdamW parameter groups, `ScheduledAdamW`
(AdamW with its hyperparameters set from the update index), the warmup + cosine and one-cycle schedules, and the
EMA of the weights."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

# A schedule maps the 0-based update index to (learning rate, AdamW beta1 or None to keep the constructed one).
Schedule = Callable[[int], tuple[float, float | None]]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: 1-D parameters (norm weights, biases) and names in model.no_weight_decay() get no decay.
    Embedding tables are matrices and are decayed, as in MAR."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(groups: list[dict] | Iterable[nn.Parameter], lr: float, betas: tuple[float, float], eps: float,
          fused: bool = False, foreach: bool | None = True, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over ``groups`` (`param_groups`, or parameters sharing ``weight_decay``). fused: torch's single-kernel
    update (CPU and CUDA), equal to the multi-tensor one (foreach, the default) to float rounding, not bit for bit;
    foreach=None lets torch choose (the per-tensor loop on the CPU)."""
    if fused:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach)


def lr_at(step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate for the update with 0-based index ``step``: linear warmup (peak * (step+1) / warmup) over
    ``warmup_steps`` updates, then a half cosine from ``peak_lr`` down to ``min_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0,
                  as_multiplier: bool = False) -> Schedule:
    """`lr_at` as a Schedule (beta1 constant). as_multiplier: peak_lr * lr_at(step, 1.0, ...), the product torch's
    LambdaLR forms, with which the VAE and VQ trainers were written; its warm-up values differ from the direct
    form in the last bit, so it is kept to reproduce their weights exactly."""
    if as_multiplier:
        return lambda step: (peak_lr * lr_at(step, 1.0, warmup_steps, total_steps, min_lr / peak_lr), None)
    return lambda step: (lr_at(step, peak_lr, warmup_steps, total_steps, min_lr), None)


def one_cycle(max_lr: float, total_steps: int, pct_start: float = 0.3, div_factor: float = 25.0,
              final_div_factor: float = 1e4, beta1: tuple[float, float] = (0.85, 0.95)) -> Schedule:
    """The one-cycle policy (Smith 2018) with cosine annealing, as torch's OneCycleLR computes it: over the first
    ``pct_start`` of the updates the lr rises from max_lr / div_factor to max_lr while beta1 falls from beta1[1]
    to beta1[0]; then the lr falls to max_lr / div_factor / final_div_factor and beta1 returns to beta1[1]."""
    start_lr = max_lr / div_factor
    end_lr = start_lr / final_div_factor
    low, high = beta1
    rise_end = float(pct_start * total_steps) - 1

    def anneal(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)

    def at(step: int) -> tuple[float, float]:
        if step <= rise_end:
            pct = (step - 0.0) / (rise_end - 0.0)
            return anneal(start_lr, max_lr, pct), anneal(high, low, pct)
        pct = (step - rise_end) / (total_steps - 1 - rise_end)
        return anneal(max_lr, end_lr, pct), anneal(low, high, pct)

    return at


class ScheduledAdamW:
    """AdamW whose learning rate (and beta1, where the schedule cycles it) is set from the update index before
    each update: the one optimizer of every trainer in the package. The hyperparameters follow from the index
    alone, so a resumed run needs only ``optimizer.state_dict()``.

    Args: params: `param_groups` or parameters; schedule: a `Schedule`; betas, eps, weight_decay, fused, foreach:
    as in `adamw` (betas[0] is replaced by the schedule's beta1 when it gives one)."""

    def __init__(self, params: list[dict] | Iterable[nn.Parameter], schedule: Schedule, betas: tuple[float, float],
                 eps: float = 1e-8, weight_decay: float = 0.0, fused: bool = False, foreach: bool | None = None):
        self.schedule = schedule
        self.optimizer = adamw(params, schedule(0)[0], betas, eps, fused, foreach, weight_decay)

    def set_step(self, step: int) -> None:
        """Set the hyperparameters of the update with 0-based index ``step``."""
        lr, beta1 = self.schedule(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if beta1 is not None:
                group["betas"] = (beta1, *group["betas"][1:])

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, step: int) -> None:
        """The update with 0-based index ``step``: its hyperparameters, then AdamW's step."""
        self.set_step(step)
        self.optimizer.step()


def ema_decay_at(step: int, decay: float, warmup: bool = True) -> float:
    """EMA decay for the update with 0-based index ``step``: min(decay, (1 + step) / (10 + step)) with warm-up.

    Without it, a short run's EMA is still mostly the random initialisation (decay 0.995 after 400 steps keeps
    0.995^400 = 13.5 % of it); with it the average starts from the first trained weights."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


class EMA:
    """Exponential moving average of a module's parameters (fp32 copies); buffers are taken from the module.
    ``warmup``: the decay ramps up as `ema_decay_at` says."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        self.names = [n for n, _ in model.named_parameters()]
        self.shadow = [p.detach().float().clone() for _, p in model.named_parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Average in the weights after the update with 0-based index ``step``."""
        params = [p.detach().float() for p in model.parameters()]
        weight = 1.0 - ema_decay_at(step, self.decay, self.warmup)
        torch._foreach_lerp_(self.shadow, params, weight)  # one fused multi-tensor op

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The module's state dict with EMA values in place of the parameters (loadable into the model)."""
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for n, s in zip(self.names, self.shadow):
            state[n] = s.to(state[n].dtype).clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ValueError(f"EMA state lacks parameters {missing[:5]}")
        for n, s in zip(self.names, self.shadow):
            s.copy_(state[n])
