"""Loading, saving, fingerprinting and training the continuous VAEs that TokenBridge quantizes.

The architecture (the ``VAE`` interface, ``AutoencoderKL`` and its presets) lives in ``tokenbridge.autoencoder``.

- ``load_vae(spec)``: "fmnist" (the shipped f4 VAE, 32x32x1 -> 8x8x4, in
  ``tokenbridge/weights/fmnist_vae.safetensors``), "kl16:/path/kl16.ckpt" (MAR's KL-16), "diffusers:/local/folder",
  or a .safetensors file written by ``save_vae``.
- ``vae_fingerprint(vae)``: a short hash of a VAE's weights, to check that a generator is sampled with its VAE.
- ``train_vae``: trains the embedded Fashion-MNIST VAE.

Every loader checks its input before doing work: a bad spec or device, a missing, foreign, truncated or malformed
file, or a config that does not match the stored tensors gives a ValueError / FileNotFoundError naming the file and
the problem. Stored shapes (a safetensors header, a loaded state dict) are compared with the model built on the
meta device before any parameter memory is allocated, so a crafted config (ch=100000) costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .autoencoder import KL16_SCALING_FACTOR, PRESETS, VAE, AutoencoderKL, AutoencoderKLConfig
from .autoencoder import DiffusersVAE, build_vae, cannot_match, check_shapes, is_number, meta_vae
from .data import as_tensors
from .files import atomic_path, check_target, holds_output, tensor_bytes
from .metrics import psnr
from .optim import lr_at
from .progress import disable

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
FMNIST_WEIGHTS = WEIGHTS_DIR / "fmnist_vae.safetensors"
SPEC_FORMS = ("'fmnist' (the shipped VAE), 'kl16:/path/kl16.ckpt' (MAR's KL-16), 'diffusers:/local/folder' (a "
              "diffusers AutoencoderKL folder) or the path of a .safetensors written by save_vae / train-vae")
_FORMAT = "tokenbridge-vae"
_TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# How the shipped weights/fmnist_vae.safetensors were made (also stored in the file's "training" metadata):
FMNIST_TRAINING = (
    "python -c \"import torch; torch.set_num_threads(1); from tokenbridge.vae import train_vae; "
    "train_vae('tokenbridge/weights/fmnist_vae.safetensors', steps=1400, batch_size=64, lr=2e-3, kl_weight=2e-3, "
    "seed=0)\"  # 1,324 s on one contended CPU core (~1.5 epochs). Test split (10,000 images): mean per-image PSNR "
    "28.48 dB on the [0, 1] scale (26.76 dB from the pooled MSE); scaling_factor 1.0680; scaled posterior-mean "
    "latents per channel mean [-0.13, -0.26, 0.25, -0.08], std [0.52, 1.28, 0.95, 1.02], |z| > 5: 1.6e-6, max 5.53."
)


# ---------------------------------------------------------------------------------------------------------------
# Checks shared by the loaders


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device; a ValueError now (not after the weights are read) if it is malformed, 'meta'
    (holds no weights) or a CUDA / MPS device this machine lacks."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r} ({e})") from None
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if (dev.type == "meta" or dev.type == "cuda" and (dev.index or 0) >= cuda
            or dev.type == "mps" and not torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} is not usable here (CUDA devices: {cuda}; 'meta' holds no weights)")
    return dev


def _existing_file(path: Path, what: str, hint: str = "") -> Path:
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory, not a file{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found{hint}")
    return path


def _state_shapes(state: Mapping, source: str) -> dict[str, tuple[int, ...]]:
    """{key: shape} of a loaded state dict whose entries must all be floating-point tensors."""
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{source}: entry {key!r} is {kind}, not a floating-point tensor")
    return {k: tuple(v.shape) for k, v in state.items()}


def _check_finite(state: Mapping[str, torch.Tensor], source: str) -> None:
    # one NaN weight would silently turn every latent and image into NaN
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{source}: {len(bad)} tensors contain NaN or inf ({', '.join(bad[:3])})")


def _materialise(model: AutoencoderKL, state: dict, device: torch.device, source: str) -> AutoencoderKL:
    """Assign the (shape-checked) ``state`` to the meta ``model`` as float32, on ``device``, in eval mode."""
    state = {k: v.to(torch.float32) for k, v in state.items()}  # a no-op for float32; half files load as float32
    _check_finite(state, source)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------------------------
# Loading and saving


def load_kl16(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    config: AutoencoderKLConfig | None = None,
    scaling_factor: float = KL16_SCALING_FACTOR,
) -> AutoencoderKL:
    """Load MAR's ``kl16.ckpt`` (its ``"model"`` entry, CompVis key names) into an eval-mode float32 AutoencoderKL.

    ``config`` overrides the kl16 architecture (e.g. other CompVis KL checkpoints); a bare state dict is accepted
    too. The checkpoint's shapes are compared with the architecture built on the meta device before any parameter
    is allocated. Raises FileNotFoundError / ValueError naming the file and the problem.
    """
    path = _existing_file(Path(path), "VAE checkpoint", " (MAR's kl16.ckpt: download it from the MAR repo)")
    device = check_device(device)
    if config is not None and not isinstance(config, AutoencoderKLConfig):
        raise ValueError(f"load_kl16: config must be an AutoencoderKLConfig, got {type(config).__name__}")
    cfg = AutoencoderKLConfig.from_dict({**asdict(config or PRESETS["kl16"]), "scaling_factor": scaling_factor})
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
    model = meta_vae(cfg, _state_shapes(state, str(path)), str(path))
    return _materialise(model, state, device, str(path))


def save_vae(vae: AutoencoderKL, path: str | os.PathLike, training: dict | None = None) -> Path:
    """Write an AutoencoderKL (weights + config + scaling_factor in the metadata) to a .safetensors file, atomically.

    Refuses (ValueError) weights with NaN or inf, a ``path`` that is a directory or whose folder is not writable."""
    if not isinstance(vae, AutoencoderKL):
        raise ValueError(f"save_vae supports AutoencoderKL, got {type(vae).__name__}")
    path = check_target(path, _FORMAT, what="VAE file")
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in vae.state_dict().items()}
    _check_finite(tensors, f"save_vae (not writing {path})")
    meta = {"format": _FORMAT, "config": json.dumps(asdict(vae.config))}
    if training:
        meta["training"] = json.dumps(training)
    with atomic_path(path, _FORMAT, needed=tensor_bytes(tensors)) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def _read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """(metadata, {key: shape}) of a .safetensors file, from its header alone: no tensor is read."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # SafetensorError for truncated / garbage files, OSError, ...
        torch_file = path.suffix in _TORCH_SUFFIXES
        hint = "; a torch checkpoint such as MAR's kl16.ckpt is given as 'kl16:PATH'" if torch_file else ""
        raise ValueError(f"{path}: cannot read as safetensors ({type(e).__name__}: {e}){hint}") from e


