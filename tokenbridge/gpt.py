"""RasterGPT: a LlamaGen-style class-conditional causal transformer over a raster sequence of discrete codes
(stage 1 of D2C: it samples the coarse discrete tokens that the continuous stage is conditioned on).

Layout: codes [N, L] int64 in [0, vocab_size), a [N, gh, gw] grid flattened row-major (L = gh * gw). The input
sequence is `prefix_tokens` class positions (the class embedding, repeated; the learned position embeddings tell
them apart) followed by codes[:, :L-1]: the last code is never an input, so there are P + L - 1 input positions
(P = prefix_tokens). The logits of code t come from the hidden state of the input just before it, the last
prefix position for t = 0 (teacher forcing). Class index `num_classes` is the unconditional ("null") class used
for label dropout and classifier-free guidance.

Blocks are pre-norm (LayerNorm) causal self-attention (F.scaled_dot_product_attention) + GELU MLP; weights are
initialised as in GPT-2 (normal, std 0.02; the residual output projections scaled by 1 / sqrt(2 * depth)).
LlamaGen's RMSNorm / SwiGLU / RoPE are left out: at the sizes of stage 1 (a few hundred positions) the plain GPT-2
block is enough and learned positions keep the cached and uncached paths trivially identical.

Sampling runs one new position per step against per-layer key/value caches preallocated at the final length
P + L - 1 (`layers.KVCache`, shared with the channel heads): no per-step re-allocation and copying of a growing
tensor (concatenation costs O(L^2) copies), and the memory a sampling run needs is taken at its first step.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from .layers import KVCache
from .samplers import filter_logits, guide
from .sampling import cfg_schedule as cfg_scale

__all__ = ["RasterGPT"]


class _CausalBlock(nn.Module):
    """Pre-norm block: x + Attn(LN(x)), then x + MLP(LN(x)); attention is causal, optionally against a KV cache."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = max(1, int(width * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))

    def forward(self, x: Tensor, cache: KVCache | None = None, start: int = 0) -> Tensor:
        """x [N, S, W] at positions start..start+S-1 -> [N, S, W].

        Without cache, the S positions attend causally to each other (start must be 0). With cache, their keys and
        values are written at `start` and they attend to everything cached so far; S must be 1 unless start = 0
        (a prefill), because SDPA's is_causal aligns the mask to the top-left corner.
        """
        x = x + self._attention(self.norm1(x), cache, start)
        return x + self.mlp(self.norm2(x))

    def _attention(self, h: Tensor, cache: KVCache | None, start: int) -> Tensor:
        n, length, width = h.shape
        q, k, v = self.qkv(h).view(n, length, 3, self.num_heads, self.head_dim).unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, start)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=length > 1)
        return self.proj(out.transpose(1, 2).reshape(n, length, width))


