"""Per-token prediction heads: the backbone gives one feature z per spatial token, a head turns it into a token.

- DimensionwiseARHead: the paper's head (Sec. 3.2). A small causal transformer over the C channels of one token,
  p(q) = prod_c p(q^c | q^<c, z), each step a `levels`-way classification. Sampling uses a KV cache.
- GroupedHead: the same transformer over C/g groups of g channels, each group one levels**g-way classification
  (paper Table 2d).
- ParallelHead: C independent classifiers from z, no inter-channel dependency (paper Table 2a).
- DiffusionHead (in `diffusion.py`, built here by `build_head("diffusion", ...)`): MAR's continuous-token
  diffusion MLP (the speed baseline of paper Table 5).

Shapes: z [N, z_dim] float; indices [N, C] long in [0, levels), always in natural channel order.
Classifier-free guidance: `sample(z, cfg=...)` takes 2N rows of z (first N conditional, last N unconditional)
and returns N rows.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .diffusion import DiffusionHead
from .layers import AdaLNBlock, KVCache, LinearCrossEntropy, check_z, modulate
from . import samplers
from .samplers import cfg_rows, guide

__all__ = ["DimensionwiseARHead", "GroupedHead", "ParallelHead", "build_head"]


# ----------------------------------------------------------------------------------------------------------------
# input checks and sampling helpers


def _check_indices(indices: Tensor, num_rows: int, num_channels: int, levels: int) -> None:
    if not isinstance(indices, Tensor) or indices.shape != (num_rows, num_channels):
        shape = tuple(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__
        raise ValueError(f"indices must have shape [N={num_rows}, num_channels={num_channels}], got {shape}")
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor, got dtype {indices.dtype}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= levels):
        raise ValueError(
            f"indices must lie in [0, levels={levels}), got range [{int(indices.min())}, {int(indices.max())}]"
        )


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


# ----------------------------------------------------------------------------------------------------------------
# the sampling contract shared by the discrete heads


class _DiscreteHead(nn.Module):
    """What the discrete heads share: the contract of `sample` (checks, guidance, filtering). A subclass sets
    z_dim and implements `_sample`."""

    z_dim: int

    @torch.no_grad()
    def sample(
        self,
        z: Tensor,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        cfg: float | Tensor | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Sample one token per row of z.

        z: [N, z_dim], or [2N, z_dim] (conditional rows then unconditional rows) when cfg is given; cfg: float or
        [N] tensor, logits = l_u + cfg * (l_c - l_u) at every step, both halves in one batched pass. temperature,
        top_k, top_p: the toolbox's contract (tokenbridge.samplers: 0 = greedy; 0 / 1 = no filtering), checked by
        the generator's sample(), not here.
        Returns (indices [N, C] long in natural channel order, log_prob [N] float32: summed log-prob of the
        sampled classes under the distribution sampled from, a per-token confidence).
        use_cache=True runs one new step per layer against a KV cache; False re-runs the whole prefix every step
        (the reference path; same tokens for the same generator seed). Heads without steps ignore it.
        """
        check_z(z, self.z_dim)
        n, scale = cfg_rows(z, cfg)

        def pick(logits: Tensor) -> tuple[Tensor, Tensor]:
            """Logits [rows of z, ..., V] -> guided and sampled: (classes [N, ...], their log-probs [N, ...])."""
            return samplers.pick(guide(logits, scale), temperature, top_k, top_p, generator)

        return self._sample(z, n, scale, pick, use_cache)

    def _sample(
        self, z: Tensor, n: int, scale: Tensor | None, pick: Callable[[Tensor], tuple[Tensor, Tensor]], use_cache: bool
    ) -> tuple[Tensor, Tensor]:
        """`sample` after its checks: n output rows, scale [n, 1] or None (no guidance), pick(logits) samples from
        the logits of all rows of z. Returns (indices [n, C], log_prob [n])."""
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------------------
# causal transformer over the channels (or channel groups) of one token


