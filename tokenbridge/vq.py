"""A learned VQ tokenizer of continuous VAE latents: D2C's coarse discrete tokens (stage 1's vocabulary).

D2C (arXiv 2503.17155) takes its discrete tokens from a VQGAN-type vector-quantized tokenizer. This one is of that
kind but works on the VAE's continuous latents [N, h, w, C] instead of on pixels, for two reasons: D2C's stage 2
reconstructs those latents anyway (the coarse tokens only have to say roughly what the latents are), and a latent
grid is tiny (8 x 8 x 4 for Fashion-MNIST), so the tokenizer trains on CPU in minutes, not GPU-days: about 7 steps/s
at batch 256 on one shared core (200 steps: 28 s, all 256 codes in use, held-out latent MSE 0.23 at latent variance
1.0); the default 2000 steps take about 5 minutes. No GAN or perceptual loss: the loss is the latent MSE plus the
VQ commitment loss.

Architecture: a small conv encoder (optionally downsampling the latent grid 2x with a stride-2 conv), a 1x1
projection to ``dim``, ``vector_quantize_pytorch.VectorQuantize`` (EMA codebook, k-means initialisation and
dead-code replacement, which keep most codes in use) and a conv decoder back to the latent layout.

A tokenizer folder (``save_pretrained`` / ``from_pretrained``, what ``tokenbridge train-vq`` writes) holds
``config.json`` (format, version, the constructor config and the training report) and ``model.safetensors``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from vector_quantize_pytorch import VectorQuantize

from .budget import check_model_budget, state_bytes
from .files import atomic_path, check_writable, holds_output, remove_stale_temporaries, tensor_bytes
from .markdown import markdown_table
from .metrics import psnr
from .optim import lr_at
from .progress import disable
from .reading import check_state
from .shards import ShardedTokens
from .tokens import CachedTokens
from .vae import load_vae, vae_fingerprint

VQ_FORMAT = "tokenbridge-vq"
# the pretrained-folder file names of tokenbridge.generators.pretrained (not imported: the generators package
# imports the D2C family, which imports this module)
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
DOWNSAMPLES = (1, 2)
HOLDOUT = 0.05  # share of a token file held out for evaluation when no test file is given


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_vq_args(channels: int, codebook_size: int, dim: int, downsample: int, hidden: int, decay: float,
                   commitment_weight: float, threshold_ema_dead_code: float,
                   latent_grid: tuple[int, int] | None) -> None:
    bad = [f"{k}={v!r}" for k, v in (("channels", channels), ("dim", dim), ("hidden", hidden))
           if not (_is_int(v) and v >= 1)]
    bad += [] if _is_int(codebook_size) and codebook_size >= 2 else [f"codebook_size={codebook_size!r} (>= 2)"]
    bad += [] if downsample in DOWNSAMPLES and _is_int(downsample) else [f"downsample={downsample!r} (1 or 2)"]
    bad += [] if isinstance(decay, (int, float)) and 0 < decay < 1 else [f"decay={decay!r} (in (0, 1))"]
    for name, value in (("commitment_weight", commitment_weight), ("threshold_ema_dead_code", threshold_ema_dead_code)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            bad.append(f"{name}={value!r} (>= 0)")
    if latent_grid is not None and not (len(latent_grid) == 2 and all(_is_int(g) and g >= 1 for g in latent_grid)):
        bad.append(f"latent_grid={latent_grid!r} (two positive integers or None)")
    if bad:
        raise ValueError(f"VQTokenizer: bad arguments: {', '.join(bad)}")


def _conv_stack(c_in: int, hidden: int, c_out: int, resample: nn.Module | None) -> nn.Sequential:
    """3x3 conv, [resample], 3x3 conv, 1x1 conv: enough for latent grids of a few dozen cells."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, hidden, 3, padding=1), nn.GELU()]
    if resample is not None:
        layers += [resample, nn.GELU()]
    layers += [nn.Conv2d(hidden, hidden, 3, padding=1), nn.GELU(), nn.Conv2d(hidden, c_out, 1)]
    return nn.Sequential(*layers)


