"""Typed run configuration: YAML plus dotted overrides, validated by pydantic before any work starts.

A run config has five sections (see configs/fmnist.yaml)::

    out_dir: runs/fmnist
    seed: 0
    family: tokenbridge            # a generator family registered in tokenbridge.generators
    data:   {...}                  # DataConfig
    model:  {preset: fmnist, ...}  # the family's own config class; `preset` names a starting point
    train:  {...}                  # TrainConfig
    sample: {...}                  # keyword arguments of the family's sample(); the generator's sampling defaults

Every default lives once: in the fields below, or, for model and sample settings, in the constructor / `sample`
signature they are derived from (`signature_model`). Unknown keys, wrong types and impossible values raise one
`ConfigError` naming the key, the value and what was expected.
"""

from __future__ import annotations

import copy
import inspect
import os
import re
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveInt, ValidationError, create_model
from pydantic import field_validator, model_validator

# ----------------------------------------------------------------------------------------------------------------
# Errors


class ConfigError(ValueError):
    """A configuration value that is unknown, of the wrong type or impossible; the message names the key."""


def _known_keys(cls: type[BaseModel], loc: tuple) -> list[str]:
    """The keys a section accepts at ``loc`` (the path of an unknown key's parent), walking nested sections."""
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        cls = annotation
    return sorted(cls.model_fields)


def _describe(cls: type[BaseModel], error: dict, prefix: str) -> str:
    key = ".".join(str(p) for p in (prefix, *error["loc"]) if p != "")
    if error["type"] == "extra_forbidden":
        known = _known_keys(cls, error["loc"][:-1])
        return f"unknown config key '{key}'" + (f" (known here: {', '.join(known)})" if known else "")
    value = error.get("input")
    shown = "" if isinstance(value, (dict, BaseModel)) else f" = {value!r}"
    return f"config key '{key}'{shown}: {error['msg']}"


def validate(cls: type[BaseModel], value: Any, prefix: str = "") -> BaseModel:
    """``cls.model_validate(value)`` with errors re-raised as one ConfigError naming each bad key."""
    try:
        return cls.model_validate(value)
    except ValidationError as e:
        raise ConfigError("; ".join(_describe(cls, err, prefix) for err in e.errors())) from None


