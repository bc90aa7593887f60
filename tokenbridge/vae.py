"""Continuous VAEs that TokenBridge quantizes after training.

- ``VAE``: the interface the rest of the package uses. ``encode`` gives latents [B, C, h, w] already multiplied by
  ``scaling_factor`` (so they are roughly unit-variance, ready for the quantizer's [-5, 5] range); ``decode`` takes
  such latents back to images [B, image_channels, H, W] in [-1, 1].
- ``AutoencoderKL``: the LDM/CompVis KL autoencoder, configurable. Preset ``kl16`` has exactly the state-dict layout
  of MAR's ``kl16.ckpt`` (256x256x3 -> 16x16x16); preset ``fmnist`` is the small embedded f4 VAE
  (32x32x1 -> 8x8x4) trained by ``train_vae`` and shipped in ``tokenbridge/weights/fmnist_vae.safetensors``.
- ``load_vae(spec)``: "fmnist", "kl16:/path/kl16.ckpt", "diffusers:/local/folder", or a .safetensors file written
  by ``save_vae``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .files import atomic_path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
FMNIST_WEIGHTS = WEIGHTS_DIR / "fmnist_vae.safetensors"
KL16_SCALING_FACTOR = 0.2325
SD_SCALING_FACTOR = 0.18215
_FORMAT = "tokenbridge-vae"

# How the shipped weights/fmnist_vae.safetensors were made (also stored in the file's "training" metadata):
FMNIST_TRAINING = (
    "python -c \"import torch; torch.set_num_threads(1); from tokenbridge.vae import train_vae; "
    "train_vae('tokenbridge/weights/fmnist_vae.safetensors', steps=1400, batch_size=64, lr=2e-3, kl_weight=2e-3, "
    "seed=0)\"  # 1,324 s on one contended CPU core (~1.5 epochs). Test split (10,000 images): mean per-image PSNR "
    "28.48 dB on the [0, 1] scale (26.76 dB from the pooled MSE); scaling_factor 1.0680; scaled posterior-mean "
    "latents per channel mean [-0.13, -0.26, 0.25, -0.08], std [0.52, 1.28, 0.95, 1.02], |z| > 5: 1.6e-6, max 5.53."
)


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
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """decode(encode(images)), clamped to [-1, 1]."""
        return self.decode(self.encode(images, sample=sample)).clamp(-1, 1)

    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError(f"images must be a tensor [B, C, H, W], got {getattr(images, 'shape', type(images))}")
        b, c, h, w = images.shape
        if c != self.image_channels:
            raise ValueError(f"images have {c} channels, this VAE expects {self.image_channels}")
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
            raise ValueError(f"latents have {latents.shape[1]} channels, this VAE expects {self.latent_channels}")


# ---------------------------------------------------------------------------------------------------------------
# LDM / CompVis AutoencoderKL (own implementation; key names match the CompVis checkpoints)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    # Small models have fewer channels than 32: use the largest group count <= `groups` that divides them.
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0):
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
    """Single-head spatial self-attention with 1x1-conv q/k/v/proj_out (CompVis layout)."""

    def __init__(self, channels: int, groups: int):
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
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric padding (right/bottom only) as in the CompVis models, so pretrained weights behave identically.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks), ``attn`` (maybe empty), optional ``downsample``/``upsample``."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]):
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
    def __init__(self, channels: int, groups: int, dropout: float):
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
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        self.decoder_attn_resolutions = tuple(int(r) for r in self.decoder_attn_resolutions)
        if not self.ch_mult or self.ch <= 0 or self.num_res_blocks < 1 or self.z_channels < 1 or self.embed_dim < 1:
            raise ValueError(f"invalid AutoencoderKL config: {self}")
        if not (self.scaling_factor > 0 and math.isfinite(self.scaling_factor)):
            raise ValueError(f"scaling_factor must be positive and finite, got {self.scaling_factor}")

    @classmethod
    def from_dict(cls, d: dict) -> "AutoencoderKLConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown AutoencoderKL config keys: {sorted(unknown)}")
        return cls(**d)


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
    def __init__(self, cfg: AutoencoderKLConfig):
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
    def __init__(self, cfg: AutoencoderKLConfig):
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

    def __init__(self, config: AutoencoderKLConfig | None = None, **overrides):
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
        mean, logvar = self.encode_moments(images)
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            mean = mean + torch.exp(0.5 * logvar) * noise
        return mean * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
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
# Loading and saving


def _check_state_dict(model: nn.Module, state: dict, source: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        for name, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", mismatched)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{len(items)} {name}: {', '.join(items[:5])}{more}")
        raise ValueError(f"{source} does not match the AutoencoderKL layout: " + "; ".join(parts))


def load_kl16(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    config: AutoencoderKLConfig | None = None,
    scaling_factor: float = KL16_SCALING_FACTOR,
) -> AutoencoderKL:
    """Load MAR's ``kl16.ckpt`` (its ``"model"`` entry, CompVis key names) into an eval-mode AutoencoderKL.

    ``config`` overrides the kl16 architecture (e.g. other CompVis KL checkpoints); a bare state dict is accepted
    too. Raises FileNotFoundError / ValueError naming the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VAE checkpoint {path} not found (MAR's kl16.ckpt: download it from the MAR repo)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt/foreign files
        raise ValueError(f"{path}: cannot read as a torch checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        state = ckpt["model"]
    elif isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state = ckpt
    else:
        keys = list(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: expected a dict with a 'model' state dict (MAR kl16 format), got {keys}")
    cfg = AutoencoderKLConfig.from_dict({**asdict(config or PRESETS["kl16"]), "scaling_factor": scaling_factor})
    with torch.device("meta"):
        model = AutoencoderKL(cfg)
    _check_state_dict(model, state, str(path))
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=torch.float32).eval()


def save_vae(vae: AutoencoderKL, path: str | os.PathLike, training: dict | None = None) -> Path:
    """Write an AutoencoderKL (weights + config + scaling_factor in the metadata) to a .safetensors file, atomically."""
    from safetensors.torch import save_file

    if not isinstance(vae, AutoencoderKL):
        raise ValueError(f"save_vae supports AutoencoderKL, got {type(vae).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in vae.state_dict().items()}
    meta = {"format": _FORMAT, "config": json.dumps(asdict(vae.config))}
    if training:
        meta["training"] = json.dumps(training)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_vae_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a save_vae file: {"config": dict, "training": dict or None}."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != _FORMAT or "config" not in meta:
        raise ValueError(f"{path}: not a tokenbridge VAE file (no '{_FORMAT}' metadata with a config)")
    return {"config": json.loads(meta["config"]), "training": json.loads(meta["training"]) if "training" in meta else None}


def _load_safetensors_vae(path: Path, device: str | torch.device) -> AutoencoderKL:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"VAE weights {path} not found")
    try:
        meta = read_vae_metadata(path)
        state = load_file(str(path))
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: cannot read as safetensors ({type(e).__name__}: {e})") from e
    cfg = AutoencoderKLConfig.from_dict(meta["config"])
    model = AutoencoderKL(cfg)
    _check_state_dict(model, state, str(path))
    model.load_state_dict(state, strict=True)
    model.training_info = meta["training"]
    return model.to(device).eval()


class DiffusersVAE(VAE):
    """Wraps a diffusers ``AutoencoderKL`` loaded from a local folder (e.g. the Stable Diffusion VAE)."""

    def __init__(self, folder: str | os.PathLike, scaling_factor: float | None = None):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from diffusers import AutoencoderKL as _DiffusersAutoencoderKL
        except ImportError as e:
            raise ValueError("the 'diffusers:' VAE spec needs the diffusers package (pip install diffusers)") from e
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"diffusers VAE folder {folder} not found")
        self.model = _DiffusersAutoencoderKL.from_pretrained(str(folder), local_files_only=True)
        cfg = self.model.config
        self.latent_channels = int(cfg.latent_channels)
        self.stride = 2 ** (len(cfg.block_out_channels) - 1)
        self.image_channels = int(cfg.in_channels)
        self.scaling_factor = float(scaling_factor or getattr(cfg, "scaling_factor", None) or SD_SCALING_FACTOR)

    def encode(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        self._check_images(images)
        dist = self.model.encode(images).latent_dist
        return (dist.sample() if sample else dist.mean) * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self._check_latents(latents)
        return self.model.decode(latents / self.scaling_factor).sample


def load_vae(spec: str, device: str | torch.device = "cpu") -> VAE:
    """Load a VAE in eval mode from a spec:

    - ``"fmnist"``: the shipped Fashion-MNIST VAE (32x32x1 -> 8x8x4);
    - ``"kl16:/path/kl16.ckpt"``: MAR's KL-16 (256x256x3 -> 16x16x16, scaling 0.2325);
    - ``"diffusers:/local/folder"``: a diffusers AutoencoderKL folder (needs diffusers; offline);
    - a path to a ``.safetensors`` written by ``save_vae`` / ``train_vae``.
    """
    spec = str(spec)
    if spec == "fmnist":
        if not FMNIST_WEIGHTS.is_file():
            raise FileNotFoundError(
                f"shipped VAE weights {FMNIST_WEIGHTS} are missing; train them with `tokenbridge train-vae --out "
                f"{FMNIST_WEIGHTS}` or pass a .safetensors path"
            )
        return _load_safetensors_vae(FMNIST_WEIGHTS, device)
    if spec.startswith("kl16:"):
        return load_kl16(spec[len("kl16:"):], device)
    if spec.startswith("diffusers:"):
        return DiffusersVAE(spec[len("diffusers:"):]).to(device).eval()
    if spec.endswith(".safetensors") or Path(spec).is_file():
        return _load_safetensors_vae(Path(spec), device)
    raise ValueError(
        f"unknown VAE spec {spec!r}: use 'fmnist', 'kl16:/path/kl16.ckpt', 'diffusers:/folder' or a .safetensors file"
    )


# ---------------------------------------------------------------------------------------------------------------
# Training the embedded Fashion-MNIST VAE


@torch.no_grad()
def latent_stats(vae: VAE, images: torch.Tensor, batch_size: int = 500) -> dict:
    """Per-channel mean/std of scaled posterior-mean latents, the fraction beyond +-5, and the overall std."""
    z = torch.cat([vae.encode(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
    per = z.transpose(0, 1).flatten(1)
    return {
        "mean": [round(float(m), 4) for m in per.mean(1)],
        "std": [round(float(s), 4) for s in per.std(1)],
        "std_all": round(float(z.std()), 4),
        "frac_beyond_5": float((z.abs() > 5).float().mean()),
        "max_abs": round(float(z.abs().max()), 3),
    }


@torch.no_grad()
def _eval_psnr(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 500) -> float:
    """Mean per-image PSNR (dB) of the reconstructions; on [-1, 1] images it equals the PSNR on the [0, 1] scale."""
    from .metrics import psnr

    return float(torch.cat([psnr(vae.reconstruct(images[i:i + batch_size]).clamp(-1, 1), images[i:i + batch_size])
                            for i in range(0, len(images), batch_size)]).mean())


def train_vae(
    out_path: str | os.PathLike = FMNIST_WEIGHTS,
    steps: int = 1400,
    batch_size: int = 64,
    lr: float = 2e-3,
    kl_weight: float = 2e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    log_every: int = 200,
    data_root: str | os.PathLike | None = None,
    preset: str = "fmnist",
) -> AutoencoderKL:
    """Train the embedded KL-VAE on the Fashion-MNIST train split and save it (atomically) to ``out_path``.

    Loss per image = sum of squared errors over pixels (images in [-1, 1]) + ``kl_weight`` * KL(q(z|x) || N(0, I))
    summed over latent elements, with reparameterised posterior samples. AdamW, 100-step warm-up, cosine decay.
    The defaults reproduce the shipped weights (see FMNIST_TRAINING). Afterwards scaling_factor = 1 / std of posterior means over 5,000 training images (scaled latents have std 1,
    like 0.2325 for KL-16); test-split PSNR and latent statistics are printed and stored in the file's metadata.
    """
    from tqdm import tqdm

    from .data import as_tensors

    if steps < 1 or batch_size < 1 or lr <= 0 or kl_weight < 0:
        raise ValueError(f"need steps >= 1, batch_size >= 1, lr > 0, kl_weight >= 0; got {steps}, {batch_size}, {lr}, {kl_weight}")
    torch.manual_seed(seed)
    device = torch.device(device)
    train_x, _ = as_tensors("train", root=data_root)
    test_x, _ = as_tensors("test", root=data_root)
    vae = build_vae(preset).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=1e-4)
    warmup = min(100, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
    )
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    vae.train()
    bar = tqdm(range(steps), desc="train-vae", disable=None)
    for step in bar:
        x = train_x[torch.randint(len(train_x), (batch_size,), generator=gen)].to(device)
        recon, mean, logvar = vae(x)
        rec = (recon - x).pow(2).flatten(1).sum(1).mean()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()
        loss = rec + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0 * 784)  # loss is a per-image sum; only catches spikes
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            p = float(-10 * torch.log10(((recon.detach().clamp(-1, 1) - x) / 2).pow(2).mean()))
            bar.set_postfix(rec=f"{rec.item():.2f}", kl=f"{kl.item():.1f}", psnr=f"{p:.2f}")
            if bar.disable:
                print(f"step {step} rec {rec.item():.3f} kl {kl.item():.2f} batch-psnr {p:.2f} dB", flush=True)
    vae.eval()
    with torch.no_grad():
        calib = train_x[:5000].to(device)
        means = torch.cat([vae.encode_moments(calib[i : i + 500])[0] for i in range(0, len(calib), 500)])
        vae.scaling_factor = 1.0 / float(means.std())
    test = test_x.to(device)
    test_psnr = _eval_psnr(vae, test)
    stats = latent_stats(vae, test)
    info = {
        "call": f"train_vae(steps={steps}, batch_size={batch_size}, lr={lr}, kl_weight={kl_weight}, seed={seed})",
        "steps": steps, "batch_size": batch_size, "lr": lr, "kl_weight": kl_weight, "seed": seed,
        "seconds": round(time.time() - t0, 1), "test_psnr_db": round(test_psnr, 3), "test_latents": stats,
    }
    save_vae(vae, out_path, training=info)
    print(f"test PSNR {test_psnr:.2f} dB ([0,1] scale), scaling_factor {vae.scaling_factor:.4f}, "
          f"latent mean {stats['mean']} std {stats['std']}, beyond +-5: {stats['frac_beyond_5']:.2e}; saved {out_path}")
    return vae
