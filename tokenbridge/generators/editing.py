"""What editing (inpainting, outpainting, class-guided regeneration of a region) adds to a family's ``sample``: the
checks of ``known`` / ``known_mask`` and the token-grid mask they give.

``known`` is an image's latents [N, C, H, W] (as the generator's VAE encodes them), ``known_mask`` [N, H, W] bool
says which latent positions to keep (True) and which to generate. A MAR family's token is a p x p patch of latents,
so a mask must be constant over every patch: a token is kept whole or generated whole. Every row of one call must
keep the same number of tokens, because the MAR loop's mask schedule is shared by the batch;
`tokenbridge.edit.edit` groups images by that count.
"""

from __future__ import annotations

import torch


def check_known(known: torch.Tensor | None, known_mask: torch.Tensor | None, n: int, channels: int,
                grid_size: tuple[int, int], patch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Validate an edit request before any work; None when neither is given.

    Returns (known float32 [N, C, H, W], token_known [N, L] bool: True = the token of that patch is kept, L = the
    patches in raster order). A ValueError names a missing half, a wrong dtype, shape, channel count or batch size,
    a non-finite latent, a mask partly covering a patch, or rows keeping different numbers of tokens.
    """
    if known is None and known_mask is None:
        return None
    if known is None or known_mask is None:
        raise ValueError("known (latents [N, C, H, W]) and known_mask ([N, H, W] bool) go together: give both or "
                         "neither")
    h, w = grid_size
    if not isinstance(known, torch.Tensor) or not known.is_floating_point():
        raise ValueError(f"known must be a float tensor of latents [N={n}, C={channels}, {h}, {w}], got "
                         f"{getattr(known, 'dtype', type(known).__name__)}")
    if known.dim() != 4 or known.shape[0] != n or tuple(known.shape[2:]) != (h, w):
        raise ValueError(f"known must be latents [N={n}, C={channels}, {h}, {w}] (one per label, this generator's "
                         f"latent grid), got shape {tuple(known.shape)}")
    if known.shape[1] != channels:
        raise ValueError(f"known has {known.shape[1]} channels, this generator's latents have {channels}: latents "
                         f"of another VAE?")
    if not isinstance(known_mask, torch.Tensor) or known_mask.dtype != torch.bool:
        raise ValueError(f"known_mask must be a bool tensor [N={n}, {h}, {w}] (True = keep), got "
                         f"{getattr(known_mask, 'dtype', type(known_mask).__name__)}")
    if tuple(known_mask.shape) != (n, h, w):
        raise ValueError(f"known_mask must be [N={n}, {h}, {w}] (the latent grid, True = keep), got shape "
                         f"{tuple(known_mask.shape)}: an image-resolution mask goes through "
                         f"tokenbridge.edit.latent_mask first")
    if not bool(torch.isfinite(known).all()):
        raise ValueError("known holds non-finite latents (NaN or inf)")
    p = int(patch_size)
    cells = known_mask.reshape(n, h // p, p, w // p, p)
    kept, touched = cells.all(4).all(2), cells.any(4).any(2)
    if bool((touched & ~kept).any()):
        raise ValueError(f"known_mask does not fit the token grid: {int((touched & ~kept).sum())} of the "
                         f"{p}x{p} latent patches (one token each) are only partly kept; make the mask constant "
                         f"over every patch (tokenbridge.edit.token_mask_to_latent builds one from a token-grid mask)")
    token_known = kept.reshape(n, -1)
    counts = token_known.sum(1)
    if bool((counts != counts[0]).any()):
        raise ValueError(f"the rows of known_mask keep different numbers of tokens ({sorted(set(counts.tolist()))}): "
                         f"the MAR mask schedule is shared by a batch; sample them in separate calls "
                         f"(tokenbridge.edit.edit groups them)")
    return known.float(), token_known
