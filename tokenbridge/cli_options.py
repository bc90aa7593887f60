"""What the command line's parser needs to know about the library, as plain constants (no torch import).

`tokenbridge --help` must answer before torch, scipy and the generators are imported, so the parser cannot ask the
families' ``sample()`` signatures for their options. The tables here copy them; tests/test_cli_ux.py checks that
they equal the library's (the signature defaults of every registered family, the shipped generators' recorded
sampling options, the repro names and scales), so a change in the library that is not made here fails a test.
"""
from __future__ import annotations

from typing import Any, NamedTuple

VERSION = "0.1.0"  # = pyproject.toml's version and tokenbridge.__version__ (tests/test_cli_ux.py checks both)


class SamplingOption(NamedTuple):
    """One sampling option: its argparse type (bool: --x/--no-x; "pair": two floats), its choices, its default in
    each family that has it (the family's ``sample()`` signature default), its help text and, for a default of
    None, what None means."""
    kind: Any
    choices: tuple[str, ...] | None
    defaults: dict[str, Any]
    help: str
    unset: str = ""


_MASKED = ("tokenbridge", "mar", "d2c")  # the MAR-style families (masked generation over a random order)
_ALL = ("tokenbridge", "mar", "d2c", "tokenbridge-ar")
_DIFFUSION = ("mar", "d2c")  # a diffusion head per token


def _same(families: tuple[str, ...], value: Any) -> dict[str, Any]:
    return {f: value for f in families}


SAMPLING_OPTIONS: dict[str, SamplingOption] = {
    "cfg": SamplingOption(float, None, _same(_ALL, 1.0), "classifier-free guidance scale (1 = no guidance)"),
    "cfg_schedule": SamplingOption(str, ("linear", "constant"), _same(_ALL, "linear"),
                                   "guidance scale over the steps: rising linearly to cfg, or cfg throughout"),
    "temperature": SamplingOption(float, None, _same(_ALL, 1.0),
                                  "sampling temperature (diffusion families: the scale of the DDPM noise)"),
    "num_iter": SamplingOption(int, None, _same(_MASKED, 64), "masked-generation (MAR) steps, capped at the "
                                                              "number of tokens"),
    "sorted_positions": SamplingOption(bool, None, _same(_MASKED, False), "each step's positions reach the head in "
                                       "ascending order, as the released samplers (converted checkpoints record it)"),
    "sampler": SamplingOption(str, ("toolbox", "paper"), _same(_MASKED, "toolbox"),
                              "'paper': today's sampler (the toolbox options such as --cfg-interval ignored; "
                              "fmnist-mar and fmnist-d2c: the defaults they recorded before, 100 DDPM steps, "
                              "16 MAR steps)"),
    "cfg_interval": SamplingOption("pair", None, _same(_MASKED, None),
                                   "guide only the steps whose mask ratio lies in [LO, HI]", "every step"),
    "uncond_every": SamplingOption(int, None, _same(_MASKED, 1),
                                   "recompute the unconditional features every N guided steps (reuse in between)"),
    "top_k": SamplingOption(int, None, _same(("tokenbridge", "tokenbridge-ar"), 0),
                            "keep the k most likely token values (0 = off)"),
    "top_p": SamplingOption(float, None, _same(("tokenbridge", "tokenbridge-ar"), 1.0),
                            "nucleus sampling: keep the most likely values up to this mass (1 = off)"),
    "order": SamplingOption(str, ("random", "confidence"), {"tokenbridge": "random"},
                            "which positions each step fills: a random order, or the most confident first"),
    "cfg_mix": SamplingOption(str, ("logits", "z"), {"tokenbridge": "logits"},
                              "guide the head's logits, or the backbone's features before the head (released code)"),
    "num_sampling_steps": SamplingOption(int, None, _same(_DIFFUSION, 100), "diffusion (DDPM) steps per token"),
    "clip_denoised": SamplingOption(float, None, _same(_DIFFUSION, None),
                                    "clamp the predicted clean token to +-this bound at every diffusion step",
                                    "unclipped"),
    "released_cfg": SamplingOption(bool, None, _same(_DIFFUSION, False),
                                   "the released MAR sampler's last-step guidance scale 1 + (cfg - 1)(L - 1)/L"),
    "num_sampling_steps_end": SamplingOption(int, None, _same(_DIFFUSION, None),
                                             "anneal the diffusion steps to this count at the last MAR step (DiSA)",
                                             "no annealing"),
    "sampling_steps_anneal": SamplingOption(str, ("linear", "cosine"), _same(_DIFFUSION, "linear"),
                                            "how the diffusion steps move to --num-sampling-steps-end"),
    "diffusion_sampler": SamplingOption(str, ("ddpm", "ddim"), _same(_DIFFUSION, "ddpm"),
                                        "the per-token diffusion sampler (ddim: eta 0)"),
    "stage1_cfg": SamplingOption(float, None, {"d2c": 1.0}, "stage 1 (coarse codes) guidance scale, constant"),
    "stage1_temperature": SamplingOption(float, None, {"d2c": 1.0}, "stage 1 temperature (> 0)"),
    "stage1_top_k": SamplingOption(int, None, {"d2c": 0}, "stage 1 top-k (0 = off)"),
    "stage1_top_p": SamplingOption(float, None, {"d2c": 1.0}, "stage 1 nucleus mass (1 = off)"),
}