class _ChannelARHead(_DiscreteHead):
    """Shared machinery of DimensionwiseARHead and GroupedHead: a causal transformer over the S = C / g steps of
    one token, step j a levels**g-way classification of the g channels order[j*g:(j+1)*g], conditioned on z.

    Step 0 reads Linear(z); step j > 0 reads a step-specific embedding of the class chosen at step j-1, plus a
    learned position embedding. AdaLN conditioning cond_j = Linear(z) + e_j (learned per step). Each step has its
    own output Linear(width, vocab), stored as one [S, width, vocab] weight so teacher forcing is one batched
    matmul and a sampling step touches only its own slice.

    The options both public heads take (keyword-only, defaults here): width, depth, num_heads of the transformer;
    order, the prediction order (a permutation of range(C); channel order[0] first; None = natural order);
    dropout, attn_dropout; mlp_ratio, the MLP hidden width over `width`; gelu, the blocks' MLP activation
    ("tanh" approximation or "exact", `layers.GELUS`); final_norm: an affine LayerNorm on the last block's output
    before the final AdaLN; sample_start_cond: the sampler adds the first step's condition embedding e_0 to the
    first input, which the training path does not (the released TokenBridge sampler's input, see tokenbridge.official).
    """

    # sample() modulates all steps at once when N * S <= this (see there); a speed knob, same result either way
    precompute_max_rows = 1024
    # the training loss skips the [N, S, vocab] logits tensor from this vocabulary size on (`LinearCrossEntropy`)
    fused_loss_min_vocab = 4096

    def __init__(
        self,
        z_dim: int,
        num_channels: int,
        levels: int,
        group_size: int,
        *,
        width: int = 256,
        depth: int = 3,
        num_heads: int = 4,
        order: Sequence[int] | Tensor | None = None,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        mlp_ratio: float = 2.0,
        gelu: str = "tanh",
        final_norm: bool = False,
        sample_start_cond: bool = False,
    ):
        super().__init__()
        if min(z_dim, num_channels, width, depth, num_heads) < 1 or levels < 2:
            raise ValueError(
                f"need z_dim, num_channels, width, depth, num_heads >= 1 and levels >= 2, got z_dim={z_dim}, "
                f"num_channels={num_channels}, width={width}, depth={depth}, num_heads={num_heads}, levels={levels}"
            )
        if group_size < 1 or num_channels % group_size:
            raise ValueError(f"num_channels={num_channels} must be divisible by group_size={group_size} >= 1")
        # checked on the CPU even when the module is built under torch.device("meta") (config checks)
        natural = torch.arange(num_channels, device="cpu")
        order = natural if order is None else torch.as_tensor(order, device="cpu").long().flatten()
        if order.numel() != num_channels or not torch.equal(order.sort().values, natural):
            raise ValueError(f"order must be a permutation of range({num_channels}), got {order.tolist()}")
        self.z_dim, self.num_channels, self.levels, self.group_size = z_dim, num_channels, levels, group_size
        self.steps, self.vocab = num_channels // group_size, levels**group_size
        self.register_buffer("order", order)
        self.register_buffer("inverse", torch.argsort(order))

        self.z_in = nn.Linear(z_dim, width)
        # one table for all steps: row j * vocab + class embeds the class chosen at step j (input of step j + 1);
        # the last step's class is never an input, so a single-step head (g = C) has an empty table
        self.tok_emb = nn.Embedding((self.steps - 1) * self.vocab, width)
        self.register_buffer("emb_offset", torch.arange(self.steps - 1) * self.vocab, persistent=False)
        self.pos_emb = nn.Parameter(torch.zeros(self.steps, width))
        self.z_cond = nn.Linear(z_dim, width)
        self.cond_pos = nn.Parameter(torch.zeros(self.steps, width))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            AdaLNBlock(width, num_heads, mlp_ratio, dropout, attn_dropout, gelu) for _ in range(depth)
        )
        self.final_norm = nn.LayerNorm(width, eps=1e-6) if final_norm else nn.Identity()
        self.sample_start_cond = bool(sample_start_cond)
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(width, 2 * width)
        self.out_w = nn.Parameter(torch.zeros(self.steps, width, self.vocab))
        self.out_b = nn.Parameter(torch.zeros(self.steps, self.vocab))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.tok_emb.weight, self.pos_emb, self.cond_pos, self.out_w):
            nn.init.normal_(p, std=0.02)
        for ada in [b.ada for b in self.blocks] + [self.ada_out]:  # blocks start as the identity (DiT)
            nn.init.zeros_(ada.weight)
            nn.init.zeros_(ada.bias)

    # -- natural channel order <-> step classes ------------------------------------------------------------

    def _encode(self, indices: Tensor) -> Tensor:
        """[N, C] natural-order indices -> [N, S] step classes (base-`levels` digits, first channel most
        significant)."""
        q = indices.long()[:, self.order].view(indices.shape[0], self.steps, self.group_size)
        tokens = q[..., 0]
        for k in range(1, self.group_size):
            tokens = tokens * self.levels + q[..., k]
        return tokens

    def _decode(self, tokens: Tensor) -> Tensor:
        digits = []
        for _ in range(self.group_size):
            digits.append(tokens % self.levels)
            tokens = tokens // self.levels
        return torch.stack(digits[::-1], -1).view(tokens.shape[0], self.num_channels)[:, self.inverse]

    # -- transformer -----------------------------------------------------------------------------------------

    def _cond(self, z: Tensor) -> Tensor:
        """silu(Linear(z) + e_j) for every step: [N, S, W]."""
        return F.silu(self.z_cond(z)[:, None] + self.cond_pos)

    def _classify(self, h: Tensor, mod: Tensor, step: int | None = None) -> Tensor:
        """Final AdaLN + per-step classifier: h [N, L, W], mod = ada_out(cond) [N, L, 2W] -> logits [N, L, vocab]
        for steps 0..L-1, or for the single step `step` (L = 1)."""
        h = self._out_features(h, mod)
        if step is not None:
            return torch.addmm(self.out_b[step], h[:, 0], self.out_w[step])[:, None]
        length = h.shape[1]
        return torch.baddbmm(self.out_b[:length, None], h.transpose(0, 1), self.out_w[:length]).transpose(0, 1)

    def _out_features(self, h: Tensor, mod: Tensor) -> Tensor:
        """The final AdaLN: what the per-step classifiers read, [N, L, W]."""
        scale, shift = mod.chunk(2, dim=-1)
        return modulate(self.norm_out(self.final_norm(h)), shift, scale)

    def _start(self, z: Tensor, sampling: bool = False) -> Tensor:
        """The first step's input before its position embedding: Linear(z) [N, 1, W] (+ e_0 when sampling with
        `sample_start_cond`)."""
        x = self.z_in(z)[:, None]
        return x + self.cond_pos[0] if sampling and self.sample_start_cond else x

    def _prefix_logits(self, z: Tensor, tokens: Tensor, sampling: bool = False) -> Tensor:
        """Teacher forcing: logits [N, L, vocab] of steps 0..L-1 given the classes of steps 0..L-2 ([N, L-1])."""
        x, cond = self._prefix_hidden(z, tokens, sampling)
        return self._classify(x, self.ada_out(cond))

    def _prefix_hidden(self, z: Tensor, tokens: Tensor, sampling: bool = False) -> tuple[Tensor, Tensor]:
        """The last block's output [N, L, W] and the conditioning [N, L, W] of steps 0..L-1 (teacher forcing)."""
        length = tokens.shape[1] + 1
        x = [self._start(z, sampling)]
        if length > 1:
            x.append(self.tok_emb(tokens + self.emb_offset[: length - 1]))
        x = self.drop(torch.cat(x, 1) + self.pos_emb[:length])
        cond = self._cond(z)[:, :length]
        for block in self.blocks:
            x = block(x, block.ada(cond))
        return x, cond

    # -- public API ----------------------------------------------------------------------------------------

    def step_logits(self, z: Tensor, indices: Tensor) -> Tensor:
        """Teacher-forced logits in prediction (step) order: [N, S, vocab] (S = C / g, vocab = levels ** g)."""
        check_z(z, self.z_dim)
        _check_indices(indices, z.shape[0], self.num_channels, self.levels)
        return self._prefix_logits(z, self._encode(indices)[:, :-1])

    def loss(self, z: Tensor, indices: Tensor, reduction: str = "mean") -> Tensor:
        """Cross-entropy in nats per channel. reduction: "mean" (scalar) or "none" ([N], mean over channels)."""
        _check_reduction(reduction)
        if reduction == "mean" and self.vocab >= self.fused_loss_min_vocab and torch.is_grad_enabled():
            return self._fused_mean_loss(z, indices)
        logits = self.step_logits(z, indices)
        ce = F.cross_entropy(logits.transpose(1, 2).float(), self._encode(indices), reduction="none")
        ce = ce.sum(1) / self.num_channels  # a group's joint NLL is the sum of its channels' NLLs
        return ce.mean() if reduction == "mean" else ce

    def _fused_mean_loss(self, z: Tensor, indices: Tensor) -> Tensor:
        """loss(reduction="mean") through `LinearCrossEntropy`: the same value and gradients, less memory."""
        check_z(z, self.z_dim)
        _check_indices(indices, z.shape[0], self.num_channels, self.levels)
        classes = self._encode(indices)  # [N, S]
        x, cond = self._prefix_hidden(z, classes[:, :-1])
        h = self._out_features(x, self.ada_out(cond))
        total = sum(LinearCrossEntropy.apply(h[:, s], self.out_w[s], self.out_b[s], classes[:, s])
                    for s in range(self.steps))
        return total / (self.num_channels * z.shape[0])

    @torch.no_grad()
    def sampling_logits(self, z: Tensor, indices: Tensor, use_cache: bool = True) -> Tensor:
        """The logits [N, S, vocab] (prediction order) the sampler computes while it draws ``indices`` [N, C]
        (natural order): step s given the classes of steps < s, the KV cache used or (use_cache=False) the prefix
        re-run at every step. Unlike `step_logits` (the training path) they include `sample_start_cond`."""
        check_z(z, self.z_dim)
        classes, logits = self._encode(indices.to(z.device)), []

        def forced(step_logits: Tensor) -> tuple[Tensor, Tensor]:
            logits.append(step_logits.float())
            return classes[:, len(logits) - 1], step_logits.new_zeros(step_logits.shape[0], dtype=torch.float32)

        self._sample(z, z.shape[0], None, forced, use_cache)
        return torch.stack(logits, 1)

    def _sample(
        self, z: Tensor, n: int, scale: Tensor | None, pick: Callable[[Tensor], tuple[Tensor, Tensor]], use_cache: bool
    ) -> tuple[Tensor, Tensor]:
        tokens = torch.zeros(n, self.steps, dtype=torch.long, device=z.device)
        log_prob = torch.zeros(n, dtype=torch.float32, device=z.device)
        if use_cache:
            cond = self._cond(z)
            ada = [block.ada for block in self.blocks] + [self.ada_out]
            # Small batches are weight-bandwidth bound: modulate all steps in one matmul per layer (weights read
            # once, not once per step). Large batches are compute bound and would hold N*S*(6*depth+2)*W floats.
            mods = [f(cond) for f in ada] if z.shape[0] * self.steps <= self.precompute_max_rows else None
            cache = [KVCache(self.steps) for _ in self.blocks]
            x = self._start(z, sampling=True) + self.pos_emb[0]
        for t in range(self.steps):
            if use_cache:
                step_mods = [m[:, t : t + 1] for m in mods] if mods else [f(cond[:, t : t + 1]) for f in ada]
                for block, kv, mod in zip(self.blocks, cache, step_mods):
                    x = block(x, mod, kv, t)
                logits = self._classify(x, step_mods[-1], t)[:, 0]
            else:
                prefix = tokens[:, :t] if scale is None else tokens[:, :t].repeat(2, 1)
                logits = self._prefix_logits(z, prefix, sampling=True)[:, t]
            tok, lp = pick(logits)
            tokens[:, t] = tok
            log_prob += lp
            if use_cache and t + 1 < self.steps:
                tok = tok if scale is None else tok.repeat(2)
                x = (self.tok_emb(tok + t * self.vocab) + self.pos_emb[t + 1])[:, None]
        return self._decode(tokens), log_prob


