"""Building blocks shared by the per-token heads (`heads.py`) and the diffusion head (`diffusion.py`).

- `modulate`: DiT's AdaLN modulation.
- `AdaLNBlock` and its `KVCache`: the causal transformer block of the channel-autoregressive heads.
- `LinearCrossEntropy`: the channel heads' training loss without the [N, vocab] logits (large vocabularies).
- `check_z`, `cfg_rows`, `guide`: the input check and classifier-free guidance contract every head's `sample` shares:
  with guidance, z stacks N conditional rows then N unconditional rows and the head returns N rows.

Shapes: z [N, z_dim]; transformer activations [N, L, W] (L positions of width W).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["GELUS", "modulate", "KVCache", "AdaLNBlock", "LinearCrossEntropy", "check_z", "cfg_rows", "guide"]

# the MLP activation of the AdaLN blocks: GELU's tanh approximation, or the exact (erf) GELU
GELUS = ("tanh", "exact")


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """AdaLN: x * (1 + scale) + shift; x [..., W], shift and scale broadcastable to it."""
    return torch.addcmul(shift, x, 1 + scale)


# ----------------------------------------------------------------------------------------------------------------
# input check and classifier-free guidance


def check_z(z: Tensor, z_dim: int) -> None:
    """Raise ValueError unless z is a float tensor [N, z_dim]."""
    if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[1] != z_dim:
        shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise ValueError(f"z must have shape [N, z_dim={z_dim}], got {shape}")
    if not z.is_floating_point():
        raise ValueError(f"z must be a float tensor, got dtype {z.dtype}")


def cfg_rows(z: Tensor, cfg: float | Tensor | None) -> tuple[int, Tensor | None]:
    """Number of output rows N and the guidance scale as a [N, 1] tensor (None without guidance).

    z: [N, z_dim] without guidance, [2N, z_dim] (conditional rows, then unconditional rows) with it; cfg: None, a
    float or an [N] tensor.
    """
    if cfg is None:
        return z.shape[0], None
    if z.shape[0] % 2:
        raise ValueError(f"with cfg, z must stack N conditional and N unconditional rows; got {z.shape[0]} rows")
    n = z.shape[0] // 2
    scale = torch.as_tensor(cfg, dtype=z.dtype, device=z.device)
    if scale.dim() == 0:
        scale = scale.expand(n)
    if scale.shape != (n,):
        raise ValueError(f"cfg must be a float or a tensor of shape [N={n}], got shape {tuple(scale.shape)}")
    return n, scale[:, None]


def guide(out: Tensor, scale: Tensor | None) -> Tensor:
    """Classifier-free guidance on stacked [cond; uncond] rows: u + cfg * (c - u).

    out: [2N, ...] (returned unchanged, all rows, when scale is None); scale: [N, 1] from `cfg_rows`. Returns [N, ...].
    """
    if scale is None:
        return out
    cond, uncond = out.chunk(2)
    scale = scale.view(-1, *([1] * (out.dim() - 1)))
    return uncond + scale * (cond - uncond)


# ----------------------------------------------------------------------------------------------------------------
# causal AdaLN transformer block


class KVCache:
    """One layer's keys and values for sampling, preallocated at the first write: [N, H, size, head_dim] each
    (dtype taken from the first keys/values, so autocast works)."""

    def __init__(self, size: int):
        self.size: int = size
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def update(self, k: Tensor, v: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """Write k, v [N, H, L, head_dim] at positions start..start+L-1; return everything cached so far,
        [N, H, start+L, head_dim] each."""
        if self.k is None or self.v is None:
            self.k = k.new_empty(*k.shape[:2], self.size, k.shape[3])
            self.v = v.new_empty(*v.shape[:2], self.size, v.shape[3])
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class AdaLNBlock(nn.Module):
    """Pre-LN causal self-attention (qk-norm) + MLP, DiT-style AdaLN (shift/scale/gate for each), per position.

    The pre-norms have no scale or bias of their own: the modulation's shift and scale are their affine part.
    gelu: the MLP's activation, "tanh" (GELU's tanh approximation) or "exact" (the erf GELU)."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, dropout: float, attn_dropout: float,
                 gelu: str = "tanh"):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width={width} must be divisible by num_heads={num_heads}")
        if gelu not in GELUS:
            raise ValueError(f"gelu must be one of {GELUS}, got {gelu!r}")
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.attn_dropout = attn_dropout
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        activation = nn.GELU(approximate="tanh" if gelu == "tanh" else "none")
        self.mlp = nn.Sequential(nn.Linear(width, hidden), activation, nn.Linear(hidden, width))
        self.drop = nn.Dropout(dropout)
        self.ada = nn.Linear(width, 6 * width)  # applied to silu(cond)

    def forward(self, x: Tensor, mod: Tensor, cache: KVCache | None = None, start: int = 0) -> Tensor:
        """x [N, L, W]; mod = self.ada(silu(conditioning)) [N, L, 6W] (the caller decides when to compute it).
        Returns [N, L, W].

        Without `cache`, L positions attend causally to each other (teacher forcing). With `cache`, x holds
        positions start..start+L-1 (L = 1 unless start = 0): their keys/values are added to the cache and they
        attend to everything cached so far.
        """
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        x = x + gate1 * self.drop(self._attention(modulate(self.norm1(x), shift1, scale1), cache, start))
        return x + gate2 * self.drop(self.mlp(modulate(self.norm2(x), shift2, scale2)))

    def _attention(self, h: Tensor, cache: KVCache | None, start: int) -> Tensor:
        n, length, width = h.shape
        q, k, v = self.qkv(h).view(n, length, 3, self.num_heads, self.head_dim).unbind(2)
        q, k, v = self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2), v.transpose(1, 2)
        causal = length > 1
        if cache is not None:
            k, v = cache.update(k, v, start)
            causal = causal and start == 0  # a single new query may see every cached key
        p = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal)
        return self.proj(out.transpose(1, 2).reshape(n, length, width))


