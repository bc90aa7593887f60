"""The released state dicts' keys -> the plain generators' tensors, with the weight rewrites that remove the
released layout's differences from the plain modules ("fold what folds").

- An affine LayerNorm whose output only feeds an AdaLN modulation folds into the modulation's Linear:
  modulate(g * n + b, shift, scale) = n * g (1 + scale) + b (1 + scale) + shift for the normalized n, so with
  scale' = g (1 + scale) - 1 and shift' = shift + b (1 + scale), both affine in the condition, the plain
  (non-affine) norm computes the same. The released TokenBridge channel blocks' norm1 / norm2 and MAR's
  diffusion blocks' `in_ln` are such norms; `channel_norm` is not (a second, non-affine LayerNorm follows it).
  The rewrite is done in float64 and rounded once to the checkpoint's dtype.
- MAR's final AdaLN splits its modulation as (shift, scale), the plain head as (scale, shift): the two halves of
  its Linear's weight rows and bias swap places (exact).
- The released TokenBridge head has one projection of z for the first input and the condition; the plain head
  has two (`z_in`, `z_cond`), both get its weights (exact).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["ConversionError", "Rule", "apply_rules", "backbone_rules", "channel_head_rules", "diffusion_head_rules",
           "fold_affine_norms", "swap_halves"]


class ConversionError(ValueError):
    """A checkpoint that does not fit the official layout; the message names every offending key."""


@dataclass
class Rule:
    """One tensor of ours made from official tensors: ``target`` = ``fn(*sources)``; ``shapes`` are the shapes
    the sources must have."""

    target: str
    sources: list[str]
    shapes: list[tuple[int, ...]]
    fn: Callable[..., Tensor] = field(default=lambda t: t)


# ----------------------------------------------------------------------------------------------------------------
# weight rewrites


def fold_affine_norms(t: Tensor, chunks: int, slots: Sequence[tuple[int, int]], affine: Sequence[Tensor]) -> Tensor:
    """An AdaLN modulation Linear's weight [chunks * W, W_cond] or bias [chunks * W] with affine LayerNorms folded
    in: ``slots[k]`` = (shift chunk, scale chunk) that norm k's output is modulated by, ``affine`` = (weight_0,
    bias_0, weight_1, bias_1, ...) [W] each. Returns float64 (see the module docstring for the maths)."""
    parts = list(t.double().chunk(chunks))
    for (shift, scale), g, b in zip(slots, affine[::2], affine[1::2]):
        g, b = g.double(), b.double()
        if t.dim() == 1:  # the bias: the constant 1 of (1 + scale) is scaled too
            one_plus = 1 + parts[scale]
            parts[shift], parts[scale] = parts[shift] + b * one_plus, g * one_plus - 1
        else:
            parts[shift], parts[scale] = parts[shift] + b[:, None] * parts[scale], g[:, None] * parts[scale]
    return torch.cat(parts)


def swap_halves(t: Tensor) -> Tensor:
    """[2W, ...] -> its second half, then its first: (shift, scale) rows become (scale, shift)."""
    first, second = t.chunk(2)
    return torch.cat([second, first])


# ----------------------------------------------------------------------------------------------------------------
# key rules


def _same(ours: dict[str, Tensor], target: str, source: str) -> Rule:
    return Rule(target, [source], [tuple(ours[target].shape)])


def _module(ours: dict[str, Tensor], target: str, source: str, names: Sequence[str] = ("weight", "bias")) -> list[Rule]:
    return [_same(ours, f"{target}.{n}", f"{source}.{n}") for n in names]


def _folded(ours: dict[str, Tensor], target: str, source: str, chunks: int, norms: Sequence[str],
            slots: Sequence[tuple[int, int]]) -> list[Rule]:
    """The modulation Linear ``target`` from ``source`` with the affine LayerNorms ``norms`` folded in."""
    width = ours[f"{target}.bias"].shape[0] // chunks
    affine = [f"{n}.{p}" for n in norms for p in ("weight", "bias")]
    return [Rule(f"{target}.{name}", [f"{source}.{name}", *affine],
                 [tuple(ours[f"{target}.{name}"].shape)] + [(width,)] * len(affine),
                 lambda t, *gb: fold_affine_norms(t, chunks, slots, gb)) for name in ("weight", "bias")]


def backbone_rules(ours: dict[str, Tensor], out_pos_key: str) -> list[Rule]:
    """The MAR backbone, shared by both released families (its LayerNorms feed no modulation: nothing folds)."""
    cls = ours["backbone.class_emb.weight"]
    rules = [Rule("backbone.class_emb.weight", ["class_emb.weight", "fake_latent"],
                  [(cls.shape[0] - 1, cls.shape[1]), (1, cls.shape[1])], lambda c, f: torch.cat([c, f])),
             _same(ours, "backbone.encoder_pos", "encoder_pos_embed_learned"),
             _same(ours, "backbone.mask_token", "mask_token"),
             _same(ours, "backbone.decoder_pos", "decoder_pos_embed_learned"),
             _same(ours, "backbone.output_pos", out_pos_key)]
    for target, source in (("token_proj", "z_proj"), ("encoder_in_norm", "z_proj_ln"), ("encoder_norm", "encoder_norm"),
                           ("decoder_embed", "decoder_embed"), ("decoder_norm", "decoder_norm")):
        rules += _module(ours, f"backbone.{target}", source)
    for ours_stack, stack in (("encoder", "encoder_blocks"), ("decoder", "decoder_blocks")):
        depth = sum(1 for k in ours if re.fullmatch(rf"backbone\.{ours_stack}\.\d+\.norm1\.weight", k))
        for i in range(depth):
            t, s = f"backbone.{ours_stack}.{i}", f"{stack}.{i}"
            for a, b in (("norm1", "norm1"), ("attn.qkv", "attn.qkv"), ("attn.proj", "attn.proj"),
                         ("norm2", "norm2"), ("mlp.0", "mlp.fc1"), ("mlp.3", "mlp.fc2")):
                rules += _module(ours, f"{t}.{a}", f"{s}.{b}")
    return rules


def channel_head_rules(ours: dict[str, Tensor]) -> list[Rule]:
    """The released TokenBridge channel head -> the plain DimensionwiseARHead (gelu "exact", final_norm on)."""
    steps, width, vocab = ours["head.out_w"].shape
    rules = _module(ours, "head.z_in", "condition_proj") + _module(ours, "head.z_cond", "condition_proj")
    rules += _module(ours, "head.final_norm", "channel_norm")
    rules += _module(ours, "head.ada_out", "channel_final.adaLN_modulation.1")
    rules += [Rule("head.pos_emb", ["channel_embed"], [(1, steps, width)], lambda t: t[0]),
              Rule("head.cond_pos", ["timesteps_embeddings"], [(1, steps, width)], lambda t: t[0]),
              Rule("head.tok_emb.weight", [f"token_embeddings.{i}.weight" for i in range(steps - 1)],
                   [(vocab, width)] * (steps - 1), lambda *t: torch.cat(t)),
              Rule("head.out_w", [f"channel_heads.{i}.weight" for i in range(steps)], [(vocab, width)] * steps,
                   lambda *t: torch.stack([w.t() for w in t])),
              Rule("head.out_b", [f"channel_heads.{i}.bias" for i in range(steps)], [(vocab,)] * steps,
                   lambda *t: torch.stack(t))]
    depth = sum(1 for k in ours if re.fullmatch(r"head\.blocks\.\d+\.qkv\.weight", k))
    for i in range(depth):
        t, s = f"head.blocks.{i}", f"channel_blocks.{i}"
        for a, b in (("qkv", "attn.qkv"), ("q_norm", "attn.q_norm"), ("k_norm", "attn.k_norm"),
                     ("proj", "attn.proj"), ("mlp.0", "mlp.fc1"), ("mlp.2", "mlp.fc2")):
            rules += _module(ours, f"{t}.{a}", f"{s}.{b}")
        # modulation chunks (shift1, scale1, gate1, shift2, scale2, gate2): norm1 feeds 0/1, norm2 feeds 3/4
        rules += _folded(ours, f"{t}.ada", f"{s}.adaLN_modulation.1", 6, [f"{s}.norm1", f"{s}.norm2"],
                         [(0, 1), (3, 4)])
    return rules


def diffusion_head_rules(ours: dict[str, Tensor]) -> list[Rule]:
    """MAR's SimpleMLPAdaLN -> the plain DiffusionHead (in_ln folded, final modulation halves swapped)."""
    net = "diffloss.net"
    rules: list[Rule] = []
    for a, b in (("time_mlp.0", "time_embed.mlp.0"), ("time_mlp.2", "time_embed.mlp.2"), ("z_cond", "cond_embed"),
                 ("x_in", "input_proj"), ("out", "final_layer.linear")):
        rules += _module(ours, f"head.{a}", f"{net}.{b}")
    rules += [Rule(r.target, r.sources, r.shapes, swap_halves)
              for r in _module(ours, "head.ada_out", f"{net}.final_layer.adaLN_modulation.1")]
    depth = sum(1 for k in ours if re.fullmatch(r"head\.blocks\.\d+\.ada\.weight", k))
    for i in range(depth):
        t, s = f"head.blocks.{i}", f"{net}.res_blocks.{i}"
        for a in ("mlp.0", "mlp.2"):
            rules += _module(ours, f"{t}.{a}", f"{s}.{a}")
        # modulation chunks (shift, scale, gate): in_ln feeds 0/1
        rules += _folded(ours, f"{t}.ada", f"{s}.adaLN_modulation.1", 3, [f"{s}.in_ln"], [(0, 1)])
    return rules


