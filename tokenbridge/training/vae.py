"""Training the embedded Fashion-MNIST KL-VAE (`tokenbridge.autoencoder`), saved with `tokenbridge.vae.save_vae`:
what ``tokenbridge train-vae`` runs, and how the shipped ``weights/fmnist_vae.safetensors`` were made."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..autoencoder import PRESETS, VAE, AutoencoderKL, build_vae, is_number
from ..data import as_tensors
from ..files import check_target, holds_output
from ..metrics import psnr
from ..optim import ScheduledAdamW, warmup_cosine
from ..progress import disable
from ..vae import VAE_FORMAT, check_device, save_vae

# How the shipped weights/fmnist_vae.safetensors were made (also stored in the file's "training" metadata):
FMNIST_TRAINING = (
    "python -c \"import torch; torch.set_num_threads(1); from tokenbridge.training.vae import train_vae; "
    "train_vae('tokenbridge/weights/fmnist_vae.safetensors', steps=1400, batch_size=64, lr=2e-3, kl_weight=2e-3, "
    "seed=0)\"  # 1,324 s on one contended CPU core (~1.5 epochs). Test split (10,000 images): mean per-image PSNR "
    "28.48 dB on the [0, 1] scale (26.76 dB from the pooled MSE); scaling_factor 1.0680; scaled posterior-mean "
    "latents per channel mean [-0.13, -0.26, 0.25, -0.08], std [0.52, 1.28, 0.95, 1.02], |z| > 5: 1.6e-6, max 5.53."
)


def _in_batches(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """torch.cat of ``fn`` applied to consecutive slices of ``images`` [N, ...] of at most ``batch_size`` rows."""
    return torch.cat([fn(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


@torch.no_grad()
def latent_stats(vae: VAE, images: torch.Tensor, batch_size: int = 500) -> dict:
    """Statistics of the scaled posterior-mean latents of ``images`` [N, C, H, W] in [-1, 1], encoded in batches.

    Returns {"mean", "std"}: per-channel lists (length latent_channels), "std_all": overall std, "frac_beyond_5":
    fraction of elements with |z| > 5 (outside the quantizer's default range), "max_abs": the largest |z|.
    """
    z = _in_batches(vae.encode, images, batch_size)
    per = z.transpose(0, 1).flatten(1)
    return {
        "mean": [round(float(m), 4) for m in per.mean(1)],
        "std": [round(float(s), 4) for s in per.std(1)],
        "std_all": round(float(z.std()), 4),
        "frac_beyond_5": float((z.abs() > 5).float().mean()),
        "max_abs": round(float(z.abs().max()), 3),
    }


@torch.no_grad()
def _eval_psnr(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 500) -> float:
    """Mean per-image PSNR (dB) of the reconstructions; on [-1, 1] images it equals the PSNR on the [0, 1] scale."""
    return float(_in_batches(lambda x: psnr(vae.reconstruct(x), x), images, batch_size).mean())


def _check_training(out_path: str | os.PathLike, steps: int, batch_size: int, lr: float, kl_weight: float, seed: int,
                    log_every: int, preset: str, device: str | torch.device) -> tuple[Path, torch.device]:
    """(output path, device) once everything train_vae can check before reading data is fine: argument types and
    ranges, the preset, the device, and that ``out_path`` (a .safetensors) can be written, its folder created, so
    an hour of training is not lost at the end."""
    if not isinstance(out_path, (str, os.PathLike)) or Path(out_path).suffix != ".safetensors":
        raise ValueError(f"train_vae: out_path must be the .safetensors file to write (what load_vae reads), "
                         f"got {out_path!r}")
    counts = {"steps": steps, "batch_size": batch_size, "log_every": log_every, "seed": seed}
    bad = [f"{k}={v!r}" for k, v in counts.items() if not (isinstance(v, int) and not isinstance(v, bool))]
    bad += [f"{k}={v!r}" for k, v in counts.items() if k != "seed" and isinstance(v, int) and v < 1]
    bad += [] if is_number(lr) and 0 < lr < math.inf else [f"lr={lr!r}"]
    bad += [] if is_number(kl_weight) and 0 <= kl_weight < math.inf else [f"kl_weight={kl_weight!r}"]
    if bad:
        raise ValueError(f"train_vae: need integers steps, batch_size, log_every >= 1 and seed, a finite lr > 0 "
                         f"and kl_weight >= 0; got {', '.join(bad)}")
    if preset not in PRESETS:
        raise ValueError(f"train_vae: unknown VAE preset {preset!r}; choose from {sorted(PRESETS)}")
    device = check_device(device)
    return check_target(out_path, VAE_FORMAT, what="VAE output"), device


@holds_output("out_path", "VAE output")
def train_vae(
    out_path: str | os.PathLike,
    steps: int = 1400,
    batch_size: int = 64,
    lr: float = 2e-3,
    kl_weight: float = 2e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    log_every: int = 200,
    data_root: str | os.PathLike | None = None,
    preset: str = "fmnist",
) -> AutoencoderKL:
    """Train the embedded KL-VAE on the Fashion-MNIST train split and save it (atomically) to ``out_path``.

    Loss per image = sum of squared errors over pixels (images in [-1, 1]) + ``kl_weight`` * KL(q(z|x) || N(0, I))
    summed over latent elements, with reparameterised posterior samples. AdamW, 100-step warm-up, cosine decay.
    The defaults reproduce the shipped weights (see FMNIST_TRAINING). Afterwards scaling_factor = 1 / std of
    posterior means over 5,000 training images (scaled latents have std 1, like 0.2325 for KL-16); test-split PSNR
    and latent statistics are printed and stored in the file's metadata. Every argument and the output path are
    checked before the data is read; a diverged (NaN) loss stops training with a ValueError.
    """
    from tqdm import tqdm

    out_path, device = _check_training(out_path, steps, batch_size, lr, kl_weight, seed, log_every, preset, device)
    torch.manual_seed(seed)
    train_x, _ = as_tensors("train", root=data_root)
    test_x, _ = as_tensors("test", root=data_root)
    vae = build_vae(preset).to(device)
    opt = ScheduledAdamW(vae.parameters(), warmup_cosine(lr, min(100, steps // 10), steps, as_multiplier=True),
                         betas=(0.9, 0.99), weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    vae.train()
    bar = tqdm(range(steps), desc="train-vae", disable=disable())
    for step in bar:
        x = train_x[torch.randint(len(train_x), (batch_size,), generator=gen)].to(device)
        recon, mean, logvar = vae(x)
        rec = (recon - x).pow(2).flatten(1).sum(1).mean()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()
        loss = rec + kl_weight * kl
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0 * 784)  # loss is a per-image sum; only catches spikes
        opt.step(step)
        if step % log_every == 0 or step == steps - 1:
            if not math.isfinite(loss.item()):  # the weights are garbage now; say so instead of saving them
                raise ValueError(f"train_vae: the loss is {loss.item()} at step {step} (diverged: lower lr?); "
                                 f"{out_path} was not written")
            p = float(-10 * torch.log10(((recon.detach().clamp(-1, 1) - x) / 2).pow(2).mean()))
            bar.set_postfix(rec=f"{rec.item():.2f}", kl=f"{kl.item():.1f}", psnr=f"{p:.2f}")
            if bar.disable:
                print(f"step {step} rec {rec.item():.3f} kl {kl.item():.2f} batch-psnr {p:.2f} dB", flush=True)
    vae.eval()
    with torch.no_grad():
        calib = train_x[:5000].to(device)
        means = _in_batches(lambda x: vae.encode_moments(x)[0], calib, 500)
        vae.scaling_factor = 1.0 / float(means.std())
    test = test_x.to(device)
    test_psnr = _eval_psnr(vae, test)
    stats = latent_stats(vae, test)
    info = {
        "call": f"train_vae(steps={steps}, batch_size={batch_size}, lr={lr}, kl_weight={kl_weight}, seed={seed})",
        "steps": steps, "batch_size": batch_size, "lr": lr, "kl_weight": kl_weight, "seed": seed,
        "seconds": round(time.time() - t0, 1), "test_psnr_db": round(test_psnr, 3), "test_latents": stats,
    }
    save_vae(vae, out_path, training=info)
    print(f"test PSNR {test_psnr:.2f} dB ([0,1] scale), scaling_factor {vae.scaling_factor:.4f}, "
          f"latent mean {stats['mean']} std {stats['std']}, beyond +-5: {stats['frac_beyond_5']:.2e}; saved {out_path}")
    return vae
