"""The generic trainer: any registered generator family (tokenbridge.generators), DDP, AdamW, warmup + cosine,
EMA, gradient clipping, and atomic resumable checkpoints that record what made them.

    run = load_run_config("configs/fmnist.yaml", ["train.steps=100"])
    train(run)                                  # out_dir/checkpoint.pt, log.jsonl, config.yaml

Launch on several GPUs with ``torchrun --nproc_per_node N -m tokenbridge.cli train ...``: the same code path runs
with one process, and N processes with global_batch / N samples each reproduce one process's updates.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import distributed as D
from .checkpoint import CHECKPOINT_NAME, CKPT_FORMAT, FORMAT_VERSION, load_checkpoint, save_checkpoint
from .config import ConfigError, RunConfig, apply_overrides, read_yaml, validate
from .files import FolderLock, atomic_path, check_writable
from .optim import EMA, ScheduledAdamW, param_groups, warmup_cosine
from .progress import disable
from .reading import check_tokens
from .generators import apply_preset, check_sample_options, get_family
from .shards import ShardedTokens
from .tokens import CachedTokens, LatentTokens, OnTheFlyTokens, image_dataset
from .vae import vae_fingerprint

CONFIGS = Path(__file__).resolve().parent / "configs"

# ----------------------------------------------------------------------------------------------------------------
# Config


def check_run_config(config: dict | RunConfig) -> RunConfig:
    """Validate a whole run config before any work: sections, the family's model config (presets resolved; data-
    dependent values stay open) and its sampling options. Raises ConfigError naming the first bad key."""
    run = config if isinstance(config, RunConfig) else validate(RunConfig, config)
    family = get_family(run.family)
    model = family.resolve_config(apply_preset(family, run.model))
    family.check_config(model)
    sample = check_sample_options(family, run.sample)
    return run.model_copy(update={"model": model, "sample": sample})


def load_run_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML run config, apply dotted overrides (``train.lr=3e-4``) and validate it (`check_run_config`).
    ``path`` may also name a config shipped with the package (``fmnist``: tokenbridge/configs/fmnist.yaml)."""
    shipped = CONFIGS / f"{path}.yaml"
    if not Path(path).exists() and shipped.is_file():
        path = shipped
    return check_run_config(apply_overrides(read_yaml(path), overrides))


# ----------------------------------------------------------------------------------------------------------------
# Data and model


@dataclass
class TrainingData:
    """A training dataset, an optional per-batch transform (VAE + quantizer on the fly) and where it came from."""

    dataset: Dataset
    prepare: Callable[[tuple], tuple] | None
    provenance: dict[str, Any]


def training_data(run: RunConfig, device: torch.device) -> TrainingData:
    """The dataset a run's data section names: a token file (``source: tokens``) or images encoded per batch; its
    indices, or its continuous latents for a family whose ``items`` is ``"latents"``."""
    data = run.data
    continuous = get_family(run.family).items == "latents"  # the family's declared items (generators/base.py)
    if data.source == "tokens":
        if not data.tokens:
            raise ConfigError("config key 'data.tokens' is required for data.source=tokens (a cache-latents file)")
        path = Path(data.tokens)
        tokens = ShardedTokens(path) if path.is_dir() or path.suffix == ".json" else CachedTokens(path)
        if continuous:
            tokens = LatentTokens(tokens)
        return TrainingData(tokens, None, {"tokens": str(data.tokens), "tokens_items": len(tokens),
                                           "vae": tokens.vae, "vae_fingerprint": tokens.vae_fingerprint})
    prepare = OnTheFlyTokens(data, None if continuous else run.model["quantizer"], device)
    return TrainingData(image_dataset(data), prepare, {"tokens": None, "vae": data.vae,
                                                        "vae_fingerprint": vae_fingerprint(prepare.vae)})


