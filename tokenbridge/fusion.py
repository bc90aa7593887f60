"""D2C's fusion modules: how the discrete stream (coarse codes) conditions the continuous MAR backbone.

The discrete codes [N, gh, gw] (int64 in [0, codebook_size)) are embedded by `CodeEmbedding` (a learned table plus
a learned position embedding of the coarse grid) into e [N, Ld = gh * gw, D], D the backbone width. A fusion module
turns e into a context once per backbone call (`condition`) and the backbone (`FusedMAR`) consults it through two
hooks:

- ``prefix(context)``: extra never-masked tokens [N, Q, D] placed in the backbone's buffer, after the class slots
  (the buffer is prepended to the encoder sequence; the encoder's output for it heads the decoder sequence, so the
  tokens are in both and are never predicted);
- ``after_block(x, context, stage, index)``: a residual update of the token states x [N, S, D] after block
  ``index`` of ``stage`` ("encoder" or "decoder").

`CrossAttentionFusion` uses the second hook (every block's states attend to e), `QFormerFusion` the first
(``num_queries`` learned queries summarise e in ``depth`` small layers). Shapes: D = the backbone width.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from .backbone import MAR

__all__ = ["CodeEmbedding", "CrossAttentionFusion", "FusedMAR", "Fusion", "QFormerFusion", "build_fusion"]

FUSION_KINDS = ("cross_attention", "qformer")


class CodeEmbedding(nn.Module):
    """codes [N, gh, gw] int64 in [0, codebook_size) -> e [N, gh * gw, width] (raster order): table + position."""

    def __init__(self, codebook_size: int, grid: tuple[int, int], width: int) -> None:
        super().__init__()
        self.codebook_size, self.grid = int(codebook_size), (int(grid[0]), int(grid[1]))
        self.table = nn.Embedding(self.codebook_size, width)
        self.pos = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], width))
        nn.init.normal_(self.table.weight, std=0.02)  # the scale of MAR's class and position embeddings
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, codes: Tensor) -> Tensor:
        return self.table(codes.flatten(1)) + self.pos


class Fusion(nn.Module):
    """The interface `FusedMAR` calls; the defaults do nothing (a fusion overrides the hook it uses)."""

    num_tokens: int = 0  # extra buffer tokens `prefix` returns

    def condition(self, codes_emb: Tensor) -> Tensor:
        """Code embeddings [N, Ld, D] -> the context the hooks receive (once per backbone call)."""
        raise NotImplementedError

    def prefix(self, context: Tensor) -> Tensor | None:
        """Extra buffer tokens [N, num_tokens, D], or None."""
        return None

    def after_block(self, x: Tensor, context: Tensor, stage: str, index: int) -> Tensor:
        """Token states x [N, S, D] after block ``index`` of ``stage`` -> updated states [N, S, D]."""
        return x


def _attention(width: int, num_heads: int) -> nn.MultiheadAttention:
    if width % num_heads:
        raise ValueError(f"fusion width {width} is not divisible by num_heads {num_heads}")
    return nn.MultiheadAttention(width, num_heads, batch_first=True)


class _CrossAttentionLayer(nn.Module):
    """x + Attn(LN(x), context): pre-norm residual cross-attention with a zero-initialised output projection."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = _attention(width, num_heads)
        # Zero output projection: the residual branch is exactly 0 at init, so an untrained fusion leaves the
        # backbone's function unchanged (it starts as the plain MAR baseline, and a pretrained MAR could be
        # fine-tuned without a shock); the projection still gets a gradient, so the branch opens as it learns.
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        return x + self.attn(self.norm(x), context, context, need_weights=False)[0]


class CrossAttentionFusion(Fusion):
    """After each fused backbone block, the token states attend to the (normalised) code embeddings.

    blocks: which blocks get a cross-attention layer: "all" (default: the encoder reads the visible tokens in the
    light of the codes, and the decoder, which produces z for the masked positions, reads them directly), "encoder"
    or "decoder". Padded encoder slots attend too; MAR drops them before the decoder.
    """

    def __init__(self, width: int, num_heads: int, encoder_depth: int, decoder_depth: int,
                 blocks: Literal["all", "encoder", "decoder"]) -> None:
        super().__init__()
        if blocks not in ("all", "encoder", "decoder"):
            raise ValueError(f"fusion blocks must be 'all', 'encoder' or 'decoder', got {blocks!r}")
        self.context_norm = nn.LayerNorm(width)
        enc = encoder_depth if blocks in ("all", "encoder") else 0
        dec = decoder_depth if blocks in ("all", "decoder") else 0
        self.encoder_layers = nn.ModuleList(_CrossAttentionLayer(width, num_heads) for _ in range(enc))
        self.decoder_layers = nn.ModuleList(_CrossAttentionLayer(width, num_heads) for _ in range(dec))

    def condition(self, codes_emb: Tensor) -> Tensor:
        return self.context_norm(codes_emb)

    def after_block(self, x: Tensor, context: Tensor, stage: str, index: int) -> Tensor:
        layers = self.encoder_layers if stage == "encoder" else self.decoder_layers
        return layers[index](x, context) if index < len(layers) else x


