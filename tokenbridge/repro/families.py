"""`tokenbridge repro table3`: TokenBridge vs continuous MAR (diffusion loss) at equal backbone, data and training
steps: the paper's headline claim at small scale.

Every (family, training seed) pair is trained with the budget's train section on the same cached train split (the
TokenBridge generator on its indices, continuous MAR on the latents of the same file), then scored on
``eval.per_class`` samples per class with the classifier metrics against the test split (FD_cls, k-NN precision
and recall, class accuracy). Rows give mean +- sd over the training seeds; a difference is called real only where
it exceeds the sum of the two sds. The time columns are measured in this process, families alternating: seconds
per training step (forward, backward, AdamW at the training batch) and end-to-end sampling images/s (sampling +
VAE decode of ``table3.speed_batch`` images), each the median of ``table3.speed_repeats`` rounds. The plot puts
quality against sampling time as num_iter (both families) and the diffusion steps (continuous MAR) vary, on the
seed-0 generators.
"""
from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import load_generator, training_trajectory
from ..classifier import classifier_metrics
from ..generate import generate
from ..markdown import markdown_table
from ..tokens import CachedTokens
from .plots import plot_trajectories, pyplot, save_figure
from .stats import pm, verdict
from .runs import (DEFAULT_LABEL, Context, _write_json, class_labels, count_params, short_hash, token_file, train_once,
                   train_variant, variant_model_config)

FAMILIES = {"tokenbridge": "TokenBridge (AR head)", "mar": "continuous MAR (diffusion head)"}
METRICS = ("fd_cls", "precision", "recall", "class_accuracy")


@dataclass
class FamilyRun:
    family: str
    seed: int
    run_dir: Path
    model: nn.Module
    train: dict  # elapsed_s, step, loss, s_per_step
    metrics: dict  # fd_cls, precision, recall, class_accuracy, is_cls


def row_config(ctx: Context, name: str) -> tuple[str, dict]:
    """(family, model config) of a compared row: "tokenbridge" (the budget's model), "mar" (table3.mar_model) or a
    D2C row (a key of d2c.rows, tokenbridge.repro.d2c)."""
    if name == "tokenbridge":
        return name, variant_model_config(ctx.budget["model"], {})
    if name == "mar":
        return name, ctx.budget["table3"]["mar_model"]
    return "d2c", ctx.budget["d2c"]["rows"][name]


def train_family(ctx: Context, name: str, seed: int) -> tuple[Path, dict]:
    """Train (or reuse a finished run of the same configuration) one row at one training seed; the TokenBridge
    runs are the Table 2 ablations' default variant, so `repro all` trains them once."""
    family, model_cfg = row_config(ctx, name)
    if family == "tokenbridge":
        return train_variant(ctx, model_cfg, DEFAULT_LABEL, seed)
    train_cfg = {k: v for k, v in ctx.budget["train"].items() if k != "device"}
    tokens = token_file(ctx, ctx.budget["model"], "train")  # indices and latents of the same images
    config = {"seed": seed, "family": family, "data": {"source": "tokens", "tokens": str(tokens)},
              "model": model_cfg, "train": train_cfg}
    run_dir = ctx.work_dir / "runs" / f"table3-{name}-seed{seed}-{short_hash({**config, 'data': tokens.name})}"
    return run_dir, train_once(ctx, config, run_dir)


def sampling_options(ctx: Context, family: str, num_iter: int | None = None, steps: int | None = None) -> dict:
    """A family's sampling options at the eval settings (num_iter / diffusion steps overridable): the diffusion
    sampler's from table3, D2C's stage-1 options from d2c.stage1."""
    e = ctx.budget["eval"]
    options = {"num_iter": num_iter or e["num_iter"], "cfg": e["cfg"], "cfg_schedule": e["cfg_schedule"],
               "temperature": e["temperature"]}
    if family in ("mar", "d2c"):
        options["num_sampling_steps"] = steps or ctx.budget["table3"]["num_sampling_steps"]
        options["clip_denoised"] = ctx.budget["table3"]["clip_denoised"]
    if family == "d2c":
        options.update(ctx.budget["d2c"]["stage1"])
    return options


def score(ctx: Context, model: nn.Module, options: dict, per_class: int) -> dict[str, float]:
    """Classifier metrics of ``per_class`` samples per class with sampling ``options``."""
    e = ctx.budget["eval"]
    labels = class_labels(per_class)
    result = generate(model, labels.tolist(), vae=ctx.res.vae, seed=ctx.eval_seed, device=ctx.device,
                      batch_size=e["batch_size"], **options)
    return classifier_metrics(result["images"], labels, real_images=ctx.res.images("test", e["real_images"]),
                              classifier=ctx.res.classifier, device=ctx.device)


