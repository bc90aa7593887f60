"""The LDM / CompVis KL autoencoder and the VAE interface the rest of the package uses.

- ``VAE``: ``encode`` gives latents [B, C, h, w] already multiplied by ``scaling_factor`` (so they are roughly
  unit-variance, ready for the quantizer's [-5, 5] range); ``decode`` takes such latents back to images
  [B, image_channels, H, W] in [-1, 1].
- ``AutoencoderKL``: the LDM/CompVis KL autoencoder, configurable (own implementation; state-dict key names match
  the CompVis checkpoints). Preset ``kl16`` has exactly the state-dict layout of MAR's ``kl16.ckpt``
  (256x256x3 -> 16x16x16); preset ``fmnist`` is the small embedded f4 VAE (32x32x1 -> 8x8x4).
- ``DiffusersVAE``: adapts a diffusers ``AutoencoderKL`` to the interface.
- ``build_vae(preset)``: a freshly initialised AutoencoderKL. Loading and training live in ``tokenbridge.vae``.
- ``meta_vae(cfg, shapes, source)``: the model on the meta device, checked against stored tensor shapes
  before anything is allocated (by arithmetic in ``cannot_match``, then parameter by parameter).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layout import channel_mismatch

KL16_SCALING_FACTOR = 0.2325
SD_SCALING_FACTOR = 0.18215  # Stable Diffusion's VAE, for diffusers folders whose config has none


class VAE(nn.Module):
    """Interface: images [B, image_channels, H, W] in [-1, 1] <-> scaled latents [B, latent_channels, H/stride, W/stride].

    Subclasses set ``latent_channels``, ``stride``, ``scaling_factor``, ``image_channels`` and implement
    ``encode`` / ``decode``.
    """

    latent_channels: int
    stride: int
    scaling_factor: float
    image_channels: int

    def encode(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Images [B, image_channels, H, W] in [-1, 1] -> scaled latents [B, latent_channels, H/stride, W/stride]
        (posterior mean, or a posterior sample with ``sample=True``)."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, latent_channels, h, w] -> images [B, image_channels, h*stride, w*stride], roughly
        in [-1, 1]: not clamped (``.clamp(-1, 1)`` as `tokenbridge.generate` and `reconstruct` do), and without
        autograd in the implementations (a decoder to look at samples; training calls ``forward``)."""
        raise NotImplementedError

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """decode(encode(images)) clamped to [-1, 1]: images [B, C, H, W] in [-1, 1] -> same shape."""
        return self.decode(self.encode(images, sample=sample)).clamp(-1, 1)

    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError(f"images must be a tensor [B, C, H, W], got {getattr(images, 'shape', type(images))}")
        b, c, h, w = images.shape
        if c != self.image_channels:
            raise ValueError(f"images have {c} channels: " + channel_mismatch("this VAE's encode", images.shape,
                                                                                self.image_channels))
        if h % self.stride or w % self.stride:
            raise ValueError(f"image size {h}x{w} is not divisible by the VAE stride {self.stride}")
        if not images.is_floating_point():
            raise ValueError(f"images must be float in [-1, 1], got dtype {images.dtype}")
        if images.numel() and images.device.type != "meta":
            lo, hi = images.aminmax()
            if not (torch.isfinite(lo) and torch.isfinite(hi)):
                raise ValueError("images contain NaN or inf")
            if lo < -1.5 or hi > 1.5:
                raise ValueError(f"images must be in [-1, 1], got range [{lo.item():.3g}, {hi.item():.3g}]")

    def _check_latents(self, latents: torch.Tensor) -> None:
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
            raise ValueError(f"latents must be a tensor [B, C, h, w], got {getattr(latents, 'shape', type(latents))}")
        if latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents have {latents.shape[1]} channels: " + channel_mismatch(
                "this VAE's decode", latents.shape, self.latent_channels))



