"""Official-format checkpoints for the converter tests, and a reference of the released math written from the
official code's description (key names, shapes, eps values, chunk orders): random tensors in a small
configuration, so that every test runs in well under a second."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tokenbridge.quantizer import gaussian_bins

D, HEADS, DEPTH, BUFFER, CLASSES, SIDE, C = 32, 4, 1, 4, 10, 4, 16  # backbone; grid SIDE x SIDE, C channels
W, HEAD_HEADS, HEAD_DEPTH, LEVELS = 16, 2, 2, 8  # TokenBridge channel head
MLP_W, MLP_DEPTH = 24, 2  # MAR diffusion MLP
L = SIDE * SIDE
ORDER = [8, 1, 10, 9, 6, 12, 4, 0, 3, 11, 7, 14, 2, 15, 13, 5]


def _linear(shapes: dict, name: str, out: int, inp: int) -> None:
    shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp), (out,)


def _norm(shapes: dict, name: str, width: int) -> None:
    shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (width,), (width,)


def _vit_block(shapes: dict, p: str, width: int) -> None:
    _norm(shapes, f"{p}.norm1", width)
    _linear(shapes, f"{p}.attn.qkv", 3 * width, width)
    _linear(shapes, f"{p}.attn.proj", width, width)
    _norm(shapes, f"{p}.norm2", width)
    _linear(shapes, f"{p}.mlp.fc1", 4 * width, width)
    _linear(shapes, f"{p}.mlp.fc2", width, 4 * width)


def backbone_shapes(out_pos: str) -> dict:
    s = {"class_emb.weight": (CLASSES, D), "fake_latent": (1, D), "encoder_pos_embed_learned": (1, L + BUFFER, D),
         "mask_token": (1, 1, D), "decoder_pos_embed_learned": (1, L + BUFFER, D), out_pos: (1, L, D)}
    _linear(s, "z_proj", D, C)
    _norm(s, "z_proj_ln", D)
    for stack in ("encoder_blocks", "decoder_blocks"):
        for i in range(DEPTH):
            _vit_block(s, f"{stack}.{i}", D)
    _norm(s, "encoder_norm", D)
    _linear(s, "decoder_embed", D, D)
    _norm(s, "decoder_norm", D)
    return s


def tokenbridge_shapes() -> dict:
    s = backbone_shapes("output_pos_embed")
    _linear(s, "condition_proj", W, D)
    s["channel_embed"] = s["timesteps_embeddings"] = (1, C, W)
    for i in range(C - 1):
        s[f"token_embeddings.{i}.weight"] = (LEVELS, W)
    for i in range(HEAD_DEPTH):
        p = f"channel_blocks.{i}"
        _vit_block(s, p, W)
        _norm(s, f"{p}.attn.q_norm", W // HEAD_HEADS)
        _norm(s, f"{p}.attn.k_norm", W // HEAD_HEADS)
        _linear(s, f"{p}.adaLN_modulation.1", 6 * W, W)
    _norm(s, "channel_norm", W)
    _linear(s, "channel_final.adaLN_modulation.1", 2 * W, W)
    for i in range(C):
        _linear(s, f"channel_heads.{i}", LEVELS, W)
    return s


def mar_shapes() -> dict:
    s = backbone_shapes("diffusion_pos_embed_learned")
    n = "diffloss.net"
    _linear(s, f"{n}.time_embed.mlp.0", MLP_W, 256)
    _linear(s, f"{n}.time_embed.mlp.2", MLP_W, MLP_W)
    _linear(s, f"{n}.cond_embed", MLP_W, D)
    _linear(s, f"{n}.input_proj", MLP_W, C)
    for i in range(MLP_DEPTH):
        _norm(s, f"{n}.res_blocks.{i}.in_ln", MLP_W)
        _linear(s, f"{n}.res_blocks.{i}.mlp.0", MLP_W, MLP_W)
        _linear(s, f"{n}.res_blocks.{i}.mlp.2", MLP_W, MLP_W)
        _linear(s, f"{n}.res_blocks.{i}.adaLN_modulation.1", 3 * MLP_W, MLP_W)
    _linear(s, f"{n}.final_layer.linear", 2 * C, MLP_W)
    _linear(s, f"{n}.final_layer.adaLN_modulation.1", 2 * MLP_W, MLP_W)
    return s


def random_state(shapes: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 0.3 + (1.0 if k.endswith("norm1.weight") else 0.0)
            for k, shape in shapes.items()}


def tokenbridge_buffers() -> dict:
    boundaries, values = gaussian_bins(LEVELS, 3.0, "clamped")
    return {"reconstruction_values": values.float(), "boundaries": boundaries.float(),
            "channel_mask": torch.full((C, C), float("-inf")).triu(1)}


def tokenbridge_checkpoint(seed: int = 0) -> dict:
    """Like the released file: model with buffers, model_ema with parameters only."""
    params = random_state(tokenbridge_shapes(), seed)
    ema = random_state(tokenbridge_shapes(), seed + 1)
    return {"model": {**params, **tokenbridge_buffers()}, "model_ema": ema, "optimizer": {}, "epoch": 399,
            "scaler": {}}


def mar_checkpoint(seed: int = 0) -> dict:
    params = random_state(mar_shapes(), seed)
    return {"model": params, "model_ema": {k: v.clone() for k, v in params.items()}, "optimizer": {}, "epoch": 3}


# ----------------------------------------------------------------------------------------------------------------
# the released math, from the official state dict


def _ln(x, sd, name, eps=1e-6):
    return F.layer_norm(x, x.shape[-1:], sd.get(f"{name}.weight"), sd.get(f"{name}.bias"), eps)


def _lin(x, sd, name):
    return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])


def _attention(h, sd, p, heads, causal, qk_norm):
    b, n, d = h.shape
    q, k, v = _lin(h, sd, f"{p}.attn.qkv").reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    if qk_norm:
        q, k = _ln(q, sd, f"{p}.attn.q_norm"), _ln(k, sd, f"{p}.attn.k_norm")
    mask = torch.full((n, n), float("-inf")).triu(1) if causal else None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return _lin(out.transpose(1, 2).reshape(b, n, d), sd, f"{p}.attn.proj")


def _mlp(h, sd, p):
    return _lin(F.gelu(_lin(h, sd, f"{p}.mlp.fc1")), sd, f"{p}.mlp.fc2")  # exact GELU (timm Mlp)


def _vit(x, sd, p):
    x = x + _attention(_ln(x, sd, f"{p}.norm1"), sd, p, HEADS, False, False)
    return x + _mlp(_ln(x, sd, f"{p}.norm2"), sd, p)


def ref_backbone(sd, tokens, class_vec, mask, out_pos):
    """MAR's forward_mae_encoder + forward_mae_decoder: tokens [B, L, C], class_vec [B, D], mask [B, L] bool."""
    b = tokens.shape[0]
    x = torch.cat([class_vec[:, None].expand(b, BUFFER, D), _lin(tokens, sd, "z_proj")], 1)
    x = _ln(x + sd["encoder_pos_embed_learned"], sd, "z_proj_ln")
    keep = torch.cat([torch.zeros(b, BUFFER, dtype=torch.bool), mask], 1).logical_not()
    x = x[keep].reshape(b, -1, D)
    for i in range(DEPTH):
        x = _vit(x, sd, f"encoder_blocks.{i}")
    x = _lin(_ln(x, sd, "encoder_norm"), sd, "decoder_embed")
    full = sd["mask_token"].repeat(b, BUFFER + L, 1)
    full[keep] = x.reshape(-1, D)
    x = full + sd["decoder_pos_embed_learned"]
    for i in range(DEPTH):
        x = _vit(x, sd, f"decoder_blocks.{i}")
    return _ln(x, sd, "decoder_norm")[:, BUFFER:] + sd[out_pos]


