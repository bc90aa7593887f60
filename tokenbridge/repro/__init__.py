"""`tokenbridge repro NAME`: the paper's tables and Fig. 8 at a stated budget, one markdown table + one PNG each.

    run_repro("table2a", out_dir="docs/results", scale="small", overrides=["train.steps=400"])

Every table writes ``<out_dir>/<name>.md`` (our numbers next to the paper's, the exact command, the budget, parameter
counts, wall time, seed) and ``<out_dir>/<name>.png``, prints the table and returns it.

- budgets: ``SCALES`` (tiny: tests; small: 2 CPU cores; paper: TokenBridge-L sizes, GPUs) and `resolve_budget`;
  ``overrides`` are dotted ``key=value`` edits of the chosen budget (``train.steps=2000``,
  ``model.backbone.width=256``, ``eval.per_class=500``, ``table2e.heads=[[64,2],[128,4]]``, ``table5.repeats=3``);
  values are parsed as YAML;
- runs: token caches, training (tokenbridge.train.train) and evaluation of generator variants, reused from
  ``work_dir`` (default runs/repro) when their config matches, so ``all`` trains the shared baseline once; delete
  ``work_dir`` to start over;
- tables: table1 .. table2e, table5 (which times the heads with `speed.time_heads`) and fig8; table3 (families.py):
  TokenBridge vs continuous MAR, several training seeds; shipped (shipped.py): the shipped generator's coverage
  against real test images and the VAE floor; d2c (d2c.py): D2C with both fusion modules vs TokenBridge vs MAR;
- speed: the head timing of Table 5, also run by ``python benchmarks/heads.py``.

Our numbers are Fashion-MNIST classifier metrics; the paper's are ImageNet 256x256 Inception FID. Compare the
ordering of the variants, never the values.
"""
from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..files import write_text
from .budgets import SCALES, resolve_budget
from .runs import Context, Resources, Variant, VariantResult, heldout_nll, run_variant
from . import shipped
from .tables import PAPER, TABLES, TITLES

REPRO_NAMES = ("table1", "table2a", "table2b", "table2c", "table2d", "table2e", "table5", "fig8", "table3", "shipped", "d2c",
               "frontier")

__all__ = ["PAPER", "REPRO_NAMES", "SCALES", "TABLES", "TITLES", "Context", "Resources", "Variant", "VariantResult",
           "heldout_nll", "resolve_budget", "run_repro", "run_variant"]


def _write_markdown(ctx: Context, table: str, wall_s: float) -> Path:
    lines = [f"# {TITLES[ctx.name]}", "", table, ""]
    lines += [f"- {n}" if not n.startswith("  ") else n for n in ctx.notes]
    lines += [
        "",
        f"- Command: `{ctx.command()}`",
        f"- Scale `{ctx.scale}`, seed {ctx.seed}, device {ctx.device}, torch threads {torch.get_num_threads()}; "
        f"wall time of this command {wall_s:.0f} s ({wall_s / 60:.1f} min; reused runs and token caches in "
        f"`{ctx.work_dir}` are not counted again).",
        f"- Plot: `{ctx.name}.png`",
        "",
    ]
    path = ctx.out_dir / f"{ctx.name}.md"
    write_text(path, "\n".join(lines))
    return path


def run_repro(name: str, out_dir: str | os.PathLike = "docs/results", scale: str = "small",
              overrides: Sequence[str] = (), device: str = "cpu", work_dir: str | os.PathLike = "runs/repro",
              resources: Resources | None = None) -> str:
    """Run one reproduction (a name in REPRO_NAMES, or "all"), write `<out_dir>/<name>.md` and `.png`, print and
    return the markdown table (for "all": every table, each under a `## name` heading).

    scale: a key of SCALES; overrides: dotted `key=value` edits of that budget; work_dir: token caches and trained
    variants (reused when their config matches); resources: VAE / classifier / data / generator (default: shipped).
    """
    names = list(REPRO_NAMES) if name == "all" else [name]
    if any(n not in TABLES for n in names):
        raise ValueError(f"unknown repro name {name!r}; choose from {', '.join(REPRO_NAMES)} or all")
    budget = resolve_budget(scale, tuple(overrides))
    resources = resources or Resources(device=device)
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    tables = []
    for n in names:
        ctx = Context(n, scale, tuple(overrides), copy.deepcopy(budget), out_dir, work_dir, str(device), resources)
        start = time.time()
        table = TABLES[n](ctx)
        path = _write_markdown(ctx, table, time.time() - start)
        print(f"{TITLES[n]}\n\n{table}\n\nwrote {path} and {out_dir / (n + '.png')}\n", flush=True)
        tables.append(table if name != "all" else f"## {n}\n\n{table}")
    return "\n\n".join(tables)
