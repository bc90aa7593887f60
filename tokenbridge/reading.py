"""The checks every file a user hands in passes before it is used: generator weights (size budget from the config
on the meta device, names, shapes, dtypes and finite values), paths named inside a file (kept inside its folder),
and token indices entering training (inside [0, levels), labels inside [0, num_classes))."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .budget import check_model_budget, meta_model, state_bytes


def check_state(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], where: Any,
                what: str = "weights", shaped: set[str] | None = None) -> None:
    """Refuse (ValueError naming the tensor) a state dict whose names differ from ``expected`` (a module's state
    dict, meta tensors welcome), whose shapes differ for the names in ``shaped`` (default: all; buffers a module
    resizes when it loads, such as a calibrated quantizer's, are left out), that holds integer values where
    floating-point ones belong, or NaN / inf."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where}: {what} do not fit the recorded config: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    for name, want in expected.items():
        got = state[name]
        if (shaped is None or name in shaped) and tuple(got.shape) != tuple(want.shape):
            raise ValueError(f"{where}: {what} do not fit the recorded config: tensor {name!r} has shape "
                             f"{list(got.shape)}, the config makes {list(want.shape)}")
        if want.is_floating_point() and not got.is_floating_point():
            raise ValueError(f"{where}: tensor {name!r} holds {got.dtype} values where {want.dtype} {what} belong")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            bad = int((~torch.isfinite(got)).sum())
            raise ValueError(f"{where}: tensor {name!r} holds {bad} NaN or infinite value(s) of {got.numel()}")


def check_generator_file(cls: type[nn.Module], config: dict[str, Any], state: dict[str, torch.Tensor],
                         where: Any) -> None:
    """Everything about a generator file checked before the generator is allocated: its config builds (on the
    meta device) a model within the size budget, and ``state`` fits that model with finite floating-point values."""
    try:
        model = meta_model(cls, config)
    except (TypeError, KeyError) as e:
        raise ValueError(f"{where}: the recorded config does not build a {cls.__name__}: {e}") from None
    check_model_budget(state_bytes(model), where)
    check_state(model.state_dict(), state, where, shaped={name for name, _ in model.named_parameters()})


def inside(folder: str | os.PathLike, name: Any, where: Any, what: str = "file") -> Path:
    """``folder / name`` for a relative ``name`` that stays inside ``folder`` (no absolute path, no ``..`` out of
    it, no link out of it); anything else is a ValueError naming ``where`` it was written."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or "\\" in name:
        raise ValueError(f"{where} names {what} {name!r}: expected a file name inside {folder}")
    folder = Path(folder).resolve()
    path = (folder / name).resolve()
    if path.parent != folder and folder not in path.parents:
        raise ValueError(f"{where} names {what} {name!r}, which lies outside its folder {folder}")
    return folder / name


def check_tokens(indices: torch.Tensor, labels: torch.Tensor, levels: int, num_classes: int | None,
                 where: Any) -> None:
    """Refuse (ValueError) a batch whose token indices leave [0, levels) or labels leave [0, num_classes): an
    index past the table would train on garbage (or crash the embedding lookup with an unreadable message)."""
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= levels):
        raise ValueError(f"{where}: token indices span [{int(indices.min())}, {int(indices.max())}], outside "
                         f"[0, {levels}): the cache is damaged or was made with other levels")
    if num_classes is not None and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{where}: labels span [{int(labels.min())}, {int(labels.max())}], outside "
                         f"[0, {num_classes})")