class VQTokenizer(nn.Module):
    """Latents [N, h, w, C] (channel-last, scaled VAE latents) <-> codes [N, h/downsample, w/downsample] int64 in
    [0, codebook_size).

    Args:
        channels: C, the latent channels.
        codebook_size: the number of codes (the stage-1 vocabulary).
        dim: the codebook vector size (the encoder projects to it).
        downsample: 1 (one code per latent cell) or 2 (one code per 2x2 cells, a stride-2 conv).
        hidden: conv width of the encoder and the decoder.
        decay: EMA decay of the codebook updates.
        commitment_weight: weight of the commitment loss ||z - sg(q)||^2 in ``loss``.
        kmeans_init: initialise the codebook by k-means on the first training batch.
        threshold_ema_dead_code: codes whose EMA usage count falls below this are replaced by encoder outputs
            of the current batch (0: never), the codebook-usage trick.
        use_cosine_sim: nearest code by cosine similarity of l2-normalised vectors instead of Euclidean distance.
        latent_grid: the (h, w) it was trained on (None: any grid divisible by ``downsample``).
    """

    def __init__(self, channels: int, codebook_size: int = 256, dim: int = 32, downsample: int = 2, hidden: int = 64,
                 decay: float = 0.9, commitment_weight: float = 0.25, kmeans_init: bool = True,
                 threshold_ema_dead_code: float = 2.0, use_cosine_sim: bool = False,
                 latent_grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        _check_vq_args(channels, codebook_size, dim, downsample, hidden, decay, commitment_weight,
                       threshold_ema_dead_code, latent_grid)
        self.channels, self.codebook_size, self.dim, self.downsample = channels, codebook_size, dim, downsample
        self.latent_grid = None if latent_grid is None else (int(latent_grid[0]), int(latent_grid[1]))
        self.config = {"channels": channels, "codebook_size": codebook_size, "dim": dim, "downsample": downsample,
                       "hidden": hidden, "decay": float(decay), "commitment_weight": float(commitment_weight),
                       "kmeans_init": bool(kmeans_init), "threshold_ema_dead_code": float(threshold_ema_dead_code),
                       "use_cosine_sim": bool(use_cosine_sim),
                       "latent_grid": None if latent_grid is None else list(self.latent_grid)}
        down = nn.Conv2d(hidden, hidden, 4, stride=2, padding=1) if downsample == 2 else None
        up = nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1) if downsample == 2 else None
        self.encoder = _conv_stack(channels, hidden, dim, down)
        self.decoder = _conv_stack(dim, hidden, channels, up)
        self.vq = VectorQuantize(dim=dim, codebook_size=codebook_size, decay=decay, commitment_weight=commitment_weight,
                                 kmeans_init=kmeans_init, threshold_ema_dead_code=threshold_ema_dead_code,
                                 use_cosine_sim=use_cosine_sim)
        self.report: dict[str, Any] = {}  # the training report of a loaded folder

    # -------------------------------------------------------------------------------------------- checks
    def code_grid(self, h: int, w: int) -> tuple[int, int]:
        """(gh, gw) of a latent grid (h, w), or ValueError naming what does not fit this tokenizer."""
        if self.latent_grid is not None and (h, w) != self.latent_grid:
            raise ValueError(f"VQ tokenizer was trained on a {self.latent_grid[0]}x{self.latent_grid[1]} latent grid, "
                             f"got {h}x{w}")
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"latent grid {h}x{w} is not divisible by the VQ tokenizer's downsample {self.downsample}")
        return h // self.downsample, w // self.downsample

    def check_latents(self, latents: torch.Tensor) -> tuple[int, int]:
        """ValueError unless ``latents`` is a float [N, h, w, C] this tokenizer takes; returns (gh, gw)."""
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or not latents.is_floating_point():
            raise ValueError(f"latents must be a float tensor [N, h, w, C], got "
                             f"{getattr(latents, 'dtype', type(latents))} {list(getattr(latents, 'shape', []))}")
        if latents.shape[-1] != self.channels:
            raise ValueError(f"VQ tokenizer takes {self.channels} latent channels, got latents with "
                             f"{latents.shape[-1]} (last dim of {list(latents.shape)})")
        return self.code_grid(latents.shape[1], latents.shape[2])

    def check_codes(self, codes: torch.Tensor) -> None:
        """ValueError unless ``codes`` is an integer [N, gh, gw] tensor with values in [0, codebook_size)."""
        if not isinstance(codes, torch.Tensor) or codes.ndim != 3 or codes.is_floating_point() or codes.is_complex():
            raise ValueError(f"codes must be an integer tensor [N, gh, gw], got "
                             f"{getattr(codes, 'dtype', type(codes))} {list(getattr(codes, 'shape', []))}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]")
        self.code_grid(codes.shape[1] * self.downsample, codes.shape[2] * self.downsample)

    # -------------------------------------------------------------------------------------------- maths
    def _quantize(self, latents: torch.Tensor, update: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """latents [N, h, w, C] -> (quantized [N, dim, gh, gw], codes [N, gh, gw] int64, commitment loss).
        Without ``update`` the codebook is left as it is even in training mode (encode must not change it)."""
        gh, gw = self.check_latents(latents)
        z = self.encoder(latents.permute(0, 3, 1, 2).float())  # [N, dim, gh, gw]
        z = z.flatten(2).transpose(1, 2)  # [N, L, dim], raster order
        quantized, codes, aux = self.vq(z, freeze_codebook=not update)
        n = latents.shape[0]
        return quantized.transpose(1, 2).reshape(n, self.dim, gh, gw), codes.reshape(n, gh, gw).long(), aux

    def _decode_vectors(self, quantized: torch.Tensor) -> torch.Tensor:
        """[N, dim, gh, gw] -> latents [N, h, w, C]."""
        return self.decoder(quantized).permute(0, 2, 3, 1)

    @torch.no_grad()
    def encode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents float [N, h, w, C] -> codes int64 [N, gh, gw] in [0, codebook_size) (nearest code), in float32
        even under autocast (a generator training in bf16 must see the codes its GPT was trained on)."""
        with torch.autocast(latents.device.type, enabled=False):
            return self._quantize(latents, update=False)[1]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes int [N, gh, gw] -> reconstructed latents float32 [N, gh * downsample, gw * downsample, C]."""
        self.check_codes(codes)
        n, gh, gw = codes.shape
        with torch.autocast(codes.device.type, enabled=False):
            vectors = self.vq.get_output_from_indices(codes.reshape(n, -1).long())  # [N, L, dim]
            return self._decode_vectors(vectors.transpose(1, 2).reshape(n, self.dim, gh, gw).float())

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """latents [N, h, w, C] -> (reconstruction [N, h, w, C], codes [N, gh, gw] int64, commitment loss scalar).
        In training mode the EMA codebook is updated (and dead codes replaced); gradients reach the encoder
        through the straight-through estimator."""
        quantized, codes, aux = self._quantize(latents, update=True)
        return self._decode_vectors(quantized), codes, aux.reshape(())

    def loss(self, latents: torch.Tensor) -> torch.Tensor:
        """Scalar training loss: MSE of the reconstruction in latent units + the weighted commitment loss."""
        recon, _, aux = self(latents)
        return F.mse_loss(recon, latents.float()) + aux

    # -------------------------------------------------------------------------------------------- folders
    def save_pretrained(self, directory: str | os.PathLike, report: dict | None = None,
                        overwrite: bool = False) -> Path:
        """Write config.json (config + report) and model.safetensors into ``directory`` as one atomic step (a
        temporary folder renamed into place). An existing non-empty folder is replaced only with ``overwrite``."""
        directory = check_vq_folder(directory, overwrite)
        report = self.report if report is None else report
        record = {"format": VQ_FORMAT, "version": 1, "config": self.config, "report": report}
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}

        def write(folder: Path) -> None:
            with atomic_path(folder / WEIGHTS_NAME, VQ_FORMAT, needed=tensor_bytes(state)) as tmp:
                save_file(state, str(tmp), metadata={"format": VQ_FORMAT})
            with atomic_path(folder / CONFIG_NAME) as tmp:
                tmp.write_text(json.dumps(record, indent=2) + "\n")

        _replace_folder(directory, write)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> VQTokenizer:
        """A tokenizer folder (``save_pretrained``, ``tokenbridge train-vq``) -> VQTokenizer in eval mode, its
        training report as ``.report``. A missing, foreign or mismatched file is a ValueError naming it."""
        record = read_vq_record(directory)
        weights = Path(directory) / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{directory} is not a VQ tokenizer folder: {WEIGHTS_NAME} is missing")
        try:
            state = load_file(str(weights))
        except Exception as e:  # safetensors raises its own error types for truncated or garbled files
            raise ValueError(f"{weights} is corrupt or not a safetensors file: {e}") from None
        where = f"{directory}/{CONFIG_NAME}"
        with torch.device("meta"):  # its size first: a crafted config could ask for any
            check_model_budget(state_bytes(build_tokenizer(record["config"], where)), where, "VQ tokenizer")
        model = build_tokenizer(record["config"], where)
        check_state(model.state_dict(), state, weights)  # NaN, inf or integer weights named
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{weights}: weights do not fit the recorded VQ config: {e}") from None
        model.report = record.get("report") or {}
        return model.to(device).eval()