class DiffusersVAE(VAE):
    """Adapts a diffusers ``AutoencoderKL`` (e.g. the Stable Diffusion VAE; ``model.*`` in the state dict) to the VAE
    interface. ``tokenbridge.vae.load_vae("diffusers:FOLDER")`` checks and loads one from a folder."""

    def __init__(self, model: nn.Module, scaling_factor: float | None = None) -> None:
        super().__init__()
        self.model = model
        cfg = model.config
        self.latent_channels = int(cfg.latent_channels)
        self.stride = 2 ** (len(cfg.block_out_channels) - 1)
        self.image_channels = int(cfg.in_channels)
        self.scaling_factor = float(scaling_factor or getattr(cfg, "scaling_factor", None) or SD_SCALING_FACTOR)

    def encode(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Images [B, in_channels, H, W] in [-1, 1] -> scaled latents [B, latent_channels, H/stride, W/stride]."""
        self._check_images(images)
        dist = self.model.encode(images).latent_dist
        return (dist.sample() if sample else dist.mean) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, latent_channels, h, w] -> images [B, in_channels, h*stride, w*stride], ~[-1, 1]
        (not clamped; no autograd)."""
        self._check_latents(latents)
        return self.model.decode(latents / self.scaling_factor).sample


# ---------------------------------------------------------------------------------------------------------------
# Building blocks (CompVis layout)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    # Small models have fewer channels than 32: use the largest group count <= `groups` that divides them.
    # Found among the divisor pairs (d, channels // d), d <= sqrt(channels): a config read from a file may have
    # a huge norm_groups, and counting down from it could take minutes.
    g = min(groups, channels)
    if channels % g:
        divisors = (d for i in range(1, math.isqrt(channels) + 1) if channels % i == 0 for d in (i, channels // i))
        g = max(d for d in divisors if d <= g)
    return nn.GroupNorm(g, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-norm residual block: [B, in_channels, H, W] -> [B, out_channels, H, W] (1x1 ``nin_shortcut`` when the
    channel count changes)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q/k/v/proj_out (CompVis layout); [B, C, H, W] -> same."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).reshape(b, 1, c, h * w).transpose(-1, -2) for m in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(o.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Strided 3x3 conv: [B, C, H, W] -> [B, C, H/2, W/2]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric padding (right/bottom only) as in the CompVis models, so pretrained weights behave identically.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv: [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks), ``attn`` (maybe empty), optional ``downsample``/``upsample``."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, blk in enumerate(self.block):
            x = blk(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


class _Mid(nn.Module):
    """Middle block ResnetBlock -> AttnBlock -> ResnetBlock at the lowest resolution; shape-preserving."""

    def __init__(self, channels: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups, dropout)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


@dataclass
class AutoencoderKLConfig:
    """LDM AutoencoderKL hyper-parameters. ``attn_resolutions``: encoder levels (in pixels) with attention;
    ``decoder_attn_resolutions``: the same for the decoder (MAR's KL-16 has none besides the middle block)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    decoder_attn_resolutions: tuple[int, ...] = ()
    z_channels: int = 16
    embed_dim: int = 16
    in_channels: int = 3
    resolution: int = 256
    dropout: float = 0.0
    norm_groups: int = 32
    scaling_factor: float = KL16_SCALING_FACTOR

    def __post_init__(self) -> None:
        # Configs also come from file metadata: reject wrong types and sizes here rather than failing (or silently
        # truncating, as int(1.5) would) deep inside a layer constructor.
        for name in _INT_FIELDS:
            setattr(self, name, _as_int(name, getattr(self, name)))
        for name in ("ch_mult", "attn_resolutions", "decoder_attn_resolutions"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"AutoencoderKL config: {name} must be a list of integers, got {value!r}")
            setattr(self, name, tuple(_as_int(f"{name}[{i}]", v) for i, v in enumerate(value)))
        bad = [f"{n}={getattr(self, n)}" for n in _INT_FIELDS if getattr(self, n) < 1]
        bad += [f"ch_mult={self.ch_mult}"] if not self.ch_mult or min(self.ch_mult) < 1 else []
        bad += [f"dropout={self.dropout!r}"] if not (is_number(self.dropout) and 0 <= self.dropout < 1) else []
        if not (is_number(self.scaling_factor) and 0 < self.scaling_factor < math.inf):
            bad.append(f"scaling_factor={self.scaling_factor!r}")
        if bad:
            raise ValueError(f"invalid AutoencoderKL config ({', '.join(bad)}): sizes must be >= 1, ch_mult "
                             "non-empty, dropout in [0, 1), scaling_factor positive and finite")

    @classmethod
    def from_dict(cls, d: dict, complete: bool = False) -> "AutoencoderKLConfig":
        """Config from a dict (e.g. ``asdict`` output or a save_vae file's metadata); unknown keys raise ValueError,
        and so do missing keys with ``complete=True`` (a stored config must not fall back to the kl16 defaults)."""
        if not isinstance(d, dict):
            raise ValueError(f"an AutoencoderKL config must be a dict, got {type(d).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown AutoencoderKL config keys: {sorted(unknown)}")
        missing = sorted(known - set(d)) if complete else []
        if missing:
            raise ValueError(f"AutoencoderKL config lacks keys {missing}")
        return cls(**d)


_INT_FIELDS = ("ch", "num_res_blocks", "z_channels", "embed_dim", "in_channels", "resolution", "norm_groups")


def is_number(value: object) -> bool:
    """Whether ``value`` is a real number (numpy scalars included) and not a bool (an int subclass, never a size)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _as_int(name: str, value: object) -> int:
    if not (is_number(value) and isinstance(value, numbers.Integral)):
        raise ValueError(f"AutoencoderKL config: {name} must be an integer, got {value!r}")
    return int(value)


PRESETS: dict[str, AutoencoderKLConfig] = {
    # MAR's KL-16 (https://github.com/LTH14/mar): 256x256x3 -> 16x16x16, ~66.5M parameters.
    "kl16": AutoencoderKLConfig(),
    # Embedded Fashion-MNIST VAE: 32x32x1 -> 8x8x4 (f4). scaling_factor is replaced by train_vae.
    "fmnist": AutoencoderKLConfig(
        ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(), decoder_attn_resolutions=(),
        z_channels=4, embed_dim=4, in_channels=1, resolution=32, norm_groups=8, scaling_factor=1.0,
    ),
}


class Encoder(nn.Module):
    """Images [B, in_channels, H, W] -> unscaled moments [B, 2 * z_channels, H/stride, W/stride] (mean, logvar)."""

    def __init__(self, cfg: AutoencoderKLConfig) -> None:
        super().__init__()
        g = cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        res, block_in = cfg.resolution, cfg.ch
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            block_out = cfg.ch * mult
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, g, cfg.dropout))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in, g))
            level = _Level(blocks, attns)
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = _Mid(block_in, g, cfg.dropout)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)  # double_z: mean and logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Unscaled latents [B, z_channels, h, w] -> images [B, in_channels, h*stride, w*stride], roughly in [-1, 1]."""

    def __init__(self, cfg: AutoencoderKLConfig) -> None:
        super().__init__()
        g = cfg.norm_groups
        block_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (len(cfg.ch_mult) - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, g, cfg.dropout)
        levels: list[_Level] = []
        for i in reversed(range(len(cfg.ch_mult))):
            block_out = cfg.ch * cfg.ch_mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, g, cfg.dropout))
                block_in = block_out
                if res in cfg.decoder_attn_resolutions:
                    attns.append(AttnBlock(block_in, g))
            level = _Level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            levels.insert(0, level)  # keep CompVis indexing: up.0 is the full-resolution level
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(VAE):
    """LDM KL autoencoder. ``encode`` returns latents scaled by ``scaling_factor`` (posterior mean, or a posterior
    sample with ``sample=True``); ``decode`` undoes the scaling. ``forward`` is the training pass."""

    def __init__(self, config: AutoencoderKLConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = config or AutoencoderKLConfig()
        if overrides:
            cfg = AutoencoderKLConfig.from_dict({**asdict(cfg), **overrides})
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.latent_channels = cfg.embed_dim
        self.stride = 2 ** (len(cfg.ch_mult) - 1)
        self.image_channels = cfg.in_channels

    @property
    def scaling_factor(self) -> float:
        """Multiplier applied to posterior latents by ``encode`` (stored in ``config``)."""
        return self.config.scaling_factor

    @scaling_factor.setter
    def scaling_factor(self, value: float) -> None:
        self.config.scaling_factor = float(value)

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled posterior (mean, logvar), each [B, embed_dim, H/stride, W/stride]; logvar clamped to [-30, 20]."""
        self._check_images(images)
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images [B, in_channels, H, W] in [-1, 1] -> scaled latents [B, embed_dim, H/stride, W/stride]: the
        posterior mean, or with ``sample=True`` a posterior sample drawn with ``generator``."""
        mean, logvar = self.encode_moments(images)
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            mean = mean + torch.exp(0.5 * logvar) * noise
        return mean * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, embed_dim, h, w] -> images [B, in_channels, h*stride, w*stride], roughly in [-1, 1]
        (not clamped; no autograd)."""
        self._check_latents(latents)
        return self.decoder(self.post_quant_conv(latents / self.scaling_factor))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction from a reparameterised posterior sample, mean, logvar) (all unscaled)."""
        mean, logvar = self.encode_moments(images)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        return self.decoder(self.post_quant_conv(z)), mean, logvar


