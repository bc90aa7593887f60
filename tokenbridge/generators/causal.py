"""CausalTokenBridgeGenerator: TokenBridge's tokens and dimension-wise head on a causal raster backbone.

The MAR backbone of the ``tokenbridge`` family re-runs the whole sequence at every one of its ``num_iter`` steps;
here a class-conditional causal transformer (`RasterGPT`, D2C's stage 1, with a KV cache) reads the spatial tokens
in raster order, LlamaGen-style, so sampling costs about one backbone pass per image. Each spatial token's input
is its C per-channel indices de-quantized and projected (as the MAR backbone's ``token_proj`` embeds them); the
output feature z of position t conditions the same dimension-wise AR head (`DimensionwiseARHead`), which predicts
token t's C indices in the (frequency) channel order: p(q) = prod_t prod_c p(q_t^c | q_t^<c, z_t(q_<t, class)).

Training (`loss`): teacher forcing; cross-entropy over all C indices of all H*W tokens, in nats per channel (as
the ``tokenbridge`` family's). Labels are replaced by the null class with probability ``backbone.class_dropout``
(training mode only) so that the model also learns the unconditional distribution for guidance.

Generation (`sample`): H*W steps, each one new backbone position against the KV caches (both guidance halves in
one batch of 2N rows) and one head sample with guidance on the head's logits, temperature and top-k / top-p.

It trains on the same token files as the ``tokenbridge`` family (indices and the quantizer that made them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..config import signature_model, validate
from ..gpt import RasterGPT
from ..heads import DimensionwiseARHead
from ..quantizer import DimensionwiseQuantizer
from ..samplers import CfgSchedule, GuidanceScale, Temperature, TopK, TopP
from ..sampling import cfg_schedule as cfg_scale
from .base import Generator, ShapesConfig, apply_preset, make_generator
from .presets import FMNIST_SHAPES
from .registry import register_family
from .tokenbridge import HEAD_CONFIGS, QuantizerConfig, _fill_from_data, check_buildable, quantizer_meta_parts

BackboneConfig = signature_model(RasterGPT, "CausalBackboneConfig", exclude=("vocab_size", "seq_len", "num_classes"))
HeadConfig = HEAD_CONFIGS["ar"]  # DimensionwiseARHead's options; order may be "frequency" (from the tokens)


class CausalTokenBridgeConfig(ShapesConfig):
    """grid_size, channels and num_classes default to the training tokens' (None: taken from the token file); the
    grid's H*W positions run in raster order, the C channels of each are predicted one by one by the head."""

    quantizer: QuantizerConfig = QuantizerConfig()
    backbone: BackboneConfig = BackboneConfig()
    head: HeadConfig = HeadConfig()