def build_tokenizer(config: dict, where: str) -> VQTokenizer:
    """VQTokenizer(**config) (untrained); unknown keys or bad values are a ValueError naming ``where``."""
    if not isinstance(config, dict):
        raise ValueError(f"{where}: the VQ tokenizer config must be a mapping, got {type(config).__name__}")
    try:
        return VQTokenizer(**config)
    except TypeError as e:
        raise ValueError(f"{where}: bad VQ tokenizer config {config}: {e}") from None
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def read_vq_record(directory: str | os.PathLike) -> dict[str, Any]:
    """The config.json of a tokenizer folder: {"config": constructor config, "report": training report, ...}."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a VQ tokenizer folder (make one with `tokenbridge train-vq`): "
                                f"{CONFIG_NAME} is missing")
    try:
        record = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(record, dict) or record.get("format") != VQ_FORMAT or not isinstance(record.get("config"), dict):
        raise ValueError(f"{path} is not a tokenbridge VQ tokenizer config (format {VQ_FORMAT!r})")
    return record


def check_vq_folder(directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """The folder to write a tokenizer to, checked before any training: not a file, writable, and not already
    holding files unless ``overwrite``."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"VQ tokenizer folder {directory} is a file; give a folder")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        what = "a VQ tokenizer" if (directory / CONFIG_NAME).exists() else "files"
        raise ValueError(f"folder {directory} already holds {what}; pass --overwrite (overwrite=True) to replace it, "
                         "or choose another folder")
    check_writable(directory / CONFIG_NAME, "VQ tokenizer folder")
    return directory