class Section(BaseModel):
    """A config section: unknown keys and non-finite floats are errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, protected_namespaces=())


# ----------------------------------------------------------------------------------------------------------------
# Config classes derived from signatures (constructors and sample() hold their defaults once)


def _parameters(fn: Callable | type) -> list[tuple[inspect.Parameter, Any]]:
    """(parameter, type hint) of a function, or of a class's __init__; a class whose __init__ passes **kwargs on
    to its base class also gets the base's keyword-only parameters."""
    init = fn.__init__ if isinstance(fn, type) else fn
    hints = typing.get_type_hints(init, include_extras=True)  # keeps declared ranges (Annotated)
    params = [(p, hints.get(p.name, Any)) for p in inspect.signature(init).parameters.values()]
    if isinstance(fn, type) and any(p.kind is p.VAR_KEYWORD for p, _ in params):
        base = next(b for b in fn.__mro__[1:] if "__init__" in b.__dict__)
        params += [(p, h) for p, h in _parameters(base) if p.kind is p.KEYWORD_ONLY]
    return [(p, h) for p, h in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def signature_model(fn: Callable | type, name: str, exclude: Sequence[str] = (),
                    types: dict[str, Any] | None = None) -> type[Section]:
    """A Section whose fields are the parameters of ``fn`` (a function, or a class: its constructor), with types
    from the annotations and defaults from the signature. ``exclude`` drops parameters the caller fills in (sizes
    derived from the data); ``types`` replaces annotations pydantic cannot validate (tensors)."""
    fields: dict[str, Any] = {}
    for p, hint in _parameters(fn):
        if p.name in ("self", "cls") or p.name in exclude:
            continue
        annotation = (types or {}).get(p.name, hint)
        fields[p.name] = (annotation, ... if p.default is inspect.Parameter.empty else p.default)
    return create_model(name, __base__=Section, **fields)


# ----------------------------------------------------------------------------------------------------------------
# The generic sections


class DataConfig(Section):
    """Where the training tokens come from, and how `cache-latents` makes them."""

    source: Literal["tokens", "images"] = "tokens"  # tokens: a cache-latents file; images: encode each batch
    tokens: str | None = None  # the cache-latents file (written by `cache-latents --config`, read by `train`)
    dataset: str = "fmnist"  # fmnist | folder:PATH | wds:PATTERN (webdataset tars) | hf:PATH (local HF datasets)
    split: str = "train"
    limit: PositiveInt | None = None  # first N images only
    vae: str = "fmnist"  # fmnist | kl16:PATH | diffusers:FOLDER | a .safetensors
    resolution: PositiveInt = 32  # images of a folder dataset are resized/cropped to this
    channels: Literal[1, 3] = 3  # images of a folder dataset (the VAE's input channels)
    strict_images: bool = False  # an unreadable image in a folder is an error (default: skipped and counted)
    allow_large_images: bool = False  # open images beyond PIL's decompression-bomb limit
    sample_posterior: bool = False  # encode with a posterior sample instead of its mean
    store_latents: bool = True  # the token file also keeps the continuous latents (data-derived channel order)
    latents_dtype: Literal["float16", "float32"] = "float32"  # of stored latents (float16: half the disk)
    shard_size: PositiveInt | None = None  # cache-latents writes a folder of shards of this many images (torchrun)
    flip: bool = False  # shards also keep the tokens of horizontally flipped images (MAR's augmentation)
    encode_batch: PositiveInt = 256  # images per VAE call while caching


class TrainConfig(Section):
    """Optimisation. The learning rate is ``lr`` when given, else ``blr * global_batch / 256`` (MAR's rule; the
    paper's 8e-4 at batch 2048 is blr 1e-4); linear warmup, then a cosine to ``min_lr``."""

    steps: PositiveInt | None = None  # total optimizer steps; or give epochs instead
    epochs: float | None = Field(default=None, gt=0)
    global_batch: PositiveInt = 128  # summed over all processes
    lr: float | None = Field(default=None, gt=0)
    blr: float = Field(default=1e-4, gt=0)
    min_lr: NonNegativeFloat = 0.0
    warmup_steps: int | None = Field(default=None, ge=0)
    warmup_epochs: float | None = Field(default=None, ge=0)
    weight_decay: NonNegativeFloat = 0.02
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(default=1e-8, gt=0)
    ema: float = Field(default=0.9999, ge=0, lt=1)  # EMA decay per step
    ema_warmup: bool = True  # decay_t = min(ema, (1 + t) / (10 + t)): the average forgets the random init
    grad_clip: NonNegativeFloat = 3.0  # max global grad norm (official code 3.0, paper 1.0); 0 = no clipping
    bf16: bool = True  # autocast to bfloat16, CUDA only
    compile: bool = False  # torch.compile the training module (eager, with a warning, when it cannot compile)
    # AdamW's fused update instead of the multi-tensor (foreach) one: equal to rounding, 6x faster on the CPU
    # (benchmarks/train_speed.py); a resumed run keeps the update its checkpoint was written with
    fused_adamw: bool = True
    ckpt_every: int = Field(default=1000, ge=0)  # 0: only at the end
    log_every: PositiveInt = 50
    num_workers: int = Field(default=0, ge=0)
    device: str = "auto"  # auto -> cuda:LOCAL_RANK if available, else cpu
    find_unused_parameters: bool = False

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        import torch  # only here: reading a config needs no torch otherwise

        if device != "auto":
            try:
                torch.device(device)
            except (RuntimeError, TypeError):
                raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
        return device

    @model_validator(mode="after")
    def _one_length(self) -> TrainConfig:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of train.steps and train.epochs")
        if self.warmup_steps is not None and self.warmup_epochs is not None:
            raise ValueError("give at most one of train.warmup_steps and train.warmup_epochs")
        return self


class RunConfig(Section):
    """A whole training run. ``model`` and ``sample`` are checked by the family (tokenbridge.generators)."""

    out_dir: str
    seed: int = Field(default=0, ge=0)
    family: str = "tokenbridge"
    data: DataConfig = DataConfig()
    model: dict[str, Any] = {}
    train: TrainConfig
    sample: dict[str, Any] = {}


# ----------------------------------------------------------------------------------------------------------------
# YAML and dotted overrides


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.1 needs ``1.0e-4``; easy to get wrong in configs)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """A YAML scalar or flow collection: ``3`` -> 3, ``1e-4`` -> 0.0001, ``[1, 2]`` -> [1, 2], ``abc`` -> 'abc'."""
    return yaml.load(text, Loader=_YamlLoader) if text.strip() else None


def apply_overrides(config: dict, overrides: Sequence[str]) -> dict:
    """A copy of ``config`` with ``key.sub=value`` overrides applied (values parsed by `parse_value`)."""
    config = copy.deepcopy(config)
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        node = config
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{'.'.join(parts[:i + 1])}' is a value, not a section")
            node = child
        try:
            node[parts[-1]] = parse_value(raw)
        except yaml.YAMLError as e:  # a tag (!!python/object, ...) or broken syntax: the parser names it
            raise ConfigError(f"override {item!r}: its value is not a plain YAML value: "
                              f"{' '.join(str(e).split())}") from None
    return config


def read_yaml(path: str | os.PathLike) -> dict:
    """A YAML mapping from a file (``{}`` for an empty file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        with open(path) as f:
            config = yaml.load(f, Loader=_YamlLoader) or {}
    except yaml.YAMLError as e:  # the parser's message names the line and column
        raise ConfigError(f"config {path} is not valid YAML: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"config {path} must be a YAML mapping, got {type(config).__name__}")
    return config


def merge(base: dict, update: dict) -> dict:
    """Deep merge: mappings merge key by key, anything else in ``update`` replaces the value in ``base``."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
