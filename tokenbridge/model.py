"""TokenBridgeGenerator: dimension-wise quantizer + MAR backbone + per-token head (paper Sec. 3.3).

Training (`forward`): indices [B, H, W, C] are de-quantized to continuous values, a random subset of positions is
masked (ratio ~ truncated normal on [mask_ratio_min, 1], one ratio per batch, random order per sample), the backbone
gives z for every position and the head's cross-entropy is taken on the masked positions only.

Generation (`sample`): `num_iter` MAR steps with the cosine mask schedule. "random" order predicts a random
permutation's next chunk at every step; "confidence" order (paper Fig. 8) samples every still-masked position and
keeps the ones whose sampled tokens have the highest log-probability. Sampled indices are de-quantized and fed
back as continuous inputs. Classifier-free guidance runs conditional and unconditional rows as one 2N batch
through backbone and head; the head mixes the logits.

`build_generator(config)` rebuilds a model from a plain dict (stored as `model.config`, JSON-serialisable).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from .backbone import MAR, patchify, random_masking, sample_orders, unpatchify
from .heads import build_head
from .quantizer import DimensionwiseQuantizer
from .sampling import (
    CFG_SCHEDULES,
    cfg_schedule as cfg_at,
    mask_schedule_list,
    num_masked_for_ratio,
    truncnorm_mask_ratio,
)

ORDERS = ("random", "confidence")

_BACKBONE_DEFAULTS: dict[str, Any] = {
    "width": 256,
    "encoder_depth": 4,
    "decoder_depth": 4,
    "num_heads": 4,
    "mlp_ratio": 4.0,
    "buffer_size": 64,
    "label_drop_prob": 0.1,
    "dropout": 0.0,
    "attn_dropout": 0.0,
    "patch_size": 1,
    "grad_checkpointing": False,
}
_HEAD_DEFAULTS: dict[str, Any] = {
    "kind": "ar",
    "width": 256,
    "depth": 3,
    "num_heads": 4,
    "group_size": None,
    "order": None,
    "dropout": 0.0,
}
_TOP_DEFAULTS: dict[str, Any] = {
    "levels": 64,
    "value_range": [-5.0, 5.0],
    "std_range": 3.0,
    "quantizer_kind": "gaussian",
    "quantizer_tails": "paper",
    "quantizer_calibration": "none",
    "mask_ratio_min": 0.7,
}
_REQUIRED = ("grid_size", "channels", "num_classes")

# Embedded default (Fashion-MNIST, f4 VAE: 8x8x4 tokens, B=64): 2.9M parameters, sized for a 20-30 min CPU run.
# Measured on the idle 2-core dev machine, AdamW, batch 128: 0.85 s/step (1.2 it/s, ~1,800 steps in 25 min).
# Training is compute bound; the head runs on every masked position (~87% of 64 per image), so its width costs
# as much as the backbone's (head width 128 instead of 64: 1.6 s/step).
DEFAULT_FMNIST_CONFIG: dict[str, Any] = {
    "grid_size": [8, 8],
    "channels": 4,
    "num_classes": 10,
    **copy.deepcopy(_TOP_DEFAULTS),
    "backbone": {
        "width": 192,
        "encoder_depth": 3,
        "decoder_depth": 3,
        "num_heads": 4,
        "mlp_ratio": 4.0,
        "buffer_size": 8,
        "label_drop_prob": 0.1,
        "dropout": 0.0,
        "attn_dropout": 0.0,
        "patch_size": 1,
        "grad_checkpointing": False,
    },
    "head": {
        "kind": "ar",
        "width": 64,
        "depth": 2,
        "num_heads": 4,
        "group_size": None,
        "order": None,
        "dropout": 0.0,
    },
}


def _json_safe(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def resolve_config(config: dict) -> dict:
    """Fill defaults into a generator config and validate its keys. Returns a new JSON-safe dict."""
    if not isinstance(config, dict):
        raise ValueError(f"generator config must be a dict, got {type(config).__name__}")
    missing = [k for k in _REQUIRED if k not in config]
    if missing:
        raise ValueError(f"generator config is missing required keys {missing}")
    known = set(_REQUIRED) | set(_TOP_DEFAULTS) | {"backbone", "head"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"unknown generator config keys {unknown}; known: {sorted(known)}")
    backbone = dict(config.get("backbone") or {})
    unknown = sorted(set(backbone) - set(_BACKBONE_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown backbone config keys {unknown}; known: {sorted(_BACKBONE_DEFAULTS)}")
    out = {**_TOP_DEFAULTS, **{k: v for k, v in config.items() if k not in ("backbone", "head")}}
    out["backbone"] = {**_BACKBONE_DEFAULTS, **backbone}
    # Extra head keys are passed through to heads.build_head, which validates them.
    out["head"] = {**_HEAD_DEFAULTS, **dict(config.get("head") or {})}
    grid = out["grid_size"]
    if isinstance(grid, int):
        grid = [grid, grid]
    if len(grid) != 2 or any(int(g) != g or g < 1 for g in grid):
        raise ValueError(f"grid_size must be two positive integers (H, W), got {out['grid_size']}")
    out["grid_size"] = [int(g) for g in grid]
    for key in ("channels", "num_classes", "levels"):
        if int(out[key]) != out[key] or out[key] < 1:
            raise ValueError(f"{key} must be a positive integer, got {out[key]}")
    return _json_safe(out)


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
    raise ValueError(
        f"head order must be a permutation of range({channels}) or range({channels * pp}), got {order}"
    )


def _make_generator(generator: torch.Generator | int | None, device: torch.device) -> torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise ValueError(f"generator must be None, an int seed or a torch.Generator, got {type(generator).__name__}")
    g = torch.Generator(device=device)
    g.manual_seed(generator)
    return g


class TokenBridgeGenerator(nn.Module):
    """Quantizer + MAR backbone + head.

    forward(indices [B, H, W, C] long in [0, levels), labels [B] long in [0, num_classes]) -> scalar CE loss.
    sample(labels [N]) -> dict(indices [N, H, W, C] long, latents [N, C, H, W] float, confidence [N, H, W] float).
    Label `num_classes` means unconditional.
    """

    def __init__(
        self,
        quantizer: DimensionwiseQuantizer,
        backbone: MAR,
        head: nn.Module,
        channels: int,
        mask_ratio_min: float = 0.7,
        config: dict | None = None,
    ) -> None:
        super().__init__()
        p = backbone.patch_size
        if backbone.token_dim != channels * p * p:
            raise ValueError(f"backbone token_dim {backbone.token_dim} != channels * patch_size**2 = {channels * p * p}")
        if not (0.0 <= mask_ratio_min < 1.0):
            raise ValueError(f"mask_ratio_min must be in [0, 1), got {mask_ratio_min}")
        self.quantizer = quantizer
        self.backbone = backbone
        self.head = head
        self.channels = channels
        self.grid_size = backbone.grid_size
        self.patch_size = p
        self.seq_len = backbone.seq_len
        self.num_classes = backbone.num_classes
        self.levels = quantizer.levels
        self.mask_ratio_min = mask_ratio_min
        self.config = copy.deepcopy(config) if config is not None else None

    # ------------------------------------------------------------------ validation
    def _check_indices(self, indices: torch.Tensor) -> None:
        h, w = self.grid_size
        if indices.dim() != 4 or tuple(indices.shape[1:]) != (h, w, self.channels):
            raise ValueError(f"indices must be [B, {h}, {w}, {self.channels}], got shape {tuple(indices.shape)}")
        if indices.is_floating_point() or indices.dtype == torch.bool or indices.is_complex():
            raise ValueError(f"indices must be an integer tensor, got {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.levels):
            raise ValueError(
                f"indices must lie in [0, {self.levels}), got range [{int(indices.min())}, {int(indices.max())}]"
            )

    def _check_labels(self, labels: torch.Tensor, batch: int | None = None) -> None:
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
            raise ValueError(f"labels must be a 1-D integer tensor, got {getattr(labels, 'shape', type(labels))}")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
        if batch is not None and labels.shape[0] != batch:
            raise ValueError(f"labels has {labels.shape[0]} entries but the batch has {batch}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}] ({self.num_classes} = unconditional), "
                f"got range [{int(labels.min())}, {int(labels.max())}]"
            )

    # ------------------------------------------------------------------ token helpers
    def indices_to_tokens(self, indices: torch.Tensor) -> torch.Tensor:
        """Index tokens [B, L, C*p*p] -> de-quantized continuous tokens [B, L, C*p*p] (backbone input)."""
        grid = unpatchify(indices, self.grid_size, self.patch_size)
        return patchify(self.quantizer.dequantize(grid), self.patch_size)

    # ------------------------------------------------------------------ training
    def forward(self, indices: torch.Tensor, labels: torch.Tensor, mask_ratio: float | None = None) -> torch.Tensor:
        """Masked-token cross-entropy. mask_ratio=None draws it from the truncated normal (MAR training)."""
        self._check_indices(indices)
        self._check_labels(labels, indices.shape[0])
        indices = indices.long()
        labels = labels.to(indices.device).long()
        targets = patchify(indices, self.patch_size)  # [B, L, C*p*p]
        tokens = patchify(self.quantizer.dequantize(indices), self.patch_size)
        if mask_ratio is None:
            mask_ratio = float(truncnorm_mask_ratio(1, low=self.mask_ratio_min)[0])
        num_masked = num_masked_for_ratio(mask_ratio, self.seq_len)
        orders = sample_orders(indices.shape[0], self.seq_len, device=indices.device)
        mask = random_masking(orders, num_masked)
        z = self.backbone(tokens, labels, mask)
        return self.head.loss(z[mask], targets[mask])

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def sample(
        self,
        labels: torch.Tensor,
        num_iter: int = 64,
        cfg: float | None = 1.0,
        cfg_schedule: str = "linear",
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        order: str = "random",
        generator: torch.Generator | int | None = None,
        progress: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Generate token grids for class `labels` [N] (value num_classes = unconditional).

        num_iter is capped at the sequence length L (every step predicts at least one position). cfg None or 1.0
        runs without guidance (no unconditional half). generator: None (global RNG), an int seed or a
        torch.Generator on the model's device. Returns dict(indices [N, H, W, C] long, latents [N, C, H, W] float
        de-quantized and channel-first, confidence [N, H, W] float = head log-prob of the token at that position
        when it was sampled; with patch_size p > 1 every latent position of a patch gets its token's value).
        """
        self._check_labels(labels)
        if labels.numel() == 0:
            raise ValueError("labels is empty: pass at least one class index to sample")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}")
        if int(num_iter) != num_iter or num_iter < 1:
            raise ValueError(f"num_iter must be a positive integer, got {num_iter}")
        if cfg is not None and not float(cfg) >= 0:
            raise ValueError(f"cfg must be >= 0 (1.0 = no guidance), got {cfg}")
        device = next(self.parameters()).device
        gen = _make_generator(generator, device)
        labels = labels.to(device).long()
        n, seq_len = labels.shape[0], self.seq_len
        tdim = self.backbone.token_dim
        num_iter = min(int(num_iter), seq_len)
        schedule = mask_schedule_list(num_iter, seq_len)
        use_cfg = cfg is not None and float(cfg) != 1.0
        if use_cfg:
            labels = torch.cat([labels, torch.full_like(labels, self.num_classes)])

        idx = torch.zeros(n, seq_len, tdim, dtype=torch.long, device=device)
        conf = torch.zeros(n, seq_len, device=device)
        mask = torch.ones(n, seq_len, dtype=torch.bool, device=device)
        tokens = self.indices_to_tokens(idx)
        orders = sample_orders(n, seq_len, device=device, generator=gen) if order == "random" else None

        was_training = self.training
        self.eval()
        try:
            prev = seq_len
            for step in tqdm(range(num_iter), disable=not progress, desc="sampling"):
                remaining = schedule[step]
                if use_cfg:
                    z = self.backbone(torch.cat([tokens, tokens]), labels, torch.cat([mask, mask]))
                else:
                    z = self.backbone(tokens, labels, mask)
                if order == "random":
                    # The first `remaining` entries of each order stay masked; this step predicts the next chunk.
                    pos = orders[:, remaining:prev]
                else:
                    # Every still-masked position is sampled; argsort puts the masked ones (True) first.
                    pos = torch.argsort(mask.to(torch.int8), dim=1, descending=True, stable=True)[:, :prev]
                m = pos.shape[1]
                gather = pos.unsqueeze(-1).expand(n, m, z.shape[-1])
                z_sel = torch.gather(z[:n], 1, gather).reshape(n * m, -1)
                step_cfg = None
                if use_cfg:
                    z_sel = torch.cat([z_sel, torch.gather(z[n:], 1, gather).reshape(n * m, -1)])
                    step_cfg = cfg_at(float(cfg), cfg_schedule, remaining / seq_len)
                new_idx, logp = self.head.sample(
                    z_sel, temperature=temperature, top_k=top_k, top_p=top_p, cfg=step_cfg, generator=gen
                )
                new_idx, logp = new_idx.reshape(n, m, tdim), logp.reshape(n, m).float()
                keep = prev - remaining
                if keep < m:
                    top = logp.topk(keep, dim=1).indices
                    pos, logp = pos.gather(1, top), logp.gather(1, top)
                    new_idx = new_idx.gather(1, top.unsqueeze(-1).expand(n, keep, tdim))
                idx.scatter_(1, pos.unsqueeze(-1).expand(n, keep, tdim), new_idx.long())
                conf.scatter_(1, pos, logp)
                mask.scatter_(1, pos, False)
                tokens = self.indices_to_tokens(idx)
                prev = remaining
        finally:
            self.train(was_training)

        grid = unpatchify(idx, self.grid_size, self.patch_size)
        p = self.patch_size
        h, w = self.grid_size
        confidence = conf.reshape(n, h // p, w // p).repeat_interleave(p, 1).repeat_interleave(p, 2)
        latents = self.quantizer.dequantize(grid).permute(0, 3, 1, 2).contiguous()
        return {"indices": grid, "latents": latents, "confidence": confidence}


HEAD_KINDS = ("ar", "parallel", "grouped")


def _build_head(head_cfg: dict, z_dim: int, channels: int, patch_size: int, levels: int) -> nn.Module:
    """heads.build_head with the kwargs each kind takes. The head sees tokens of C*p*p values."""
    h = dict(head_cfg)
    kind = h.pop("kind")
    if kind not in HEAD_KINDS:
        raise ValueError(f"head kind must be one of {HEAD_KINDS} for the discrete generator, got {kind!r}")
    group_size = h.pop("group_size")
    order = expand_channel_order(h.pop("order"), channels, patch_size)
    if kind == "grouped" and group_size is not None:
        h["group_size"] = int(group_size)
    if kind == "parallel":
        # Channels are predicted independently: there is no order and no attention.
        h.pop("num_heads", None)
        h.pop("attn_dropout", None)
        h.pop("mlp_ratio", None)
    else:
        h["order"] = order
    return build_head(kind, z_dim=z_dim, num_channels=channels * patch_size * patch_size, levels=levels, **h)


def build_generator(config: dict, quantizer: DimensionwiseQuantizer | None = None) -> TokenBridgeGenerator:
    """Build a TokenBridgeGenerator from a plain dict (see DEFAULT_FMNIST_CONFIG for the keys).

    Required: grid_size [H, W], channels, num_classes; everything else has a default. `quantizer` may be passed
    (e.g. one already fitted on latents); its settings must agree with the config's quantizer keys.
    """
    cfg = resolve_config(config)
    qkeys = {
        "levels": "levels",
        "value_range": "value_range",
        "std_range": "std_range",
        "quantizer_kind": "kind",
        "quantizer_tails": "tails",
        "quantizer_calibration": "calibration",
    }
    if quantizer is None:
        quantizer = DimensionwiseQuantizer(**{qk: cfg[ck] for ck, qk in qkeys.items()})
    else:
        qcfg = _json_safe(quantizer.config())
        clash = {ck: (cfg[ck], qcfg[qk]) for ck, qk in qkeys.items() if ck in config and cfg[ck] != qcfg[qk]}
        if clash:
            raise ValueError(f"quantizer settings disagree with the config (config, quantizer): {clash}")
        cfg.update({ck: qcfg[qk] for ck, qk in qkeys.items()})

    b = cfg["backbone"]
    p = int(b["patch_size"])
    channels = int(cfg["channels"])
    token_dim = channels * p * p
    backbone = MAR(
        grid_size=tuple(cfg["grid_size"]),
        token_dim=token_dim,
        num_classes=int(cfg["num_classes"]),
        width=b["width"],
        encoder_depth=b["encoder_depth"],
        decoder_depth=b["decoder_depth"],
        num_heads=b["num_heads"],
        mlp_ratio=b["mlp_ratio"],
        buffer_size=b["buffer_size"],
        label_drop_prob=b["label_drop_prob"],
        dropout=b["dropout"],
        attn_dropout=b["attn_dropout"],
        grad_checkpointing=b["grad_checkpointing"],
        patch_size=p,
    )
    head = _build_head(cfg["head"], z_dim=int(b["width"]), channels=channels, patch_size=p, levels=int(cfg["levels"]))
    return TokenBridgeGenerator(
        quantizer, backbone, head, channels=channels, mask_ratio_min=float(cfg["mask_ratio_min"]), config=cfg
    )


def generator_config(model: TokenBridgeGenerator) -> dict:
    """The config that rebuilds `model` with build_generator (a deep copy)."""
    if model.config is None:
        raise ValueError("this generator was not built by build_generator and carries no config")
    return copy.deepcopy(model.config)