def apply_rules(rules: list[Rule], official: dict[str, Tensor], ours: dict[str, Tensor],
                consumed_elsewhere: Sequence[str] = (), derived: Callable[[str], bool] = lambda k: False
                ) -> dict[str, Tensor]:
    """Our state dict from the official one by ``rules``; raise ConversionError naming every missing key,
    unexpected key and shape mismatch. ``consumed_elsewhere``: official keys checked by the caller;
    ``derived(key)``: our keys that come from the config, not from the checkpoint."""
    missing, mismatched, new = [], [], {}
    for rule in rules:
        absent = [s for s in rule.sources if s not in official]
        missing += absent
        bad = [f"{s}: {tuple(official[s].shape)}, expected {e}" for s, e in zip(rule.sources, rule.shapes)
               if s in official and tuple(official[s].shape) != tuple(e)]
        mismatched += bad
        if not absent and not bad:
            new[rule.target] = rule.fn(*(official[s] for s in rule.sources)).to(ours[rule.target].dtype)
    used = {s for rule in rules for s in rule.sources} | set(consumed_elsewhere)
    unexpected = sorted(set(official) - used)
    missing = list(dict.fromkeys(missing))  # a source several rules read is named once
    mismatched = list(dict.fromkeys(mismatched))
    problems = [f"{name} ({len(keys)}): {', '.join(keys)}" for name, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)) if keys]
    if problems:
        raise ConversionError("the checkpoint does not fit the official layout; " + "; ".join(problems))
    unfilled = sorted(k for k in ours if k not in new and not derived(k))
    if unfilled:  # a rule table out of step with the model: a bug here, not in the checkpoint
        raise RuntimeError(f"conversion rules leave these tensors unfilled: {unfilled}")
    return new
