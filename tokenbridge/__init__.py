"""TokenBridge: discrete tokens from a pretrained continuous VAE (arXiv 2503.16430), and generators that sample them.

    import tokenbridge
    result = tokenbridge.generate("fmnist", labels=[0, 1, 2])       # images [3, 1, 32, 32] in [-1, 1]
    vae = tokenbridge.load_vae("fmnist")
    latents = vae.encode(result["images"])                           # [3, C, 8, 8], channel-first
    quantizer = tokenbridge.DimensionwiseQuantizer(levels=64)
    indices = quantizer.quantize(tokenbridge.channel_last(latents))  # [3, 8, 8, C], channel-last

Layout of the public API: images and latents that go into or come out of a network are channel-first
(images [N, C, H, W] in [-1, 1]; latents [N, C, h, w], as `vae.encode` and ``sample()["latents"]`` give them);
the quantizer works on the last axis (latents and indices [..., C], e.g. ``sample()["indices"]`` [N, h, w, C]);
`channel_last` / `channel_first` convert between the two. A tensor whose channel count does not fit the model or
quantizer raises a ValueError that names both shapes.

The names below are imported on first use, so that ``import tokenbridge`` (and ``tokenbridge --help``) does not
load torch.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from .cli_options import VERSION as __version__

# name -> the module that defines it (imported by __getattr__ on first use)
_EXPORTS = {
    "generate": "generate", "load_generator": "checkpoint", "save_samples": "generate",
    "load_vae": "vae", "DimensionwiseQuantizer": "quantizer", "frequency_channel_order": "ordering",
    "channel_last": "layout", "channel_first": "layout",
    "TokenBridgeGenerator": "generators", "ContinuousMARGenerator": "generators", "D2CGenerator": "generators",
    "CausalTokenBridgeGenerator": "generators", "FAMILIES": "generators",
    "evaluate_samples": "evaluate", "class_names": "edit",
}
# `generate` is also the name of the module that defines it; the import system sets a package attribute to each
# submodule it loads, which would hide the function once anything imports tokenbridge.generate
_FUNCTIONS_OVER_MODULES = {"generate"}


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FUNCTIONS_OVER_MODULES and isinstance(value, types.ModuleType):
            return  # the module stays in sys.modules ("from tokenbridge.generate import save_samples" works)
        super().__setattr__(name, value)

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tokenbridge' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


sys.modules[__name__].__class__ = _Package