# ----------------------------------------------------------------------------------------------------------------
# the channel heads' training loss at large vocabularies


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i cross_entropy(h_i @ w + b, target_i) for h [M, W], w [W, V], b [V], target [M], without the [M, V]
    logits: rows go through in chunks, and each chunk's gradients (softmax - onehot) are taken in the forward
    pass. With V = 65,536 (Table 2d, 4 channels per group at B = 16) the plain loss spends most of a training step
    writing and re-reading gigabytes of logits."""

    chunk_elements = 1 << 23  # logits per chunk (32 MB in float32)

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, b: Tensor, target: Tensor) -> Tensor:
        with torch.autocast(h.device.type, enabled=False):  # float32 logits, softmax and gradients
            return LinearCrossEntropy._forward(ctx, h.float(), w.float(), b.float(), target)

    @staticmethod
    def _forward(ctx, h: Tensor, w: Tensor, b: Tensor, target: Tensor) -> Tensor:
        rows = max(1, LinearCrossEntropy.chunk_elements // w.shape[1])
        total = h.new_zeros(())
        grad_h, grad_w, grad_b = torch.empty_like(h), torch.zeros_like(w), torch.zeros_like(b)
        for start in range(0, h.shape[0], rows):
            hc, tc = h[start : start + rows], target[start : start + rows]
            logits = torch.addmm(b, hc, w)  # [m, V]
            lse = torch.logsumexp(logits, 1)
            total += (lse - logits.gather(1, tc[:, None])[:, 0]).sum()
            probs = logits.sub_(lse[:, None]).exp_()  # d loss / d logits = softmax - onehot
            probs[torch.arange(tc.shape[0], device=tc.device), tc] -= 1
            torch.mm(probs, w.T, out=grad_h[start : start + rows])
            grad_w.addmm_(hc.T, probs)
            grad_b += probs.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        grad_h, grad_w, grad_b = ctx.saved_tensors
        return grad_h * grad_total, grad_w * grad_total, grad_b * grad_total, None
