"""Processes and randomness for the trainer: torchrun process groups, a data order that resumes mid-epoch, and
RNG states stored as plain tensors (so that torch.load(weights_only=True) reads checkpoints)."""

from __future__ import annotations

import os
import random
import signal
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def init_distributed(device_cfg: str) -> tuple[int, int, torch.device, bool]:
    """(rank, world_size, device, created_group). torchrun sets RANK / WORLD_SIZE / LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_cfg.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"config key 'train.device' = {device_cfg!r} but no CUDA GPU is visible to torch "
                         f"({torch.__version__}); use device=auto or device=cpu")
    use_cuda = torch.cuda.is_available() and device_cfg in ("auto", "cuda")
    if device_cfg not in ("auto", "cuda", "cpu"):
        device = torch.device(device_cfg)
    elif use_cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device, False
    if world > 1:
        # DistributedDataParallel imports torch._dynamo on first use, which imports torch.distributed.nn, whose
        # functions take `group=group.WORLD` as a default argument: imported after the group exists, they keep it
        # for good, destroy_process_group cannot free it, and its gloo threads (two workers and the TCP loop) live
        # on into interpreter exit, which they now and then abort ("terminate called without an active
        # exception", SIGABRT; torch 2.13). Imported before the group, those defaults are None.
        from torch import _dynamo  # noqa: F401  (`import torch._dynamo` would make `torch` local here)

        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return dist.get_rank(), dist.get_world_size(), device, True
    return 0, 1, device, False


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


class ResumableSampler(Sampler[int]):
    """This rank's share of a shuffled epoch, starting after its first ``skip`` samples (exact mid-epoch resume).

    The order is DistributedSampler's (shuffle=True, drop_last=True: permutation of seed + epoch, cut to a multiple
    of the world size, every world-th index from the rank), kept as one int64 tensor (8 bytes per item) and handed
    out in chunks, instead of the Python lists DistributedSampler builds (~36 bytes per item, twice): the index
    order is then the only per-item memory of training, 40 MB for 5M items."""

    CHUNK = 1 << 16

    def __init__(self, size: int, world: int, rank: int, seed: int):
        self.size, self.world, self.rank, self.seed = size, world, rank, seed
        self.num_samples = (size - 1) // world if size % world else size // world  # DistributedSampler's count
        self.epoch, self.skip = 0, 0

    def set_position(self, epoch: int, skip: int) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=g)[: self.num_samples * self.world][self.rank:: self.world]
        for start in range(self.skip, len(order), self.CHUNK):
            yield from order[start: start + self.CHUNK].tolist()

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)


def rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.random.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_meta": [int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python_version": int(py_state[0]),
        "python_state": torch.tensor(py_state[1], dtype=torch.int64),
        "python_gauss": py_state[2],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.random.set_rng_state(state["torch"])
    pos, has_gauss, gauss = state["numpy_meta"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    random.setstate((state["python_version"], tuple(int(x) for x in state["python_state"].tolist()), state["python_gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class TrainingInterrupted(Exception):
    """SIGTERM or Ctrl-C stopped training after the checkpoint of ``step`` was written."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after saving step {step} to {checkpoint}; the same command resumes it")


class StopSignals:
    """While active, SIGTERM and SIGINT (Ctrl-C) only raise a flag that the training loop reads between steps, so
    that it can save the current step before exiting. Under DDP every rank must stop at the same step:
    `requested` combines the ranks' flags (one tiny all-reduce per step)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, device: torch.device):
        self.device, self.signum, self._previous = device, 0, {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def requested(self) -> int:
        """The signal number that asked to stop (0: none), agreed by every rank."""
        if not is_distributed():
            return self.signum
        flag = torch.tensor([self.signum], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
