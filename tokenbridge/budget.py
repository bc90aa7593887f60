"""Sizes checked before the work: a generator's parameters and buffers (counted on the meta device from its
config, before anything is allocated), requests of known size (images x resolution, labels x per-class) against
the free memory and a rough time estimate, and one-line messages for running out of memory anyway.

Limits a user can raise: ``TOKENBRIDGE_MAX_MODEL_GB`` (default: the smaller of 8 GiB and the free memory) and
``TOKENBRIDGE_MAX_REQUEST_HOURS`` (default 12: a request that would surely take longer is refused).
"""
from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .quantizer import DimensionwiseQuantizer

DEFAULT_MAX_MODEL_GB = 8.0
DEFAULT_MAX_REQUEST_HOURS = 12.0
# an encoder's live feature maps per input value, roughly (128 channels at full resolution, a few at once, against
# 1-3 image channels): what encoding a batch needs beyond the batch itself
ACTIVATION_FACTOR = 100
PROBE_ABOVE = 256  # larger requests are timed on one image first (for smaller ones the probe would cost too much)
_GIB = 2**30


def _gib(n: float) -> str:
    return f"{n / _GIB:.2f} GiB"


def duration(seconds: float) -> str:
    """``seconds`` in the unit a person reads best: 40 s, 12 min, 3.5 h."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:,.1f} h"


def available_memory() -> int:
    """Bytes of memory free for new allocations (Linux MemAvailable, else the physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _env_float(name: str, default: float) -> float:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a number") from None
    if not value > 0:
        raise ValueError(f"{name}={text!r} must be > 0")
    return value


def model_limit() -> int:
    """Bytes a generator built from a file may take: TOKENBRIDGE_MAX_MODEL_GB, else min(8 GiB, free memory)."""
    if "TOKENBRIDGE_MAX_MODEL_GB" in os.environ:
        return int(_env_float("TOKENBRIDGE_MAX_MODEL_GB", DEFAULT_MAX_MODEL_GB) * _GIB)
    return min(int(DEFAULT_MAX_MODEL_GB * _GIB), available_memory())


@contextmanager
def _on_meta() -> Iterator[None]:
    """Build modules on the meta device (shapes and dtypes, no storage). The quantizer computes and checks its
    tables in its constructor (they need values), so it alone is built on the CPU: its tables are small."""
    original = DimensionwiseQuantizer.__init__

    def on_cpu(self: Any, *args: Any, **kwargs: Any) -> None:
        with torch.device("cpu"):
            original(self, *args, **kwargs)

    DimensionwiseQuantizer.__init__ = on_cpu
    try:
        with torch.device("meta"):
            yield
    finally:
        DimensionwiseQuantizer.__init__ = original


def meta_model(cls: type[nn.Module], config: dict[str, Any]) -> nn.Module:
    """``cls.from_config(config)`` with no storage for its parameters: what it would allocate, for free."""
    with _on_meta():
        return cls.from_config(config)


def state_bytes(model: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (meta tensors count as if allocated)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def check_model_budget(nbytes: int, where: Any, what: str = "generator") -> None:
    """Refuse (ValueError) a model of ``nbytes`` over `model_limit`, naming ``where`` it was described and the
    limit's variable."""
    limit = model_limit()
    if nbytes > limit:
        raise ValueError(f"{where} describes a {what} of {_gib(nbytes)} (parameters and buffers), over the limit "
                         f"of {_gib(limit)}; set TOKENBRIDGE_MAX_MODEL_GB to allow it if this machine can hold it")


def check_memory(nbytes: float, request: str, hint: str) -> None:
    """Refuse (ValueError) a request that needs ``nbytes`` when less memory is free; ``hint`` says what to lower."""
    free = available_memory()
    if nbytes > free:
        raise ValueError(f"{request} needs about {_gib(nbytes)} of memory, {_gib(free)} are free; {hint}")


def check_time(seconds: float, request: str, hint: str) -> None:
    """Refuse (ValueError) a request that would take at least ``seconds``, over TOKENBRIDGE_MAX_REQUEST_HOURS."""
    hours = _env_float("TOKENBRIDGE_MAX_REQUEST_HOURS", DEFAULT_MAX_REQUEST_HOURS)
    if seconds > hours * 3600:
        raise ValueError(f"{request} would take about {duration(seconds)} here, over the limit of {hours:g} h "
                         f"(TOKENBRIDGE_MAX_REQUEST_HOURS); {hint}")


def check_images_request(count: int, channels: int, resolution: int, request: str, hint: str) -> None:
    """``count`` float32 images [channels, resolution, resolution] (and one copy) must fit in the free memory."""
    check_memory(2.0 * count * channels * resolution * resolution * 4, request, hint)


def check_encode_request(batch: int, shape: tuple[int, ...], request: str, hint: str) -> None:
    """Encoding ``batch`` images of ``shape`` [C, H, W] (float32) with a VAE must fit in the free memory."""
    check_memory(float(batch) * math.prod(shape) * 4 * ACTIVATION_FACTOR, request, hint)


def check_sample_request(model: nn.Module, count: int, batch_size: int, probe: Any) -> float | None:
    """Check that sampling ``count`` images fits in memory and time before the work. ``probe()`` samples one image
    and returns the result dict; its time and output size, scaled to ``count``, are the estimate (rough: the time
    assumes a batch of ``batch_size`` costs what one image costs, its warm-up included). Returns the estimated
    seconds, None when the request is too small to be worth probing."""
    if count <= PROBE_ABOVE:
        return None
    start = time.perf_counter()
    one = probe()
    seconds = time.perf_counter() - start
    per_image = sum(v.numel() * v.element_size() for v in one.values() if torch.is_tensor(v))
    request, hint = f"sampling {count:,} images", "ask for fewer (--per-class, --labels)"
    # the results, the uint8 copy and the PNG grid (3x upscaled, so 9x the pixels) are held at once
    check_memory(count * (per_image * 2 + 10 * per_image / 4), request, hint)
    estimate = seconds * math.ceil(count / batch_size)
    check_time(estimate, request, hint)
    return estimate


_OOM = re.compile(r"(can't allocate memory|out of memory|CUDA out of memory|tried to allocate)", re.IGNORECASE)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an error (MemoryError, torch.OutOfMemoryError, a RuntimeError of the CPU allocator) means memory
    ran out."""
    return isinstance(error, MemoryError) or bool(_OOM.search(str(error)))


def out_of_memory(error: BaseException, args: Any = None) -> str:
    """One line for running out of memory: what the allocator was asked for, the free memory, what to lower."""
    text = str(error)
    asked = re.search(r"allocate ([0-9]+) bytes", text) or re.search(r"allocate ([0-9.]+ ?[KMGT]?i?B)", text)
    size = asked and (_gib(int(asked.group(1))) if asked.group(1).isdigit() else asked.group(1))
    need = f" (one allocation of {size})" if asked else ""
    command = getattr(args, "command", None)
    return (f"out of memory{' in ' + command if command else ''}{need}; {_gib(available_memory())} free now: ask "
            "for less (fewer images or labels, a smaller --batch-size or resolution) or use a larger machine")
