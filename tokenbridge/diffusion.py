"""MAR's diffusion loss for continuous tokens: a DDPM noise schedule and the AdaLN-MLP denoiser head.

- DiffusionSchedule: the DDPM quantities of a cosine schedule (float64), respacing for sampling, and the forward
  process / posterior maths on them.
- DiffusionHead: an MLP denoiser of one continuous token x [N, token_dim] conditioned on a backbone feature
  z [N, z_dim]; eps-prediction with learned-range variance (improved DDPM). `loss` is MAR's diffusion loss,
  `sample` draws tokens by respaced DDPM (the speed baseline of paper Table 5).

Shapes: z [N, z_dim] float; tokens x [N, token_dim]; timesteps t [N] (or [1], shared by all rows) long.
Classifier-free guidance: `sample(z, cfg=...)` takes 2N rows of z (first N conditional, last N unconditional)
and returns N rows.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .layers import cfg_rows, check_z, guide, modulate

__all__ = ["DiffusionSchedule", "DiffusionHead"]


def _timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of timesteps t [N] -> [N, dim] float32 (cosines, then sines)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


def _normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise (arguments broadcast together)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


class DiffusionSchedule:
    """DDPM quantities (float64, CPU) for a cosine schedule, optionally respaced to a subset of the training steps.

    Every vector has one entry per (respaced) step i; `timesteps[i]` is the training-step index the model is fed.
    The methods take step indices i (an int, or a long tensor [N] on any device) and tensors [N, D], and return
    [N, D] in the dtype and device of their tensor arguments.
    """

    def __init__(self, alphas_cumprod: Tensor, timesteps: Tensor):
        self.timesteps = timesteps  # training-step index of every (respaced) step, fed to the model
        ac = alphas_cumprod
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        self.betas = 1 - ac / ac_prev
        self.sqrt_ac, self.sqrt_1m_ac = ac.sqrt(), (1 - ac).sqrt()
        self.post_var = self.betas * (1 - ac_prev) / (1 - ac)
        # the first posterior variance is 0; reuse the second one so its log stays finite (improved DDPM)
        self.post_logvar = torch.log(torch.cat([self.post_var[1:2], self.post_var[1:]]))
        self.log_betas = torch.log(self.betas)
        self.coef_x0 = self.betas * ac_prev.sqrt() / (1 - ac)
        self.coef_xt = (1 - ac_prev) * (1 - self.betas).sqrt() / (1 - ac)

    @classmethod
    def cosine(cls, steps: int, s: float = 0.008) -> DiffusionSchedule:
        """The improved-DDPM cosine schedule with `steps` training steps (betas clipped at 0.999)."""
        f = torch.cos((torch.arange(steps + 1, dtype=torch.float64) / steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        return cls(torch.cumprod(1 - betas, 0), torch.arange(steps))

    def __len__(self) -> int:
        return len(self.timesteps)

    def respaced(self, num_steps: int) -> DiffusionSchedule:
        """The schedule on `num_steps` evenly spaced steps of this one (first and last kept)."""
        total = len(self.timesteps)
        if not 1 <= num_steps <= total:
            raise ValueError(f"num_steps must be in [1, {total}], got {num_steps}")
        keep = torch.linspace(0, total - 1, num_steps, dtype=torch.float64).round().long()
        return type(self)(self.sqrt_ac[keep] ** 2, self.timesteps[keep])

    def at(self, name: str, i: Tensor | int, like: Tensor) -> Tensor:
        """Value(s) of a schedule vector at step(s) i, shaped [N or 1, 1] to broadcast against `like` [N, D]."""
        v = getattr(self, name)[i.cpu() if isinstance(i, Tensor) else i]
        return v.to(like.device, like.dtype).reshape(-1, 1)

    def q_sample(self, x0: Tensor, i: Tensor | int, noise: Tensor) -> Tensor:
        """x_i ~ q(x_i | x_0) for given noise: sqrt(a_i) x0 + sqrt(1 - a_i) noise; x0, noise [N, D]."""
        return self.at("sqrt_ac", i, x0) * x0 + self.at("sqrt_1m_ac", i, x0) * noise

    def q_posterior(self, x0: Tensor, x: Tensor, i: Tensor | int) -> tuple[Tensor, Tensor]:
        """Mean [N, D] and log-variance [N or 1, 1] of q(x_{i-1} | x_i = x, x_0 = x0)."""
        mean = self.at("coef_x0", i, x0) * x0 + self.at("coef_xt", i, x0) * x
        return mean, self.at("post_logvar", i, x0)

    def p_mean_logvar(self, x: Tensor, i: Tensor | int, eps: Tensor, v: Tensor,
                      clip: float | None = None) -> tuple[Tensor, Tensor]:
        """Model mean and log-variance [N, D] of x_{i-1} given x_i = x and the model's eps and v [N, D]: v in
        [-1, 1] interpolates the log-variance between the posterior's (beta~) and beta. clip: the predicted x0 is
        clamped to [-clip, clip] (None: not clamped, as MAR)."""
        x0 = (x - self.at("sqrt_1m_ac", i, x) * eps) / self.at("sqrt_ac", i, x)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        mean, post_logvar = self.q_posterior(x0, x, i)
        frac = (v + 1) / 2
        return mean, frac * self.at("log_betas", i, x) + (1 - frac) * post_logvar


def ddim_step(s: DiffusionSchedule, x: Tensor, i: int, eps: Tensor, clip: float | None = None) -> Tensor:
    """One deterministic DDIM step (eta = 0) from respaced step i to i - 1 (to x0 at i = 0): the predicted x0
    (clamped to [-clip, clip] if given) and the noise direction that x = sqrt(a_i) x0 + sqrt(1 - a_i) eps implies
    for it, re-noised to the previous step's level: sqrt(a_{i-1}) x0 + sqrt(1 - a_{i-1}) eps'. x, eps [N, D]."""
    x0 = (x - s.at("sqrt_1m_ac", i, x) * eps) / s.at("sqrt_ac", i, x)
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    if i == 0:
        return x0
    eps = (x - s.at("sqrt_ac", i, x) * x0) / s.at("sqrt_1m_ac", i, x)
    return s.at("sqrt_ac", i - 1, x) * x0 + s.at("sqrt_1m_ac", i - 1, x) * eps


class _DiffusionBlock(nn.Module):
    """Residual AdaLN MLP block: x + gate * MLP(modulate(LN(x))), modulation from cond."""

    def __init__(self, width: int, affine_norm: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=affine_norm, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Linear(width, 3 * width)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        """x [N, W], cond [N, W] (already through silu) -> [N, W]."""
        shift, scale, gate = self.ada(cond).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.norm(x), shift, scale))


class DiffusionHead(nn.Module):
    """MAR's diffusion head: an AdaLN MLP denoiser of one continuous token x [N, token_dim] given z [N, z_dim].

    eps-prediction with learned-range variance (improved DDPM), cosine schedule with `train_steps` steps
    (`self.schedule`); sampling is DDPM respaced to `num_steps`. MAR-L: width 1024, depth 3, token_dim 16.

    Options for the official MAR layout (tokenbridge.convert; the defaults are this package's own head):
    affine_block_norm: the residual blocks' LayerNorm has a learned scale and bias (MAR's `in_ln`);
    final_chunks: how the final AdaLN splits its modulation, "scale_shift" (default) or "shift_scale" (MAR);
    full_batch_noise: with guidance, draw every step's noise over the doubled [cond; uncond] batch and keep the
    first half, and draw it at the last step too, as MAR does (the same distribution; it matters only for matching
    a seed's random stream).
    """

    def __init__(self, z_dim: int, token_dim: int, width: int = 1024, depth: int = 3, train_steps: int = 1000,
                 affine_block_norm: bool = False, final_chunks: Literal["scale_shift", "shift_scale"] = "scale_shift",
                 full_batch_noise: bool = False):
        super().__init__()
        if min(z_dim, token_dim, width, depth, train_steps) < 1:
            raise ValueError(f"bad DiffusionHead sizes: z_dim={z_dim} token_dim={token_dim} width={width}")
        if final_chunks not in ("scale_shift", "shift_scale"):
            raise ValueError(f"final_chunks must be 'scale_shift' or 'shift_scale', got {final_chunks!r}")
        self.final_chunks, self.full_batch_noise = final_chunks, bool(full_batch_noise)
        self.z_dim, self.token_dim = z_dim, token_dim
        self.time_mlp = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.z_cond = nn.Linear(z_dim, width)
        self.x_in = nn.Linear(token_dim, width)
        self.blocks = nn.ModuleList(_DiffusionBlock(width, affine_block_norm) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, 2 * token_dim)
        self.schedule = DiffusionSchedule.cosine(train_steps)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in [b.ada for b in self.blocks] + [self.ada_out, self.out]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def denoise(self, x: Tensor, t: Tensor, z_cond: Tensor) -> tuple[Tensor, Tensor]:
        """x [N, D] noisy token, t [N] or [1] training-step indices, z_cond = self.z_cond(z) [N, W].
        Returns (eps [N, D], v [N, D]): v in [-1, 1] interpolates log-variance between beta~ and beta."""
        cond = F.silu(self.time_mlp(_timestep_embedding(t)) + z_cond)
        h = self.x_in(x)
        for block in self.blocks:
            h = block(h, cond)
        scale, shift = self.ada_out(cond).chunk(2, dim=-1)
        if self.final_chunks == "shift_scale":
            scale, shift = shift, scale
        eps, v = self.out(modulate(self.norm_out(h), shift, scale)).chunk(2, dim=-1)
        return eps, v

    def loss(self, z: Tensor, target: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Scalar: eps-MSE + variational bound term for the variance (mean detached), one random timestep per row;
        z [N, z_dim], target [N, token_dim]."""
        check_z(z, self.z_dim)
        if target.shape != (z.shape[0], self.token_dim):
            raise ValueError(f"target must have shape [N={z.shape[0]}, token_dim={self.token_dim}], got "
                             f"{tuple(target.shape)}")
        s, n = self.schedule, z.shape[0]
        t = torch.randint(0, len(s), (n,), device=z.device, generator=generator)
        noise = torch.randn(target.shape, device=z.device, dtype=target.dtype, generator=generator)
        x_t = s.q_sample(target, t, noise)
        eps, v = self.denoise(x_t, t, self.z_cond(z))
        mse = ((eps - noise) ** 2).mean(1)
        mean, logvar = s.p_mean_logvar(x_t, t, eps.detach(), v)
        true_mean, true_logvar = s.q_posterior(target, x_t, t)
        kl = _normal_kl(true_mean, true_logvar, mean, logvar).mean(1)
        # at t = 0 the bound term is the negative log-likelihood of x0 itself
        nll = 0.5 * (math.log(2 * math.pi) + logvar + (target - mean) ** 2 * torch.exp(-logvar)).mean(1)
        vb = torch.where(t == 0, nll, kl)
        return (mse + vb).mean()

    @torch.no_grad()
    def sample(self, z: Tensor, num_steps: int = 100, temperature: float = 1.0, cfg: float | Tensor | None = None,
               generator: torch.Generator | None = None, clip_denoised: float | None = None,
               method: Literal["ddpm", "ddim"] = "ddpm") -> Tensor:
        """Token [N, token_dim] by DDPM respaced to num_steps; temperature scales the per-step noise.
        z: [N, z_dim], or with cfg [2N, z_dim] (N conditional then N unconditional rows) and
        eps = e_u + cfg * (e_c - e_u); cfg: float or [N] tensor. clip_denoised: clamp each step's predicted x0 to
        [-clip_denoised, clip_denoised]. Respacing makes the first steps sensitive to eps errors (at t = 999,
        x0 = (x - sqrt(1 - a) eps) / sqrt(a) with sqrt(a) ~ 5e-5), so a model trained briefly can diverge
        without it; None keeps MAR's unclipped sampler. method: "ddpm" (respaced DDPM, MAR's) or "ddim"
        (deterministic DDIM, eta = 0, on the same respaced steps: no per-step noise, so temperature has no effect;
        the learned variance is not used)."""
        check_z(z, self.z_dim)
        if method not in ("ddpm", "ddim"):
            raise ValueError(f"method must be 'ddpm' or 'ddim', got {method!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        n, scale = cfg_rows(z, cfg)
        s = self.schedule.respaced(num_steps)
        z_cond = self.z_cond(z)
        x = torch.randn(n, self.token_dim, device=z.device, dtype=z.dtype, generator=generator)
        for i in reversed(range(num_steps)):
            t = s.timesteps[i : i + 1].to(z.device)  # same step for every row: embed it once
            eps, v = self.denoise(x if scale is None else x.repeat(2, 1), t, z_cond)
            if scale is not None:
                eps, v = guide(eps, scale), v[:n]
            if method == "ddim":
                x = ddim_step(s, x, i, eps, clip_denoised)
                continue
            mean, logvar = s.p_mean_logvar(x, i, eps, v, clip_denoised)
            if self.full_batch_noise:  # MAR: noise for every row of the batch, at every step
                rows = n if scale is None else 2 * n
                noise = torch.randn(rows, self.token_dim, device=x.device, dtype=x.dtype, generator=generator)[:n]
                x = mean + temperature * torch.exp(0.5 * logvar) * noise if i > 0 else mean
            elif i > 0:
                noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
                x = mean + temperature * torch.exp(0.5 * logvar) * noise
            else:
                x = mean
        return x