class _QFormerLayer(nn.Module):
    """Queries [N, Q, D]: self-attention among them, cross-attention to the codes, MLP (each pre-norm residual)."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(width), _attention(width, num_heads)
        self.norm2, self.cross_attn = nn.LayerNorm(width), _attention(width, num_heads)
        self.norm3 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, q: Tensor, codes_emb: Tensor) -> Tensor:
        h = self.norm1(q)
        q = q + self.self_attn(h, h, h, need_weights=False)[0]
        q = q + self.cross_attn(self.norm2(q), codes_emb, codes_emb, need_weights=False)[0]
        return q + self.mlp(self.norm3(q))


class QFormerFusion(Fusion):
    """``num_queries`` learned queries read the code embeddings in ``depth`` layers; their outputs [N, Q, D] join
    the backbone's buffer as extra never-masked tokens.

    The queries give the backbone a fixed-size summary of the codes, whatever the coarse grid's size, at the cost
    of Q more buffer positions in every attention layer. Not zero-initialised: extra attention keys change the
    backbone's output anyway, and the queries need a signal to specialise.
    """

    def __init__(self, width: int, num_heads: int, num_queries: int, depth: int, mlp_ratio: float) -> None:
        super().__init__()
        if num_queries < 1 or depth < 1 or not mlp_ratio > 0:
            raise ValueError(f"qformer fusion needs num_queries >= 1, depth >= 1 and mlp_ratio > 0, got "
                             f"{num_queries}, {depth}, {mlp_ratio}")
        self.num_tokens = int(num_queries)
        self.queries = nn.Parameter(torch.randn(1, num_queries, width) * 0.02)
        self.context_norm = nn.LayerNorm(width)
        self.layers = nn.ModuleList(_QFormerLayer(width, num_heads, mlp_ratio) for _ in range(depth))

    def condition(self, codes_emb: Tensor) -> Tensor:
        kv = self.context_norm(codes_emb)
        q = self.queries.expand(codes_emb.shape[0], -1, -1)
        for layer in self.layers:
            q = layer(q, kv)
        return q

    def prefix(self, context: Tensor) -> Tensor:
        return context


def build_fusion(kind: Literal["cross_attention", "qformer"] = "qformer", num_heads: int | None = None,
                 blocks: Literal["all", "encoder", "decoder"] = "all", num_queries: int = 16, depth: int = 2,
                 mlp_ratio: float = 4.0, *, width: int, encoder_depth: int, decoder_depth: int,
                 backbone_heads: int) -> Fusion:
    """A fusion module for a backbone of ``width`` with the given depths (the config's defaults live here).

    kind: "cross_attention" (uses ``blocks``) or "qformer" (uses ``num_queries``, ``depth``, ``mlp_ratio``);
    num_heads: attention heads of the fusion layers (None: the backbone's ``backbone_heads``)."""
    heads = int(num_heads) if num_heads is not None else int(backbone_heads)
    if kind == "cross_attention":
        return CrossAttentionFusion(width, heads, encoder_depth, decoder_depth, blocks)
    if kind == "qformer":
        return QFormerFusion(width, heads, num_queries, depth, mlp_ratio)
    raise ValueError(f"fusion kind must be one of {FUSION_KINDS}, got {kind!r}")


class FusedMAR(MAR):
    """The MAR backbone with a fusion module: forward(tokens, labels, mask, context=...) with the context (from
    ``fusion.condition``) passed explicitly at every call; the buffer and the blocks read it.

    A batch of k * N rows (the sampler's [cond; uncond] rows for guidance) uses the N-row context k times: both
    halves see the same codes, so guidance acts on the class alone.

    buffer_size: the class slots; the buffer holds ``buffer_size + fusion.num_tokens`` positions.
    """

    def __init__(self, fusion: Fusion, *, buffer_size: int, **mar_options: Any) -> None:
        super().__init__(buffer_size=buffer_size + fusion.num_tokens, **mar_options)
        self.class_slots = buffer_size
        self.fusion = fusion  # added after MAR's own init, which would otherwise re-initialise its layers

    def forward(self, tokens: Tensor, labels: Tensor, mask: Tensor, return_encoder: bool = False,
                context: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        if context is None:
            raise ValueError("FusedMAR needs the discrete context: pass context=fusion.condition(codes)")
        reps, rest = divmod(tokens.shape[0], context.shape[0])
        if rest or reps < 1:
            raise ValueError(f"a batch of {tokens.shape[0]} rows does not fit a context of {context.shape[0]} rows")
        context = context.repeat(reps, *([1] * (context.dim() - 1))) if reps > 1 else context
        return super().forward(tokens, labels, mask, return_encoder, context=context)

    def _buffer(self, labels: Tensor, context: Tensor | None = None) -> Tensor:
        extra = self.fusion.prefix(context)
        cls = self._class_embedding(labels).unsqueeze(1).expand(labels.shape[0], self.class_slots, self.width)
        return cls if extra is None else torch.cat([cls, extra.to(cls.dtype)], dim=1)

    def _run(self, blocks: nn.ModuleList, x: Tensor, attn_mask: Tensor | None,
             context: Tensor | None = None) -> Tensor:
        stage = "encoder" if blocks is self.encoder else "decoder"
        for i in range(len(blocks)):
            x = super()._run(blocks[i : i + 1], x, attn_mask)  # MAR's step (gradient checkpointing included)
            x = self.fusion.after_block(x, context, stage, i)
        return x
