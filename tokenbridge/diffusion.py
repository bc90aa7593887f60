"""MAR's diffusion loss for continuous tokens: a DDPM noise schedule and the AdaLN-MLP denoiser head.

- DiffusionSchedule: the DDPM quantities of a cosine schedule (float64), respacing for sampling, and the forward
  process / posterior maths on them.
- DiffusionHead: an MLP denoiser of one continuous token x [N, token_dim] conditioned on a backbone feature
  z [N, z_dim]; eps-prediction with learned-range variance (improved DDPM). `loss` is MAR's diffusion loss
  (`losses` gives its terms per row, for given timesteps and noise), `sample` draws tokens by respaced DDPM (the
  speed baseline of paper Table 5), `guided_denoise` is one classifier-free-guided network evaluation.

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

__all__ = ["VB_OBJECTIVES", "DiffusionSchedule", "DiffusionHead", "drop_retired_options"]

# The variational-bound term of the loss (see DiffusionHead): MAR's released loss, or this package's first one
VB_OBJECTIVES = ("bits_discretized", "nats_continuous")
# diffusion steps per token at sampling, respaced from the trained ones (MAR: 100 of 1,000); the mar and d2c
# families' num_sampling_steps default
NUM_SAMPLING_STEPS = 100
# half the width of the discretized likelihood's bins: 8-bit data on [-1, 1] (improved DDPM, which MAR inherits)
_BIN_HALF_WIDTH = 1.0 / 255.0
# Options that head configs recorded before tokenbridge.official folded them into the weights, with the one value
# this head computes: a recorded config still names them, at that value.
_RETIRED = {"affine_block_norm": False, "final_chunks": "scale_shift"}


def _timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of timesteps t [N] -> [N, dim] float32 (cosines, then sines)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


def _normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise (arguments broadcast together)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Phi(x) by the tanh approximation 0.5 (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) (improved DDPM's)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _discretized_gaussian_nll(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """-log P(x) elementwise (nats) for a Gaussian (mean, exp(log_scale)) discretized into bins of width 2/255 on
    [-1, 1], open-ended below -0.999 and above 0.999; probabilities floored at 1e-12 (improved DDPM's decoder)."""
    centred, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centred + _BIN_HALF_WIDTH))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centred - _BIN_HALF_WIDTH))
    log_prob = torch.where(x < -0.999, torch.log(cdf_plus.clamp(min=1e-12)),
                           torch.where(x > 0.999, torch.log((1.0 - cdf_min).clamp(min=1e-12)),
                                       torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))
    return -log_prob