def _loader(dataset: Dataset, run: RunConfig, rank: int, world: int, device: torch.device):
    local_batch = run.train.global_batch // world
    sampler = D.ResumableSampler(len(dataset), world, rank, run.seed)
    steps_per_epoch = sampler.num_samples // local_batch
    if steps_per_epoch == 0:
        raise ValueError(f"dataset of {len(dataset)} items is smaller than train.global_batch={run.train.global_batch}")
    gen = torch.Generator()  # keeps the global RNG untouched by iterator creation (exact resume)
    loader = DataLoader(dataset, batch_size=local_batch, sampler=sampler, drop_last=True,
                        num_workers=run.train.num_workers, pin_memory=device.type == "cuda", generator=gen)
    return loader, sampler, gen, steps_per_epoch


def _schedule(run: RunConfig, steps_per_epoch: int) -> tuple[int, int, float]:
    """(total steps, warmup steps, peak lr)."""
    t = run.train
    total = t.steps if t.steps is not None else int(round(t.epochs * steps_per_epoch))
    warmup = t.warmup_steps if t.warmup_steps is not None else int(round((t.warmup_epochs or 0) * steps_per_epoch))
    if total <= 0:
        raise ConfigError(f"config key 'train.epochs' = {t.epochs}: gives {total} steps at {steps_per_epoch} per epoch")
    return total, warmup, t.lr if t.lr is not None else t.blr * t.global_batch / 256


