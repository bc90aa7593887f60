"""Released checkpoints -> tokenbridge generators: official TokenBridge-L/H and MAR-B/L/H.

An official ``checkpoint-last.pth`` is a dict with ``model``, ``model_ema``, ``optimizer``, ``epoch`` (and
``scaler``, ``args``). `convert_tokenbridge` builds a plain `TokenBridgeGenerator` (MAR backbone with LayerNorm eps
1e-6, the "ar" head with the exact GELU, a final norm and the sampler's first-input option, the quantizer with
boundaries clamped at +-3 and the released arithmetic, the hard-coded KL-16 channel order) and `convert_mar` a plain
`ContinuousMARGenerator` (the same backbone and a `DiffusionHead` with doubled-batch noise); the weight rewrites of
`layout` make the plain modules compute the released functions. Sizes are read from the tensors' shapes
(attention heads, which no shape shows, from the released models' table in `presets`).

The mapping is strict: every key of the checkpoint must be consumed and every tensor of the generator filled;
missing keys, unexpected keys and shape mismatches are all named in one `ConversionError`. The released
TokenBridge ``model_ema`` holds parameters only: its missing buffers (``reconstruction_values``, ``boundaries``,
``channel_mask``) are taken from ``model``. The unconditional class is MAR's ``fake_latent`` parameter; it becomes
class row ``num_classes`` of the backbone's class embedding.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..generators.mar import ContinuousMARGenerator
from ..generators.tokenbridge import TokenBridgeGenerator
from ..quantizer import gaussian_bins, released_values
from .layout import ConversionError, apply_rules, backbone_rules, channel_head_rules, diffusion_head_rules
from .presets import (
    CHANNEL_ORDER,
    HEAD_NUM_HEADS,
    MAR_SAMPLING,
    MAR_SAMPLING_COMMON,
    NUM_HEADS,
    TOKENBRIDGE_SAMPLING,
    TOKENBRIDGE_SAMPLING_COMMON,
    released_head,
    tokenbridge_preset_of,
)

__all__ = ["convert", "convert_mar", "convert_tokenbridge", "detect_family", "load_official_state", "read_checkpoint"]

_TOKENBRIDGE_BUFFERS = ("reconstruction_values", "boundaries", "channel_mask")


# ----------------------------------------------------------------------------------------------------------------
# reading the checkpoint


def read_checkpoint(path: str | os.PathLike, trust_pickle: bool = False) -> dict:
    """torch.load an official checkpoint on the CPU, weights_only=True (argparse.Namespace, its ``args``, allowed)
    unless ``trust_pickle``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:
        raise ConversionError(f"{path} could not be read as a torch checkpoint ({e}); if it is a trusted file "
                              "holding other Python objects, pass trust_pickle=True (--trust-pickle)") from e


def load_official_state(source: str | os.PathLike | dict, weights: str = "model_ema",
                        trust_pickle: bool = False) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state dict, info) of an official checkpoint (a path or the loaded dict). weights: "model_ema" or "model".
    The buffers missing from the released ``model_ema`` (reconstruction_values, boundaries, channel_mask) are
    taken from ``model`` and listed in info["from_model"]; a missing parameter is not.
    The file is read with weights_only=True (argparse.Namespace allowed); trust_pickle=True reads any pickle."""
    if weights not in ("model", "model_ema"):
        raise ValueError(f"weights must be 'model' or 'model_ema', got {weights!r}")
    info: dict[str, Any] = {"weights": weights, "from_model": []}
    ckpt = source
    if not isinstance(source, dict):
        path = Path(source)
        path = path / "checkpoint-last.pth" if path.is_dir() else path
        info["path"] = str(path)
        ckpt = read_checkpoint(path, trust_pickle)
    if not isinstance(ckpt, dict) or weights not in ckpt or not isinstance(ckpt[weights], dict):
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ConversionError(f"not an official checkpoint: no {weights!r} state dict (found {found})")
    state = dict(ckpt[weights])
    if weights == "model_ema" and isinstance(ckpt.get("model"), dict):
        for key in _TOKENBRIDGE_BUFFERS:  # buffers only: a parameter missing from the EMA stays missing
            if key not in state and key in ckpt["model"]:
                state[key] = ckpt["model"][key]
                info["from_model"].append(key)
    if "epoch" in ckpt:
        info["epoch"] = int(ckpt["epoch"])
    return state, info


def detect_family(state: dict[str, Tensor]) -> str:
    """"tokenbridge" (a channel head) or "mar" (a diffusion loss) from an official state dict's keys."""
    if any(k.startswith("channel_heads.") for k in state):
        return "tokenbridge"
    if any(k.startswith("diffloss.") for k in state):
        return "mar"
    raise ConversionError("neither an official TokenBridge checkpoint (no channel_heads.*) nor an official MAR "
                          "one (no diffloss.*)")