class DimensionwiseARHead(_ChannelARHead):
    """The paper's dimension-wise autoregressive head: p(q | z) = prod_c p(q^c | q^<c, z) over the C channels of
    one token, each a `levels`-way classification.

    options (keyword-only): width, depth, num_heads, order, dropout, attn_dropout, mlp_ratio; their meaning and
    defaults are in `_ChannelARHead`. order: prediction order (e.g. from `frequency_channel_order`): channel
    order[0] is predicted first. Inputs and outputs are always in natural channel order. Paper sizes: L width
    1024, depth 4, 8 heads; H 1024 x 6. mlp_ratio 2 reproduces the paper's parameter counts (z_dim 1024, C 16,
    levels 64: 1024 x 4 65.0M, 1024 x 6 94.4M; paper 65M / 94M).
    """

    def __init__(self, z_dim: int, num_channels: int, levels: int, **options: Any):
        super().__init__(z_dim, num_channels, levels, 1, **options)

    def forward(self, z: Tensor, indices: Tensor) -> Tensor:
        """Teacher-forced logits [N, C, levels] in natural channel order, all channels in one pass."""
        return self.step_logits(z, indices)[:, self.inverse]


class GroupedHead(_ChannelARHead):
    """Autoregressive over C / g groups of g channels (consecutive in prediction order), each group one
    levels**g-way classification (paper Table 2d); group_size=1 computes what DimensionwiseARHead computes.

    `forward` returns logits [N, C / g, levels ** g] (groups in prediction order; a group's class is its channels'
    indices as base-`levels` digits, first channel most significant). `loss` is in nats per channel, comparable
    with the other heads. Per-group input embeddings and classifiers make parameters grow like
    2 * (C / g) * levels**g * width: with z_dim 64, C 4, levels 16, width 256, depth 3: g=1 2.96M, g=2 3.13M,
    g=4 19.8M parameters (see tests/test_heads.py). options: as DimensionwiseARHead.
    """

    def __init__(self, z_dim: int, num_channels: int, levels: int, group_size: int = 2, **options: Any):
        super().__init__(z_dim, num_channels, levels, group_size, **options)

    def forward(self, z: Tensor, indices: Tensor) -> Tensor:
        """Teacher-forced logits [N, C / g, levels ** g] (groups in prediction order)."""
        return self.step_logits(z, indices)


