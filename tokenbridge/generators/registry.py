"""The seam between generator families and the machinery that trains, saves and samples them.

A family is an ``nn.Module`` class registered with `register_family` that offers:

- ``family``: its name (recorded in every checkpoint; `tokenbridge sample` dispatches on it);
- ``presets``: named model configs (``model: {preset: fmnist}`` starts from one; the keys given beside it win);
- ``resolve_config(config, data=None) -> dict``: validate a model config (a ConfigError names a bad key), fill
  what the training data decides (grid, channels, classes, the quantizer that made the tokens) and return the
  JSON-safe config that rebuilds the generator without the data;
- ``from_config(config, data=None)`` and the attribute ``config`` (the resolved config);
- optionally ``check_config(config)``: raise ConfigError for values only the constructors can judge;
- ``loss(batch) -> scalar``: one training step's loss for a batch of the training dataset;
- it gets ``save_pretrained(dir)`` / ``from_pretrained(dir)`` (generators/pretrained.py) unless it has its own;
- ``sample(labels, ...) -> dict`` with ``latents [N, C, h, w]`` (for the VAE to decode); its keyword parameters,
  with their defaults, are the family's sampling options (`sample_options`).

The trainer (tokenbridge.train) and the sampler (tokenbridge.generate) use nothing else.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import ConfigError, Section, merge, signature_model, validate
from .pretrained import PretrainedMethods

FAMILIES: dict[str, type[nn.Module]] = {}
# sample() parameters that are not sampling options: the class labels, the random source, the progress bar, a
# per-step callback (live views), given generation orders (a tensor per run, for replays) and the kept region of
# an edit (tensors)
_NOT_OPTIONS = ("labels", "generator", "progress", "callback", "orders", "known", "known_mask")


def register_family(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: make ``cls`` trainable, saveable and sampleable under the name ``cls.family``."""
    for attr in ("family", "presets", "resolve_config", "from_config", "loss", "sample"):
        if not hasattr(cls, attr):
            raise TypeError(f"generator family {cls.__name__} lacks '{attr}' (see tokenbridge.generators.registry)")
    for name in ("save_pretrained", "from_pretrained"):  # pretrained folders (generators/pretrained.py)
        if not hasattr(cls, name):
            setattr(cls, name, PretrainedMethods.__dict__[name])
    FAMILIES[cls.family] = cls
    return cls


def get_family(name: str) -> type[nn.Module]:
    """The registered family class called ``name``."""
    if name not in FAMILIES:
        raise ConfigError(f"config key 'family' = {name!r}: unknown generator family; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


def apply_preset(cls: type[nn.Module], config: dict[str, Any]) -> dict[str, Any]:
    """``{preset: name, **keys}`` -> the preset's config with ``keys`` merged over it (no preset: unchanged)."""
    config = dict(config or {})
    name = config.pop("preset", None)
    if name is None:
        return config
    if name not in cls.presets:
        raise ConfigError(f"config key 'model.preset' = {name!r}: unknown {cls.family} preset; "
                          f"known: {sorted(cls.presets)}")
    return merge(cls.presets[name], config)


def sample_options(cls: type[nn.Module]) -> type[Section]:
    """The config class of ``cls.sample``'s keyword options (their defaults are the signature's)."""
    return signature_model(cls.sample, f"{cls.__name__}SampleOptions", exclude=_NOT_OPTIONS)


def check_sample_options(cls: type[nn.Module], options: dict[str, Any], prefix: str = "sample") -> dict[str, Any]:
    """Validate sampling options for ``cls``; returns only the keys that were given (validated values)."""
    checked = validate(sample_options(cls), options or {}, prefix)
    return {k: v for k, v in checked.model_dump(mode="python").items() if k in (options or {})}
