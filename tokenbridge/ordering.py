"""Data-derived channel order for the dimension-wise autoregressive head (TokenBridge Sec. 3.2).

Channels whose latent maps carry more of their energy at low spatial frequencies hold more of the image's
structure, so the head predicts them first and the high-frequency detail channels last.
"""
from __future__ import annotations

import torch

from .layout import channel_mismatch

DEFAULT_CUTOFF = 0.25  # radial frequency in cycles per latent pixel; Nyquist is 0.5, so this is its lower half


def low_frequency_energy_share(latents: torch.Tensor, cutoff: float = DEFAULT_CUTOFF) -> torch.Tensor:
    """Share of each channel's spectral energy at radial frequency <= `cutoff` (cycles per latent pixel).

    Args:
        latents: `[N, C, H, W]` real latents (channel-first, as a VAE encoder returns them).
        cutoff: in (0, 0.5*sqrt(2)]; frequencies come from `torch.fft.fftfreq`, so 0.5 is the Nyquist limit.
    Returns:
        `[C]` float64 in [0, 1]. The dataset-wide channel mean is removed first (a constant offset is not
        image content); each image's own mean (the DC term) stays and counts as low frequency.
    """
    if latents.dim() != 4:
        raise ValueError(f"latents must be [N, C, H, W], got shape {tuple(latents.shape)}")
    if not 0 < cutoff <= 0.5 * 2**0.5:
        raise ValueError(f"cutoff must lie in (0, 0.707], got {cutoff}")
    if not torch.isfinite(latents).all():
        raise ValueError("latents contain NaN or inf")
    x = latents.double()
    x = x - x.mean(dim=(0, 2, 3), keepdim=True)
    power = torch.fft.fft2(x).abs().pow(2).sum(0)  # [C, H, W]
    fy = torch.fft.fftfreq(x.shape[2], dtype=torch.float64, device=x.device)
    fx = torch.fft.fftfreq(x.shape[3], dtype=torch.float64, device=x.device)
    low = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt() <= cutoff
    total = power.sum(dim=(1, 2)).clamp_min(1e-30)
    return (power * low).sum(dim=(1, 2)) / total


def _check_layout(shape: tuple[int, ...], channels: int | None) -> None:
    if channels is not None and shape[1] != channels:
        raise ValueError(channel_mismatch("frequency_channel_order", shape, channels))
    if channels is None and shape[1] == shape[2] and shape[2] != shape[3]:
        raise ValueError(channel_mismatch("frequency_channel_order", shape, shape[3]) + " (pass channels=C if "
                         f"the latents really are {shape[1]} channels of {shape[2]}x{shape[3]})")


def frequency_channel_order(latents: torch.Tensor, cutoff: float = DEFAULT_CUTOFF,
                            channels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Channels sorted by low-frequency energy share, most low-frequency first.

    Args:
        latents: `[N, C, H, W]` latents of real images (channel-first, as `VAE.encode` returns them).
        channels: C when known (the VAE's ``latent_channels``): a tensor whose dim 1 differs raises a ValueError
            naming both shapes. Without it, a tensor that reads as a square channel-last grid [N, H, H, C] but as a
            non-square channel-first one (e.g. [16, 8, 8, 4]) is refused as a likely layout mistake.
    Returns:
        (order, inverse), both LongTensor `[C]`: `order[k]` is the channel predicted k-th, and
        `inverse[c]` is the position of channel c in that order (`order[inverse] == arange(C)`).
    """
    if latents.dim() == 4:
        _check_layout(tuple(latents.shape), channels)
    share = low_frequency_energy_share(latents, cutoff).cpu()
    order = torch.sort(share, descending=True, stable=True).indices
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return order, inverse
