"""OfficialARHead: the dimension-wise AR head laid out as the released TokenBridge code lays it out.

The released head (TokenBridge-L/H) differs from `heads.DimensionwiseARHead` in four places, all kept here so that a
converted checkpoint (tokenbridge.convert) computes exactly the released function:

- one projection of z (`condition_proj`) is both the first step's input and, plus a learned per-step embedding,
  the AdaLN condition (DimensionwiseARHead has two: `z_in` and `z_cond`);
- the blocks' two pre-norms have a learned scale and bias, and their MLP uses the exact GELU;
- an extra LayerNorm with scale and bias (`channel_norm`) comes before the final AdaLN (whose own norm has none,
  and which splits its modulation as (scale, shift), as DimensionwiseARHead does);
- `first_token_timestep`: the released *sampler* adds the first per-step condition embedding to the first input
  as well; its training path does not. Released samples depend on it, so it is an option (on in the official
  presets), applied on the sampling path only (`sample`, `sampling_logits`); `forward` / `loss` never add it.

Everything else (per-step token embeddings and classifiers indexed by position in the prediction order, the KV
cache, guidance, filtering) is DimensionwiseARHead's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .heads import DimensionwiseARHead
from .layers import AdaLNBlock, check_z

__all__ = ["OfficialARHead"]


class OfficialARHead(DimensionwiseARHead):
    """The released TokenBridge channel head (see the module docstring). Shapes as DimensionwiseARHead; sizes of
    TokenBridge-L: width 1024, depth 4, 8 heads, mlp_ratio 4 (H: depth 6)."""

    def __init__(self, z_dim: int, num_channels: int, levels: int, *, width: int = 1024, depth: int = 4,
                 num_heads: int = 8, order: Sequence[int] | Tensor | None = None, dropout: float = 0.0,
                 attn_dropout: float = 0.0, mlp_ratio: float = 4.0, first_token_timestep: bool = False):
        super().__init__(z_dim, num_channels, levels, width=width, depth=depth, num_heads=num_heads, order=order,
                         dropout=dropout, attn_dropout=attn_dropout, mlp_ratio=mlp_ratio)
        del self.z_cond  # z_in (the official condition_proj) is also the condition's projection
        self.blocks = nn.ModuleList(
            AdaLNBlock(width, num_heads, mlp_ratio, dropout, attn_dropout, affine_norm=True, exact_gelu=True)
            for _ in range(depth)
        )
        self.channel_norm = nn.LayerNorm(width, eps=1e-6)
        self.first_token_timestep = bool(first_token_timestep)
        self._sampling = False
        self._init_weights()

    @contextmanager
    def _sampling_path(self) -> Iterator[None]:
        self._sampling = True
        try:
            yield
        finally:
            self._sampling = False

    def _cond(self, z: Tensor) -> Tensor:
        """silu(condition_proj(z) + e_j) for every step: [N, S, W]."""
        return F.silu(self.z_in(z)[:, None] + self.cond_pos)

    def _start(self, z: Tensor) -> Tensor:
        """condition_proj(z) [N, 1, W], plus e_0 on the sampling path when `first_token_timestep` is on."""
        x = self.z_in(z)[:, None]
        return x + self.cond_pos[0] if self._sampling and self.first_token_timestep else x

    def _out_features(self, h: Tensor, mod: Tensor) -> Tensor:
        return super()._out_features(self.channel_norm(h), mod)

    def _sample(self, z: Tensor, n: int, scale: Tensor | None, pick: Callable[[Tensor], tuple[Tensor, Tensor]],
                use_cache: bool) -> tuple[Tensor, Tensor]:
        with self._sampling_path():
            return super()._sample(z, n, scale, pick, use_cache)

    @torch.no_grad()
    def sampling_logits(self, z: Tensor, indices: Tensor, use_cache: bool = True) -> Tensor:
        """The logits the sampler computes when it draws ``indices`` [N, C] (natural order): [N, C, levels] in
        prediction order, step c given the classes of steps < c. use_cache=False re-runs the prefix at every step
        (the released sampler's way); True uses the KV cache. Unlike `step_logits` (the training path) these
        include the `first_token_timestep` quirk when it is on."""
        check_z(z, self.z_dim)
        classes = self._encode(indices.to(z.device))
        logits: list[Tensor] = []

        def forced(step_logits: Tensor) -> tuple[Tensor, Tensor]:
            logits.append(step_logits.float())
            return classes[:, len(logits) - 1], step_logits.new_zeros(step_logits.shape[0], dtype=torch.float32)

        self._sample(z, z.shape[0], None, forced, use_cache)
        return torch.stack(logits, 1)