class TokenGPT(RasterGPT):
    """`RasterGPT` over token vectors instead of codes: position t's input is Linear(tokens[:, t]) (tokens
    [N, L, token_dim] float, the de-quantized indices) and its output is the final-normed feature [W] (no
    vocabulary head). `features` is teacher forcing; `_step_logits` (the KV-cached step) returns features too."""

    def __init__(self, token_dim: int, seq_len: int, num_classes: int, **options: Any):
        super().__init__(vocab_size=1, seq_len=seq_len, num_classes=num_classes, **options)
        if token_dim < 1:
            raise ValueError(f"token_dim must be >= 1, got {token_dim}")
        self.token_dim, self.width = token_dim, self.class_emb.embedding_dim
        self.tok_emb = nn.Linear(token_dim, self.width)  # replaces the code embedding
        nn.init.xavier_uniform_(self.tok_emb.weight)  # as the MAR backbone's token_proj
        nn.init.zeros_(self.tok_emb.bias)
        self.head = nn.Identity()  # the features go to the dimension-wise head

    def extra_repr(self) -> str:
        return (f"token_dim={self.token_dim}, seq_len={self.seq_len}, num_classes={self.num_classes}, "
                f"prefix_tokens={self.prefix_tokens}, class_dropout={self.class_dropout}")

    def _embed(self, codes: torch.Tensor) -> torch.Tensor:
        return self.tok_emb(codes.to(self.tok_emb.weight.dtype))

    def features(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced features z [N, L, W]: z[:, t] sees the class prefix and tokens[:, :t] ([N, L, D])."""
        return self._logits(tokens, labels)

    def step_features(self, tokens: torch.Tensor, labels: torch.Tensor, use_cache: bool = True) -> torch.Tensor:
        """The sampling path teacher-forced on ``tokens``: z [N, L, W], one step per position, with KV caches
        (exactly the steps `CausalTokenBridgeGenerator.sample` runs) or recomputing the prefix every step."""
        caches = self._new_caches() if use_cache else None
        return torch.stack([self._step_logits(labels, tokens, t, caches) for t in range(self.seq_len)], dim=1)


@register_family
class CausalTokenBridgeGenerator(Generator):
    """Quantizer + causal raster backbone (`TokenGPT`) + dimension-wise AR head.

    loss((indices [B, H, W, C] long in [0, levels), labels [B] long in [0, num_classes])) -> scalar CE loss.
    sample(labels [N]) -> dict(indices [N, H, W, C] long, latents [N, C, H, W] float, confidence [N, H, W] float).
    Label `num_classes` means unconditional.
    """

    family = "tokenbridge-ar"
    presets: dict[str, dict] = {}  # filled at the end of this module
    Config = CausalTokenBridgeConfig
    check_buildable = staticmethod(check_buildable)
    meta_parts = staticmethod(quantizer_meta_parts)

    def __init__(self, config: dict, quantizer: DimensionwiseQuantizer | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        self.quantizer = quantizer if quantizer is not None else DimensionwiseQuantizer(**cfg["quantizer"])
        self.seq_len, self.levels = self.grid_size[0] * self.grid_size[1], self.quantizer.levels
        self.backbone = TokenGPT(self.channels, self.seq_len, self.num_classes, **cfg["backbone"])
        self.head = DimensionwiseARHead(z_dim=self.backbone.width, num_channels=self.channels, levels=self.levels,
                                        **cfg["head"])

    # ------------------------------------------------------------------ config
    @classmethod
    def resolve_config(cls, config: dict, data: Any = None) -> dict:
        """Validate a model config (presets accepted); with ``data`` (a token dataset), fill grid, channels,
        classes and the quantizer from it and resolve ``head.order: frequency``."""
        raw = apply_preset(cls, config)
        cfg = validate(CausalTokenBridgeConfig, raw, "model").model_dump(mode="json")
        if data is not None:
            _fill_from_data(cfg, raw.get("quantizer") or {}, data)
        return cfg

    @classmethod
    def from_config(cls, config: dict, data: Any = None) -> CausalTokenBridgeGenerator:
        """Build from a model config; with ``data`` (a token dataset) its quantizer (fitted state included) and
        shapes are used, so that training de-quantizes with exactly the quantizer that made the tokens."""
        return cls(cls.resolve_config(config, data), quantizer=data.make_quantizer() if data is not None else None)

    # ------------------------------------------------------------------ training
    def _tokens(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [N, H, W, C] or [N, L, C] -> de-quantized backbone inputs [N, L, C] (raster order)."""
        return self.quantizer.dequantize(indices).reshape(indices.shape[0], self.seq_len, self.channels)

    def features(self, indices: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced head conditions z [N, L, W] of indices [N, H, W, C] (no label dropout)."""
        return self.backbone.features(self._tokens(indices.long()), labels.long())

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy of every channel of every token (nats per channel) of a batch (indices, labels)."""
        indices, labels = self.check_batch(batch)
        indices = indices.long()
        if self.training and self.backbone.class_dropout > 0:  # global RNG: the trainer's resume restores it
            drop = torch.rand(labels.shape[0], device=labels.device) < self.backbone.class_dropout
            labels = labels.masked_fill(drop, self.num_classes)
        z = self.backbone.features(self._tokens(indices), labels)
        return self.head.loss(z.reshape(-1, z.shape[-1]), indices.reshape(-1, self.channels))

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def sample(
        self,
        labels: torch.Tensor,
        cfg: GuidanceScale = 1.0,
        cfg_schedule: CfgSchedule = "linear",
        temperature: Temperature = 1.0,
        top_k: TopK = 0,
        top_p: TopP = 1.0,
        generator: torch.Generator | int | None = None,
        progress: bool = False,
        callback: Callable[[dict[str, torch.Tensor]], None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Generate token grids for class ``labels`` [N] (value num_classes = unconditional), one raster position
        per step.

        cfg: guidance scale on the head's logits, u + s * (c - u) at every channel step; s = cfg ("constant") or
        1 + (cfg - 1) * (t + 1) / L at position t ("linear", reaching cfg at the last token); cfg = 1 runs the
        conditional rows alone. temperature (0 = greedy), top_k (0 = all), top_p (1 = all): the head's sampling
        filter (the toolbox's contract, tokenbridge.samplers). generator: None (global RNG), an int seed or a torch.Generator on the model's device.
        Returns dict(indices [N, H, W, C] long, latents [N, C, H, W] float de-quantized, confidence [N, H, W]
        float = the head's log-prob of each sampled token). callback: called after every position with the
        outputs so far plus ``step`` (1-based), ``num_iter`` (= L) and ``mask`` [N, H, W] bool (True = not
        generated yet; those latents are 0, the prior mean) — for live views.
        """
        device = self.backbone.pos_emb.device
        gen = make_generator(generator, device)
        labels = labels.to(device).long()
        n, length = labels.shape[0], self.seq_len
        guided = float(cfg) != 1.0
        rows = torch.cat([labels, torch.full_like(labels, self.num_classes)]) if guided else labels
        indices = torch.zeros(n, length, self.channels, dtype=torch.long, device=device)
        tokens = torch.zeros(rows.shape[0], length, self.channels, device=device)  # both halves read the same
        confidence = torch.zeros(n, length, device=device)
        caches = self.backbone._new_caches()
        was_training = self.training
        self.eval()  # head dropout off: the cached steps must be the teacher-forced computation
        try:
            for t in tqdm(range(length), desc="sampling tokens", disable=not progress):
                z = self.backbone._step_logits(rows, tokens, t, caches)
                scale = cfg_scale(cfg, cfg_schedule, (length - t - 1) / length) if guided else None
                idx, log_prob = self.head.sample(z, temperature=float(temperature), top_k=int(top_k),
                                                 top_p=float(top_p), cfg=scale, generator=gen)
                indices[:, t], confidence[:, t] = idx, log_prob
                value = self.quantizer.dequantize(idx, dtype=tokens.dtype)
                tokens[:, t] = value.repeat(2, 1) if guided else value
                if callback is not None:
                    callback(self._partial(indices, confidence, t + 1))
        finally:
            self.train(was_training)
        return self._outputs(indices, confidence)

    def _outputs(self, indices: torch.Tensor, confidence: torch.Tensor) -> dict[str, torch.Tensor]:
        grid = indices.reshape(-1, *self.grid_size, self.channels)
        latents = self.quantizer.dequantize(grid).permute(0, 3, 1, 2).contiguous()
        return {"indices": grid, "latents": latents, "confidence": confidence.reshape(-1, *self.grid_size)}

    def _partial(self, indices: torch.Tensor, confidence: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """The outputs after ``step`` positions, with the latents of the positions not generated yet at 0."""
        out = self._outputs(indices, confidence)
        mask = (torch.arange(self.seq_len, device=indices.device) >= step).reshape(self.grid_size)
        mask = mask.expand(indices.shape[0], *self.grid_size)
        out["latents"] = out["latents"].masked_fill(mask[:, None], 0.0)
        return {**out, "mask": mask, "step": torch.tensor(step), "num_iter": torch.tensor(self.seq_len)}


# ----------------------------------------------------------------------------------------------------------------
# Presets (one place names the sizes; `model: {preset: NAME}` in a config)

# Fashion-MNIST, f4 VAE (8x8x4 tokens, 64 levels): the `tokenbridge` family's fmnist head (64 x 2) on a causal
# backbone sized to the same total parameter count (2.93M there).
_FMNIST = {**FMNIST_SHAPES,
           "backbone": {"width": 192, "depth": 6, "num_heads": 4},
           "head": {"width": 64, "depth": 2, "num_heads": 4}}
CausalTokenBridgeGenerator.presets.update({
    "tiny": {**_FMNIST, "backbone": {"width": 32, "depth": 2, "num_heads": 2},
             "head": {"width": 16, "depth": 1, "num_heads": 2}},
    "fmnist": _FMNIST,
})