def build_vae(preset: str = "fmnist", **overrides) -> AutoencoderKL:
    """Fresh (randomly initialised) AutoencoderKL from a preset name in PRESETS, with optional config overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown VAE preset {preset!r}; choose from {sorted(PRESETS)}")
    return AutoencoderKL(AutoencoderKLConfig.from_dict({**asdict(PRESETS[preset]), **overrides}))


# ---------------------------------------------------------------------------------------------------------------
# Checking a config against stored tensors before anything is allocated


def cannot_match(blocks: int, widths: Mapping[str, int], stored: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why a config describing ``blocks`` resnet blocks and layers of ``widths`` ({name: channels}) cannot fit the
    stored shapes ``{state-dict key: shape}``, by arithmetic alone; None when it might (then build it on the meta
    device and compare every shape).

    Nothing is built, so a crafted or corrupt config (ch=100000, a million blocks) costs nothing here. Built for
    real such a config would take hundreds of GB, and even on the meta device minutes for a huge block count.
    """
    if blocks > len(stored):  # every resnet block has 8 tensors
        return f"the config describes {blocks} resnet blocks, the file has only {len(stored)} tensors"
    largest = max((math.prod(shape) for shape in stored.values()), default=0)
    for name, width in widths.items():
        if width > largest:  # a layer of this width has a tensor with at least `width` elements
            return f"{name} = {width} in the config, but the largest stored tensor has {largest} elements"
    return None