class RasterGPT(nn.Module):
    """Class-conditional causal transformer over raster code sequences.

    vocab_size V: codes lie in [0, V); seq_len L: codes per sequence; num_classes: labels lie in [0, num_classes]
    (num_classes = unconditional); width / depth / num_heads / mlp_ratio: the transformer; prefix_tokens P >= 1:
    class positions before the codes; class_dropout in [0, 1): probability that `loss` (in training mode only)
    replaces a label by the null class, so the model also learns the unconditional distribution for CFG.
    """

    def __init__(self, vocab_size: int, seq_len: int, num_classes: int, width: int = 128, depth: int = 4,
                 num_heads: int = 4, mlp_ratio: float = 4.0, prefix_tokens: int = 1, class_dropout: float = 0.1):
        super().__init__()
        if min(vocab_size, seq_len, num_classes, width, depth, num_heads, prefix_tokens) < 1:
            raise ValueError(
                f"vocab_size, seq_len, num_classes, width, depth, num_heads and prefix_tokens must be >= 1, got "
                f"vocab_size={vocab_size}, seq_len={seq_len}, num_classes={num_classes}, width={width}, "
                f"depth={depth}, num_heads={num_heads}, prefix_tokens={prefix_tokens}"
            )
        if width % num_heads:
            raise ValueError(f"width={width} must be divisible by num_heads={num_heads}")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio}")
        if not 0.0 <= class_dropout < 1.0:
            raise ValueError(f"class_dropout must be in [0, 1), got {class_dropout}")
        self.vocab_size, self.seq_len, self.num_classes = vocab_size, seq_len, num_classes
        self.prefix_tokens, self.class_dropout = prefix_tokens, class_dropout
        self.class_emb = nn.Embedding(num_classes + 1, width)
        self.tok_emb = nn.Embedding(vocab_size, width)
        self.pos_emb = nn.Parameter(torch.zeros(prefix_tokens + seq_len - 1, width))
        self.blocks = nn.ModuleList(_CausalBlock(width, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)
        self._init_weights(depth)

    def _init_weights(self, depth: int) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.pos_emb, std=0.02)
        # GPT-2: the residual branches' output layers shrink with depth so the residual stream's variance does
        # not grow with the number of blocks. The output head keeps std 0.02 (LlamaGen zeroes it; that would make
        # every logit 0 at init, and an untrained model would carry no signal for the tests of causality).
        for block in self.blocks:
            for layer in (block.proj, block.mlp[2]):
                nn.init.normal_(layer.weight, std=0.02 / math.sqrt(2 * depth))

    def extra_repr(self) -> str:
        return (f"vocab_size={self.vocab_size}, seq_len={self.seq_len}, num_classes={self.num_classes}, "
                f"prefix_tokens={self.prefix_tokens}, class_dropout={self.class_dropout}")

    # ------------------------------------------------------------------------------------------------------------
    # input checks

    def _check_labels(self, labels: Tensor) -> None:
        if not isinstance(labels, Tensor) or labels.dim() != 1:
            shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"labels must be a 1-d integer tensor [N], got {shape}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.num_classes):
            raise ValueError(
                f"labels must lie in [0, num_classes={self.num_classes}] ({self.num_classes} = unconditional), "
                f"got range [{int(labels.min())}, {int(labels.max())}]"
            )

    def _check_codes(self, codes: Tensor, labels: Tensor) -> None:
        self._check_labels(labels)
        if not isinstance(codes, Tensor) or codes.shape != (labels.shape[0], self.seq_len):
            shape = tuple(codes.shape) if isinstance(codes, Tensor) else type(codes).__name__
            raise ValueError(f"codes must have shape [N={labels.shape[0]}, seq_len={self.seq_len}], got {shape}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.vocab_size):
            raise ValueError(
                f"codes must lie in [0, vocab_size={self.vocab_size}), got range [{int(codes.min())}, "
                f"{int(codes.max())}]"
            )

    # ------------------------------------------------------------------------------------------------------------
    # the network

    def _inputs(self, labels: Tensor, codes: Tensor) -> Tensor:
        """Embedded input positions 0..P+T-1: [N, P + T, W] from labels [N] and the first T codes [N, T]."""
        cls = self.class_emb(labels.long())[:, None].expand(-1, self.prefix_tokens, -1)
        x = torch.cat([cls, self._embed(codes)], dim=1)
        return x + self.pos_emb[: x.shape[1]]

    def _embed(self, codes: Tensor) -> Tensor:
        """Input embeddings [N, T, W] of codes [N, T] (a subclass embeds other tokens: generators/causal.py)."""
        return self.tok_emb(codes.long())

    def _hidden(self, x: Tensor, caches: list[KVCache] | None = None, start: int = 0) -> Tensor:
        """Blocks + final norm on x [N, S, W] (positions start..start+S-1) -> [N, S, W]."""
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i], start)
        return self.norm(x)

    def forward(self, codes: Tensor, labels: Tensor) -> Tensor:
        """Teacher-forced logits [N, L, V]: logits[:, t] predict codes[:, t] from the class prefix and codes[:, :t].

        codes [N, L] integer in [0, vocab_size); labels [N] integer in [0, num_classes] (no label dropout here).
        """
        self._check_codes(codes, labels)
        return self._logits(codes, labels)

    def _logits(self, codes: Tensor, labels: Tensor) -> Tensor:
        """`forward` after its checks."""
        h = self._hidden(self._inputs(labels, codes[:, :-1]))
        return self.head(h[:, self.prefix_tokens - 1 :])

    def loss(self, codes: Tensor, labels: Tensor) -> Tensor:
        """Mean next-token cross-entropy (nats per code, computed in at least float32), a scalar.

        In training mode each label is replaced by the null class with probability class_dropout, drawn from the
        global torch RNG of labels' device (the trainer saves and restores it, so a resumed run draws the same).
        """
        self._check_codes(codes, labels)
        if self.training and self.class_dropout > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.class_dropout
            labels = labels.masked_fill(drop, self.num_classes)
        logits = self._logits(codes, labels)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # no half-precision softmax (autocast)
        return F.cross_entropy(logits.reshape(-1, self.vocab_size), codes.reshape(-1).long())

    # ------------------------------------------------------------------------------------------------------------
    # incremental decoding

    def _new_caches(self) -> list[KVCache]:
        """One preallocated cache per block, sized for every input position (P + L - 1)."""
        return [KVCache(self.prefix_tokens + self.seq_len - 1) for _ in self.blocks]

    def _step_logits(self, labels: Tensor, codes: Tensor, t: int, caches: list[KVCache] | None) -> Tensor:
        """Logits [N, V] of code t given the prefix and codes[:, :t] (codes [N, L]; later columns are ignored).

        With caches, step t feeds only its new input (the whole prefix at t = 0, code t - 1 after that) and the
        caches must hold steps 0..t-1; without, the whole sequence so far is recomputed (the reference path).
        """
        if caches is None:
            h = self._hidden(self._inputs(labels, codes[:, :t]))
        elif t == 0:
            h = self._hidden(self._inputs(labels, codes[:, :0]), caches, 0)
        else:
            start = self.prefix_tokens + t - 1
            h = self._hidden(self._embed(codes[:, t - 1 : t]) + self.pos_emb[start], caches, start)
        return self.head(h[:, -1])

    @torch.no_grad()
    def incremental_logits(self, codes: Tensor, labels: Tensor, use_cache: bool = True) -> Tensor:
        """The sampling path, teacher-forced on given codes: logits [N, L, V], one step per position.

        With use_cache it runs exactly the KV-cached steps `sample` runs, so it should equal `forward` up to
        rounding; without, it recomputes the prefix every step. For tests and inspection.
        """
        self._check_codes(codes, labels)
        caches = self._new_caches() if use_cache else None
        return torch.stack([self._step_logits(labels, codes, t, caches) for t in range(self.seq_len)], dim=1)

    @torch.no_grad()
    def sample(self, labels: Tensor, generator: torch.Generator | None = None, cfg: float = 1.0,
               cfg_schedule: str = "constant", temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               use_cache: bool = True, progress: bool = False, known: Tensor | None = None,
               known_mask: Tensor | None = None) -> Tensor:
        """Sample codes [N, L] int64 (raster order) for labels [N] in [0, num_classes] (num_classes = unconditional).

        Each of the L steps computes the next code's logits, guides them, divides them by `temperature`, keeps the
        top_k (0 = all) and then the top-p nucleus (1 = all; `samplers.filter_logits`, never empty) and draws with
        torch.multinomial under `generator` (on the model's device; same seed, same codes); temperature 0 takes
        the argmax (the toolbox's contract). The options' ranges are checked by the generator's sample() (D2C).

        Guidance: with cfg != 1 the conditional rows and their unconditional twins (null class) run as one batch
        of 2N rows and logits = u + s * (c - u), where s = cfg ("constant", LlamaGen's choice) or
        s_t = 1 + (cfg - 1) * (t + 1) / L at step t = 0..L-1 ("linear", reaching cfg at the last code). cfg = 1 takes
        the plain N-row path (the same result, half the work). cfg < 1 moves towards the unconditional model, cfg = 0
        samples it.
        use_cache: one new position per step against per-layer KV caches; False recomputes the whole sequence at
        every step (the reference path: same codes for the same seed, up to rounding). progress: a tqdm bar.
        known [N, L] int64, known_mask [N, L] bool (editing): where the mask is True the code is forced to the known
        one (later steps condition on it); a code is still drawn there, so the random stream is the same as without.
        """
        self._check_labels(labels)
        device = self.pos_emb.device
        labels = labels.to(device)
        n, length = labels.shape[0], self.seq_len
        codes = torch.zeros(n, length, dtype=torch.long, device=device)
        if known is not None:
            known, known_mask = known.to(device).long(), known_mask.to(device)
        guided = float(cfg) != 1.0
        rows = torch.cat([labels, torch.full_like(labels, self.num_classes)]) if guided else labels
        if n == 0:
            return codes
        caches = self._new_caches() if use_cache else None
        for t in tqdm(range(length), desc="sampling codes", disable=not progress):
            # the cached path reads only code t - 1 of the doubled rows; copying all of them is cheap
            logits = self._step_logits(rows, torch.cat([codes, codes]) if guided else codes, t, caches)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # softmax not in half precision
            if guided:
                scale = cfg_scale(cfg, cfg_schedule, (length - t - 1) / length)
                logits = guide(logits, logits.new_full((n, 1), scale))
            if temperature > 0:
                logits = filter_logits(logits / temperature, int(top_k), float(top_p))
                drawn = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
            else:  # greedy (the toolbox's temperature contract); the filters always keep the argmax
                drawn = logits.argmax(-1)
            codes[:, t] = drawn if known is None else torch.where(known_mask[:, t], known[:, t], drawn)
        return codes