def _vae_metadata(path: Path, meta: Mapping[str, str]) -> tuple[dict, dict | None]:
    """The (config, training) dicts of a save_vae file's metadata, checked: right format, valid JSON, a complete
    and valid AutoencoderKL config."""
    fmt = meta.get("format")
    if fmt != _FORMAT:
        what = f"a {fmt!r} file" if fmt else "a .safetensors file without tokenbridge metadata"
        raise ValueError(f"{path} is {what}, not a tokenbridge VAE (format {_FORMAT!r}); VAE specs: {SPEC_FORMS}")
    if "config" not in meta:
        raise ValueError(f"{path}: the VAE metadata has no 'config' entry")
    parsed: dict[str, dict | None] = {"training": None}
    for key in [k for k in ("config", "training") if k in meta]:
        try:
            parsed[key] = json.loads(meta[key])
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: the VAE metadata's {key!r} is not valid JSON ({e})") from None
        if not isinstance(parsed[key], dict):
            raise ValueError(f"{path}: the VAE metadata's {key!r} is a {type(parsed[key]).__name__}, not an object")
    try:
        AutoencoderKLConfig.from_dict(parsed["config"], complete=True)
    except (ValueError, TypeError, OverflowError) as e:
        raise ValueError(f"{path}: bad VAE config in the metadata: {e}") from None
    return parsed["config"], parsed["training"]


def read_vae_metadata(path: str | os.PathLike) -> dict:
    """The checked metadata of a save_vae file: {"config": dict, "training": dict or None}."""
    path = _existing_file(Path(path), "VAE weights")
    config, training = _vae_metadata(path, _read_header(path)[0])
    return {"config": config, "training": training}


def _load_safetensors_vae(path: Path, device: str | torch.device) -> AutoencoderKL:
    path = _existing_file(path, "VAE weights")
    device = check_device(device)
    meta, shapes = _read_header(path)
    config, training = _vae_metadata(path, meta)
    model = meta_vae(AutoencoderKLConfig.from_dict(config), shapes, str(path))
    try:
        state = load_file(str(path))
    except Exception as e:
        raise ValueError(f"{path}: cannot read the tensors ({type(e).__name__}: {e})") from e
    _state_shapes(state, str(path))
    model = _materialise(model, state, device, str(path))
    model.training_info = training
    return model