def _replace_folder(directory: Path, write: Any) -> None:
    """Run ``write(tmp)`` on a fresh temporary folder beside ``directory``, then rename it into place (an old
    folder is moved aside first and deleted after): a reader sees the old folder or the new one, never a mix."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
    old = directory.with_name(f".{directory.name}.{os.getpid()}.old")
    remove_stale_temporaries(directory)  # the temporary folders of killed runs too
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        if directory.is_dir() and any(directory.iterdir()):
            os.replace(directory, old)
        os.replace(tmp, directory)  # onto a missing or empty folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ training
def code_usage(codes: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Codebook usage of codes (any shape, ints in [0, codebook_size)): ``codes_used`` (distinct codes),
    ``usage`` (their fraction of the codebook) and ``perplexity`` = exp(entropy of the code frequencies), which
    is codebook_size when every code is equally frequent and 1 when one code is used."""
    counts = torch.bincount(codes.reshape(-1).long().cpu(), minlength=codebook_size).double()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    used = int((counts > 0).sum())
    return {"codes_used": used, "usage": used / codebook_size, "perplexity": float(entropy.exp())}


def _check_latent_sets(train: torch.Tensor, test: torch.Tensor) -> None:
    for name, x in (("latents_train", train), ("latents_test", test)):
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point() or len(x) == 0:
            raise ValueError(f"train_vq: {name} must be a non-empty float tensor [N, h, w, C], got "
                             f"{getattr(x, 'dtype', type(x))} {list(getattr(x, 'shape', []))}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"train_vq: {name} hold NaN or inf values")
    if train.shape[1:] != test.shape[1:]:
        raise ValueError(f"train_vq: latents_train {list(train.shape[1:])} and latents_test {list(test.shape[1:])} "
                         "differ in grid or channels")


def _check_training(steps: int, batch_size: int, lr: float, seed: int) -> None:
    bad = [f"{k}={v!r}" for k, v in (("steps", steps), ("batch_size", batch_size)) if not (_is_int(v) and v >= 1)]
    bad += [] if _is_int(seed) else [f"seed={seed!r}"]
    bad += [] if isinstance(lr, (int, float)) and 0 < lr < math.inf else [f"lr={lr!r}"]
    if bad:
        raise ValueError(f"train_vq: need integers steps, batch_size >= 1 and seed, and a finite lr > 0; got "
                         f"{', '.join(bad)}")


@torch.no_grad()
def evaluate_vq(model: VQTokenizer, latents: torch.Tensor, vae: nn.Module | None = None,
                batch_size: int = 256) -> dict[str, Any]:
    """Held-out quality of a tokenizer on latents [N, h, w, C]: codebook usage (``code_usage``), ``latent_mse``
    of decode(encode(x)) vs x, ``latent_var`` (the latents' variance, the MSE of predicting their mean), and with
    a VAE ``psnr_db``: mean per-image PSNR of VAE-decoded reconstructions vs VAE-decoded originals ([-1, 1];
    an identical pair counts as 100 dB, not inf)."""
    model.eval()
    device = next(model.parameters()).device
    codes, sq_err, psnrs = [], 0.0, []
    for i in range(0, len(latents), batch_size):
        x = latents[i:i + batch_size].to(device).float()
        c = model.encode(x)
        recon = model.decode(c)
        codes.append(c.cpu())
        sq_err += float((recon - x).double().square().sum())
        if vae is not None:
            decoded = [vae.decode(t.permute(0, 3, 1, 2)).clamp(-1, 1) for t in (recon, x)]
            psnrs.append(psnr(decoded[0], decoded[1]).clamp_max(100.0).cpu())
    result = code_usage(torch.cat(codes), model.codebook_size)
    result.update(latent_mse=sq_err / latents.numel(), latent_var=float(latents.double().var()))
    result["psnr_db"] = float(torch.cat(psnrs).mean()) if psnrs else None
    return result


def _fit_vq(model: VQTokenizer, latents_train: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int,
            progress: bool, device: torch.device) -> dict[str, Any]:
    """train_vq's optimisation loop; returns the training part of the report."""
    h, w = latents_train.shape[1:3]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, 1.0, min(100, steps // 10), steps))
    gen = torch.Generator().manual_seed(seed)
    t0, losses = time.time(), []
    for step in tqdm(range(steps), desc="train-vq", disable=disable(None) if progress else True):
        x = latents_train[torch.randint(len(latents_train), (batch_size,), generator=gen)].to(device).float()
        loss = model.loss(x)
        if not math.isfinite(loss.item()):
            raise ValueError(f"train_vq: the loss is {loss.item()} at step {step} (diverged: lower lr?)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "num_train": len(latents_train),
            "codebook_size": model.codebook_size, "code_grid": list(model.code_grid(h, w)),
            "final_train_loss": sum(losses[-50:]) / len(losses[-50:]), "seconds": round(time.time() - t0, 1)}


@holds_output("out_dir", "VQ tokenizer folder")
def train_vq(latents_train: torch.Tensor, latents_test: torch.Tensor, config: dict | None = None,
             steps: int = 2000, batch_size: int = 256, lr: float = 2e-3, seed: int = 0,
             out_dir: str | os.PathLike | None = None, progress: bool = True, vae: nn.Module | None = None,
             device: str | torch.device = "cpu", overwrite: bool = False,
             record: dict | None = None) -> dict[str, Any]:
    """Train a VQTokenizer on latents [N, h, w, C] and return its report (and write it with the tokenizer to
    ``out_dir`` when given).

    config: VQTokenizer keyword arguments (channels and latent_grid come from the latents). AdamW with a short
    warm-up and cosine decay; batches drawn with replacement from a generator seeded by ``seed``; k-means init and
    dead-code replacement draw from the global RNG, which is seeded by ``seed`` inside a fork (the caller's RNG state
    is restored afterwards), so a run is deterministic on one device and leaves the caller's random stream alone.
    The report holds the training settings, the final training loss, seconds, and ``evaluate_vq`` on the held-out
    ``latents_test`` (PSNR when ``vae`` is given); ``record`` adds provenance keys (token file, VAE spec).
    Every argument and ``out_dir`` are checked before training.
    """
    _check_latent_sets(latents_train, latents_test)
    _check_training(steps, batch_size, lr, seed)
    _, h, w, c = latents_train.shape
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # before building: a reproducible init
        model = build_tokenizer({**(config or {}), "channels": c, "latent_grid": (h, w)}, "train_vq")
        model.check_latents(latents_train[:1])
        if out_dir is not None:
            check_vq_folder(out_dir, overwrite)
        model = model.to(device).train()
        report = _fit_vq(model, latents_train, steps, batch_size, lr, seed, progress, device)
    report.update({"num_test": len(latents_test), "latent_grid": [h, w, c], **(record or {})})
    report.update(evaluate_vq(model, latents_test, vae))
    model.report = report
    if out_dir is not None:
        model.save_pretrained(out_dir, overwrite=overwrite)
    return report


# ------------------------------------------------------------------------------------------------ token caches
def _cache_latents(path: str | os.PathLike) -> tuple[torch.Tensor, Any]:
    """(latents float32 [N, h, w, C], the cache) of a cache-latents file or shard folder; ValueError without
    latents."""
    path = Path(path)
    tokens = ShardedTokens(path) if path.is_dir() or path.suffix == ".json" else CachedTokens(path)
    if tokens.latents is None:
        raise ValueError(f"token file {path} stores no continuous latents, which the VQ tokenizer trains on: make it "
                         "with `tokenbridge cache-latents` and data.store_latents=true")
    latents = torch.as_tensor(tokens.latents[:len(tokens)]).permute(0, 2, 3, 1).float().contiguous()
    return latents, tokens


def token_latents(path: str | os.PathLike, test_path: str | os.PathLike | None = None,
                  holdout: float = HOLDOUT) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(train latents, held-out latents, the training cache) from token caches (latents float32 [N, h, w, C]).
    Without ``test_path`` the last ``holdout`` share of the items (at least one) is held out."""
    train, tokens = _cache_latents(path)
    if test_path is not None:
        test, test_tokens = _cache_latents(test_path)
        if tokens.vae_fingerprint and test_tokens.vae_fingerprint not in (None, tokens.vae_fingerprint):
            raise ValueError(f"token files {path} and {test_path} were made with different VAEs (fingerprints "
                             f"{tokens.vae_fingerprint} and {test_tokens.vae_fingerprint})")
        return train, test, tokens
    if len(train) < 2:
        raise ValueError(f"token file {path} holds {len(train)} item(s): too few to hold out a test share; give "
                         "--test-tokens")
    n_test = min(len(train) - 1, max(1, round(holdout * len(train))))
    return train[:-n_test], train[-n_test:], tokens


def token_vae(tokens: Any, device: str | torch.device = "cpu") -> tuple[nn.Module | None, str]:
    """(the VAE a token cache records, "") when it loads and matches the cache's fingerprint and channels, else
    (None, why not): the VQ report's PSNR is then left out."""
    try:
        vae = load_vae(tokens.vae, device) if tokens.vae else None
    except (OSError, ValueError) as e:
        return None, f"PSNR skipped: the token file's VAE {tokens.vae!r} does not load ({e})"
    if vae is None:
        return None, "PSNR skipped: the token file records no VAE"
    if tokens.vae_fingerprint and vae_fingerprint(vae) != tokens.vae_fingerprint:
        return None, f"PSNR skipped: VAE {tokens.vae!r} is not the one that made the token file (fingerprint)"
    if getattr(vae, "latent_channels", None) != tokens.grid_shape[-1]:
        return None, f"PSNR skipped: VAE {tokens.vae!r} does not have the token file's {tokens.grid_shape[-1]} channels"
    return vae.eval(), ""


def report_table(report: dict[str, Any]) -> str:
    """The held-out part of a train_vq report as a markdown table."""
    rows = [("codes used", f"{report['codes_used']} / {report['codebook_size']} ({100 * report['usage']:.1f} %)"),
            ("perplexity", f"{report['perplexity']:.1f}"),
            ("latent MSE", f"{report['latent_mse']:.4f} (latent variance {report['latent_var']:.4f})"),
            ("PSNR of VAE decodes", "-" if report.get("psnr_db") is None else f"{report['psnr_db']:.2f} dB"),
            ("code grid", "x".join(str(g) for g in report["code_grid"])),
            ("train steps / seconds", f"{report['steps']} / {report['seconds']}")]
    return markdown_table(["held-out", "value"], rows)
