"""`Generator`: the base class of every generator family, the one place the family contract is written.

A family subclasses `Generator`, registers with `register_family` and gives:

- ``family`` (its name, recorded in every checkpoint) and ``presets`` (named model configs);
- ``loss(batch) -> scalar`` on a batch ``(items [B, H, W, C], labels [B])`` of its training dataset;
- ``sample(labels, ...) -> dict`` with ``latents [N, C, H, W]``; its keyword parameters, annotated with the
  toolbox's declared types (tokenbridge.samplers: `Temperature`, `TopP`, ...) and their defaults, are the family's
  sampling options. The base class checks the labels and validates the options against that signature once per
  call, at this public entry, before any work; nothing below (heads, diffusion head, GPT) checks them again.

What the base class supplies (override where a family needs more):

- ``items``: what the trainer feeds ``loss``: ``"indices"`` (the token file's quantizer indices, integers) or
  ``"latents"`` (its continuous latents, floats), both [B, H, W, C] channel-last (tokenbridge.train reads it);
- ``Config`` (a `config.Section`; default: the shapes alone), ``resolve_config(config, data=None)`` (preset merged,
  validated, shapes filled from a token dataset) and ``from_config(config, data=None)``;
- ``check_config(config)``: build a resolved config on the meta device (no memory, no time), so that a value only
  the constructors can judge is a ConfigError before any data is read; ``meta_parts`` says what must be built
  for real first (a quantizer's tables, a D2C source);
- ``check_batch(batch)`` (shapes and dtypes of a training batch) and ``check_labels(labels)`` (sampling);
- ``save_pretrained(dir)`` / ``from_pretrained(dir)`` (generators/pretrained.py).

The smallest family is a subclass with ``family``, ``presets``, a constructor that builds its layers (after
``super().__init__(config)``), ``loss`` and ``sample``: tests/generators/test_family_contract.py registers one.
"""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import PositiveInt
from torch import nn

from ..config import ConfigError, Section, merge, signature_model, validate
from . import pretrained

SHAPE_KEYS = ("grid_size", "channels", "num_classes")
# sample() parameters that are not sampling options: the class labels, the random source, the progress bar, a
# per-step callback (live views), given generation orders (a tensor per run, for replays), the kept region of an
# edit (tensors) and a fusion context (D2C's stage 2: tensors from the codes)
NOT_OPTIONS = ("labels", "generator", "progress", "callback", "orders", "known", "known_mask", "context")


class ShapesConfig(Section):
    """The shapes every family's model config starts with; None: taken from the token file at training start."""

    grid_size: tuple[PositiveInt, PositiveInt] | None = None  # latent grid (H, W)
    channels: PositiveInt | None = None  # latent channels C
    num_classes: PositiveInt | None = None  # label num_classes = unconditional


def require_shapes(cfg: dict[str, Any]) -> None:
    """A model config must know its grid, channels and classes (given, or filled from data by `fill_shapes`)."""
    if any(cfg[key] is None for key in SHAPE_KEYS):
        raise ConfigError("model.grid_size, model.channels and model.num_classes are needed to build a "
                          "generator without training data")


def fill_shapes(cfg: dict[str, Any], data: Any) -> None:
    """Set a model config's grid_size, channels and num_classes from a token dataset (``grid_shape`` (h, w, C),
    ``num_classes``, ``path``); a value the config already gives (a preset's included) must agree with the data."""
    h, w, c = data.grid_shape
    for key, value in {"grid_size": [h, w], "channels": c, "num_classes": data.num_classes}.items():
        if cfg[key] is not None and cfg[key] != value:
            raise ConfigError(f"config key 'model.{key}' = {cfg[key]} but the token file {data.path} has {value}")
        cfg[key] = value


def apply_preset(cls: type[Generator], config: dict[str, Any] | None) -> dict[str, Any]:
    """``{preset: name, **keys}`` -> the preset's config with ``keys`` merged over it (no preset: unchanged)."""
    config = dict(config or {})
    name = config.pop("preset", None)
    if name is None:
        return config
    if name not in cls.presets:
        raise ConfigError(f"config key 'model.preset' = {name!r}: unknown {cls.family} preset; "
                          f"known: {sorted(cls.presets)}")
    return merge(cls.presets[name], config)


@functools.cache
def sample_options(cls: type[nn.Module]) -> type[Section]:
    """The config class of ``cls.sample``'s keyword options (types and defaults: the signature's)."""
    return signature_model(cls.sample, f"{cls.__name__}SampleOptions", exclude=NOT_OPTIONS)