def _shape(state: dict[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise ConversionError(f"missing key {key!r}, needed to read the model's size")
    return tuple(state[key].shape)


def _ratio(state: dict[str, Tensor], pattern: str, width: int) -> float:
    """MLP hidden width over ``width`` from any block's fc1 weight matching ``pattern`` (4.0, the released
    models', when none is there: the strict check then names the missing keys)."""
    shapes = [v.shape[0] for k, v in state.items() if re.fullmatch(pattern, k)]
    return shapes[0] / width if shapes else 4.0


def _count(state: dict[str, Tensor], prefix: str) -> int:
    """Number of consecutive indexed children ``prefix.0``, ``prefix.1``, ... in the state dict."""
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


# ----------------------------------------------------------------------------------------------------------------
# sizes -> our configs


def _backbone_config(state: dict[str, Tensor], out_pos_key: str, num_heads: int | None,
                     patch_size: int) -> tuple[dict, dict]:
    """(shape fields, backbone section) of our config from an official MAR backbone's tensor shapes."""
    width, token_dim = _shape(state, "z_proj.weight")
    seq_len = _shape(state, out_pos_key)[1]
    total = _shape(state, "encoder_pos_embed_learned")[1]
    dec_out, dec_in = _shape(state, "decoder_embed.weight")
    if dec_out != width or dec_in != width:
        raise ConversionError(f"decoder_embed.weight has shape {(dec_out, dec_in)}: only equal encoder and decoder "
                              f"widths ({width}) are supported")
    side = math.isqrt(seq_len)
    if side * side != seq_len or token_dim % (patch_size * patch_size):
        raise ConversionError(f"{out_pos_key} has {seq_len} positions: not a square grid of tokens of "
                              f"{token_dim} values with patch_size {patch_size}")
    heads = num_heads or NUM_HEADS.get(width)
    if heads is None:
        raise ConversionError(f"no released model has width {width}: give num_heads (--num-heads)")
    shapes = {"grid_size": [side * patch_size] * 2, "channels": token_dim // (patch_size * patch_size),
              "num_classes": _shape(state, "class_emb.weight")[0]}
    backbone = {"width": width, "encoder_depth": _count(state, "encoder_blocks"),
                "decoder_depth": _count(state, "decoder_blocks"), "num_heads": heads,
                "mlp_ratio": _ratio(state, r"(en|de)coder_blocks\.\d+\.mlp\.fc1\.weight", width),
                "buffer_size": total - seq_len, "patch_size": patch_size, "norm_eps": 1e-6, "dropout": 0.1,
                "attn_dropout": 0.1}
    return shapes, backbone


def _tokenbridge_config(state: dict[str, Tensor], num_heads: int | None, head_num_heads: int,
                        order: Sequence[int], first_token_timestep: bool,
                        value_range: tuple[float, float], std_range: float) -> dict:
    shapes, backbone = _backbone_config(state, "output_pos_embed", num_heads, 1)
    head_width = _shape(state, "condition_proj.weight")[0]
    levels = _shape(state, "channel_heads.0.weight")[0]
    head = released_head(head_width, _count(state, "channel_blocks"), head_num_heads,
                         _ratio(state, r"channel_blocks\.\d+\.mlp\.fc1\.weight", head_width), list(order),
                         first_token_timestep)
    quantizer = {"levels": levels, "value_range": list(value_range), "std_range": std_range, "tails": "clamped",
                 "arithmetic": "float32"}
    return {**shapes, "quantizer": quantizer, "backbone": backbone, "head": head}


def _mar_config(state: dict[str, Tensor], num_heads: int | None, patch_size: int) -> dict:
    shapes, backbone = _backbone_config(state, "diffusion_pos_embed_learned", num_heads, patch_size)
    head = {"width": _shape(state, "diffloss.net.input_proj.weight")[0],
            "depth": _count(state, "diffloss.net.res_blocks"), "train_steps": 1000, "full_batch_noise": True,
            "vb_objective": "bits_discretized"}
    return {**shapes, "backbone": backbone, "head": head}


# ----------------------------------------------------------------------------------------------------------------
# the converters


def _check_tokenbridge_buffers(model: TokenBridgeGenerator, official: dict[str, Tensor]) -> list[str]:
    """Check the official quantizer tables and channel mask against the converted model's; returns their keys."""
    q = model.quantizer
    boundaries, values = gaussian_bins(q.levels, q.std_range, "clamped")
    steps = model.head.steps
    mask = torch.full((steps, steps), float("-inf")).triu(1)
    problems = []
    for key, expected, tol in (("reconstruction_values", values, 1e-5), ("boundaries", boundaries, 1e-5),
                               ("channel_mask", mask, 0.0)):
        if key not in official:
            problems.append(f"missing key {key!r}")
        elif tuple(official[key].shape) != tuple(expected.shape):
            problems.append(f"{key}: shape {tuple(official[key].shape)}, expected {tuple(expected.shape)}")
        elif not torch.allclose(official[key].double(), expected.double(), atol=tol, rtol=0, equal_nan=True):
            problems.append(f"{key} differs from this quantizer's (levels {q.levels}, +-{q.std_range} clamped)")
    if problems:
        raise ConversionError("; ".join(problems))
    return list(_TOKENBRIDGE_BUFFERS)


def _finish(model: nn.Module, state: dict[str, Tensor], info: dict[str, Any], fmt: str, sample: dict,
            vae: str | None, note: str | None = None) -> nn.Module:
    model.load_state_dict(state, strict=False)  # strictness was enforced by apply_rules
    source = {"format": fmt, **{k: v for k, v in info.items() if k != "from_model"},
              "buffers_from_model": info["from_model"], **({"note": note} if note else {})}
    model.provenance = {"family": model.family, "config": model.config, "sample": sample, "vae": vae,
                        "vae_fingerprint": None, "tokens": None, "step": info.get("epoch", 0),
                        "ema": info["weights"] == "model_ema", "source": source}
    return model.eval()


def convert_tokenbridge(source: str | os.PathLike | dict, weights: str = "model_ema", *,
                        num_heads: int | None = None, head_num_heads: int = HEAD_NUM_HEADS,
                        order: Sequence[int] = CHANNEL_ORDER, first_token_timestep: bool = True,
                        value_range: tuple[float, float] = (-5.0, 5.0), std_range: float = 3.0,
                        vae: str | None = None, trust_pickle: bool = False) -> TokenBridgeGenerator:
    """An official TokenBridge checkpoint (path, folder holding checkpoint-last.pth, or the loaded dict) -> a
    TokenBridgeGenerator computing the released functions. weights: "model_ema" (default) or "model".
    first_token_timestep: reproduce the released sampler's first-input quirk (the head's sample_start_cond).
    vae: the VAE spec to record (e.g. "kl16:/path/kl16.ckpt"). Sampling defaults: the released sampler's behaviour
    for every size (cfg on z, sorted positions, 256 linear-cfg steps), its cfg and temperature for L and H (other
    sizes: a note in provenance["source"]["note"]). The quantizer uses the released arithmetic ("float32")."""
    official, info = load_official_state(source, weights, trust_pickle)
    if detect_family(official) != "tokenbridge":
        raise ConversionError("this is an official MAR checkpoint: use convert_mar (--family mar)")
    config = _tokenbridge_config(official, num_heads, head_num_heads, order, first_token_timestep,
                                 value_range, std_range)
    model = TokenBridgeGenerator(TokenBridgeGenerator.resolve_config(config))
    ours = model.state_dict()
    buffers = _check_tokenbridge_buffers(model, official)
    # the released arithmetic recomputes the float32 table; whether the file's equals it bit for bit is recorded
    q = model.quantizer
    info["released_values_match"] = torch.equal(official["reconstruction_values"].float(),
                                                released_values(q.levels, q.std_range, "clamped"))
    rules = backbone_rules(ours, "output_pos_embed") + channel_head_rules(ours)
    state = apply_rules(rules, official, ours, buffers, lambda k: k.startswith("quantizer.")
                        or k in ("head.order", "head.inverse"))
    size = (config["backbone"]["width"], config["head"]["depth"])
    preset = tokenbridge_preset_of(*size)
    sample = {**TOKENBRIDGE_SAMPLING_COMMON, **(TOKENBRIDGE_SAMPLING[preset] if preset else {})}
    note = None if preset else (f"no released evaluation settings for width {size[0]} and head depth {size[1]}: cfg "
                                "and temperature are not recorded (TokenBridge-L: --cfg 3.1 --temperature 0.96, "
                                "H: --cfg 3.45 --temperature 0.91)")
    return _finish(model, state, info, "official-tokenbridge", sample, vae, note)


def convert_mar(source: str | os.PathLike | dict, weights: str = "model_ema", *, num_heads: int | None = None,
                patch_size: int = 1, vae: str | None = None, trust_pickle: bool = False) -> ContinuousMARGenerator:
    """An official MAR checkpoint -> a ContinuousMARGenerator (family "mar") computing the released functions:
    backbone z, and the diffusion MLP's (eps, variance) outputs. Sampling defaults: the released settings for every
    size (temperature 1.0, 256 MAR steps, 100 diffusion steps, the released last cfg step, sorted positions) and the
    cfg of MAR-B/L/H (2.9 / 3.0 / 3.2; other sizes: a note in provenance["source"]["note"]). The head records the
    released training loss (vb_objective "bits_discretized")."""
    official, info = load_official_state(source, weights, trust_pickle)
    if detect_family(official) != "mar":
        raise ConversionError("this is an official TokenBridge checkpoint: use convert_tokenbridge (--family "
                              "tokenbridge)")
    config = _mar_config(official, num_heads, patch_size)
    model = ContinuousMARGenerator(ContinuousMARGenerator.resolve_config(config))
    ours = model.state_dict()
    rules = backbone_rules(ours, "diffusion_pos_embed_learned") + diffusion_head_rules(ours)
    state = apply_rules(rules, official, ours)
    size = (config["backbone"]["width"], config["head"]["depth"])
    sample = {**MAR_SAMPLING_COMMON, **MAR_SAMPLING.get(size, {})}
    note = None if size in MAR_SAMPLING else (f"no released evaluation settings for width {size[0]} and diffusion "
                                              f"depth {size[1]}: cfg is not recorded (MAR-B / L / H: --cfg 2.9 / "
                                              "3.0 / 3.2)")
    return _finish(model, state, info, "official-mar", sample, vae, note)


def convert(source: str | os.PathLike | dict, family: str | None = None, weights: str = "model_ema",
            **options: Any) -> nn.Module:
    """Either converter, chosen by ``family`` ("tokenbridge" / "mar") or, when None, by the checkpoint's keys."""
    path = None
    if not isinstance(source, dict):  # read the file once
        path = Path(source) / "checkpoint-last.pth" if Path(source).is_dir() else Path(source)
        source = read_checkpoint(path, options.pop("trust_pickle", False))
    if family is None:
        family = detect_family(load_official_state(source, weights)[0])
    if family not in ("tokenbridge", "mar"):
        raise ValueError(f"family must be 'tokenbridge' or 'mar', got {family!r}")
    converter = convert_tokenbridge if family == "tokenbridge" else convert_mar
    model = converter(source, weights, **options)
    if path is not None:
        model.provenance["source"]["path"] = str(path)
    return model