def evaluate_family(ctx: Context, name: str, seed: int) -> FamilyRun:
    """Train (or reuse) one row at one training seed and score it at the eval settings (cached in its run)."""
    run_dir, info = train_family(ctx, name, seed)
    family = row_config(ctx, name)[0]
    model = load_generator(run_dir / "checkpoint.pt", device=ctx.device, family=family)
    options = sampling_options(ctx, family)
    settings = {"eval": ctx.budget["eval"], "table3": {k: options[k] for k in ("num_sampling_steps", "clip_denoised")
                                                       if k in options}}
    if family == "d2c":
        settings["d2c"] = ctx.budget["d2c"]["stage1"]
    path = run_dir / f"repro_eval_{short_hash({**settings, 'classifier': ctx.res.fingerprint('classifier')})}.json"
    metrics = json.loads(path.read_text()) if path.is_file() else None
    if metrics is None:
        metrics = score(ctx, model, options, ctx.budget["eval"]["per_class"])
        _write_json(path, metrics)
    return FamilyRun(name, seed, run_dir, model, info, metrics)


def sampling_speed(ctx: Context, models: dict[str, nn.Module], options: dict[str, dict], batch: int,
                   repeats: int) -> dict[str, float]:
    """End-to-end images/s per row (median of ``repeats``, rows alternating, one warm-up call each)."""
    labels = [i % 10 for i in range(batch)]
    times: dict[str, list[float]] = {f: [] for f in models}
    for r in range(repeats + 1):
        for name, model in models.items():
            start = time.perf_counter()
            generate(model, labels, vae=ctx.res.vae, seed=r, device=ctx.device, **options[name])
            if r:  # the first round is the warm-up
                times[name].append(time.perf_counter() - start)
    return {f: batch / statistics.median(t) for f, t in times.items()}


def step_times(ctx: Context, models: dict[str, nn.Module], repeats: int, steps: int = 3) -> dict[str, float]:
    """Seconds per training step (forward, backward, AdamW) of each family on the same training images at the
    budget's batch, median of ``repeats`` rounds of ``steps`` steps, families alternating: measured here rather than
    read from the training logs, whose runs met different machine load."""
    tokens = CachedTokens(token_file(ctx, ctx.budget["model"], "train"))
    batch = int(ctx.budget["train"]["global_batch"])
    latents = tokens.latents[:batch].float().permute(0, 2, 3, 1).contiguous()  # [B, h, w, C], as LatentTokens
    inputs = {"tokenbridge": tokens.indices[:batch].long(), "mar": latents}
    labels = tokens.labels[:batch]
    times: dict[str, list[float]] = {f: [] for f in models}
    trainees = {f: copy.deepcopy(m).train() for f, m in models.items()}
    optims = {f: torch.optim.AdamW(m.parameters(), lr=1e-4, foreach=True) for f, m in trainees.items()}
    for r in range(repeats + 1):
        for family, model in trainees.items():
            start = time.perf_counter()
            for _ in range(steps):
                loss = model.loss((inputs[family].to(ctx.device), labels.to(ctx.device)))
                optims[family].zero_grad(set_to_none=True)
                loss.backward()
                optims[family].step()
            if r:  # the first round is the warm-up
                times[family].append((time.perf_counter() - start) / steps)
    return {f: statistics.median(t) for f, t in times.items()}


def _verdicts(runs: dict[str, list[FamilyRun]]) -> list[str]:
    """One line per metric: which family is ahead, and whether the gap exceeds the sum of the two sds."""
    return [verdict(m, "TokenBridge", [r.metrics[m] for r in runs["tokenbridge"]], "continuous MAR",
                    [r.metrics[m] for r in runs["mar"]]) for m in METRICS]