# ---------------------------------------------------------------------------------------------------------------
# diffusers folders

_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # diffusers' order
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # diffusers renames


def _diffusers_config(folder: Path) -> dict:
    """The config.json of a diffusers AutoencoderKL folder, checked before diffusers sees it."""
    if not folder.is_dir():
        kind = "is a file, not a folder" if folder.exists() else "not found"
        raise (ValueError if folder.exists() else FileNotFoundError)(f"diffusers VAE folder {folder} {kind}")
    path = folder / "config.json"
    if not path.is_file():
        sub = f" (a pipeline folder? use 'diffusers:{folder / 'vae'}')" if (folder / "vae").is_dir() else ""
        raise FileNotFoundError(f"diffusers VAE folder {folder} has no config.json{sub}")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    # a hand-written config may lack _class_name; then it must at least have the AutoencoderKL keys
    guess = "AutoencoderKL" if "block_out_channels" in cfg else "no _class_name" if isinstance(cfg, dict) else None
    name = cfg.get("_class_name", guess) if isinstance(cfg, dict) else f"a JSON {type(cfg).__name__}"
    if name != "AutoencoderKL":
        raise ValueError(f"{path} describes {name}, not a diffusers AutoencoderKL (the 'diffusers:' spec takes an "
                         "AutoencoderKL folder, e.g. a Stable Diffusion pipeline's vae/)")
    sizes, scale = cfg.get("block_out_channels", [64]), cfg.get("scaling_factor")
    ints = [cfg.get(k, 1) for k in ("latent_channels", "in_channels", "out_channels", "layers_per_block")]
    if (not isinstance(sizes, list) or not sizes
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in sizes + ints)
            or not (scale is None or is_number(scale) and 0 < scale < math.inf)):
        raise ValueError(f"{path}: needs block_out_channels a non-empty list and latent_channels, in_channels, "
                         "out_channels, layers_per_block integers, all >= 1, and a positive scaling_factor")
    return cfg


def _check_diffusers_weights(folder: Path, cfg: dict, model_class: type) -> None:
    """Compare the stored weight shapes (safetensors header, or a .bin memory-mapped onto the meta device) with
    the ``model_class`` (diffusers' AutoencoderKL) that ``cfg`` describes, built on the meta device: a wrong or
    crafted config.json fails here instead of allocating its model for real inside diffusers."""
    file = next((folder / n for n in _DIFFUSERS_WEIGHTS if (folder / n).is_file()), None)
    if file is None:
        found = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))[:5]
        raise FileNotFoundError(f"diffusers VAE folder {folder} has no weights ({' or '.join(_DIFFUSERS_WEIGHTS)}"
                                f"; found {found}: variants such as .fp16 and sharded weights are not loaded)")
    if file.suffix == ".safetensors":
        shapes = _read_header(file)[1]
    else:
        try:
            state = torch.load(file, map_location="meta", weights_only=True, mmap=True)
        except Exception as e:
            raise ValueError(f"{file}: cannot read as a torch state dict ({type(e).__name__}: {e})") from e
        shapes = _state_shapes(state if isinstance(state, dict) else {"(the whole file)": state}, str(file))
    stored = {}
    for key, shape in shapes.items():
        path, _, leaf = key.rpartition(".")
        parent, _, name = path.rpartition(".")
        legacy = name in _LEGACY_ATTENTION and ".attentions." in key
        stored[f"{parent}.{_LEGACY_ATTENTION[name]}.{leaf}" if legacy else key] = shape
    sizes = cfg.get("block_out_channels", [64])
    reason = cannot_match(len(sizes) * (2 * cfg.get("layers_per_block", 1) + 1) + 4,
                          {"block_out_channels": max(sizes), "latent_channels": cfg.get("latent_channels", 4)}, stored)
    if reason:
        raise ValueError(f"{file} does not match {folder / 'config.json'}: {reason}")
    try:
        with torch.device("meta"):
            model = model_class.from_config(cfg)
    except Exception as e:  # diffusers raises many types for configs it cannot build
        raise ValueError(f"diffusers cannot build the AutoencoderKL of {folder / 'config.json'} "
                         f"({type(e).__name__}: {e})") from e
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_shapes(expected, stored, str(file), f"the AutoencoderKL of {folder / 'config.json'}")


