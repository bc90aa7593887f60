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

``d2c.earlier`` names an earlier d2c.json made under the same budget (budget_record): its rows with the same
config and every training seed are read from it rather than trained again, so a table too long for one sitting
grows over several (their images/s were measured in the earlier run and are marked so).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from ..checkpoint import training_trajectory
from ..markdown import markdown_table
from ..training.vq import token_latents, train_vq
from .families import (FAMILIES, evaluate_family, plot_quality_vs_time, quality_vs_time, sampling_options,
                       sampling_speed)
from .plots import plot_trajectories
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


def _plain(obj: Any) -> Any:
    """``obj`` as it reads back from a json file (tuples as lists, other values as strings), for comparisons."""
    return json.loads(json.dumps(obj, default=str))


def budget_record(ctx: Context) -> dict:
    """Everything a row's numbers depend on besides its own config: data, models, training, evaluation, sampling,
    seeds and the VAE / classifier weights. A row of an earlier d2c.json stands in a table only under an equal
    record (JSON-normalised)."""
    b, t3 = ctx.budget, ctx.budget["table3"]
    record = {k: b[k] for k in ("seed", "train_seeds", "data", "model", "train", "eval")}
    record.update(table3={k: t3[k] for k in ("mar_model", "num_sampling_steps", "clip_denoised", "num_iters",
                                             "speed_batch")},
                  stage1=b["d2c"]["stage1"], vae=ctx.res.fingerprint("vae"),
                  classifier=ctx.res.fingerprint("classifier"))
    return _plain(record)


def earlier_rows(ctx: Context, names: list[str]) -> dict[str, dict]:
    """The rows of ``d2c.earlier`` (an earlier d2c.json) that this table reuses instead of training: those with
    the same config and every training seed. Raises ValueError, before any training, when that file was made
    under another budget (budget_record)."""
    path = ctx.budget["d2c"].get("earlier")
    if not path:
        return {}
    data = json.loads(Path(path).read_text())
    record, theirs = budget_record(ctx), data.get("budget") or {}
    if theirs != record:
        differ = sorted(k for k in {*record, *theirs} if record.get(k) != theirs.get(k))
        raise ValueError(f"d2c.earlier {path}: made under another budget (differs in {differ}); its rows cannot "
                         "stand in this table")
    reused = {}
    for name in names:
        seeds = {r["seed"]: r for r in data["runs"] if r["row"] == name}
        same = name in FAMILIES or data["rows"].get(name) == _plain(ctx.budget["d2c"]["rows"][name])
        if same and all(s in seeds for s in ctx.budget["train_seeds"]):
            reused[name] = {"runs": [seeds[s] for s in ctx.budget["train_seeds"]], "params": data["params"][name],
                            "images_s": data["images_s"][name], "options": data["options"][name],
                            "points": [p for p in data["quality_vs_steps"] if p["family"] == name]}
    return reused


def d2c(ctx: Context) -> str:
    ctx.budget["d2c"] = copy.deepcopy(ctx.budget["d2c"])
    _resolve_rows(ctx)
    names = [*ctx.budget["d2c"]["rows"], *FAMILIES]
    earlier = earlier_rows(ctx, names)
    fresh = [n for n in names if n not in earlier]
    runs = {n: [evaluate_family(ctx, n, s) for s in ctx.budget["train_seeds"]] for n in fresh}
    first = {n: runs[n][0].model for n in fresh}
    t3 = ctx.budget["table3"]
    options = {n: sampling_options(ctx, first[n].family) for n in fresh}
    speed = sampling_speed(ctx, first, options, t3["speed_batch"], t3["speed_repeats"]) if first else {}
    points = quality_vs_time(ctx, first, diffusion_steps=False) if first else []
    params = {n: count_params(first[n]) for n in fresh}
    records = [{"row": n, "seed": r.seed, "train": r.train, "metrics": r.metrics,
                "trajectory": training_trajectory(r.run_dir)} for n in fresh for r in runs[n]]
    for n, old in earlier.items():
        params[n], speed[n], options[n] = old["params"], old["images_s"], old["options"]
        points += old["points"]
        records += old["runs"]
    metrics = {n: [r["metrics"] for r in records if r["row"] == n] for n in names}
    rows = [[LABELS.get(n, n), f"{params[n] / 1e6:.2f}M"]
            + [pm([m[k] for m in metrics[n]], 2 if k == "fd_cls" else 3) for k in METRICS]
            + [f"{speed[n]:.1f}" + (" (earlier)" if n in earlier else "")] for n in names]
    table = markdown_table(["row", "params", "FD_cls", "precision", "recall", "class acc.",
                            f"images/s (batch {t3['speed_batch']})"], rows)
    plot_quality_vs_time(points, ctx.out_dir / "d2c.png", LABELS)
    plot_quality_vs_time(points, ctx.out_dir / "d2c_steps.png", LABELS, x="steps")
    plot_trajectories(records, ctx.out_dir / "d2c_training.png", LABELS)
    _write_json(ctx.out_dir / "d2c.json", {
        "runs": records, "params": params, "images_s": speed, "options": options, "rows": ctx.budget["d2c"]["rows"],
        "quality_vs_steps": points, "budget": budget_record(ctx)})
    if earlier:
        ctx.notes.append(f"Rows {', '.join(LABELS.get(n, n) for n in earlier)} are read from "
                         f"`{ctx.budget['d2c']['earlier']}` (d2c.earlier: made under this very budget; their "
                         "images/s, marked (earlier), were measured in that run, beside other rows).")
    e, t = ctx.budget["eval"], ctx.budget["train"]
    ctx.notes += [
        f"Training seeds {ctx.budget['train_seeds']} per row, {t['steps']} steps at batch {t['global_batch']} "
        f"each (the Table 3 budget); mean +- sd over the seeds. {10 * e['per_class']} samples per generator, "
        f"num_iter {e['num_iter']}, cfg {e['cfg']} ({e['cfg_schedule']}), temperature {e['temperature']}; diffusion "
        f"head {t3['num_sampling_steps']} steps, x0 clipped at {t3['clip_denoised']}; D2C stage 1: "
        f"{ctx.budget['d2c']['stage1']}.",
        f"D2C rows (model configs): {ctx.budget['d2c']['rows']}.",
        "A difference is called real only where the two means differ by more than the sum of their sds:",
        *[f"  - {verdict(k, LABELS[d], [m[k] for m in metrics[d]], LABELS[b], [m[k] for m in metrics[b]])}"
          for d in ctx.budget["d2c"]["rows"] for b in FAMILIES for k in ("fd_cls", "recall")],
        "Plots: `d2c.png` (FD_cls against sampling time per image), `d2c_steps.png` (against sequential steps); "
        "per-seed values and the points: `d2c.json`; training loss of every run: `d2c_training.png`.",
    ]
    return table
