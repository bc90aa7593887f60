"""Coarse discrete tokens of continuous latents: the sources of D2C's stage-1 codes.

A `DiscreteSource` maps scaled VAE latents [N, h, w, C] (channel-last) to one code per coarse grid cell,
[N, gh, gw] int64 in [0, codebook_size), and back to a coarse reconstruction [N, h, w, C]. Two kinds:

- ``{"kind": "quantizer", "levels": 4, "pool": 2}`` (`QuantizerSource`, training-free): average-pool the latents
  by ``pool``, quantize every channel with TokenBridge's `DimensionwiseQuantizer` at a coarse B = ``levels`` and
  read the C channel indices as one mixed-radix number, code = sum_c idx_c * B**c (codebook_size = B**C). The
  quantizer's other settings (value range, bins) are its own defaults unless ``"quantizer"`` gives them.
- ``{"kind": "vq", "path": FOLDER}`` (`VQSource`): a learned `tokenbridge.vq.VQTokenizer` (``tokenbridge
  train-vq``), frozen.

`build_source(config, grid, channels)` builds either; the source's ``.config`` records everything (the VQ
architecture included) so that ``build_source(source.config, grid, channels, load_weights=False)`` plus
``load_state_dict`` rebuilds it from a checkpoint without the tokenizer folder.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .quantizer import DimensionwiseQuantizer
from .vq import VQTokenizer, build_tokenizer, read_vq_record

# More codes than this make the stage-1 GPT's embedding and output layers the bulk of the model (and int16-sized
# vocabularies are what the project's token files and heads are built for).
MAX_CODES = 1 << 16
KINDS = ("quantizer", "vq")


def _positive_pair(grid: Any) -> tuple[int, int]:
    try:
        h, w = (int(g) for g in grid)
    except (TypeError, ValueError):
        raise ValueError(f"latent grid must be a pair (h, w), got {grid!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"latent grid must be positive, got {grid!r}")
    return h, w


class DiscreteSource(nn.Module):
    """Continuous latents -> coarse discrete codes, one code per coarse grid cell.

    Attributes: ``codebook_size`` (codes are int64 in [0, codebook_size)), ``grid`` (gh, gw), ``latent_grid``
    (h, w), ``channels`` (C) and ``config`` (JSON-safe; `build_source` rebuilds the module from it). Sources are
    frozen: they stay in eval mode whatever ``.train()`` asks (a VQ codebook must not drift while the generator
    that uses it trains) and compute no gradients.
    """

    codebook_size: int
    grid: tuple[int, int]
    config: dict

    def __init__(self, latent_grid: tuple[int, int], channels: int) -> None:
        super().__init__()
        self.latent_grid = _positive_pair(latent_grid)
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive integer, got {channels!r}")
        self.channels = channels

    def train(self, mode: bool = True) -> DiscreteSource:
        return super().train(False)

    def check_latents(self, latents: torch.Tensor) -> None:
        """ValueError unless ``latents`` is float [N, h, w, C] with this source's grid and channels."""
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or not latents.is_floating_point():
            raise ValueError(f"latents must be a float tensor [N, h, w, C], got "
                             f"{getattr(latents, 'dtype', type(latents))} {list(getattr(latents, 'shape', []))}")
        if tuple(latents.shape[1:]) != (*self.latent_grid, self.channels):
            raise ValueError(f"this discrete source takes latents [N, {self.latent_grid[0]}, {self.latent_grid[1]}, "
                             f"{self.channels}], got {list(latents.shape)}")

    def check_codes(self, codes: torch.Tensor) -> None:
        """ValueError unless ``codes`` is an integer [N, gh, gw] tensor in [0, codebook_size)."""
        if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex() or codes.ndim != 3:
            raise ValueError(f"codes must be an integer tensor [N, gh, gw], got "
                             f"{getattr(codes, 'dtype', type(codes))} {list(getattr(codes, 'shape', []))}")
        if tuple(codes.shape[1:]) != self.grid:
            raise ValueError(f"this discrete source's code grid is {list(self.grid)}, got codes {list(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got [{int(codes.min())}, "
                             f"{int(codes.max())}]")

    def encode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents float [N, h, w, C] -> codes int64 [N, gh, gw] in [0, codebook_size)."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes int64 [N, gh, gw] -> coarse reconstruction float [N, h, w, C]."""
        raise NotImplementedError

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.encode(latents)