def _validated_sample(sample: Any) -> Any:
    """``sample`` with its labels (`Generator.check_labels`) and its options (against its own signature: a
    ConfigError naming the option) checked first."""
    signature = inspect.signature(sample)

    @functools.wraps(sample)
    def checked(self: Generator, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        bound = signature.bind(self, *args, **kwargs)
        self.check_labels(bound.arguments["labels"])
        options = {k: v for k, v in bound.arguments.items() if k not in NOT_OPTIONS and k != "self"}
        valid = validate(sample_options(type(self)), options, "sample")
        bound.arguments.update({k: getattr(valid, k) for k in options})
        return sample(*bound.args, **bound.kwargs)

    return checked


class Generator(nn.Module):
    """The base of every generator family (see the module docstring). Label ``num_classes`` = unconditional."""

    family: ClassVar[str]
    presets: ClassVar[dict[str, dict]]
    items: ClassVar[Literal["indices", "latents"]] = "indices"
    Config: ClassVar[type[Section]] = ShapesConfig

    config: dict[str, Any]
    grid_size: tuple[int, int]
    channels: int
    num_classes: int

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "sample" in cls.__dict__:
            cls.sample = _validated_sample(cls.__dict__["sample"])

    def __init__(self, config: dict[str, Any]) -> None:
        """config: a model config (resolved or not); the shapes must be known (`check_buildable`)."""
        super().__init__()
        cfg = self.resolve_config(config)
        self.check_buildable(cfg)
        self.config = cfg
        self.grid_size = (int(cfg["grid_size"][0]), int(cfg["grid_size"][1]))
        self.channels, self.num_classes = int(cfg["channels"]), int(cfg["num_classes"])

    # ------------------------------------------------------------------ config
    @classmethod
    def resolve_config(cls, config: dict[str, Any], data: Any = None) -> dict[str, Any]:
        """Validate a model config (a preset merged under its keys) and return the JSON-safe config that rebuilds
        the generator without data; with ``data`` (a token dataset) fill grid, channels and classes from it."""
        cfg = validate(cls.Config, apply_preset(cls, config), "model").model_dump(mode="json")
        if data is not None:
            fill_shapes(cfg, data)
        return cfg

    @classmethod
    def check_buildable(cls, cfg: dict[str, Any]) -> None:
        """Raise ConfigError unless a resolved config builds without data (default: the shapes are given)."""
        require_shapes(cfg)

    @classmethod
    def meta_parts(cls, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(config, constructor keywords) for `check_config`'s trial build: what must exist for real first."""
        return config, {}

    @classmethod
    def check_config(cls, config: dict[str, Any]) -> None:
        """Build a resolved config on the meta device (no memory, no time), so that a value the constructors
        reject (levels=1, width=-1) is a ConfigError before any data is read. Without shapes: nothing to build."""
        if any(config[k] is None for k in SHAPE_KEYS):
            return
        try:
            trial, parts = cls.meta_parts(config)
            with torch.device("meta"):
                cls(trial, **parts)
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model config: {e}") from None

    @classmethod
    def from_config(cls, config: dict[str, Any], data: Any = None) -> Generator:
        """Build from a model config; with ``data`` (a token dataset) its shapes are used."""
        return cls(cls.resolve_config(config, data))

    # ------------------------------------------------------------------ checks (public entry points only)
    def check_batch(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch (items [B, H, W, C], labels [B]) -> (items, labels long on the items' device). Shapes
        and dtypes only: value ranges are checked where tokens enter (token file, quantizer), so a training step
        costs no device -> host synchronisation."""
        items, labels = batch
        (h, w), c, name = self.grid_size, self.channels, self.items
        kind = "an integer" if name == "indices" else "a float"
        if not isinstance(items, torch.Tensor) or items.dim() != 4 or tuple(items.shape[1:]) != (h, w, c):
            raise ValueError(f"{name} must be [B, {h}, {w}, {c}] ({kind} tensor, channel-last), got shape "
                             f"{tuple(getattr(items, 'shape', ()))}: a latent grid or channel count this generator "
                             "was not built for")
        floating = items.is_floating_point()
        if (name == "latents") != floating or items.dtype == torch.bool or items.is_complex():
            raise ValueError(f"{name} must be {kind} tensor, got {items.dtype}")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != items.shape[0] \
                or labels.is_floating_point():
            raise ValueError(f"labels must be integers [{items.shape[0]}], got "
                             f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
        return items, labels.to(items.device).long()

    def check_labels(self, labels: torch.Tensor) -> None:
        """Sampling labels: a non-empty 1-D integer tensor in [0, num_classes] (num_classes = unconditional)."""
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
            raise ValueError(f"labels must be a 1-D integer tensor, got {getattr(labels, 'shape', type(labels))}")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
        if labels.numel() == 0:
            raise ValueError("labels is empty: pass at least one class index to sample")
        if int(labels.min()) < 0 or int(labels.max()) > self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes}] ({self.num_classes} = unconditional), "
                             f"got range [{int(labels.min())}, {int(labels.max())}]")

    # ------------------------------------------------------------------ pretrained folders
    def save_pretrained(self, directory: str | os.PathLike, **record: Any) -> Path:
        """Write this generator as a pretrained folder (config.json + model.safetensors; generators/pretrained.py)."""
        return pretrained.save_pretrained(self, directory, **record)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> Generator:
        """Load a pretrained folder of this family (offline, a local path), in eval mode."""
        return pretrained.from_pretrained(cls, directory, device)


def make_generator(generator: torch.Generator | int | None, device: torch.device) -> torch.Generator | None:
    """None (the global RNG), a torch.Generator (used as is) or an int seed (a new generator on ``device``)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise ValueError(f"generator must be None, an int seed or a torch.Generator, got {type(generator).__name__}")
    return torch.Generator(device=device).manual_seed(generator)
