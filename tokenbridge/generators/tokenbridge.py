"""TokenBridgeGenerator: dimension-wise quantizer + MAR backbone + per-token head (paper Sec. 3.3).

Training (`loss`): indices [B, H, W, C] are de-quantized to continuous values, a random subset of positions is
masked (ratio ~ truncated normal on [mask_ratio_min, 1], one ratio per batch, random order per sample), the backbone
gives z for every position and the head's cross-entropy is taken on the masked positions only.

Generation (`sample`): `num_iter` MAR steps with the cosine mask schedule. "random" order predicts a random
permutation's next chunk at every step; "confidence" order (paper Fig. 8) samples every still-masked position and
keeps the ones whose sampled tokens have the highest log-probability. Sampled indices are de-quantized and fed
back as continuous inputs. Classifier-free guidance runs conditional and unconditional rows as one 2N batch
through the backbone; the head mixes the logits (``cfg_mix="logits"``, the default), or the backbone's features
are mixed before the head, z_u + cfg * (z_c - z_u) (``cfg_mix="z"``, the released code's way).

The model config (`TokenBridgeConfig`) takes the constructors' own keyword arguments in its `quantizer`,
`backbone` and `head` sections; their defaults are those constructors' defaults. `PRESETS` names the sizes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import PositiveInt

from ..backbone import MAR, patchify, unpatchify
from ..config import ConfigError, signature_model, validate
from ..heads import DimensionwiseARHead, GroupedHead, ParallelHead
from ..ordering import frequency_channel_order
from ..quantizer import DimensionwiseQuantizer
from .. import samplers
from ..samplers import (CfgInterval, CfgSchedule, GuidanceScale, Sampler, SamplingSteps, Temperature, TopK, TopP,
                        cfg_rows, guide)
from .base import apply_preset, fill_shapes, make_generator, require_shapes
from .editing import check_known
from .masked import NUM_ITER, MaskedConfig, MaskedGenerator
from .presets import FMNIST_MAR, FMNIST_SHAPES, IMAGENET_SHAPES, MAR_SIZES, PAPER_DROPOUT, TINY_MAR
from .registry import register_family

HEADS: dict[str, type[nn.Module]] = {"ar": DimensionwiseARHead, "parallel": ParallelHead, "grouped": GroupedHead}
# "frequency": the data-derived order (paper Sec. 3.2), computed from the training tokens when training starts
ChannelOrder = list[int] | Literal["frequency"] | None

QuantizerConfig = signature_model(DimensionwiseQuantizer, "QuantizerConfig")
BackboneConfig = signature_model(MAR, "BackboneConfig", exclude=("grid_size", "token_dim", "num_classes"))
HEAD_CONFIGS = {kind: signature_model(cls, f"{cls.__name__}Config", exclude=("z_dim", "num_channels", "levels"),
                                      types={"order": ChannelOrder})
                for kind, cls in HEADS.items()}


class TokenBridgeConfig(MaskedConfig):
    """grid_size, channels and num_classes default to the training tokens' (None: taken from the token file); the
    C channels of a token are predicted one by one by the AR head."""

    quantizer: QuantizerConfig = QuantizerConfig()
    backbone: BackboneConfig = BackboneConfig()
    head: dict[str, Any] = {"kind": "ar"}  # kind (ar | parallel | grouped) + that head class's keyword arguments


# The generator configs written before model.quantizer existed kept the quantizer settings as flat keys.
_FLAT_QUANTIZER_KEYS = {"levels": "levels", "value_range": "value_range", "std_range": "std_range",
                        "quantizer_kind": "kind", "quantizer_tails": "tails", "quantizer_calibration": "calibration"}


def _from_flat_keys(config: dict) -> dict:
    """A config in the flat layout of the first shipped generator -> the sectioned layout."""
    config = copy.deepcopy(config)
    flat = {q: config.pop(k) for k, q in _FLAT_QUANTIZER_KEYS.items() if k in config}
    if flat:
        config["quantizer"] = {**flat, **config.get("quantizer", {})}
        head = config.get("head", {})
        accepted = HEAD_CONFIGS.get(head.get("kind", "ar"), HEAD_CONFIGS["ar"]).model_fields
        config["head"] = {k: v for k, v in head.items() if k == "kind" or (k in accepted and v is not None)}
    return config


def expand_channel_order(order: list[int] | None, channels: int, patch_size: int) -> list[int] | None:
    """Head channel order for patched tokens (token layout (c, i, j), channel-major).

    A permutation of the C latent channels is expanded so that each channel's p*p sub-positions follow it; a
    permutation of all C*p*p token values is used as is.
    """
    if order is None:
        return None
    order = [int(o) for o in order]
    pp = patch_size * patch_size
    if sorted(order) == list(range(channels)):
        return [o * pp + k for o in order for k in range(pp)] if pp > 1 else order
    if sorted(order) == list(range(channels * pp)):
        return order
    raise ConfigError(f"config key 'model.head.order' = {order}: must be a permutation of range({channels}) "
                      f"or range({channels * pp})")


def check_buildable(cfg: dict) -> None:
    """A resolved config of the TokenBridge families builds without data: shapes given, no data-derived order."""
    require_shapes(cfg)
    if cfg["head"].get("order") == "frequency":
        raise ConfigError("config key 'model.head.order' = 'frequency' needs the training tokens to derive it")


def quantizer_meta_parts(config: dict) -> tuple[dict, dict]:
    """`Generator.meta_parts` of the TokenBridge families: the quantizer built for real (its tables are computed,
    not allocated) and a data-derived channel order left out (any other order is checked)."""
    head = {**config["head"], **({"order": None} if config["head"].get("order") == "frequency" else {})}
    return {**config, "head": head}, {"quantizer": DimensionwiseQuantizer(**config["quantizer"])}


def _fill_from_data(cfg: dict, given_quantizer: dict, data: Any) -> None:
    """grid, channels, classes and quantizer from a token dataset (tokenbridge.tokens.CachedTokens); a value the
    config gives (preset included) must agree with the data."""
    fill_shapes(cfg, data)
    clash = {k: (cfg["quantizer"][k], data.quantizer_config.get(k)) for k in given_quantizer
             if cfg["quantizer"][k] != data.quantizer_config.get(k)}
    if clash:
        raise ConfigError(f"config key 'model.quantizer' disagrees with the token file {data.path} "
                          f"(config, file): {clash}")
    cfg["quantizer"] = dict(data.quantizer_config)
    head = cfg["head"]
    if head.get("order") == "frequency":
        latents = data.latents[:10000].float() if data.latents is not None else None
        if latents is None:
            quant = data.make_quantizer()
            latents = quant.dequantize(data.indices[:10000].long()).permute(0, 3, 1, 2)
        head["order"] = frequency_channel_order(latents)[0].tolist()


@register_family
class TokenBridgeGenerator(MaskedGenerator):
    """Quantizer + MAR backbone + head.

    loss((indices [B, H, W, C] long in [0, levels), labels [B] long in [0, num_classes])) -> scalar CE loss.
    sample(labels [N]) -> dict(indices [N, H, W, C] long, latents [N, C, H, W] float, confidence [N, H, W] float).
    Label `num_classes` means unconditional.
    """

    family = "tokenbridge"
    presets: dict[str, dict] = {}  # filled at the end of this module

    def __init__(self, config: dict, quantizer: DimensionwiseQuantizer | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        self.quantizer = quantizer if quantizer is not None else DimensionwiseQuantizer(**cfg["quantizer"])
        b, p = cfg["backbone"], int(cfg["backbone"]["patch_size"])
        self.patch_size = p
        self.backbone = MAR(grid_size=tuple(cfg["grid_size"]), token_dim=self.channels * p * p,
                            num_classes=int(cfg["num_classes"]), **b)
        head = dict(cfg["head"])
        kind = head.pop("kind")
        if "order" in head:
            head["order"] = expand_channel_order(head["order"], self.channels, p)
        self.head = HEADS[kind](z_dim=int(b["width"]), num_channels=self.channels * p * p,
                                levels=self.quantizer.levels, **head)
        self.seq_len, self.levels = self.backbone.seq_len, self.quantizer.levels
        self.mask_ratio_min = float(cfg["mask_ratio_min"])

    # ------------------------------------------------------------------ config
    @classmethod
    def resolve_config(cls, config: dict, data: Any = None) -> dict:
        """Validate a model config (presets and the flat legacy layout accepted); with ``data`` (a token
        dataset), fill grid/channels/classes/quantizer from it and resolve ``head.order: frequency``."""
        raw = _from_flat_keys(apply_preset(cls, config))
        cfg = validate(TokenBridgeConfig, raw, "model").model_dump(mode="json")
        head = dict(cfg["head"])
        kind = head.pop("kind", "ar")
        if not isinstance(kind, str) or kind not in HEADS:
            raise ConfigError(f"config key 'model.head.kind' = {kind!r}: expected one of {sorted(HEADS)}")
        cfg["head"] = {"kind": kind, **validate(HEAD_CONFIGS[kind], head, "model.head").model_dump(mode="json")}
        if data is not None:
            _fill_from_data(cfg, raw.get("quantizer") or {}, data)
        return cfg

    check_buildable = staticmethod(check_buildable)
    meta_parts = staticmethod(quantizer_meta_parts)

    @classmethod
    def from_config(cls, config: dict, data: Any = None) -> TokenBridgeGenerator:
        """Build from a model config; with ``data`` (a token dataset) its quantizer (fitted state included) and
        shapes are used, so that training dequantizes with exactly the quantizer that made the tokens."""
        return cls(cls.resolve_config(config, data), quantizer=data.make_quantizer() if data is not None else None)

    # ------------------------------------------------------------------ token helpers
    def indices_to_tokens(self, indices: torch.Tensor) -> torch.Tensor:
        """Index tokens [B, L, C*p*p] -> de-quantized continuous tokens [B, L, C*p*p] (backbone input)."""
        grid = unpatchify(indices, self.grid_size, self.patch_size)
        return patchify(self.quantizer.dequantize(grid), self.patch_size)

    # ------------------------------------------------------------------ training
    def loss(self, batch: tuple[torch.Tensor, torch.Tensor], mask_ratio: float | None = None) -> torch.Tensor:
        """Masked-token cross-entropy of a batch (indices, labels). mask_ratio=None draws it from the truncated
        normal (MAR training)."""
        indices, labels = self.check_batch(batch)
        indices = indices.long()
        targets = patchify(indices, self.patch_size)  # [B, L, C*p*p]
        tokens = patchify(self.quantizer.dequantize(indices), self.patch_size)
        z, mask = self._masked_features(tokens, labels, mask_ratio)
        return self.head.loss(z[mask], targets[mask])

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def sample(
        self,
        labels: torch.Tensor,
        num_iter: SamplingSteps = NUM_ITER,
        cfg: GuidanceScale | None = 1.0,
        cfg_schedule: CfgSchedule = "linear",
        temperature: Temperature = 1.0,
        top_k: TopK = 0,
        top_p: TopP = 1.0,
        order: Literal["random", "confidence"] = "random",
        cfg_mix: Literal["logits", "z"] = "logits",
        sorted_positions: bool = False,
        sampler: Sampler = samplers.DEFAULT_SAMPLER,
        cfg_interval: CfgInterval | None = samplers.PAPER.cfg_interval,
        uncond_every: PositiveInt = samplers.PAPER.uncond_every,
        generator: torch.Generator | int | None = None,
        progress: bool = False,
        callback: Callable[[dict[str, torch.Tensor]], None] | None = None,
        orders: torch.Tensor | None = None,
        known: torch.Tensor | None = None,
        known_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Generate token grids for class `labels` [N] (value num_classes = unconditional).

        num_iter is capped at the sequence length L (every step predicts at least one position). cfg None or 1.0
        runs without guidance (no unconditional half). generator: None (global RNG), an int seed or a
        torch.Generator on the model's device. Returns dict(indices [N, H, W, C] long, latents [N, C, H, W] float
        de-quantized and channel-first, confidence [N, H, W] float = head log-prob of the token at that position
        when it was sampled; with patch_size p > 1 every latent position of a patch gets its token's value).
        callback: called after every step with the outputs so far plus ``step`` (1-based), ``num_iter`` and
        ``mask`` [N, H, W] bool (True = not generated yet; those latents are 0, the prior mean) — for live views.
        cfg_mix: "logits" (guidance on the head's logits at every channel step) or "z" (on the backbone's features
        before the head, the released code's way, whose linear schedule ends at 1 + (cfg - 1)(L - 1)/L because its
        mask length never drops below 1).
        orders: [N, L] generation orders (each row a permutation of the L positions; order "random" only) in place
        of random ones, to replay a run. sorted_positions: each step's positions reach the head in ascending
        position order, as the released code's ``nonzero`` (converted checkpoints record it), so that equal seeds
        and orders draw the same randomness for the same position; False (the shipped generator): generation order.
        sampler, cfg_interval, uncond_every: the sampler toolbox (tokenbridge.samplers): guidance only on the
        steps whose mask ratio lies in cfg_interval, unconditional features reused between guided steps;
        sampler="paper" ignores them (the sampler before the toolbox).
        known, known_mask: editing (generators/editing.py): latents [N, C, H, W] and [N, H, W] bool (True = keep);
        the kept tokens are the quantizer's indices of ``known``, returned unchanged, and the rest is sampled.
        """
        box = samplers.resolve(sampler, cfg_interval=cfg_interval, uncond_every=uncond_every)
        edit = check_known(known, known_mask, labels.shape[0], self.channels, self.grid_size, self.patch_size)
        device = next(self.parameters()).device
        gen = make_generator(generator, device)
        labels = labels.to(device).long()
        orders = self._check_orders(orders, labels.shape[0], order == "random")

        def predict(z_sel: torch.Tensor, step_cfg: float | None, g: torch.Generator | None):
            if cfg_mix == "z" and step_cfg is not None:  # mix [cond; uncond] features, then one head pass
                z_sel, step_cfg = guide(z_sel, cfg_rows(z_sel, step_cfg)[1]), None
            return self.head.sample(z_sel, temperature=temperature, top_k=top_k, top_p=top_p, cfg=step_cfg,
                                    generator=g)

        idx = torch.zeros(labels.shape[0], self.seq_len, self.backbone.token_dim, dtype=torch.long, device=device)
        token_known = None
        if edit is not None:
            latents, token_known = edit[0].to(device), edit[1].to(device)
            given = patchify(self.quantizer.quantize(latents.permute(0, 2, 3, 1).contiguous()), self.patch_size)
            idx = torch.where(token_known[..., None], given.long(), idx)
        idx, conf = self._generate(labels, idx, self.indices_to_tokens, predict, num_iter, cfg, cfg_schedule,
                                   order == "random", gen, progress, callback, released_cfg=cfg_mix == "z",
                                   orders=orders, sorted_positions=bool(sorted_positions), box=box,
                                   known=token_known)
        return self._outputs(idx, conf)

    def _outputs(self, idx: torch.Tensor, conf: torch.Tensor) -> dict[str, torch.Tensor]:
        grid = unpatchify(idx, self.grid_size, self.patch_size)
        p, (h, w) = self.patch_size, self.grid_size
        confidence = conf.reshape(-1, h // p, w // p).repeat_interleave(p, 1).repeat_interleave(p, 2)
        latents = self.quantizer.dequantize(grid).permute(0, 3, 1, 2).contiguous()
        return {"indices": grid, "latents": latents, "confidence": confidence}


# ----------------------------------------------------------------------------------------------------------------
# Presets (DiT style: one place names the sizes; `model: {preset: NAME}` in a config, `--preset` on the CLI)

# Embedded default (Fashion-MNIST, f4 VAE: 8x8x4 tokens, B=64): 2.9M parameters, sized for a ~1 hour CPU run.
# Measured on the idle 2-core dev machine, AdamW: 0.85 s/step at batch 128, 0.43 s/step at batch 64 (fmnist.yaml).
# Training is compute bound; the head runs on every masked position (~87% of 64 per image), so its width costs
# as much as the backbone's (head width 128 instead of 64: 1.6 s/step).
_FMNIST = {**FMNIST_SHAPES, "backbone": FMNIST_MAR, "head": {"kind": "ar", "width": 64, "depth": 2, "num_heads": 4}}
# ImageNet 256x256 with MAR's KL-16 VAE (16x16x16 tokens); MAR-L / MAR-H backbones, paper head sizes and dropout
_IMAGENET, _PAPER_DROPOUT = IMAGENET_SHAPES, PAPER_DROPOUT
TokenBridgeGenerator.presets.update({
    "tiny": {**_FMNIST, "backbone": TINY_MAR, "head": {"kind": "ar", "width": 16, "depth": 1, "num_heads": 2}},
    "fmnist": _FMNIST,
    "tokenbridge-l": {**_IMAGENET, "backbone": {**MAR_SIZES["l"], **_PAPER_DROPOUT},
                      "head": {"kind": "ar", "width": 1024, "depth": 4, "num_heads": 8, "dropout": 0.1}},
    "tokenbridge-h": {**_IMAGENET, "backbone": {**MAR_SIZES["h"], **_PAPER_DROPOUT},
                      "head": {"kind": "ar", "width": 1024, "depth": 6, "num_heads": 8, "dropout": 0.1}},
})