def check_shapes(expected: Mapping[str, tuple], stored: Mapping[str, tuple], source: str,
                 layout: str = "the AutoencoderKL layout") -> None:
    """ValueError listing the missing, unexpected and mis-shaped entries of ``stored`` ({key: shape}) if any."""
    missing = [k for k in expected if k not in stored]
    unexpected = [k for k in stored if k not in expected]
    mismatched = [
        f"{k}: file {tuple(stored[k])} vs model {tuple(expected[k])}"
        for k in expected
        if k in stored and tuple(stored[k]) != tuple(expected[k])
    ]
    parts = [f"{len(items)} {name}: {', '.join(items[:5])}" + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
             for name, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", mismatched))
             if items]
    if parts:
        raise ValueError(f"{source} does not match {layout}: " + "; ".join(parts))


def meta_vae(cfg: AutoencoderKLConfig, stored: Mapping[str, tuple[int, ...]], source: str) -> AutoencoderKL:
    """AutoencoderKL(cfg) on the meta device (every parameter shaped, nothing allocated, no random numbers drawn),
    checked against the stored shapes ``{key: shape}`` of ``source``: first by arithmetic (``cannot_match``, cheap
    whatever the config says), then parameter by parameter. Load the weights with ``load_state_dict(state,
    assign=True)``. Raises ValueError naming ``source`` and the mismatches."""
    blocks = len(cfg.ch_mult) * (2 * cfg.num_res_blocks + 1) + 4  # encoder nrb, decoder nrb+1 per level; 2 mids each
    reason = cannot_match(blocks, {"ch * max(ch_mult)": cfg.ch * max(cfg.ch_mult), "z_channels": cfg.z_channels,
                                   "embed_dim": cfg.embed_dim, "in_channels": cfg.in_channels}, stored)
    if reason:
        raise ValueError(f"{source} does not match its AutoencoderKL config: {reason} (a corrupt or edited file, "
                         "or the wrong config)")
    try:
        with torch.device("meta"):
            model = AutoencoderKL(cfg)
    except (RuntimeError, ValueError, OverflowError) as e:  # e.g. a width whose element count overflows int64
        raise ValueError(f"{source}: cannot build the AutoencoderKL its config describes ({e})") from None
    check_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()}, stored, source)
    return model