# ----------------------------------------------------------------------------------------------------------------
# parallel baseline


class ParallelHead(_DiscreteHead):
    """C independent `levels`-way classifiers on a shared MLP trunk of z (no inter-channel dependency)."""

    def __init__(
        self, z_dim: int, num_channels: int, levels: int, width: int = 256, depth: int = 3, dropout: float = 0.0
    ):
        super().__init__()
        if min(z_dim, num_channels, width) < 1 or levels < 2 or depth < 0:
            raise ValueError(f"bad ParallelHead sizes: z_dim={z_dim} C={num_channels} levels={levels} width={width}")
        self.z_dim, self.num_channels, self.levels = z_dim, num_channels, levels
        self.z_in = nn.Linear(z_dim, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Dropout(dropout), nn.Linear(width, width)
            )
            for _ in range(depth)
        )
        self.norm_out = nn.LayerNorm(width)
        self.out_w = nn.Parameter(torch.randn(num_channels, width, levels) * 0.02)
        self.out_b = nn.Parameter(torch.zeros(num_channels, levels))

    def _logits(self, z: Tensor) -> Tensor:
        check_z(z, self.z_dim)
        h = self.z_in(z)
        for block in self.blocks:
            h = h + block(h)
        return torch.einsum("nw,cwv->ncv", self.norm_out(h), self.out_w) + self.out_b

    def forward(self, z: Tensor, indices: Tensor | None = None) -> Tensor:
        """Logits [N, C, levels] (indices are only checked: nothing depends on them)."""
        if indices is not None:
            _check_indices(indices, z.shape[0], self.num_channels, self.levels)
        return self._logits(z)

    def loss(self, z: Tensor, indices: Tensor, reduction: str = "mean") -> Tensor:
        """Cross-entropy in nats per channel; reduction "mean" (scalar) or "none" ([N])."""
        _check_reduction(reduction)
        logits = self.forward(z, indices)
        ce = F.cross_entropy(logits.transpose(1, 2).float(), indices.long(), reduction="none").mean(1)
        return ce.mean() if reduction == "mean" else ce

    def _sample(
        self, z: Tensor, n: int, scale: Tensor | None, pick: Callable[[Tensor], tuple[Tensor, Tensor]], use_cache: bool
    ) -> tuple[Tensor, Tensor]:
        tokens, lp = pick(self._logits(z))
        return tokens, lp.sum(1)


# ----------------------------------------------------------------------------------------------------------------


def build_head(kind: str, **kwargs: Any) -> nn.Module:
    """kind: "ar" (DimensionwiseARHead), "parallel", "grouped" or "diffusion"; kwargs go to the constructor."""
    heads = {"ar": DimensionwiseARHead, "parallel": ParallelHead, "grouped": GroupedHead, "diffusion": DiffusionHead}
    if kind not in heads:
        raise ValueError(f"unknown head kind {kind!r}; choose from {sorted(heads)}")
    return heads[kind](**kwargs)
