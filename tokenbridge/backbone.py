"""MAR-style masked-autoregressive backbone (MAE encoder/decoder transformer).

The backbone reads continuous token values (the de-quantized TokenBridge indices, paper Sec. 3.3), hides the masked
positions from the encoder, lets the decoder fill them with a learned mask token and returns one context vector z
per token position; the head predicts the masked tokens' indices from z.

Layout: tokens [B, L, token_dim] with L = (H/p) * (W/p) and token_dim = C * p * p for patch size p
(`patchify` / `unpatchify` convert a [B, H, W, C] grid, channel-major inside a patch as in MAR). The class label
lives in `buffer_size` prefix positions of both encoder and decoder; class row `num_classes` is the unconditional
("fake") class used for label dropout and classifier-free guidance.
"""

from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, H, W, C] -> [B, (H/p)*(W/p), C*p*p]; inside a token the layout is (c, i, j), channel-major."""
    if x.dim() != 4:
        raise ValueError(f"patchify expects [B, H, W, C], got shape {tuple(x.shape)}")
    b, h, w, c = x.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"grid {h}x{w} is not divisible by patch_size {p}")
    if p == 1:
        return x.reshape(b, h * w, c)
    x = x.reshape(b, h // p, p, w // p, p, c).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, grid_size: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Inverse of `patchify`: [B, (H/p)*(W/p), C*p*p] -> [B, H, W, C] for grid_size (H, W)."""
    h, w = grid_size
    p = patch_size
    if tokens.dim() != 3 or h % p or w % p or tokens.shape[1] != (h // p) * (w // p) or tokens.shape[2] % (p * p):
        raise ValueError(
            f"unpatchify: tokens of shape {tuple(tokens.shape)} do not fit grid {h}x{w} with patch_size {p}"
        )
    b, c = tokens.shape[0], tokens.shape[2] // (p * p)
    if p == 1:
        return tokens.reshape(b, h, w, c)
    x = tokens.reshape(b, h // p, w // p, c, p, p).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h, w, c)


def sample_orders(
    batch_size: int,
    seq_len: int,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Independent random permutation of range(seq_len) per sample: LongTensor [batch_size, seq_len]."""
    noise = torch.rand(batch_size, seq_len, device=device, generator=generator)
    return noise.argsort(dim=1)


def random_masking(orders: torch.Tensor, num_masked: int) -> torch.Tensor:
    """Bool mask [B, L], True at the first `num_masked` positions of each sample's order (True = masked)."""
    if not (0 <= num_masked <= orders.shape[1]):
        raise ValueError(f"num_masked must be in [0, {orders.shape[1]}], got {num_masked}")
    mask = torch.zeros(orders.shape, dtype=torch.bool, device=orders.device)
    return mask.scatter(1, orders[:, :num_masked], True)


class Attention(nn.Module):
    """Multi-head self-attention (SDPA); attn_mask is a bool [B, 1, 1, S] key mask, True = may attend."""

    def __init__(self, dim: int, num_heads: int, attn_dropout: float = 0.0, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).reshape(b, s, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        drop = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, s, d)))


class Block(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, attn_dropout: float = 0.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, attn_dropout=attn_dropout, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask)
        return x + self.mlp(self.norm2(x))


class MAR(nn.Module):
    """Masked-autoregressive encoder/decoder backbone.

    forward(tokens [B, L, token_dim] float, labels [B] long in [0, num_classes], mask [B, L] bool True=masked)
    -> z [B, L, width]. Label `num_classes` means unconditional.

    norm_eps: epsilon of every LayerNorm (1e-5, torch's default, as trained here; the official MAR and TokenBridge
    models use 1e-6).
    """

    def __init__(
        self,
        grid_size: tuple[int, int],
        token_dim: int,
        num_classes: int,
        width: int = 256,
        encoder_depth: int = 4,
        decoder_depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        buffer_size: int = 64,
        label_drop_prob: float = 0.1,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        grad_checkpointing: bool = False,
        patch_size: int = 1,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        h, w = (int(v) for v in grid_size)
        if h < 1 or w < 1 or h % patch_size or w % patch_size:
            raise ValueError(f"grid_size {grid_size} must be positive and divisible by patch_size {patch_size}")
        if buffer_size < 1:
            # The encoder needs at least one visible position when every token is masked (first sampling step).
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if num_classes < 1 or token_dim < 1:
            raise ValueError(f"num_classes and token_dim must be >= 1, got {num_classes}, {token_dim}")
        if not (0.0 <= label_drop_prob < 1.0):
            raise ValueError(f"label_drop_prob must be in [0, 1), got {label_drop_prob}")
        self.grid_size = (h, w)
        self.patch_size = patch_size
        self.seq_len = (h // patch_size) * (w // patch_size)
        self.token_dim = token_dim
        self.num_classes = num_classes
        self.width = width
        self.buffer_size = buffer_size
        self.label_drop_prob = label_drop_prob
        self.grad_checkpointing = grad_checkpointing
        total = buffer_size + self.seq_len

        self.class_emb = nn.Embedding(num_classes + 1, width)
        self.token_proj = nn.Linear(token_dim, width)
        self.encoder_pos = nn.Parameter(torch.zeros(1, total, width))
        self.encoder_in_norm = nn.LayerNorm(width, eps=norm_eps)
        self.encoder = nn.ModuleList(
            Block(width, num_heads, mlp_ratio, dropout, attn_dropout, norm_eps) for _ in range(encoder_depth)
        )
        self.encoder_norm = nn.LayerNorm(width, eps=norm_eps)
        self.decoder_embed = nn.Linear(width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.decoder_pos = nn.Parameter(torch.zeros(1, total, width))
        self.decoder = nn.ModuleList(
            Block(width, num_heads, mlp_ratio, dropout, attn_dropout, norm_eps) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(width, eps=norm_eps)
        # The head is shared across positions, so z carries an explicit position signal (MAR does the same).
        self.output_pos = nn.Parameter(torch.zeros(1, self.seq_len, width))
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for p in (self.class_emb.weight, self.encoder_pos, self.mask_token, self.decoder_pos, self.output_pos):
            nn.init.normal_(p, std=0.02)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, W, C] grid -> [B, L, C*p*p] tokens for this backbone's patch size."""
        return patchify(x, self.patch_size)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L, C*p*p] tokens -> [B, H, W, C] grid for this backbone's grid and patch size."""
        return unpatchify(tokens, self.grid_size, self.patch_size)

    def _check_inputs(self, tokens: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
        if tokens.dim() != 3 or tokens.shape[1:] != (self.seq_len, self.token_dim):
            raise ValueError(
                f"tokens must be [B, {self.seq_len}, {self.token_dim}], got shape {tuple(tokens.shape)}"
            )
        if not tokens.is_floating_point():
            raise ValueError(f"tokens must be floating point (de-quantized values), got {tokens.dtype}")
        b = tokens.shape[0]
        if labels.shape != (b,) or labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"labels must be an integer tensor of shape [{b}], got {labels.dtype} {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.num_classes):
            raise ValueError(
                f"labels must be in [0, {self.num_classes}] ({self.num_classes} = unconditional), "
                f"got range [{int(labels.min())}, {int(labels.max())}]"
            )
        if mask.shape != (b, self.seq_len) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool [{b}, {self.seq_len}], got {mask.dtype} {tuple(mask.shape)}")

    def _class_embedding(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.label_drop_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.label_drop_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.class_emb(labels.long())

    def _buffer(self, labels: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The never-masked prefix [B, buffer_size, width]: the class embedding in every slot (a subclass may put
        other conditioning tokens there from ``context``: D2C's Q-Former queries, tokenbridge.fusion)."""
        if context is not None:
            raise ValueError("this MAR backbone takes no context (a fusion backbone, tokenbridge.fusion, does)")
        return self._class_embedding(labels).unsqueeze(1).expand(labels.shape[0], self.buffer_size, self.width)

    def _run(self, blocks: nn.ModuleList, x: torch.Tensor, attn_mask: torch.Tensor | None,
             context: torch.Tensor | None = None) -> torch.Tensor:
        """x through ``blocks`` (context: for a subclass's hooks between blocks; unused here)."""
        for blk in blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, attn_mask, use_reentrant=False)
            else:
                x = blk(x, attn_mask)
        return x

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                return_encoder: bool = False,
                context: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, L, token_dim], labels [B], mask [B, L] (True = masked, hidden from the encoder) -> z [B, L, width].

        context: [B, ...] extra conditioning for a subclass (tokenbridge.fusion.FusedMAR: the codes' context),
        passed to `_buffer` and `_run`; this class refuses one.

        return_encoder: return (z, encoded) with the encoder's output encoded [B, buffer_size + V, width]: the buffer,
        then the V visible positions in ascending order (the released code's layout); rows hiding more positions
        than others end with padding rows (as many as they hide beyond the fewest)."""
        self._check_inputs(tokens, labels, mask)
        b, d = tokens.shape[0], self.width
        x = self.token_proj(tokens.to(self.token_proj.weight.dtype))
        x = torch.cat([self._buffer(labels, context), x], dim=1) + self.encoder_pos
        x = self.encoder_in_norm(x)

        # Encoder sees the buffer and the unmasked tokens only. Visible positions are moved to the front
        # (stable sort keeps their order); rows with fewer visible tokens are padded and key-masked.
        visible = torch.cat([mask.new_ones(b, self.buffer_size), ~mask], dim=1)
        counts = visible.sum(dim=1)
        n_max = int(counts.max())
        keep_idx = torch.argsort((~visible).to(torch.int8), dim=1, stable=True)[:, :n_max]
        gather_idx = keep_idx.unsqueeze(-1).expand(b, n_max, d)
        x = torch.gather(x, 1, gather_idx)
        valid = torch.arange(n_max, device=x.device).unsqueeze(0) < counts.unsqueeze(1)
        attn_mask = None if bool(valid.all()) else valid[:, None, None, :]
        x = encoded = self.encoder_norm(self._run(self.encoder, x, attn_mask, context))

        # Decoder: every position; masked (and padded) slots get the learned mask token.
        x = self.decoder_embed(x)
        mask_tok = self.mask_token.to(x.dtype)
        x = torch.where(valid.unsqueeze(-1), x, mask_tok)
        full = mask_tok.expand(b, self.buffer_size + self.seq_len, d).scatter(1, gather_idx, x)
        full = full + self.decoder_pos
        full = self.decoder_norm(self._run(self.decoder, full, None, context))
        z = full[:, self.buffer_size :] + self.output_pos
        return (z, encoded) if return_encoder else z

    def extra_repr(self) -> str:
        return (
            f"grid_size={self.grid_size}, patch_size={self.patch_size}, seq_len={self.seq_len}, "
            f"token_dim={self.token_dim}, num_classes={self.num_classes}, buffer_size={self.buffer_size}"
        )