class QuantizerSource(DiscreteSource):
    """Training-free codes: avg-pool by ``pool``, `DimensionwiseQuantizer` at B = ``levels`` per channel, and the
    mixed-radix code sum_c idx_c * B**c of the C indices (codebook_size = B**C, at most MAX_CODES).

    ``quantizer``: further DimensionwiseQuantizer keyword arguments (value_range, std_range, kind, tails); left
    out, the quantizer's own defaults (those of the TokenBridge family's model.quantizer) apply. A data
    calibration is refused: this source is fitted on nothing.
    """

    def __init__(self, latent_grid: tuple[int, int], channels: int, levels: int = 4, pool: int = 2,
                 quantizer: dict | None = None) -> None:
        super().__init__(latent_grid, channels)
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
            raise ValueError(f"discrete source 'pool' must be a positive integer, got {pool!r}")
        h, w = self.latent_grid
        if h % pool or w % pool:
            raise ValueError(f"latent grid {h}x{w} is not divisible by the discrete source's pool={pool}")
        quantizer = dict(quantizer or {})
        if "levels" in quantizer:
            raise ValueError("discrete source: give 'levels' beside 'quantizer', not inside it")
        if quantizer.get("calibration", "none") != "none":
            raise ValueError(f"discrete source: the quantizer must be training-free (calibration 'none'), got "
                             f"calibration={quantizer['calibration']!r}")
        try:
            self.quantizer = DimensionwiseQuantizer(levels=levels, **quantizer)
        except TypeError as e:
            raise ValueError(f"discrete source 'quantizer' settings {quantizer}: {e}") from None
        b = self.quantizer.levels
        if b ** channels > MAX_CODES:
            raise ValueError(f"discrete source: levels={b} over {channels} channels gives {b}**{channels} = "
                             f"{b ** channels} codes, more than {MAX_CODES}; use fewer levels or a 'vq' source")
        self.pool, self.codebook_size, self.grid = pool, b ** channels, (h // pool, w // pool)
        # non-persistent: the state dict stays the quantizer's buffers, which load_state_dict checks
        self.register_buffer("radix", b ** torch.arange(channels, dtype=torch.int64), persistent=False)
        q = self.quantizer.config()
        self.config = {"kind": "quantizer", "levels": b, "pool": pool,
                       "quantizer": {k: q[k] for k in ("value_range", "std_range", "kind", "tails")}}

    @torch.no_grad()
    def encode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents float [N, h, w, C] -> codes int64 [N, h/pool, w/pool] in [0, levels**C)."""
        self.check_latents(latents)
        x = latents.float()
        if self.pool > 1:
            x = F.avg_pool2d(x.permute(0, 3, 1, 2), self.pool).permute(0, 2, 3, 1)
        indices = self.quantizer.quantize(x.contiguous())  # [N, gh, gw, C] in [0, B)
        return (indices * self.radix).sum(-1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes int [N, gh, gw] -> latents float32 [N, h, w, C]: each cell's dequantized channel values, repeated
        over its pool x pool latent cells (nearest upsampling)."""
        self.check_codes(codes)
        indices = (codes.long()[..., None] // self.radix) % self.quantizer.levels  # [N, gh, gw, C]
        values = self.quantizer.dequantize(indices)
        return values.repeat_interleave(self.pool, dim=1).repeat_interleave(self.pool, dim=2)


class VQSource(DiscreteSource):
    """Codes of a learned, frozen `VQTokenizer` (its codebook_size; grid = latent grid / its downsample)."""

    def __init__(self, tokenizer: VQTokenizer, latent_grid: tuple[int, int], channels: int,
                 path: str | None = None) -> None:
        super().__init__(latent_grid, channels)
        if tokenizer.channels != channels:
            raise ValueError(f"VQ tokenizer{f' {path}' if path else ''} was trained on {tokenizer.channels} latent "
                             f"channels, these latents have {channels}")
        try:
            self.grid = tokenizer.code_grid(*self.latent_grid)
        except ValueError as e:
            raise ValueError(f"VQ tokenizer{f' {path}' if path else ''}: {e}") from None
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        self.codebook_size = tokenizer.codebook_size
        self.config = {"kind": "vq", "path": None if path is None else str(path), "tokenizer": dict(tokenizer.config)}

    @torch.no_grad()
    def encode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents float [N, h, w, C] -> codes int64 [N, gh, gw] (nearest codebook vector)."""
        self.check_latents(latents)
        return self.tokenizer.encode(latents)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes int [N, gh, gw] -> the tokenizer's reconstruction float32 [N, h, w, C]."""
        self.check_codes(codes)
        return self.tokenizer.decode(codes)


def _vq_source(config: dict, grid: tuple[int, int], channels: int, load_weights: bool) -> VQSource:
    path = config.get("path")
    if load_weights:
        if not path:
            raise ValueError("discrete source kind 'vq' needs 'path': a folder written by `tokenbridge train-vq`")
        tokenizer = VQTokenizer.from_pretrained(path)
        recorded = config.get("tokenizer")
        if recorded is not None and dict(recorded) != tokenizer.config:
            raise ValueError(f"discrete source: the config's 'tokenizer' {recorded} is not that of the folder {path} "
                             f"({tokenizer.config})")
    else:  # the architecture only; a checkpoint's state dict supplies the weights
        arch = config.get("tokenizer")
        if arch is None:
            if not path:
                raise ValueError("discrete source kind 'vq' needs 'tokenizer' (its config) or 'path'")
            arch = read_vq_record(path)["config"]
        tokenizer = build_tokenizer(dict(arch), "discrete source 'tokenizer'")
    return VQSource(tokenizer, grid, channels, path=path)


def build_source(config: dict, grid: tuple[int, int], channels: int, load_weights: bool = True) -> DiscreteSource:
    """The discrete source a config names, for latents [N, grid[0], grid[1], channels] (see the module docstring).

    config: ``{"kind": "quantizer", "levels": B, "pool": p, "quantizer": {...}}`` (every key but kind optional) or
    ``{"kind": "vq", "path": FOLDER, "tokenizer": {...}}``. With ``load_weights`` a VQ source reads its trained
    weights from ``path``; without, it is built untrained from ``tokenizer`` (or the folder's config.json) for a
    checkpoint's state dict to fill. Bad keys, a grid or channel count that does not fit -> ValueError.
    """
    if not isinstance(config, dict) or config.get("kind") not in KINDS:
        kind = config.get("kind") if isinstance(config, dict) else config
        raise ValueError(f"discrete source: 'kind' must be one of {KINDS}, got {kind!r}")
    allowed = {"quantizer": ("kind", "levels", "pool", "quantizer"), "vq": ("kind", "path", "tokenizer")}[config["kind"]]
    unknown = sorted(set(config) - set(allowed))
    if unknown:
        raise ValueError(f"discrete source kind {config['kind']!r}: unknown keys {unknown} (known: {list(allowed)})")
    if config["kind"] == "vq":
        return _vq_source(config, grid, channels, load_weights)
    return QuantizerSource(grid, channels, **{k: v for k, v in config.items() if k != "kind"})
