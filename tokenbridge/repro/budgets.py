"""The budgets of `tokenbridge repro`: one dict per scale, and dotted overrides of it.

- ``tiny``: a few steps on a few hundred images, for tests (the numbers mean nothing);
- ``small``: the embedded Fashion-MNIST setting on 2 CPU cores, one training seed of a generator row in ~20-30 min;
- ``paper``: the paper's head sizes, batch and sampling settings (TokenBridge-L), for GPUs.

Sections: seed (sampling / NLL-mask seed, token caches); train_seeds (every generator row of Tables 2a-2e,
Fig. 8, Table 3 and d2c is trained once per seed; tables show mean +- sd over them); data (images per split);
model (a TokenBridgeGenerator config: a preset and what differs from it); train (tokenbridge.config.TrainConfig
keys); eval (sampling + metrics settings shared by table2* and fig8;
eval.seed: sampling and NLL-mask seed, None = the run's seed; another value re-evaluates the same trained
generators, which measures the evaluation's own noise); then one section per table. table2e.head_width_to_paper
maps our head widths onto the paper's Table 2e widths (our sweep is the paper's with widths divided by that
factor); table5 holds tokenbridge.repro.speed.TimingOptions; table3 (TokenBridge vs continuous MAR) names the
continuous model config and the speed and quality-vs-time settings (tokenbridge.repro.families); shipped the
generator and goals of `repro shipped`; d2c the D2C rows, stage-1 sampling, the VQ of the learned source and an
earlier d2c.json whose rows are reused; frontier the sampler toolbox's settings per shipped generator
(FRONTIER_SETTINGS), samples per class, sampling seeds, batch and the generators to run (``only``;
tokenbridge.repro.frontier).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from ..config import apply_overrides
from .speed import TimingOptions


def _timing(**options: Any) -> dict[str, Any]:
    """Every TimingOptions field (so that each can be overridden: ``table5.repeats=3``)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(TimingOptions(**options)).items()}


def _d2c(preset: str, steps: int, batch_size: int, codebook_size: int) -> dict[str, Any]:
    """The d2c section: D2C rows (Q-Former / cross-attention fusion on the training-free coarse quantizer source,
    Q-Former on a learned VQ, whose path `repro d2c` fills in after training it with `vq`), stage-1 sampling."""
    quantizer = {"kind": "quantizer", "levels": 4, "pool": 2}  # 4 levels x 4 channels of 2x2-pooled latents
    return {
        "rows": {"d2c-qformer": {"preset": preset, "source": quantizer, "stage2": {"fusion": {"kind": "qformer"}}},
                 "d2c-cross-attention": {"preset": preset, "source": quantizer,
                                         "stage2": {"fusion": {"kind": "cross_attention"}}},
                 "d2c-vq": {"preset": preset, "source": {"kind": "vq"}, "stage2": {"fusion": {"kind": "qformer"}}}},
        "stage1": {"stage1_cfg": 2.0, "stage1_temperature": 1.0},
        # an earlier d2c.json made under the same budget: its rows (same config, every training seed) are read
        # from it instead of trained again (tokenbridge.repro.d2c.earlier_rows)
        "earlier": None,
        "vq": {"steps": steps, "batch_size": batch_size, "config": {"codebook_size": codebook_size, "downsample": 2}},
    }


# the channel order is derived from each token file when training starts (paper Sec. 3.2)
_FREQUENCY = {"order": "frequency"}

# the sampler toolbox's settings per shipped generator (tokenbridge.repro.frontier); "paper" is today's sampler,
# the row every other setting of a family is held against
PAPER_SETTING = {"sampler": "paper"}
_TB_SETTINGS = {"paper": PAPER_SETTING, "interval": {"cfg_interval": [0.0, 0.5]},
                "interval+reuse": {"cfg_interval": [0.0, 0.5], "uncond_every": 2},
                "12 steps": {"num_iter": 12}, "12 steps+interval": {"num_iter": 12, "cfg_interval": [0.0, 0.5]},
                "8 steps": {"num_iter": 8}, "8 steps+interval": {"num_iter": 8, "cfg_interval": [0.0, 0.5]}}
_DDIM_ANNEAL = {"diffusion_sampler": "ddim", "num_sampling_steps": 25, "num_sampling_steps_end": 5}
_DIFFUSION_SETTINGS = {"paper": PAPER_SETTING, "disa 50-5": {"num_sampling_steps": 50, "num_sampling_steps_end": 5},
                       "ddim 25-5": _DDIM_ANNEAL,
                       "ddim 25-5+interval": {**_DDIM_ANNEAL, "cfg_interval": [0.0, 0.5]},
                       "ddim 25-5+interval+reuse": {**_DDIM_ANNEAL, "cfg_interval": [0.0, 0.5], "uncond_every": 2},
                       "8 steps+ddim 25-5+interval": {**_DDIM_ANNEAL, "num_iter": 8, "cfg_interval": [0.0, 0.5]}}