class _Logger:
    """log.jsonl (and TensorBoard events when tensorboard is installed) on the main process."""

    def __init__(self, out_dir: Path, enabled: bool, truncate_after: int | None):
        self.enabled, self.path, self.tb = enabled, out_dir / "log.jsonl", None
        if not enabled:
            return
        if truncate_after is None:
            self.path.unlink(missing_ok=True)  # a fresh run starts a fresh log
        elif self.path.is_file():  # entries a killed run wrote after its last checkpoint would be repeated
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= truncate_after]
            # the log of the run just resumed (appended to line by line, so it carries no mark of its kind)
            with atomic_path(self.path, overwrite=True) as tmp:
                tmp.write_text("".join(s + "\n" for s in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        self.tb = SummaryWriter(str(out_dir / "tb"))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _step_of(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return math.inf


class _LossModule(nn.Module):
    """Calls ``generator.loss(batch)`` through forward, so that DDP sees the call and syncs gradients."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def forward(self, batch: tuple) -> torch.Tensor:
        return self.generator.loss(batch)


def compiler_works(device: torch.device) -> bool:
    """Whether torch.compile can build kernels for ``device`` here (on the CPU it needs a C++ compiler): a tiny
    function is compiled and run once. False, with a warning, when that fails (training then runs eager)."""
    try:
        torch.compile(lambda x: torch.tanh(x) * 2 + 1)(torch.ones(2, device=device))
    except Exception as e:  # noqa: BLE001  (the failure types differ between backends and torch versions)
        warnings.warn(f"train.compile: torch.compile cannot compile for {device} here ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); training runs eager", stacklevel=2)
        return False
    return True


# ----------------------------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """One training run (`train` builds and runs it): model, optimizer, EMA, data order, checkpoints."""

    def __init__(self, run: RunConfig, data: TrainingData, rank: int, world: int, device: torch.device):
        self.run, self.data, self.rank, self.world, self.device = run, data, rank, world, device
        self.is_main = rank == 0
        self.out_dir = Path(run.out_dir)
        self.ckpt_path = self.out_dir / CHECKPOINT_NAME
        if run.train.global_batch % world:
            raise ValueError(f"train.global_batch={run.train.global_batch} is not divisible by world size {world}")
        self.local_batch = run.train.global_batch // world
        self.loader, self.sampler, self.loader_gen, self.steps_per_epoch = _loader(data.dataset, run, rank, world,
                                                                                  device)
        self.total_steps, self.warmup_steps, self.peak_lr = _schedule(run, self.steps_per_epoch)
        D.seed_all(run.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
        family = get_family(run.family)
        tokens = data.dataset if isinstance(data.dataset, (CachedTokens, ShardedTokens, LatentTokens)) else None
        self.model = family.from_config(run.model, tokens).to(device)
        # record the resolved model config (channel order, quantizer of the token file) for rebuilding
        self.run = run.model_copy(update={"model": self.model.config})
        t = run.train
        schedule = warmup_cosine(self.peak_lr, self.warmup_steps, self.total_steps, t.min_lr)
        self.adamw = ScheduledAdamW(param_groups(self.model, t.weight_decay), schedule, t.betas, t.eps,
                                    fused=t.fused_adamw, foreach=True)  # multi-tensor, also on the CPU
        self.optimizer = self.adamw.optimizer
        self.ema = EMA(self.model, t.ema, t.ema_warmup)
        D.seed_all(run.seed + rank)  # different randomness (masks, dropout) per rank
        self.start_step = 0

    def resume(self) -> None:
        """Continue from out_dir/checkpoint.pt (bit-exact in the same setting)."""
        ckpt = load_checkpoint(self.ckpt_path)
        family = ckpt["config"].get("family", "tokenbridge")
        if family != self.run.family:
            raise ValueError(f"{self.ckpt_path} holds a {family!r} generator, the config trains {self.run.family!r}")
        self._check_same_data(ckpt["provenance"])
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise ValueError(f"checkpoint {self.ckpt_path} does not fit the configured model: {e}") from e
        self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.start_step = int(ckpt["step"])
        if self.is_main and ckpt["config"].get("model") != self.run.model:
            warnings.warn(f"model config differs from the one in {self.ckpt_path}; weights loaded anyway")
        if self.is_main and ckpt.get("steps_per_epoch") not in (None, self.steps_per_epoch):
            warnings.warn("steps per epoch changed since the checkpoint; data order will differ from that run")
        states = ckpt["rng"]
        if isinstance(states, list) and len(states) == self.world:
            try:
                D.set_rng_state(states[self.rank], self.device)
            except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
                raise ValueError(f"checkpoint {self.ckpt_path} holds a malformed RNG state ({type(e).__name__}: {e}); "
                                 "it cannot resume exactly: start a new out_dir") from None
            return
        if not isinstance(states, list):
            raise ValueError(f"checkpoint {self.ckpt_path} holds a malformed RNG state (a {type(states).__name__}, "
                             "not a list per process); start a new out_dir")
        if self.is_main:
            warnings.warn(f"checkpoint was written by {len(states)} processes, now {self.world}: RNG reseeded")
        D.seed_all(self.run.seed + self.rank + 1_000_003 * self.start_step)

    def _check_same_data(self, before: dict[str, Any]) -> None:
        """A run resumes on the data it started with: another token file (or one of another size, or made by
        another VAE) would silently change what is being learned."""
        now = self.data.provenance
        for key in ("tokens", "tokens_items", "vae_fingerprint"):
            if before.get(key) is not None and now.get(key) is not None and before[key] != now[key]:
                raise ValueError(f"{self.ckpt_path} was trained with {key} = {before[key]!r}, the config now gives "
                                 f"{now[key]!r}; resume with the original data, or start a new out_dir")

    def save(self, step: int) -> None:
        """Atomic checkpoint of the current step (every rank's RNG state gathered on the main process)."""
        rng = D.rng_state(self.device)
        gathered: list[Any] = [rng]
        if D.is_distributed():
            gathered = [None] * self.world
            dist.all_gather_object(gathered, rng)
        if self.is_main:
            save_checkpoint(self.ckpt_path, {
                "format": CKPT_FORMAT, "version": FORMAT_VERSION, "step": step,
                "epoch": step // self.steps_per_epoch, "batch_in_epoch": step % self.steps_per_epoch,
                "steps_per_epoch": self.steps_per_epoch, "world_size": self.world,
                "model": self.model.state_dict(), "ema": self.ema.state_dict(self.model),
                "optimizer": self.optimizer.state_dict(), "rng": gathered,
                "config": json.dumps(self.run.model_dump(mode="json")),
                "provenance": json.dumps(self.data.provenance),
            })
        D.barrier()

    def write_config(self, overwrite: bool | None = None) -> None:
        """out_dir/config.yaml: the resolved run config (what `tokenbridge train --config` would repeat).
        ``overwrite``: replace whatever is there (a resumed run owns its folder, files from before included)."""
        if self.is_main:
            with atomic_path(self.out_dir / "config.yaml", overwrite=overwrite) as tmp:
                tmp.write_text(yaml.safe_dump(self.run.model_dump(mode="json"), sort_keys=False))

    def _training_module(self) -> nn.Module:
        module: nn.Module = _LossModule(self.model)
        if self.world > 1:
            module = nn.parallel.DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.run.train.find_unused_parameters)
        if self.run.train.compile and compiler_works(self.device):
            module = torch.compile(module)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return module

    def _batches(self, step: int, batches: Iterator | None) -> Iterator:
        """The batch iterator positioned at ``step`` (a new one at each epoch start or after a resume)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        if batches is None or pos == 0:
            self.sampler.set_position(epoch, pos * self.local_batch)
            self.loader_gen.manual_seed(self.run.seed * 1_000_003 + epoch * 1009 + self.rank)
            batches = iter(self.loader)
        return batches

    def _log_window(self, step: int, sums: torch.Tensor, n: int, seconds: float, lr: float) -> dict[str, Any]:
        stats = sums / n
        if D.is_distributed():
            dist.all_reduce(stats)
            stats /= self.world
        loss, gnorm = (float(x) for x in stats.tolist())
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step}; lower train.lr or check the data")
        return {"step": step, "epoch": step / self.steps_per_epoch, "loss": loss, "lr": lr, "grad_norm": gnorm,
                "it_s": n / seconds if seconds > 0 else None,
                "samples_s": n * self.run.train.global_batch / seconds if seconds > 0 else None}

    def _update(self, module: nn.Module, batch: tuple, step: int) -> torch.Tensor:
        """One optimizer step on ``batch``; returns [loss, grad norm] (on the device, not synchronised)."""
        t = self.run.train
        if self.data.prepare is not None:
            batch = self.data.prepare(batch)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=t.bf16 and self.device.type == "cuda"):
            loss = module(batch)
        if loss.ndim != 0:
            raise ValueError(f"{self.run.family}.loss must return a scalar, got shape {tuple(loss.shape)}")
        self.adamw.zero_grad()
        loss.float().backward()
        gnorm = nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
        self.adamw.step(step)
        self.ema.update(self.model, step)
        return torch.stack([loss.detach().float(), gnorm.detach().float()])

    def _checked(self, batch: tuple) -> tuple:
        """``batch`` once its token indices and labels are known to lie in range, whatever the cache kind (a
        single file is checked when opened, memory-mapped shards item by item here)."""
        tokens = self.data.dataset
        levels = getattr(tokens, "levels", None)
        if levels is not None and torch.is_tensor(batch[0]) and not batch[0].is_floating_point():
            check_tokens(batch[0], batch[1], int(levels), getattr(tokens, "num_classes", None),
                         f"token cache {getattr(tokens, 'path', '')}")
        return batch

    def fit(self, end_step: int, logger: _Logger) -> dict[str, Any]:
        """Optimizer steps from start_step to end_step; returns the last log record. SIGTERM / Ctrl-C save the
        current step and raise TrainingInterrupted."""
        t, module = self.run.train, self._training_module()
        metrics: dict[str, Any] = {"step": self.start_step, "loss": None, "lr": None, "grad_norm": None}
        sums = torch.zeros(2, device=self.device)  # loss, grad norm: summed on the device, read once per window
        t_window, n_window, batches, step = time.time(), 0, None, self.start_step
        self.model.train()
        pbar = tqdm(total=self.total_steps, initial=step, disable=disable() if self.is_main else True, desc="train")
        with D.StopSignals(self.device) as stop:
            while step < end_step:
                batches = self._batches(step, batches)
                batch = self._checked(next(batches))
                batch = tuple(b.to(self.device, non_blocking=True) if torch.is_tensor(b) else b for b in batch)
                sums += self._update(module, batch, step)
                step, n_window = step + 1, n_window + 1
                pbar.update(1)
                if step % t.log_every == 0 or step == end_step:
                    lr = self.optimizer.param_groups[0]["lr"]
                    metrics = self._log_window(step, sums, n_window, time.time() - t_window, lr)
                    logger.log(metrics)
                    pbar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}")
                    sums.zero_()
                    t_window, n_window = time.time(), 0
                saved = (t.ckpt_every and step % t.ckpt_every == 0) or step == end_step
                if saved:
                    self.save(step)
                signum = stop.requested()
                if signum:
                    if not saved:
                        self.save(step)
                    pbar.close()
                    raise D.TrainingInterrupted(signum, step, str(self.ckpt_path))
        pbar.close()
        return metrics


def _start(trainer: Trainer, resume: bool, overwrite: bool) -> bool:
    """Resume, start over (``overwrite``) or refuse: a checkpoint is never replaced without being asked to.
    Returns whether the run resumed."""
    if not trainer.ckpt_path.exists():
        return False
    if resume:
        trainer.resume()
        return True
    if not overwrite:
        raise ValueError(f"{trainer.ckpt_path} already holds a checkpoint; resume it (leave out --no-resume), pass "
                         "--overwrite to replace it, or choose another out_dir")
    return False


def train(config: dict | RunConfig, resume: bool = True, overwrite: bool = False, *,
          dataset: Dataset | None = None, stop_at: int | None = None) -> dict[str, Any]:
    """Train the generator a run config describes (any registered family; see tokenbridge.generators).

    config: a RunConfig or a plain dict (validated first). dataset: replaces the data section (a Dataset whose
    batches the family's ``loss`` takes). resume: continue from ``out_dir/checkpoint.pt`` if it exists (bit-exact
    continuation in the same setting); resume=False with an existing checkpoint needs ``overwrite``. The run folder
    is locked for the run (a second run into it fails at once). stop_at: stop after this global step with a
    checkpoint, as if killed (the schedule still spans train.steps). SIGTERM / Ctrl-C save the current step and
    raise TrainingInterrupted. Returns the last log record plus elapsed_s, checkpoint and total_steps.
    """
    run = check_run_config(config)
    rank, world, device, created_group = D.init_distributed(run.train.device)
    lock = FolderLock(run.out_dir)
    try:
        if rank == 0:
            check_writable(Path(run.out_dir) / CHECKPOINT_NAME, "checkpoint")
            lock.acquire()
        data = (TrainingData(dataset, None, {"tokens": None, "vae": None, "vae_fingerprint": None})
                if dataset is not None else training_data(run, device))
        trainer = Trainer(run, data, rank, world, device)
        resumed = _start(trainer, resume, overwrite)
        if resumed and trainer.start_step > trainer.total_steps:
            raise ValueError(f"{trainer.ckpt_path} is at step {trainer.start_step}, past the {trainer.total_steps} "
                             "steps the config asks for: nothing to train. Raise train.steps to continue it, or "
                             "start a new out_dir")
        trainer.write_config(overwrite=True if resumed else None)
        logger = _Logger(trainer.out_dir, trainer.is_main, trainer.start_step if resumed else None)
        end_step = trainer.total_steps if stop_at is None else min(trainer.total_steps, int(stop_at))
        t_start = time.time()
        try:
            metrics = trainer.fit(end_step, logger)
        finally:
            logger.close()
        return {**metrics, "elapsed_s": time.time() - t_start, "checkpoint": str(trainer.ckpt_path),
                "total_steps": trainer.total_steps}
    finally:
        lock.release()
        if created_group:
            dist.destroy_process_group()
