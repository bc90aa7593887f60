"""Optimisation pieces shared by every trainer in the package: AdamW parameter groups, the warmup + cosine
learning-rate schedule and the EMA of the weights."""

from __future__ import annotations

import math

import torch
from torch import nn



def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: 1-D parameters (norm weights, biases) and names in model.no_weight_decay() get no decay.
    Embedding tables are matrices and are decayed, as in MAR."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(groups: list[dict], lr: float, betas: tuple[float, float], eps: float, fused: bool = False
          ) -> torch.optim.AdamW:
    """AdamW over ``groups`` (`param_groups`). fused: torch's single-kernel update (CPU and CUDA), equal to the
    multi-tensor one (foreach, the default) to float rounding, not bit for bit."""
    if fused:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)  # multi-tensor, also on the CPU


def lr_at(step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate for the update with 0-based index ``step``: linear warmup (peak * (step+1) / warmup) over
    ``warmup_steps`` updates, then a half cosine from ``peak_lr`` down to ``min_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


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
