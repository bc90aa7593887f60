"""`tokenbridge repro d2c`: D2C (discrete coarse tokens, then continuous fine ones; arXiv 2503.17155) against
TokenBridge and continuous MAR at the same data, training budget and about the same parameters.

Rows: the budget's ``d2c.rows`` (D2C with the Q-Former and the cross-attention fusion on the training-free coarse
quantizer source, and the Q-Former on a learned VQ source), then TokenBridge and continuous MAR exactly as in
Table 3 (the same runs: `repro all` trains them once). Every row is trained with each of the budget's
``train_seeds`` and scored like Table 3 (FD_cls, k-NN precision / recall, class accuracy: mean +- sd over the
seeds); images/s are measured in this process with the rows alternating; the plot puts FD_cls against the number
of sequential sampling steps (D2C: the GPT's one step per code, then the MAR steps) and against time, on the
seed-0 generators. The VQ of the "vq" source is trained once (seed 0) on the same training latents: it is part of
the data pipeline, not of the compared generator.
"""
from __future__ import annotations

import copy
from pathlib import Path

from ..markdown import markdown_table
from ..training.vq import token_latents, train_vq
from .families import (FAMILIES, evaluate_family, plot_quality_vs_time, quality_vs_time, sampling_options,
                       sampling_speed)
from .runs import Context, _write_json, count_params, short_hash, token_file
from .stats import pm, verdict

METRICS = ("fd_cls", "precision", "recall", "class_accuracy")
LABELS = {"d2c-qformer": "D2C, Q-Former fusion", "d2c-cross-attention": "D2C, cross-attention fusion",
          "d2c-vq": "D2C, Q-Former, learned VQ source", **FAMILIES}


def vq_folder(ctx: Context) -> Path:
    """The VQ tokenizer of the budget's d2c.vq settings on the training latents, trained once into work_dir."""
    v = ctx.budget["d2c"]["vq"]
    tokens = token_file(ctx, ctx.budget["model"], "train")
    folder = ctx.work_dir / f"vq-{short_hash({'vq': v, 'tokens': tokens.name})}"
    if not (folder / "config.json").is_file():
        train, test, _ = token_latents(tokens)
        train_vq(train, test, config=v["config"], steps=v["steps"], batch_size=v["batch_size"], seed=0,
                 out_dir=folder, progress=False, device=ctx.device, record={"tokens": str(tokens)})
    return folder


def _resolve_rows(ctx: Context) -> None:
    """Point every row whose source is ``{kind: vq}`` without a path at the trained VQ of vq_folder."""
    for cfg in ctx.budget["d2c"]["rows"].values():
        source = cfg.get("source") or {}
        if source.get("kind") == "vq" and not source.get("path"):
            cfg["source"] = {**source, "path": str(vq_folder(ctx))}


def d2c(ctx: Context) -> str:
    ctx.budget["d2c"] = copy.deepcopy(ctx.budget["d2c"])
    _resolve_rows(ctx)
    names = [*ctx.budget["d2c"]["rows"], *FAMILIES]
    runs = {n: [evaluate_family(ctx, n, s) for s in ctx.budget["train_seeds"]] for n in names}
    first = {n: runs[n][0].model for n in names}
    t3 = ctx.budget["table3"]
    options = {n: sampling_options(ctx, first[n].family) for n in names}
    speed = sampling_speed(ctx, first, options, t3["speed_batch"], t3["speed_repeats"])
    rows = [[LABELS.get(n, n), f"{count_params(first[n]) / 1e6:.2f}M"]
            + [pm([r.metrics[m] for r in runs[n]], 2 if m == "fd_cls" else 3) for m in METRICS]
            + [f"{speed[n]:.1f}"] for n in names]
    table = markdown_table(["row", "params", "FD_cls", "precision", "recall", "class acc.",
                            f"images/s (batch {t3['speed_batch']})"], rows)
    points = quality_vs_time(ctx, first, diffusion_steps=False)
    plot_quality_vs_time(points, ctx.out_dir / "d2c.png", LABELS)
    plot_quality_vs_time(points, ctx.out_dir / "d2c_steps.png", LABELS, x="steps")
    _write_json(ctx.out_dir / "d2c.json", {
        "runs": [{"row": n, "seed": r.seed, "train": r.train, "metrics": r.metrics} for n in names for r in runs[n]],
        "images_s": speed, "options": options, "rows": ctx.budget["d2c"]["rows"], "quality_vs_steps": points})
    e, t = ctx.budget["eval"], ctx.budget["train"]
    ctx.notes += [
        f"Training seeds {ctx.budget['train_seeds']} per row, {t['steps']} steps at batch {t['global_batch']} "
        f"each (the Table 3 budget); mean +- sd over the seeds. {10 * e['per_class']} samples per generator, "
        f"num_iter {e['num_iter']}, cfg {e['cfg']} ({e['cfg_schedule']}), temperature {e['temperature']}; diffusion "
        f"head {t3['num_sampling_steps']} steps, x0 clipped at {t3['clip_denoised']}; D2C stage 1: "
        f"{ctx.budget['d2c']['stage1']}.",
        f"D2C rows (model configs): {ctx.budget['d2c']['rows']}.",
        "A difference is called real only where the two means differ by more than the sum of their sds:",
        *[f"  - {verdict(m, LABELS[d], [r.metrics[m] for r in runs[d]], LABELS[b], [r.metrics[m] for r in runs[b]])}"
          for d in ctx.budget["d2c"]["rows"] for b in FAMILIES for m in ("fd_cls", "recall")],
        "Plots: `d2c.png` (FD_cls against sampling time per image), `d2c_steps.png` (against sequential steps); "
        "per-seed values and the points: `d2c.json`.",
    ]
    return table