def ref_head(sd, z, classes, sampling):
    """The channel head: z [N, D], classes [N, C] in prediction order -> logits [N, C, LEVELS]. sampling: the
    sampler's first input (+ the first timestep embedding)."""
    cond = _lin(z, sd, "condition_proj")
    ts, pos = sd["timesteps_embeddings"][0], sd["channel_embed"][0]
    first = cond[:, None] + (ts[:1] if sampling else 0)
    seq = [first] + [F.embedding(classes[:, i], sd[f"token_embeddings.{i}.weight"])[:, None] for i in range(C - 1)]
    x, c = torch.cat(seq, 1) + pos, cond[:, None] + ts
    for i in range(HEAD_DEPTH):
        p = f"channel_blocks.{i}"
        sh1, sc1, g1, sh2, sc2, g2 = _lin(F.silu(c), sd, f"{p}.adaLN_modulation.1").chunk(6, -1)
        x = x + g1 * _attention(_ln(x, sd, f"{p}.norm1") * (1 + sc1) + sh1, sd, p, HEAD_HEADS, True, True)
        x = x + g2 * _mlp(_ln(x, sd, f"{p}.norm2") * (1 + sc2) + sh2, sd, p)
    x = _ln(x, sd, "channel_norm")
    scale, shift = _lin(F.silu(c), sd, "channel_final.adaLN_modulation.1").chunk(2, -1)
    x = F.layer_norm(x, (W,), eps=1e-6) * (1 + scale) + shift
    return torch.stack([_lin(x[:, i], sd, f"channel_heads.{i}") for i in range(C)], 1)


def ref_mlp(sd, x, t, c):
    """MAR's SimpleMLPAdaLN: x [N, C] noisy tokens, t [N] timesteps, c [N, D] -> [N, 2C] (eps, variance)."""
    n = "diffloss.net"
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    y = _lin(F.silu(_lin(temb, sd, f"{n}.time_embed.mlp.0")), sd, f"{n}.time_embed.mlp.2") + _lin(c, sd, f"{n}.cond_embed")
    h = _lin(x, sd, f"{n}.input_proj")
    for i in range(MLP_DEPTH):
        p = f"{n}.res_blocks.{i}"
        shift, scale, gate = _lin(F.silu(y), sd, f"{p}.adaLN_modulation.1").chunk(3, -1)
        hh = _ln(h, sd, f"{p}.in_ln") * (1 + scale) + shift
        h = h + gate * _lin(F.silu(_lin(hh, sd, f"{p}.mlp.0")), sd, f"{p}.mlp.2")
    shift, scale = _lin(F.silu(y), sd, f"{n}.final_layer.adaLN_modulation.1").chunk(2, -1)
    h = F.layer_norm(h, (MLP_W,), eps=1e-6) * (1 + scale) + shift
    return _lin(h, sd, f"{n}.final_layer.linear")
