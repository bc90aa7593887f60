"""Reconstruction through the quantized VAE: the paper's Table 1 (and Fig. 3, 6) at any scale.

Each image is encoded once; every quantizer setting then quantizes, dequantizes and decodes the same latents,
so the rows differ only by the quantizer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from .files import save_figure, write_text
from .images import save_labelled_grid
from .markdown import fmt, markdown_table
from .metrics import feature_statistics, frechet_distance, psnr, ssim
from .quantizer import DimensionwiseQuantizer


@dataclass
class Row:
    name: str
    levels: int | None
    value_range: float | None
    latent_mse: float
    psnr: float
    ssim: float
    fd: float | None = None
    extra: dict = field(default_factory=dict)


def quantizer_settings(levels: tuple[int, ...] = (8, 16, 32, 64), ranges: tuple[float, ...] = (2, 3, 4, 5),
                       default_levels: int = 64, default_range: float = 5.0,
                       calibrations: tuple[str, ...] = ("standardize", "quantile")) -> list[tuple[str, dict]]:
    """The rows of Table 1: (a) B at the default range, (b) range at the default B, then calibrated variants."""
    rows = [(f"B={b}, +-{default_range:g}", dict(levels=b, value_range=(-default_range, default_range)))
            for b in levels]
    rows += [(f"B={default_levels}, +-{r:g}", dict(levels=default_levels, value_range=(-r, r)))
             for r in ranges if r != default_range]
    rows += [(f"B={b}, calibrated={c}", dict(levels=b, calibration=c)) for c in calibrations for b in (8, default_levels)]
    return rows


@torch.no_grad()
def _batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])


@torch.no_grad()
def reconstruction_table(vae, images: torch.Tensor, settings: list[tuple[str, dict]] | None = None,
                         features: Callable[[torch.Tensor], torch.Tensor] | None = None,
                         batch_size: int = 256, device: str | torch.device = "cpu",
                         fit_latents: torch.Tensor | None = None,
                         progress: bool = True) -> tuple[list[Row], dict]:
    """Evaluate the continuous VAE and every quantizer setting on `images` `[N, C, H, W]` in [-1, 1].

    Args:
        vae: a `tokenbridge.vae` VAE (encode -> scaled latents `[N, C, h, w]`, decode -> images).
        features: optional feature extractor `[N, C, H, W] -> [N, D]` for the Frechet distance between
            reconstructions and originals (an rFID analogue; comparable only with the same extractor).
        fit_latents: latents `[M, C, h, w]` the calibrated quantizers are fitted on (default: the evaluated
            latents themselves, which flatters them; pass latents of other images to avoid that).
    Returns:
        (rows, samples): the table rows, continuous VAE first, and a dict with the latents and the decoded
        images of the first 8 inputs for every row (for grids and histograms).
    """
    settings = quantizer_settings() if settings is None else settings
    latents = _batched(vae.encode, images, batch_size, device)
    fit_latents = latents if fit_latents is None else fit_latents
    reference_stats = feature_statistics(_batched(features, images, batch_size, device)) if features else None

    def evaluate(name: str, decoded: torch.Tensor, latent_mse: float, **info) -> Row:
        fd = None
        if features is not None:
            fd = frechet_distance(*reference_stats, *feature_statistics(_batched(features, decoded, batch_size, device)))
        return Row(name, info.get("levels"), info.get("value_range"), latent_mse,
                   psnr(decoded, images).mean().item(), ssim(decoded, images).mean().item(), fd)

    continuous = _batched(vae.decode, latents, batch_size, device)
    rows = [evaluate("VAE (continuous)", continuous, 0.0)]
    samples = {"original": images[:8], "VAE (continuous)": continuous[:8], "latents": latents}
    for name, kwargs in tqdm(settings, desc="quantizer settings", disable=not progress):
        quantizer = DimensionwiseQuantizer(**kwargs)
        if quantizer.calibration != "none":
            quantizer.fit(fit_latents.permute(0, 2, 3, 1))
        dequantized = quantizer(latents.permute(0, 2, 3, 1))[0].permute(0, 3, 1, 2).contiguous()
        decoded = _batched(vae.decode, dequantized, batch_size, device)
        row = evaluate(name, decoded, (dequantized - latents).pow(2).mean().item(),
                       levels=quantizer.levels, value_range=kwargs.get("value_range", (None, None))[1])
        rows.append(row)
        samples[name] = decoded[:8]
    return rows, samples


def format_table(rows: list[Row], fd_name: str = "FD") -> str:
    """Markdown table of the rows; PSNR in dB on images in [-1, 1] (peak-to-peak 2)."""
    base = rows[0].psnr
    return markdown_table(["setting", "latent MSE", "PSNR (dB)", "PSNR vs VAE", "SSIM", fd_name],
                          [[r.name, fmt(r.latent_mse, 5), fmt(r.psnr, 2), f"{100 * (r.psnr - base) / base:+.2f}%",
                            fmt(r.ssim, 4), fmt(r.fd, 3)] for r in rows])


def save_reconstruction_grid(samples: dict, rows: list[Row], path: str | Path) -> Path:
    """One row of images per setting, named in a left margin: original, continuous VAE, then every quantized setting
    whose name is B=.. at the default range (paper Fig. 6)."""
    names = ["original", "VAE (continuous)"] + [r.name for r in rows[1:] if "calibrated" not in r.name
                                                and r.name.endswith(("+-5", "+-5.0"))]
    images = torch.cat([samples[n] for n in names])
    return save_labelled_grid(images, path, names, nrow=len(samples["original"]), scale=3)


def save_histograms(latents: torch.Tensor, path: str | Path, levels: int = 64,
                    value_range: tuple[float, float] = (-5.0, 5.0)) -> Path:
    """Per-channel density of the continuous latents next to the discretized histogram (paper Fig. 3).

    latents: `[N, C, H, W]`. The discrete histogram's bars sit at the reconstruction values (latent scale) and
    are drawn as densities (probability / bin width) so both curves share one axis.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quantizer = DimensionwiseQuantizer(levels=levels, value_range=value_range)
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    indices = quantizer.quantize(x)
    values = quantizer.dequantize(torch.arange(levels)[:, None].expand(levels, 1))[:, 0]
    widths = quantizer.bin_width_at(torch.arange(levels)).clamp(max=2 * (values[1] - values[0]).abs().item())
    channels = x.shape[1]
    cols = min(4, channels)
    rows = (channels + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for c in range(channels):
        ax = axes[c // cols][c % cols]
        ax.hist(x[:, c].numpy(), bins=200, range=value_range, density=True, histtype="step", color="C0",
                label="continuous")
        probs = torch.bincount(indices[:, c], minlength=levels).double() / len(x)
        ax.bar(values.numpy(), (probs / widths.double()).numpy(), width=widths.numpy() * 0.9, alpha=0.5,
               color="C1", label=f"quantized, B={levels}")
        ax.set_title(f"channel {c}", fontsize=9)
        ax.set_xlim(*value_range)
    for k in range(channels, rows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = save_figure(fig, path)
    plt.close(fig)
    return path


def run_reconstruct(vae, images: torch.Tensor, out_dir: str | Path, features=None, fd_name: str = "FD",
                    fit_latents: torch.Tensor | None = None, levels: tuple[int, ...] | None = None,
                    ranges: tuple[float, ...] | None = None, batch_size: int = 256,
                    device="cpu", progress: bool = True) -> tuple[list[Row], str]:
    """Table + grid + histograms into `out_dir`; returns (rows, markdown table). levels / ranges: the Table 1
    rows (None: `quantizer_settings`' defaults). progress: a bar over the quantizer settings on stderr."""
    out_dir = Path(out_dir)
    start = time.time()
    chosen = {k: tuple(v) for k, v in {"levels": levels, "ranges": ranges}.items() if v is not None}
    rows, samples = reconstruction_table(vae, images, quantizer_settings(**chosen),
                                         features=features, batch_size=batch_size, device=device,
                                         fit_latents=fit_latents, progress=progress)
    table = format_table(rows, fd_name)
    write_text(out_dir / "table1.md",
               f"{table}\n\n{len(images)} images, {time.time() - start:.0f} s. PSNR on images in [-1, 1].\n")
    save_reconstruction_grid(samples, rows, out_dir / "reconstruction_grid.png")
    save_histograms(samples["latents"], out_dir / "latent_histograms.png")
    return rows, table