# The argument groups of `sample --help` / `edit --help`: (title, families); an option goes in the first group
# whose families are exactly the families that have it.
SAMPLING_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("sampling, every family", _ALL),
    ("sampling, MAR-style families (tokenbridge, mar, d2c)", _MASKED),
    ("sampling, discrete-token families (tokenbridge, tokenbridge-ar)", ("tokenbridge", "tokenbridge-ar")),
    ("sampling, tokenbridge family", ("tokenbridge",)),
    ("sampling, diffusion-head families (mar, d2c)", _DIFFUSION),
    ("sampling, d2c family: stage 1 (the coarse-code GPT)", ("d2c",)),
)

# The sampling options each shipped generator records (they win over the signature defaults above): the fastest
# setting of `repro frontier` that kept FD and recall within today's sampling-seed spread (docs/speed.md), and,
# where that moved them, today's as the record of `--sampler paper` (SHIPPED_PAPER_SAMPLING).
# (fmnist-mar and fmnist-d2c, retrained in issue 25, record only what their config's `sample` section gives.)
_PAPER_MAR = {"num_iter": 16, "cfg": 3.0, "clip_denoised": 5.0}
_DDIM_25_5 = {"num_sampling_steps": 25, "num_sampling_steps_end": 5, "diffusion_sampler": "ddim"}
SHIPPED_PAPER_SAMPLING: dict[str, dict[str, Any]] = {
    "fmnist-mar": _PAPER_MAR,
    "fmnist-d2c": {"stage1_cfg": 2.0, **_PAPER_MAR},
}
SHIPPED_SAMPLING: dict[str, dict[str, Any]] = {
    "fmnist": {"num_iter": 16, "cfg": 3.0, "cfg_schedule": "linear"},
    "fmnist-mar": {**_PAPER_MAR, **_DDIM_25_5, "num_iter": 8},
    "fmnist-d2c": {**SHIPPED_PAPER_SAMPLING["fmnist-d2c"], **_DDIM_25_5, "num_iter": 8, "cfg_interval": [0.0, 0.5]},
    "fmnist-ar": {"cfg": 3.0},
}
SHIPPED_FAMILY = {"fmnist": "tokenbridge", "fmnist-mar": "mar", "fmnist-d2c": "d2c", "fmnist-ar": "tokenbridge-ar"}

# tokenbridge.repro: REPRO_NAMES (in order) and the keys of SCALES; the folder `repro` writes into by default
REPRO_NAMES = ("table1", "table2a", "table2b", "table2c", "table2d", "table2e", "table5", "fig8", "table3",
               "shipped", "d2c", "frontier", "edit")
REPRO_SCALES = ("tiny", "small", "paper")
REPRO_OUT = "runs/repro-results"


def option_help(name: str) -> str:
    """The help line of sampling option ``name``: what it does, then its family default(s) and the shipped
    generators' recorded values (what `sample` really uses when the option is left out)."""
    option = SAMPLING_OPTIONS[name]
    values = {option.unset if v is None else repr(v) for v in option.defaults.values()}
    family = (f"default {values.pop()}" if len(values) == 1 else
              "defaults " + ", ".join(f"{f} {option.unset if v is None else repr(v)}"
                                      for f, v in option.defaults.items()))
    shipped = [f"{g} {record[name]!r}" for g, record in SHIPPED_SAMPLING.items() if name in record]
    recorded = f"; recorded: {', '.join(shipped)}" if shipped else ""
    return f"{option.help} ({family}{recorded})".replace("%", "%%")


# The defaults the library applies when an option is left out (the functions each command calls hold them; the
# parser passes only what was given). Shown in --help; tests/test_cli_ux.py checks them against the signatures.
LIBRARY_DEFAULTS: dict[str, dict[str, Any]] = {
    "train-vae": {"steps": 1400, "batch_size": 64, "lr": 0.002, "kl_weight": 0.002, "seed": 0},
    "train-vq": {"steps": 2000, "batch_size": 256, "lr": 0.002, "seed": 0, "codebook_size": 256, "dim": 32,
                 "downsample": 2},
    "train-classifier": {"epochs": 4, "batch_size": 128, "lr": 0.003, "seed": 0, "threads": 2},
    "generate": {"seed": 0, "batch_size": 256},  # sample and edit
    "reconstruct": {"batch_size": 256},
    "demo-ui": {"max_images": 16},
    "repro": {"scale": "small"},
    "data": {"split": "train", "resolution": 32, "channels": 3, "encode_batch": 256},  # DataConfig (cache-latents)
    "quantizer": {"levels": 64, "value_range": (-5.0, 5.0), "std_range": 3.0, "kind": "gaussian"},
}
QUANTIZER_KINDS = ("gaussian", "uniform")