FRONTIER_SETTINGS = {"fmnist": _TB_SETTINGS,
                     "fmnist-mar": {**_DIFFUSION_SETTINGS, "8 steps+ddim 25-5": {**_DDIM_ANNEAL, "num_iter": 8}},
                     "fmnist-d2c": _DIFFUSION_SETTINGS,
                     # the causal TokenBridge generator (KV-cached raster backbone) at its recorded defaults
                     "fmnist-ar": {"defaults": {}}}
# the causal TokenBridge generator is a faster TokenBridge: held against TokenBridge's today
TODAY_OF = {"fmnist-ar": "fmnist"}

SCALES: dict[str, dict[str, Any]] = {
    "tiny": {
        "seed": 0,
        "train_seeds": [0, 1],
        "data": {"train_images": 256, "test_images": 64},
        "model": {"preset": "tiny", "head": _FREQUENCY},
        "train": {"steps": 2, "global_batch": 32, "lr": 1e-3, "min_lr": 0.0, "warmup_steps": 0, "ema": 0.9,
                  "grad_clip": 3.0, "ckpt_every": 0, "log_every": 1},
        "eval": {"per_class": 2, "num_iter": 4, "cfg": 3.0, "cfg_schedule": "linear", "temperature": 1.0,
                 "real_images": 64, "nll_images": 64, "nll_mask_ratio": 0.875, "batch_size": 64, "seed": None},
        "table1": {"images": 32, "fit_images": 32, "levels": [8, 64], "ranges": [3, 5]},
        "table2c": {"levels": [16, 64]},
        "table2d": {"levels": 16, "group_sizes": [1, 2]},
        "table2e": {"heads": [[8, 1], [16, 1]], "head_width_to_paper": 32},
        "table5": _timing(quick=True, repeats=1, warmup=0, budget=0.1, batches=[1], diffusion_steps=4, threads=1),
        "fig8": {"show_per_class": 1},
        "shipped": {"model": "fmnist", "per_class": 4, "weakest": 2, "recall_goal": 0.85, "fd_goal": 2.0},
        "d2c": _d2c("tiny", steps=4, batch_size=32, codebook_size=16),
        "edit": {"models": ["fmnist"], "per_class": 2, "keep": "left", "other": 1, "batch_size": 64},
        "table3": {"mar_model": {"preset": "tiny"}, "num_sampling_steps": 4, "clip_denoised": 5.0,
                   "num_iters": [2, 4], "diffusion_steps": [2], "speed_batch": 4, "speed_repeats": 1},
        "frontier": {"per_class": 2, "seeds": [0, 1], "speed_batch": 8, "b1_images": 2, "only": None,
                     "today_of": TODAY_OF,
                     "families": {"fmnist": {"paper": PAPER_SETTING, "interval": {"cfg_interval": [0.0, 0.5]}},
                                  "fmnist-ar": {"defaults": {}}}},
    },
    "small": {
        "seed": 0,
        # every generator row of Tables 2a-2e, Fig. 8 and Table 3 is trained once per seed (mean +- sd over them)
        "train_seeds": [0, 1, 2],
        "data": {"train_images": None, "test_images": None},  # None: the whole split (60,000 / 10,000)
        "model": {"preset": "fmnist", "head": _FREQUENCY},
        # 1,000 steps x 64 (issue 25: five times the first tables' 200 x 64): ~1.2 s per step for the default head
        # (64 x 2) as one of two one-thread jobs on 2 cores, ~20 min per training seed plus 1-4 min of evaluation;
        # Tables 2a-2e were run at 200 steps with 40 warm-up steps (their files' command lines).
        # EMA 0.995 is warmed up (tokenbridge.optim), so short runs evaluate trained weights
        "train": {"steps": 1000, "global_batch": 64, "lr": 1e-3, "min_lr": 1e-5, "warmup_steps": 100, "ema": 0.995,
                  "grad_clip": 3.0, "ckpt_every": 200, "log_every": 20},
        "eval": {"per_class": 50, "num_iter": 16, "cfg": 3.0, "cfg_schedule": "linear", "temperature": 1.0,
                 "real_images": 10000, "nll_images": 10000, "nll_mask_ratio": 0.875, "batch_size": 100, "seed": None},
        "table1": {"images": 10000, "fit_images": 2000, "levels": [8, 16, 32, 64], "ranges": [2, 3, 4, 5]},
        # what 3 seeds per row fit in one 2-core session: B = 32, g = 4 (one 65,536-way output per token, ~10 s per
        # step) and the middle head sizes are left out; `--scale paper` and overrides run the full sweeps
        "table2c": {"levels": [16, 64]},
        "table2d": {"levels": 16, "group_sizes": [1, 2]},
        # the paper's smallest and 4th sizes / 8 (256 x 3 -> 32 x 3, 1024 x 4 -> 128 x 4)
        "table2e": {"heads": [[32, 3], [128, 4]], "head_width_to_paper": 8},
        "table5": _timing(quick=True),
        "fig8": {"show_per_class": 2},
        # D2C vs TokenBridge vs MAR at the Table 3 budget; the D2C fmnist preset totals ~2.95M parameters like theirs
        "d2c": _d2c("fmnist", steps=500, batch_size=256, codebook_size=256),
        # the goals: recall >= 0.85 x real test images', FD <= 1.5 x the VAE reconstructions' (the floor)
        "shipped": {"model": "fmnist", "per_class": 100, "weakest": 3, "recall_goal": 0.85, "fd_goal": 1.5},
        # every shipped family regenerates the right half of 1,000 test images (issue 24)
        "edit": {"models": ["fmnist", "fmnist-mar", "fmnist-d2c"], "per_class": 100, "keep": "left", "other": 1,
                 "batch_size": 250},
        # the TokenBridge generator's fmnist backbone with a 128 x 3 diffusion head (as the shipped pair)
        # clip_denoised: the predicted x0 clamped at +-5 (unit-variance latents); unclipped, the 100-step sampler of
        # these short runs diverges (tokenbridge.diffusion.DiffusionHead.sample)
        "table3": {"mar_model": {"preset": "fmnist"}, "num_sampling_steps": 100, "clip_denoised": 5.0,
                   "num_iters": [4, 8, 16], "diffusion_steps": [25, 50], "speed_batch": 64, "speed_repeats": 3},
        # >= 1,000 samples and 2 sampling seeds per setting (issue 27)
        "frontier": {"per_class": 100, "seeds": [0, 1], "speed_batch": 64, "b1_images": 10, "only": None,
                     "today_of": TODAY_OF,
                     "families": FRONTIER_SETTINGS},
    },
    "paper": {
        "seed": 0,
        "train_seeds": [0, 1, 2],
        "data": {"train_images": None, "test_images": None},
        # TokenBridge-L (MAR-L backbone, head 1024 x 4, 8 heads); grid, channels and classes from the token file
        "model": {"preset": "tokenbridge-l", "grid_size": None, "channels": None, "num_classes": None,
                  "head": _FREQUENCY},
        # batch 2048, blr 1e-4 -> lr 8e-4, ~400 epochs of Fashion-MNIST (the paper: 800 epochs of ImageNet)
        "train": {"steps": 12000, "global_batch": 2048, "lr": None, "blr": 1e-4, "min_lr": 0.0, "warmup_steps": 1000,
                  "ema": 0.9999, "grad_clip": 1.0, "bf16": True, "ckpt_every": 1000, "log_every": 50},
        "eval": {"per_class": 1000, "num_iter": 64, "cfg": 3.1, "cfg_schedule": "linear", "temperature": 0.97,
                 "real_images": 10000, "nll_images": 10000, "nll_mask_ratio": 0.875, "batch_size": 500, "seed": None},
        "table1": {"images": 10000, "fit_images": 10000, "levels": [8, 16, 32, 64], "ranges": [2, 3, 4, 5]},
        "table2c": {"levels": [16, 32, 64]},
        "table2d": {"levels": 16, "group_sizes": [1, 2, 4]},
        "table2e": {"heads": [[256, 3], [512, 3], [512, 4], [1024, 4], [1024, 6]], "head_width_to_paper": 1},
        "table5": _timing(),  # the paper's L sizes: AR head 1024 x 4, diffusion head 1024 x 3, 100 steps
        "fig8": {"show_per_class": 2},
        "shipped": {"model": "fmnist", "per_class": 100, "weakest": 3, "recall_goal": 0.85, "fd_goal": 1.5},
        "d2c": _d2c("fmnist", steps=2000, batch_size=256, codebook_size=256),
        "edit": {"models": ["fmnist", "fmnist-mar", "fmnist-d2c"], "per_class": 100, "keep": "left", "other": 1,
                 "batch_size": 250},
        "table3": {"num_sampling_steps": 100, "clip_denoised": None, "num_iters": [16, 64, 256],
                   "mar_model": {"preset": "mar-l", "grid_size": None, "channels": None, "num_classes": None},
                   "diffusion_steps": [25, 50], "speed_batch": 64, "speed_repeats": 5},
        "frontier": {"per_class": 1000, "seeds": [0, 1], "speed_batch": 64, "b1_images": 10, "only": None,
                     "today_of": TODAY_OF,
                     "families": FRONTIER_SETTINGS},
    },
}
# Sections whose keys are checked downstream (the generator family, train.train): overrides may add keys there.
_OPEN_SECTIONS = ("model", "train")


def resolve_budget(scale: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """A copy of the budget of `scale` with dotted overrides applied (values parsed as YAML); an unknown key
    outside model/train raises ValueError."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose from {sorted(SCALES)}")
    budget = copy.deepcopy(SCALES[scale])
    for item in overrides:
        parts = item.split("=", 1)[0].strip().split(".")
        node: Any = budget
        for depth, part in enumerate(parts):
            if parts[0] in _OPEN_SECTIONS and depth > 0:
                break
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"override {item!r}: no budget key {'.'.join(parts[:depth + 1])!r} in scale "
                                 f"{scale!r}; top-level keys: {sorted(budget)}")
            node = node[part]
    return apply_overrides(budget, list(overrides))
