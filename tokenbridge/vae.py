"""Loading, saving and fingerprinting the continuous VAEs that TokenBridge quantizes.

The architecture (the ``VAE`` interface, ``AutoencoderKL`` and its presets) lives in ``tokenbridge.autoencoder``.

- ``load_vae(spec)``: "fmnist" (the shipped f4 VAE, 32x32x1 -> 8x8x4, in
  ``tokenbridge/weights/fmnist_vae.safetensors``), "kl16:/path/kl16.ckpt" (MAR's KL-16), "diffusers:/local/folder",
  or a .safetensors file written by ``save_vae``.
- ``vae_fingerprint(vae)``: a short hash of a VAE's weights, to check that a generator is sampled with its VAE
  (``state_fingerprint``: the same for any module).
- ``train_vae`` (in ``tokenbridge.training.vae``) trains the embedded Fashion-MNIST VAE.

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
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .autoencoder import KL16_SCALING_FACTOR, PRESETS, VAE, AutoencoderKL, AutoencoderKLConfig
from .autoencoder import DiffusersVAE, cannot_match, check_shapes, is_number, meta_vae
from .files import atomic_path, check_target, tensor_bytes

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
FMNIST_WEIGHTS = WEIGHTS_DIR / "fmnist_vae.safetensors"
SPEC_FORMS = ("'fmnist' (the shipped VAE), 'kl16:/path/kl16.ckpt' (MAR's KL-16), 'diffusers:/local/folder' (a "
              "diffusers AutoencoderKL folder) or the path of a .safetensors written by save_vae / train-vae")
VAE_FORMAT = "tokenbridge-vae"
_TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")



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
    path = check_target(path, VAE_FORMAT, what="VAE file")
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in vae.state_dict().items()}
    _check_finite(tensors, f"save_vae (not writing {path})")
    meta = {"format": VAE_FORMAT, "config": json.dumps(asdict(vae.config))}
    if training:
        meta["training"] = json.dumps(training)
    with atomic_path(path, VAE_FORMAT, needed=tensor_bytes(tensors)) as tmp:
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
    if fmt != VAE_FORMAT:
        what = f"a {fmt!r} file" if fmt else "a .safetensors file without tokenbridge metadata"
        raise ValueError(f"{path} is {what}, not a tokenbridge VAE (format {VAE_FORMAT!r}); VAE specs: {SPEC_FORMS}")
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
    """A short, stable identity of a VAE's weights: `state_fingerprint` of its state dict, which also covers the
    latent ``scaling_factor`` (the same weights with another scale give latents on another scale). A
    ``DiffusersVAE`` hashes the wrapped diffusers model (keys ``model.*``).
    """
    return state_fingerprint(vae, f"scaling_factor={getattr(vae, 'scaling_factor', None)!r}|")


def state_fingerprint(module: nn.Module, prefix: str = "") -> str:
    """16 hex characters of a sha256 over ``prefix`` and a module's state dict.

    Entries are hashed in sorted key order, each as its key, dtype string, shape and the raw bytes of the tensor in
    its own dtype (so the same weights stored as float32 and bfloat16 differ). Deterministic across processes and
    loads of the same file; any changed weight or buffer changes it.
    """
    state = module.state_dict()
    digest = hashlib.sha256(prefix.encode())
    for key in sorted(state):
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"state_fingerprint: state-dict entry {key!r} is a {type(value).__name__}, not a tensor")
        if value.device.type == "meta":
            raise ValueError(f"state_fingerprint: {key!r} is on the meta device (weights not loaded)")
        tensor = value.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{key}|{tensor.dtype}|{tuple(value.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
