"""MAR's diffusion loss as the released code computes it (improved DDPM's `training_losses` with a learned variance),
checked against a reference built here from the published formulas: the cosine schedule, the Gaussian posterior,
the KL between Gaussians, and at t = 0 the discretized Gaussian log-likelihood with the tanh approximation of the
normal CDF, in bits; on fixed timesteps (t = 0 included) and fixed noise. Also the loss terms' API, the old
objective (nats, continuous t = 0 term) and the helpers a reimplementation is compared with."""

from __future__ import annotations

import math

import pytest
import torch

from tokenbridge.backbone import MAR
from tokenbridge.checkpoint import load_generator
from tokenbridge.diffusion import DiffusionHead

TOKEN_DIM, Z_DIM = 4, 6
T = torch.tensor([0, 0, 1, 2, 17, 500, 998, 999])


def _head(objective: str | None = None, seed: int = 0) -> DiffusionHead:
    torch.manual_seed(seed)
    head = DiffusionHead(Z_DIM, TOKEN_DIM, width=16, depth=2,
                         **({} if objective is None else {"vb_objective": objective}))
    with torch.no_grad():  # non-zero everywhere: the zero-initialised output layers would predict eps = v = 0
        for p in head.parameters():
            p.normal_(0, 0.3)
    return head


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(len(T), Z_DIM, generator=g)
    # targets inside [-1, 1], at its edges (the open-ended bins) and beyond them, as latents can be
    target = torch.tensor([[-1.0, 0.3, 1.0, -0.2], [1.7, -2.4, 0.999, -0.9995]])
    target = torch.cat([target, torch.rand(len(T) - 2, TOKEN_DIM, generator=g) * 4 - 2])
    return z, target, torch.randn(len(T), TOKEN_DIM, generator=g)