def quality_vs_time(ctx: Context, models: dict[str, nn.Module], diffusion_steps: bool = True) -> list[dict]:
    """FD_cls and images/s of the seed-0 generators as num_iter (and, for "mar", the diffusion steps) vary."""
    t3, points = ctx.budget["table3"], []
    per_class = max(2, ctx.budget["eval"]["per_class"] // 2)
    settings = [(name, {"num_iter": n}) for name in models for n in t3["num_iters"]]
    if diffusion_steps and "mar" in models:
        settings += [("mar", {"num_iter": max(t3["num_iters"]), "steps": s}) for s in t3["diffusion_steps"]]
    for name, sizes in settings:
        options = sampling_options(ctx, row_config(ctx, name)[0], sizes["num_iter"], sizes.get("steps"))
        fd = score(ctx, models[name], options, per_class)["fd_cls"]
        speed = sampling_speed(ctx, {name: models[name]}, {name: options}, t3["speed_batch"], 1)[name]
        stage1 = getattr(getattr(models[name], "stage1", None), "seq_len", 0)  # D2C: the GPT's steps come first
        points.append({"family": name, **sizes, "fd_cls": fd, "images_s": speed,
                       "sequential_steps": sizes["num_iter"] + stage1})
    return points


def plot_quality_vs_time(points: list[dict[str, Any]], path: Path, labels: dict[str, str] = FAMILIES,
                         x: str = "time") -> None:
    """FD_cls against sampling time per image (x="time") or the number of sequential sampling steps (x="steps"),
    one curve per row (and per varied setting)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for k, family in enumerate(dict.fromkeys(p["family"] for p in points)):
        for vary in ("num_iter", "steps"):
            pts = [p for p in points if p["family"] == family and (("steps" in p) == (vary == "steps"))]
            if not pts:
                continue
            xs = [1.0 / p["images_s"] * 1000 if x == "time" else p["sequential_steps"] for p in pts]
            ys = [p["fd_cls"] for p in pts]
            label = f"{labels.get(family, family)}, {'diffusion steps' if vary == 'steps' else 'num_iter'} varied"
            marker = "osD^v<>"[k % 7]
            ax.plot(xs, ys, marker=marker, linestyle="-" if vary == "num_iter" else "--", label=label)
            for x, y, p in zip(xs, ys, pts):
                ax.annotate(str(p.get("steps", p["num_iter"])), (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("sampling time per image (ms, end to end, batch as in the table)" if x == "time" else
                  "sequential sampling steps (D2C: the GPT's steps + the MAR steps)")
    ax.set_ylabel("FD_cls (lower is better)")
    ax.legend(fontsize=7)
    ax.set_title(f"Quality against sampling {'time' if x == 'time' else 'steps'} (seed-0 generators)")
    fig.tight_layout()
    save_figure(fig, path)


def table3(ctx: Context) -> str:
    t3 = ctx.budget["table3"]
    runs = {f: [evaluate_family(ctx, f, s) for s in ctx.budget["train_seeds"]] for f in FAMILIES}
    first = {f: runs[f][0].model for f in FAMILIES}
    options = {f: sampling_options(ctx, f) for f in FAMILIES}
    speed = [sampling_speed(ctx, first, options, t3["speed_batch"], t3["speed_repeats"])]
    step_s = step_times(ctx, first, t3["speed_repeats"])
    rows = []
    for f, label in FAMILIES.items():
        rs = runs[f]
        rows.append([label, f"{count_params(rs[0].model) / 1e6:.2f}M", f"{count_params(rs[0].model.head) / 1e6:.2f}M",
                     f"{step_s[f]:.3f}"]
                    + [pm([r.metrics[m] for r in rs], 2 if m == "fd_cls" else 3) for m in METRICS]
                    + [f"{speed[0][f]:.1f}"])
    table = markdown_table(["family", "params", "head", "train s/step", "FD_cls", "precision", "recall",
                            "class acc.", f"images/s (batch {t3['speed_batch']})"], rows)
    points = quality_vs_time(ctx, first)
    plot_quality_vs_time(points, ctx.out_dir / "table3.png")
    records = [{"family": r.family, "seed": r.seed, "train": r.train, "metrics": r.metrics,
                "trajectory": training_trajectory(r.run_dir)} for f in FAMILIES for r in runs[f]]
    plot_trajectories(records, ctx.out_dir / "table3_training.png", FAMILIES, key="family")
    _write_json(ctx.out_dir / "table3.json", {
        "runs": records, "images_s": speed[0], "train_s_per_step": step_s,
        "quality_vs_time": points})
    e = ctx.budget["eval"]
    ctx.notes += [f"{len(ctx.budget['train_seeds'])} training seeds per family ({ctx.budget['train_seeds']}); mean +- "
                  f"sd over them. Budget: "
                  f"{ctx.budget['train']['steps']} steps at batch {ctx.budget['train']['global_batch']} for both; "
                  f"{10 * e['per_class']} samples per generator, num_iter {e['num_iter']}, cfg {e['cfg']} "
                  f"({e['cfg_schedule']}), temperature {e['temperature']}; diffusion head "
                  f"{t3['num_sampling_steps']} DDPM steps, predicted x0 clipped at {t3['clip_denoised']}.", *_verdicts(runs),
                  "Per-seed values and the quality-vs-time points: `table3.json`; training loss of every run: "
                  "`table3_training.png`."]
    return table