def load_diffusers_vae(folder: str | os.PathLike, scaling_factor: float | None = None) -> DiffusersVAE:
    """A ``DiffusersVAE`` (float32, on the CPU) from a local diffusers AutoencoderKL folder, offline.

    The folder is checked first (config.json present and an AutoencoderKL, weights present and of the shapes that
    config describes, compared on the meta device); diffusers' own errors come back as ValueErrors naming it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    except ImportError as e:
        raise ValueError("the 'diffusers:' VAE spec needs the diffusers package (pip install diffusers)") from e
    folder = Path(folder)
    _check_diffusers_weights(folder, _diffusers_config(folder), DiffusersAutoencoderKL)
    try:
        model = DiffusersAutoencoderKL.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise ValueError(f"diffusers could not load the VAE folder {folder} ({type(e).__name__}: {e})") from e
    _check_finite(model.state_dict(), f"diffusers VAE folder {folder}")
    return DiffusersVAE(model, scaling_factor)


def load_vae(spec: str | os.PathLike, device: str | torch.device = "cpu") -> VAE:
    """Load a VAE in eval mode from a spec:

    - ``"fmnist"``: the shipped Fashion-MNIST VAE (32x32x1 -> 8x8x4);
    - ``"kl16:/path/kl16.ckpt"``: MAR's KL-16 (256x256x3 -> 16x16x16, scaling 0.2325);
    - ``"diffusers:/local/folder"``: a diffusers AutoencoderKL folder (needs diffusers; offline);
    - a path to a ``.safetensors`` written by ``save_vae`` / ``train_vae``.

    Anything else, a missing file, or a file that is not what its form promises raises ValueError /
    FileNotFoundError naming the file, the problem and (for a bad spec) the accepted forms.
    """
    if not isinstance(spec, (str, os.PathLike)) or not str(spec):
        raise ValueError(f"VAE spec {spec!r}: give one of {SPEC_FORMS}")
    spec = os.fspath(spec)
    device = check_device(device)
    if spec == "fmnist":
        _existing_file(FMNIST_WEIGHTS, "shipped VAE weights", f"; train them with `tokenbridge train-vae --out "
                       f"{FMNIST_WEIGHTS}` or pass a .safetensors path")
        return _load_safetensors_vae(FMNIST_WEIGHTS, device)
    kind, colon, rest = spec.partition(":")
    if kind in ("kl16", "diffusers"):
        if not colon or not rest.strip():
            raise ValueError(f"VAE spec {spec!r}: '{kind}:' needs a path after the colon; use {SPEC_FORMS}")
        if kind == "kl16":
            return load_kl16(rest, device)
        return load_diffusers_vae(rest).to(device).eval()
    path = Path(spec)
    if path.is_dir():
        hint = f"; for a diffusers folder use 'diffusers:{spec}'" if (path / "config.json").is_file() else ""
        raise ValueError(f"VAE spec {spec!r} is a directory, not a VAE file{hint}; use {SPEC_FORMS}")
    if path.is_file():
        return _load_safetensors_vae(path, device)
    if path.suffix or "/" in spec or os.sep in spec:  # meant as a path
        raise FileNotFoundError(f"VAE file {spec} not found; VAE specs: {SPEC_FORMS}")
    raise ValueError(f"unknown VAE spec {spec!r}: use {SPEC_FORMS}")


def vae_fingerprint(vae: nn.Module) -> str:
    """A short, stable identity of a VAE's weights: 16 hex characters of a sha256 over its state dict.

    Entries are hashed in sorted key order, each as its key, dtype string, shape and the raw bytes of the tensor in
    its own dtype (so the same weights stored as float32 and bfloat16 differ). Deterministic across processes and
    loads of the same file; any changed weight or buffer changes it, and so does the latent ``scaling_factor``
    (the same weights with another scale give latents on another scale). A ``DiffusersVAE`` hashes the wrapped
    diffusers model (keys ``model.*``).
    """
    state = vae.state_dict()
    digest = hashlib.sha256(f"scaling_factor={getattr(vae, 'scaling_factor', None)!r}|".encode())
    for key in sorted(state):
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"vae_fingerprint: state-dict entry {key!r} is a {type(value).__name__}, not a tensor")
        if value.device.type == "meta":
            raise ValueError(f"vae_fingerprint: {key!r} is on the meta device (weights not loaded)")
        tensor = value.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{key}|{tensor.dtype}|{tuple(value.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# Training the embedded Fashion-MNIST VAE


def _in_batches(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """torch.cat of ``fn`` applied to consecutive slices of ``images`` [N, ...] of at most ``batch_size`` rows."""
    return torch.cat([fn(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


@torch.no_grad()
def latent_stats(vae: VAE, images: torch.Tensor, batch_size: int = 500) -> dict:
    """Statistics of the scaled posterior-mean latents of ``images`` [N, C, H, W] in [-1, 1], encoded in batches.

    Returns {"mean", "std"}: per-channel lists (length latent_channels), "std_all": overall std, "frac_beyond_5":
    fraction of elements with |z| > 5 (outside the quantizer's default range), "max_abs": the largest |z|.
    """
    z = _in_batches(vae.encode, images, batch_size)
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
    return float(_in_batches(lambda x: psnr(vae.reconstruct(x), x), images, batch_size).mean())


def _check_training(out_path: str | os.PathLike, steps: int, batch_size: int, lr: float, kl_weight: float, seed: int,
                    log_every: int, preset: str, device: str | torch.device) -> tuple[Path, torch.device]:
    """(output path, device) once everything train_vae can check before reading data is fine: argument types and
    ranges, the preset, the device, and that ``out_path`` (a .safetensors) can be written, its folder created, so
    an hour of training is not lost at the end."""
    if not isinstance(out_path, (str, os.PathLike)) or Path(out_path).suffix != ".safetensors":
        raise ValueError(f"train_vae: out_path must be the .safetensors file to write (what load_vae reads), "
                         f"got {out_path!r}")
    counts = {"steps": steps, "batch_size": batch_size, "log_every": log_every, "seed": seed}
    bad = [f"{k}={v!r}" for k, v in counts.items() if not (isinstance(v, int) and not isinstance(v, bool))]
    bad += [f"{k}={v!r}" for k, v in counts.items() if k != "seed" and isinstance(v, int) and v < 1]
    bad += [] if is_number(lr) and 0 < lr < math.inf else [f"lr={lr!r}"]
    bad += [] if is_number(kl_weight) and 0 <= kl_weight < math.inf else [f"kl_weight={kl_weight!r}"]
    if bad:
        raise ValueError(f"train_vae: need integers steps, batch_size, log_every >= 1 and seed, a finite lr > 0 "
                         f"and kl_weight >= 0; got {', '.join(bad)}")
    if preset not in PRESETS:
        raise ValueError(f"train_vae: unknown VAE preset {preset!r}; choose from {sorted(PRESETS)}")
    device = check_device(device)
    return check_target(out_path, _FORMAT, what="VAE output"), device


@holds_output("out_path", "VAE output")
def train_vae(
    out_path: str | os.PathLike,
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
    The defaults reproduce the shipped weights (see FMNIST_TRAINING). Afterwards scaling_factor = 1 / std of
    posterior means over 5,000 training images (scaled latents have std 1, like 0.2325 for KL-16); test-split PSNR
    and latent statistics are printed and stored in the file's metadata. Every argument and the output path are
    checked before the data is read; a diverged (NaN) loss stops training with a ValueError.
    """
    from tqdm import tqdm

    out_path, device = _check_training(out_path, steps, batch_size, lr, kl_weight, seed, log_every, preset, device)
    torch.manual_seed(seed)
    train_x, _ = as_tensors("train", root=data_root)
    test_x, _ = as_tensors("test", root=data_root)
    vae = build_vae(preset).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=1e-4)
    warmup = min(100, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, 1.0, warmup, steps))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    vae.train()
    bar = tqdm(range(steps), desc="train-vae", disable=disable())
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
            if not math.isfinite(loss.item()):  # the weights are garbage now; say so instead of saving them
                raise ValueError(f"train_vae: the loss is {loss.item()} at step {step} (diverged: lower lr?); "
                                 f"{out_path} was not written")
            p = float(-10 * torch.log10(((recon.detach().clamp(-1, 1) - x) / 2).pow(2).mean()))
            bar.set_postfix(rec=f"{rec.item():.2f}", kl=f"{kl.item():.1f}", psnr=f"{p:.2f}")
            if bar.disable:
                print(f"step {step} rec {rec.item():.3f} kl {kl.item():.2f} batch-psnr {p:.2f} dB", flush=True)
    vae.eval()
    with torch.no_grad():
        calib = train_x[:5000].to(device)
        means = _in_batches(lambda x: vae.encode_moments(x)[0], calib, 500)
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