def drop_retired_options(head: dict) -> dict:
    """A recorded DiffusionHead config without the options older configs carry at the value this head computes
    (`_RETIRED`); another value is an error naming the fix (a folder converted before the weight rewrites)."""
    head = dict(head)
    for name, value in _RETIRED.items():
        recorded = head.pop(name, value)
        if recorded != value:
            raise ValueError(f"this diffusion-head config has {name}={recorded!r}: it was converted from an "
                             "official checkpoint before the weight rewrites; run tokenbridge convert again")
    return head


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

    def predict_x0(self, x: Tensor, i: Tensor | int, eps: Tensor) -> Tensor:
        """The clean token [N, D] that x_i = x [N, D] and the predicted noise eps [N, D] imply."""
        return (x - self.at("sqrt_1m_ac", i, x) * eps) / self.at("sqrt_ac", i, x)

    def p_mean_logvar(self, x: Tensor, i: Tensor | int, eps: Tensor, v: Tensor, clip: float | None = None,
                      return_x0: bool = False) -> tuple[Tensor, ...]:
        """Model mean and log-variance [N, D] of x_{i-1} given x_i = x and the model's eps and v [N, D]: v in
        [-1, 1] interpolates the log-variance between the posterior's (beta~) and beta. clip: the predicted x0 is
        clamped to [-clip, clip] (None: not clamped, as MAR). return_x0: also return that x0 [N, D] (clamped)."""
        x0 = self.predict_x0(x, i, eps)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        mean, post_logvar = self.q_posterior(x0, x, i)
        frac = (v + 1) / 2
        logvar = frac * self.at("log_betas", i, x) + (1 - frac) * post_logvar
        return (mean, logvar, x0) if return_x0 else (mean, logvar)


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

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
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

    The blocks' LayerNorms have no scale or bias of their own (the modulation's shift and scale are their affine
    part) and the final AdaLN splits its modulation as (scale, shift).
    full_batch_noise: with guidance, draw every step's noise over the doubled [cond; uncond] batch and keep the
    first half, and draw it at the last step too, as MAR does (the same distribution; it matters only for matching
    a seed's random stream).
    vb_objective: the variational-bound term of the loss, which alone trains the variance. "bits_discretized"
    (default): MAR's released loss (improved DDPM's), the KL in bits (divided by ln 2) and at t = 0 the negative
    log-likelihood of a Gaussian discretized into bins of width 2/255; "nats_continuous": the KL in nats and at
    t = 0 the Gaussian density (this package's objective before, which trained the shipped fmnist-mar and
    fmnist-d2c generators). The second is preferable when the 8-bit bins mean nothing for the data (latents that
    are continuous and not confined to [-1, 1]: the bins then round every t = 0 term to a width the data never
    had) or when the loss should be a likelihood in nats; the first trains as the paper did, weighting the
    variance term 1/ln 2 = 1.44x more, and logs losses comparable with MAR's.
    """

    def __init__(self, z_dim: int, token_dim: int, width: int = 1024, depth: int = 3, train_steps: int = 1000,
                 full_batch_noise: bool = False,
                 vb_objective: Literal["bits_discretized", "nats_continuous"] = "bits_discretized"):
        super().__init__()
        if min(z_dim, token_dim, width, depth, train_steps) < 1:
            raise ValueError(f"bad DiffusionHead sizes: z_dim={z_dim} token_dim={token_dim} width={width}")
        if vb_objective not in VB_OBJECTIVES:
            raise ValueError(f"vb_objective must be one of {VB_OBJECTIVES}, got {vb_objective!r}")
        self.full_batch_noise = bool(full_batch_noise)
        self.vb_objective = vb_objective
        self.z_dim, self.token_dim = z_dim, token_dim
        self.time_mlp = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.z_cond = nn.Linear(z_dim, width)
        self.x_in = nn.Linear(token_dim, width)
        self.blocks = nn.ModuleList(_DiffusionBlock(width) for _ in range(depth))
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
        eps, v = self.out(modulate(self.norm_out(h), shift, scale)).chunk(2, dim=-1)
        return eps, v

    def guided_denoise(self, x: Tensor, t: Tensor, z: Tensor, cfg: float | Tensor) -> tuple[Tensor, Tensor]:
        """One classifier-free-guided evaluation: x [N, D] noisy tokens, t [N] or [1] training-step indices,
        z [2N, z_dim] (N conditional, then N unconditional rows), cfg a float or [N]. Returns (eps [N, D] =
        e_u + cfg (e_c - e_u), v [N, D] of the conditional rows), what `sample` uses at each step."""
        check_z(z, self.z_dim)
        n, scale = cfg_rows(z, cfg)
        if x.shape != (n, self.token_dim):
            raise ValueError(f"x must have shape [N={n}, token_dim={self.token_dim}], got {tuple(x.shape)}")
        eps, v = self.denoise(x.repeat(2, 1), t.repeat(2) if t.numel() > 1 else t, self.z_cond(z))
        return guide(eps, scale), v[:n]

    def losses(self, z: Tensor, target: Tensor, t: Tensor | None = None, noise: Tensor | None = None,
               generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The loss terms per row: dict(loss, mse, vb [N] float, t [N] long). z [N, z_dim], target [N, token_dim];
        t [N] training-step indices in [0, train_steps) and noise [N, token_dim] are drawn (from ``generator``)
        unless given. mse: the eps regression; vb: the variational-bound term with the model mean detached, so
        that only the variance learns from it (`vb_objective` sets its units and its t = 0 term); loss = mse + vb."""
        check_z(z, self.z_dim)
        n = z.shape[0]
        if target.shape != (n, self.token_dim):
            raise ValueError(f"target must have shape [N={n}, token_dim={self.token_dim}], got "
                             f"{tuple(target.shape)}")
        s = self.schedule
        if t is None:
            t = torch.randint(0, len(s), (n,), device=z.device, generator=generator)
        elif t.shape != (n,) or t.is_floating_point() or int(t.min()) < 0 or int(t.max()) >= len(s):
            raise ValueError(f"t must be [N={n}] integer timesteps in [0, {len(s)}), got {t.dtype} {tuple(t.shape)}")
        if noise is None:
            noise = torch.randn(target.shape, device=z.device, dtype=target.dtype, generator=generator)
        elif noise.shape != target.shape:
            raise ValueError(f"noise must have the target's shape {tuple(target.shape)}, got {tuple(noise.shape)}")
        t = t.to(z.device).long()
        x_t = s.q_sample(target, t, noise)
        eps, v = self.denoise(x_t, t, self.z_cond(z))
        mse = ((eps - noise) ** 2).mean(1)
        mean, logvar = s.p_mean_logvar(x_t, t, eps.detach(), v)
        true_mean, true_logvar = s.q_posterior(target, x_t, t)
        kl = _normal_kl(true_mean, true_logvar, mean, logvar).mean(1)
        # at t = 0 the bound term is the negative log-likelihood of x0 itself
        if self.vb_objective == "bits_discretized":
            nll = _discretized_gaussian_nll(target, mean, 0.5 * logvar).mean(1)
            vb = torch.where(t == 0, nll, kl) / math.log(2.0)
        else:
            nll = 0.5 * (math.log(2 * math.pi) + logvar + (target - mean) ** 2 * torch.exp(-logvar)).mean(1)
            vb = torch.where(t == 0, nll, kl)
        return {"loss": mse + vb, "mse": mse, "vb": vb, "t": t}

    def loss(self, z: Tensor, target: Tensor, generator: torch.Generator | None = None, t: Tensor | None = None,
             noise: Tensor | None = None) -> Tensor:
        """Scalar: the mean over rows of `losses` (eps-MSE + variational-bound term), one random timestep per row
        unless t is given; z [N, z_dim], target [N, token_dim]."""
        return self.losses(z, target, t, noise, generator)["loss"].mean()

    @torch.no_grad()
    def sample(self, z: Tensor, num_steps: int = NUM_SAMPLING_STEPS, temperature: float = 1.0, cfg: float | Tensor | None = None,
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
