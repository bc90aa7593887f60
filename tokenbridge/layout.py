"""The public API's one layout convention, and the error for a tensor that breaks it.

Networks take and give channel-first tensors: images [N, C, H, W] in [-1, 1], latents [N, C, h, w] (`VAE.encode`,
``sample()["latents"]``, `frequency_channel_order`). The quantizer works on the last axis: latents and indices
[..., C] (``DimensionwiseQuantizer.quantize``, ``sample()["indices"]`` [N, h, w, C]). `channel_last` and
`channel_first` convert a 4-D tensor between the two.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def channel_last(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, H, W, C] (contiguous), e.g. `vae.encode` latents for the quantizer."""
    if x.dim() != 4:
        raise ValueError(f"channel_last wants a 4-D tensor [N, C, H, W], got shape {list(x.shape)}")
    return x.permute(0, 2, 3, 1).contiguous()


def channel_first(x: torch.Tensor) -> torch.Tensor:
    """[N, H, W, C] -> [N, C, H, W] (contiguous), e.g. dequantized latents for `vae.decode`."""
    if x.dim() != 4:
        raise ValueError(f"channel_first wants a 4-D tensor [N, H, W, C], got shape {list(x.shape)}")
    return x.permute(0, 3, 1, 2).contiguous()


def channel_mismatch(what: str, shape: Sequence[int], expected: int, channel_first_layout: bool = True) -> str:
    """The message for a tensor of ``shape`` whose channel axis (1 when ``channel_first_layout``, else the last)
    does not hold the ``expected`` channels: the shape wanted next to the shape given, and the conversion when the
    other layout fits."""
    shape = list(shape)
    if channel_first_layout:
        flipped = len(shape) == 4 and shape[-1] == expected  # the same tensor, channel-last
        wanted = ([shape[0], expected, shape[1], shape[2]] if flipped else
                  [shape[0], expected, *shape[2:]] if len(shape) == 4 else ["N", expected, "H", "W"])
        hint = "; it looks channel-last [N, H, W, C]: pass tokenbridge.channel_first(x)" if flipped else ""
        return f"{what} wants channel-first {wanted} ({expected} channels), got {shape}{hint}"
    flipped = len(shape) == 4 and shape[1] == expected  # the same tensor, channel-first
    wanted = [shape[0], shape[2], shape[3], expected] if flipped else [*shape[:-1], expected] or ["...", expected]
    hint = "; it looks channel-first [N, C, H, W]: pass tokenbridge.channel_last(x)" if flipped else ""
    return f"{what} wants channel-last {wanted} ({expected} channels on the last axis), got {shape}{hint}"
