"""The registry of generator families: the trainer (tokenbridge.train), the sampler (tokenbridge.generate) and the
CLI look a family up by the name every checkpoint records. The contract a family fulfils is `base.Generator`'s."""

from __future__ import annotations

from typing import Any

from ..config import ConfigError, validate
from .base import Generator, sample_options

FAMILIES: dict[str, type[Generator]] = {}


def register_family(cls: type[Generator]) -> type[Generator]:
    """Class decorator: make ``cls`` (a `Generator` subclass) trainable, saveable and sampleable as ``cls.family``."""
    if not (isinstance(cls, type) and issubclass(cls, Generator)):
        raise TypeError(f"generator family {getattr(cls, '__name__', cls)} must subclass "
                        "tokenbridge.generators.base.Generator")
    for attr in ("family", "presets"):
        if not hasattr(cls, attr):
            raise TypeError(f"generator family {cls.__name__} lacks '{attr}' (see tokenbridge.generators.base)")
    for attr in ("loss", "sample"):
        if getattr(cls, attr, None) is None:
            raise TypeError(f"generator family {cls.__name__} lacks '{attr}' (see tokenbridge.generators.base)")
    FAMILIES[cls.family] = cls
    return cls


def get_family(name: str) -> type[Generator]:
    """The registered family class called ``name``."""
    if name not in FAMILIES:
        raise ConfigError(f"config key 'family' = {name!r}: unknown generator family; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


def check_sample_options(cls: type[Generator], options: dict[str, Any], prefix: str = "sample") -> dict[str, Any]:
    """Validate sampling options for ``cls``; returns only the keys that were given (validated values)."""
    checked = validate(sample_options(cls), options or {}, prefix)
    return {k: v for k, v in checked.model_dump(mode="python").items() if k in (options or {})}
