"""Training the VQ tokenizer (`tokenbridge.vq.VQTokenizer`) on the continuous latents of a token cache: what
``tokenbridge train-vq`` runs. The model module holds the network and its folders; this one the optimisation
loop, the held-out report and reading latents (and their VAE) from cache-latents files or shard folders."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..files import holds_output
from ..markdown import markdown_table
from ..metrics import psnr
from ..optim import ScheduledAdamW, warmup_cosine
from ..progress import disable
from ..shards import ShardedTokens
from ..tokens import CachedTokens
from ..vae import load_vae, vae_fingerprint
from ..vq import VQTokenizer, build_tokenizer, check_vq_folder, code_usage

HOLDOUT = 0.05  # share of a token file held out for evaluation when no test file is given


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_latent_sets(train: torch.Tensor, test: torch.Tensor) -> None:
    for name, x in (("latents_train", train), ("latents_test", test)):
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point() or len(x) == 0:
            raise ValueError(f"train_vq: {name} must be a non-empty float tensor [N, h, w, C], got "
                             f"{getattr(x, 'dtype', type(x))} {list(getattr(x, 'shape', []))}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"train_vq: {name} hold NaN or inf values")
    if train.shape[1:] != test.shape[1:]:
        raise ValueError(f"train_vq: latents_train {list(train.shape[1:])} and latents_test {list(test.shape[1:])} "
                         "differ in grid or channels")


def _check_training(steps: int, batch_size: int, lr: float, seed: int) -> None:
    bad = [f"{k}={v!r}" for k, v in (("steps", steps), ("batch_size", batch_size)) if not (_is_int(v) and v >= 1)]
    bad += [] if _is_int(seed) else [f"seed={seed!r}"]
    bad += [] if isinstance(lr, (int, float)) and 0 < lr < math.inf else [f"lr={lr!r}"]
    if bad:
        raise ValueError(f"train_vq: need integers steps, batch_size >= 1 and seed, and a finite lr > 0; got "
                         f"{', '.join(bad)}")


@torch.no_grad()
def evaluate_vq(model: VQTokenizer, latents: torch.Tensor, vae: nn.Module | None = None,
                batch_size: int = 256) -> dict[str, Any]:
    """Held-out quality of a tokenizer on latents [N, h, w, C]: codebook usage (``code_usage``), ``latent_mse``
    of decode(encode(x)) vs x, ``latent_var`` (the latents' variance, the MSE of predicting their mean), and with
    a VAE ``psnr_db``: mean per-image PSNR of VAE-decoded reconstructions vs VAE-decoded originals ([-1, 1];
    an identical pair counts as 100 dB, not inf)."""
    model.eval()
    device = next(model.parameters()).device
    codes, sq_err, psnrs = [], 0.0, []
    for i in range(0, len(latents), batch_size):
        x = latents[i:i + batch_size].to(device).float()
        c = model.encode(x)
        recon = model.decode(c)
        codes.append(c.cpu())
        sq_err += float((recon - x).double().square().sum())
        if vae is not None:
            decoded = [vae.decode(t.permute(0, 3, 1, 2)).clamp(-1, 1) for t in (recon, x)]
            psnrs.append(psnr(decoded[0], decoded[1]).clamp_max(100.0).cpu())
    result = code_usage(torch.cat(codes), model.codebook_size)
    result.update(latent_mse=sq_err / latents.numel(), latent_var=float(latents.double().var()))
    result["psnr_db"] = float(torch.cat(psnrs).mean()) if psnrs else None
    return result


def _fit_vq(model: VQTokenizer, latents_train: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int,
            progress: bool, device: torch.device) -> dict[str, Any]:
    """train_vq's optimisation loop; returns the training part of the report."""
    h, w = latents_train.shape[1:3]
    opt = ScheduledAdamW(model.parameters(), warmup_cosine(lr, min(100, steps // 10), steps, as_multiplier=True),
                         betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(seed)
    t0, losses = time.time(), []
    for step in tqdm(range(steps), desc="train-vq", disable=disable(None) if progress else True):
        x = latents_train[torch.randint(len(latents_train), (batch_size,), generator=gen)].to(device).float()
        loss = model.loss(x)
        if not math.isfinite(loss.item()):
            raise ValueError(f"train_vq: the loss is {loss.item()} at step {step} (diverged: lower lr?)")
        opt.zero_grad()
        loss.backward()
        opt.step(step)
        losses.append(loss.item())
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "num_train": len(latents_train),
            "codebook_size": model.codebook_size, "code_grid": list(model.code_grid(h, w)),
            "final_train_loss": sum(losses[-50:]) / len(losses[-50:]), "seconds": round(time.time() - t0, 1)}


@holds_output("out_dir", "VQ tokenizer folder")
def train_vq(latents_train: torch.Tensor, latents_test: torch.Tensor, config: dict | None = None,
             steps: int = 2000, batch_size: int = 256, lr: float = 2e-3, seed: int = 0,
             out_dir: str | os.PathLike | None = None, progress: bool = True, vae: nn.Module | None = None,
             device: str | torch.device = "cpu", overwrite: bool = False,
             record: dict | None = None) -> dict[str, Any]:
    """Train a VQTokenizer on latents [N, h, w, C] and return its report (and write it with the tokenizer to
    ``out_dir`` when given).

    config: VQTokenizer keyword arguments (channels and latent_grid come from the latents). AdamW with a short
    warm-up and cosine decay; batches drawn with replacement from a generator seeded by ``seed``; k-means init and
    dead-code replacement draw from the global RNG, which is seeded by ``seed`` inside a fork (the caller's RNG state
    is restored afterwards), so a run is deterministic on one device and leaves the caller's random stream alone.
    The report holds the training settings, the final training loss, seconds, and ``evaluate_vq`` on the held-out
    ``latents_test`` (PSNR when ``vae`` is given); ``record`` adds provenance keys (token file, VAE spec).
    Every argument and ``out_dir`` are checked before training.
    """
    _check_latent_sets(latents_train, latents_test)
    _check_training(steps, batch_size, lr, seed)
    _, h, w, c = latents_train.shape
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # before building: a reproducible init
        model = build_tokenizer({**(config or {}), "channels": c, "latent_grid": (h, w)}, "train_vq")
        model.check_latents(latents_train[:1])
        if out_dir is not None:
            check_vq_folder(out_dir, overwrite)
        model = model.to(device).train()
        report = _fit_vq(model, latents_train, steps, batch_size, lr, seed, progress, device)
    report.update({"num_test": len(latents_test), "latent_grid": [h, w, c], **(record or {})})
    report.update(evaluate_vq(model, latents_test, vae))
    model.report = report
    if out_dir is not None:
        model.save_pretrained(out_dir, overwrite=overwrite)
    return report


# ------------------------------------------------------------------------------------------------ token caches
def _cache_latents(path: str | os.PathLike) -> tuple[torch.Tensor, Any]:
    """(latents float32 [N, h, w, C], the cache) of a cache-latents file or shard folder; ValueError without
    latents."""
    path = Path(path)
    tokens = ShardedTokens(path) if path.is_dir() or path.suffix == ".json" else CachedTokens(path)
    if tokens.latents is None:
        raise ValueError(f"token file {path} stores no continuous latents, which the VQ tokenizer trains on: make it "
                         "with `tokenbridge cache-latents` and data.store_latents=true")
    latents = torch.as_tensor(tokens.latents[:len(tokens)]).permute(0, 2, 3, 1).float().contiguous()
    return latents, tokens


def token_latents(path: str | os.PathLike, test_path: str | os.PathLike | None = None,
                  holdout: float = HOLDOUT) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(train latents, held-out latents, the training cache) from token caches (latents float32 [N, h, w, C]).
    Without ``test_path`` the last ``holdout`` share of the items (at least one) is held out."""
    train, tokens = _cache_latents(path)
    if test_path is not None:
        test, test_tokens = _cache_latents(test_path)
        if tokens.vae_fingerprint and test_tokens.vae_fingerprint not in (None, tokens.vae_fingerprint):
            raise ValueError(f"token files {path} and {test_path} were made with different VAEs (fingerprints "
                             f"{tokens.vae_fingerprint} and {test_tokens.vae_fingerprint})")
        return train, test, tokens
    if len(train) < 2:
        raise ValueError(f"token file {path} holds {len(train)} item(s): too few to hold out a test share; give "
                         "--test-tokens")
    n_test = min(len(train) - 1, max(1, round(holdout * len(train))))
    return train[:-n_test], train[-n_test:], tokens


def token_vae(tokens: Any, device: str | torch.device = "cpu") -> tuple[nn.Module | None, str]:
    """(the VAE a token cache records, "") when it loads and matches the cache's fingerprint and channels, else
    (None, why not): the VQ report's PSNR is then left out."""
    try:
        vae = load_vae(tokens.vae, device) if tokens.vae else None
    except (OSError, ValueError) as e:
        return None, f"PSNR skipped: the token file's VAE {tokens.vae!r} does not load ({e})"
    if vae is None:
        return None, "PSNR skipped: the token file records no VAE"
    if tokens.vae_fingerprint and vae_fingerprint(vae) != tokens.vae_fingerprint:
        return None, f"PSNR skipped: VAE {tokens.vae!r} is not the one that made the token file (fingerprint)"
    if getattr(vae, "latent_channels", None) != tokens.grid_shape[-1]:
        return None, f"PSNR skipped: VAE {tokens.vae!r} does not have the token file's {tokens.grid_shape[-1]} channels"
    return vae.eval(), ""


def report_table(report: dict[str, Any]) -> str:
    """The held-out part of a train_vq report as a markdown table."""
    rows = [("codes used", f"{report['codes_used']} / {report['codebook_size']} ({100 * report['usage']:.1f} %)"),
            ("perplexity", f"{report['perplexity']:.1f}"),
            ("latent MSE", f"{report['latent_mse']:.4f} (latent variance {report['latent_var']:.4f})"),
            ("PSNR of VAE decodes", "-" if report.get("psnr_db") is None else f"{report['psnr_db']:.2f} dB"),
            ("code grid", "x".join(str(g) for g in report["code_grid"])),
            ("train steps / seconds", f"{report['steps']} / {report['seconds']}")]
    return markdown_table(["held-out", "value"], rows)