def reference_terms(head: DiffusionHead, z: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                    bits: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(mse [N], vb [N]) of MAR's training loss from the published formulas (float64 schedule)."""
    steps = 1000
    f = torch.cos((torch.arange(steps + 1, dtype=torch.float64) / steps + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_logvar_clipped = torch.log(torch.cat([post_var[1:2], post_var[1:]]))

    def col(v):  # a schedule vector at t as a float32 column
        return v[t].float()[:, None]

    x_t = col(abar.sqrt()) * x0 + col((1 - abar).sqrt()) * noise
    eps, v = head.denoise(x_t, t, head.z_cond(z))
    eps = eps.detach()
    x0_pred = (x_t - col((1 - abar).sqrt()) * eps) / col(abar.sqrt())

    def posterior_mean(start):
        return (col(betas * abar_prev.sqrt() / (1 - abar)) * start
                + col((1 - abar_prev) * (1 - betas).sqrt() / (1 - abar)) * x_t)

    frac = (v + 1) / 2  # learned range: between log beta~ (clipped) and log beta
    logvar = frac * col(torch.log(betas)) + (1 - frac) * col(post_logvar_clipped)
    mean, true_mean, true_logvar = posterior_mean(x0_pred), posterior_mean(x0), col(post_logvar_clipped)
    kl = 0.5 * (-1 + logvar - true_logvar + torch.exp(true_logvar - logvar)
                + (true_mean - mean) ** 2 / torch.exp(logvar))
    if bits:
        def cdf(u):
            return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
        std = torch.exp(0.5 * logvar)
        upper, lower = cdf((x0 - mean + 1 / 255) / std), cdf((x0 - mean - 1 / 255) / std)
        prob = torch.where(x0 < -0.999, upper, torch.where(x0 > 0.999, 1 - lower, upper - lower))
        nll = -torch.log(prob.clamp(min=1e-12))
        vb = torch.where(t[:, None] == 0, nll, kl).mean(1) / math.log(2)
    else:
        nll = 0.5 * (math.log(2 * math.pi) + logvar + (x0 - mean) ** 2 / torch.exp(logvar))
        vb = torch.where(t[:, None] == 0, nll, kl).mean(1)
    return ((eps - noise) ** 2).mean(1), vb


@pytest.mark.parametrize("objective", ["bits_discretized", "nats_continuous"])
def test_loss_terms_match_the_published_formulas_on_fixed_t_and_noise(objective):
    head = _head(objective)
    z, target, noise = _inputs()
    terms = head.losses(z, target, t=T, noise=noise)
    mse, vb = reference_terms(head, z, target, T, noise, bits=objective == "bits_discretized")
    assert torch.equal(terms["t"], T)
    assert torch.allclose(terms["mse"], mse, rtol=1e-5, atol=1e-6)
    assert torch.allclose(terms["vb"], vb, rtol=1e-4, atol=1e-5)
    assert torch.allclose(terms["loss"], mse + vb, rtol=1e-4, atol=1e-5)
    assert torch.allclose(head.loss(z, target, t=T, noise=noise), (mse + vb).mean(), rtol=1e-4)


def test_the_default_objective_is_the_released_one_and_differs_from_the_old():
    """Bits: the t > 0 terms are the nats KL / ln 2; the t = 0 terms are the discretized likelihood's."""
    z, target, noise = _inputs()
    assert _head().vb_objective == "bits_discretized"
    released = _head("bits_discretized").losses(z, target, t=T, noise=noise)
    old = _head("nats_continuous").losses(z, target, t=T, noise=noise)
    later = T > 0
    assert torch.allclose(released["vb"][later], old["vb"][later] / math.log(2), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(released["vb"][~later], old["vb"][~later] / math.log(2), rtol=1e-2)
    assert torch.equal(released["mse"], old["mse"])
    with pytest.raises(ValueError, match="vb_objective"):
        DiffusionHead(Z_DIM, TOKEN_DIM, vb_objective="bits")


def test_only_the_variance_learns_from_the_vb_term():
    head = _head()
    z, target, noise = _inputs()
    head.losses(z, target, t=T, noise=noise)["vb"].sum().backward()
    grad = head.out.weight.grad  # rows [0, D): eps, [D, 2D): v
    assert grad[:TOKEN_DIM].abs().max() == 0 and grad[TOKEN_DIM:].abs().max() > 0


def test_drawn_timesteps_and_noise_come_from_the_generator():
    head = _head()
    z, target, _ = _inputs()
    a = head.losses(z, target, generator=torch.Generator().manual_seed(4))
    b = head.losses(z, target, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a["t"], b["t"]) and torch.equal(a["loss"], b["loss"]) and a["t"].shape == (len(T),)


@pytest.mark.parametrize("kwargs, message", [
    ({"t": torch.tensor([1000] * len(T))}, r"\[0, 1000\)"), ({"t": torch.zeros(3, dtype=torch.long)}, "t must be"),
    ({"noise": torch.zeros(2, TOKEN_DIM)}, "noise must"),
])
def test_bad_timesteps_or_noise_are_named(kwargs, message):
    z, target, _ = _inputs()
    with pytest.raises(ValueError, match=message):
        _head().losses(z, target, **kwargs)


def test_posterior_helper_returns_the_predicted_clean_token():
    head = _head()
    s, x, eps, v = head.schedule, torch.randn(3, TOKEN_DIM), torch.randn(3, TOKEN_DIM), torch.rand(3, TOKEN_DIM)
    i = torch.tensor([0, 40, 999])
    abar = s.sqrt_ac[i][:, None] ** 2  # float64
    mean, logvar, x0 = s.p_mean_logvar(x, i, eps, v, return_x0=True)
    expected = (x.double() - (1 - abar).sqrt() * eps.double()) / abar.sqrt()
    assert torch.allclose(x0.double(), expected, rtol=1e-4, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip((mean, logvar), s.p_mean_logvar(x, i, eps, v)))
    assert s.p_mean_logvar(x, i, eps, v, clip=1.0, return_x0=True)[2].abs().max() <= 1.0


def test_guided_denoise_is_the_uncond_plus_cfg_times_the_difference():
    head = _head()
    x, z, t = torch.randn(3, TOKEN_DIM), torch.randn(6, Z_DIM), torch.tensor([5, 300, 999])
    eps, v = head.guided_denoise(x, t, z, 2.5)
    e_c, v_c = head.denoise(x, t, head.z_cond(z[:3]))
    e_u, _ = head.denoise(x, t, head.z_cond(z[3:]))
    assert torch.allclose(eps, e_u + 2.5 * (e_c - e_u), atol=1e-6) and torch.allclose(v, v_c, atol=1e-6)
    with pytest.raises(ValueError, match="x must have shape"):
        head.guided_denoise(torch.randn(2, TOKEN_DIM), t, z, 2.5)


def test_backbone_returns_its_encoder_output_on_request():
    torch.manual_seed(0)
    mar = MAR(grid_size=(4, 4), token_dim=3, num_classes=5, width=16, encoder_depth=1, decoder_depth=1,
              num_heads=2, buffer_size=2).eval()
    tokens, labels = torch.randn(2, 16, 3), torch.tensor([1, 4])
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, [0, 5, 6, 15]] = True
    z, encoded = mar(tokens, labels, mask, return_encoder=True)
    assert torch.equal(z, mar(tokens, labels, mask)) and encoded.shape == (2, 2 + 12, 16)
    # the encoder alone, on the buffer and the visible positions in ascending order
    x = torch.cat([mar._buffer(labels), mar.token_proj(tokens)], 1) + mar.encoder_pos
    x = mar.encoder_in_norm(x)[:, torch.cat([torch.arange(2), 2 + (~mask[0]).nonzero()[:, 0]])]
    assert torch.allclose(encoded, mar.encoder_norm(mar._run(mar.encoder, x, None)), atol=1e-6)


# both were retrained with the released objective (issue 25)
@pytest.mark.parametrize("name, path", [("fmnist-mar", ("head",)), ("fmnist-d2c", ("stage2", "head"))])
def test_shipped_generators_record_the_objective_they_were_trained_with(name, path):
    model = load_generator(name)
    config, head = model.config, model
    for key in path:
        config, head = config[key], getattr(head, key)
    assert config["vb_objective"] == "bits_discretized"
    assert head.vb_objective == "bits_discretized"
