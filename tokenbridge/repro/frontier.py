"""`tokenbridge repro frontier`: the sampler toolbox's speed-quality frontier for every shipped family.

Every family (``frontier.families``: a generator spec -> its settings) is sampled at each setting: sampling
options merged over the generator's recorded defaults of today's sampler (``sampling_defaults(model, "paper")``;
``{"sampler": "paper"}`` is today's sampler). Quality: FD_cls, k-NN precision / recall and class accuracy of
``10 * per_class`` samples (the same labels at every setting) against the test split, once per sampling seed in
``seeds``; speed: images/s of one `generate` call of the scored samples, generated at batch ``speed_batch``
(sampling + VAE decode), median over the seeds, and at batch 1 over ``b1_images`` images. A setting *keeps
quality* when its mean FD is at most today's mean FD plus today's sampling-seed spread (max - min over the seeds)
and its mean recall at least today's mean recall minus that spread. ``frontier.today_of``: a generator held
against another's today (the causal TokenBridge generator against TokenBridge's). ``frontier.only``: the generator
specs to run (None: all). The Pareto set (no other setting of the family both faster and lower in FD) is marked;
the plot shows FD against images/s, one curve per family.
"""
from __future__ import annotations

import json
import statistics
import time
from typing import Any

import torch

from ..classifier import classifier_metrics
from ..generate import generate, sampling_defaults
from ..markdown import fmt, markdown_table
from ..samplers import record_reuse_error
from ..vae import state_fingerprint
from .budgets import PAPER_SETTING
from .plots import pyplot, save_figure
from .runs import Context, _write_json, class_labels, short_hash

METRICS = ("fd_cls", "precision", "recall", "class_accuracy")


def _score_setting(ctx: Context, model: Any, options: dict, labels: torch.Tensor,
                   real: torch.Tensor) -> tuple[float, list[dict]]:
    """(images/s: median over the seeds of samples / seconds of their `generate` call, metrics of each seed)."""
    f, rates, runs = ctx.budget["frontier"], [], []
    for seed in f["seeds"]:
        start = time.perf_counter()
        fake = generate(model, labels.tolist(), vae=ctx.res.vae, seed=int(seed), device=ctx.device,
                        batch_size=int(f["speed_batch"]), **options)["images"]
        rates.append(len(labels) / (time.perf_counter() - start))
        metrics = classifier_metrics(fake, labels, real_images=real, classifier=ctx.res.classifier, device=ctx.device)
        runs.append({m: float(metrics[m]) for m in METRICS})
    return statistics.median(rates), runs


def batch1_rate(ctx: Context, model: Any, options: dict) -> float:
    """images/s of `generate` at batch 1 over ``frontier.b1_images`` images (one class after the other)."""
    n = int(ctx.budget["frontier"]["b1_images"])
    start = time.perf_counter()
    generate(model, [i % 10 for i in range(n)], vae=ctx.res.vae, seed=0, device=ctx.device, batch_size=1, **options)
    return n / (time.perf_counter() - start)


def reuse_error(ctx: Context, model: Any, options: dict, labels: torch.Tensor) -> dict[str, float]:
    """Mean relative error of the reused unconditional features and guidance direction (uncond_every > 1) over
    the reusing MAR steps of one batch of ``labels``."""
    with record_reuse_error() as errors:
        generate(model, labels.tolist(), vae=ctx.res.vae, seed=0, device=ctx.device, **options)
    return {k: statistics.fmean(e[k] for e in errors) for k in ("z_u", "guidance")} if errors else {}


def _summary(runs: list[dict]) -> dict[str, tuple[float, float]]:
    """metric -> (mean, spread = max - min) over the sampling seeds."""
    return {m: (statistics.fmean(r[m] for r in runs), max(r[m] for r in runs) - min(r[m] for r in runs))
            for m in METRICS}


def kept(setting: dict, today: dict) -> bool:
    """FD and recall within today's sampling-seed spread (see the module docstring)."""
    (fd, _), (recall, _) = setting["fd_cls"], setting["recall"]
    (fd0, fd_spread), (recall0, recall_spread) = today["fd_cls"], today["recall"]
    return fd <= fd0 + fd_spread and recall >= recall0 - recall_spread


def pareto(rows: list[dict]) -> set[str]:
    """Names of the settings no other setting beats in both images/s and mean FD."""
    return {r["name"] for r in rows
            if not any(o["images_per_s"] > r["images_per_s"] and o["fd_cls"][0] < r["fd_cls"][0] for o in rows)}


def _setting_row(ctx: Context, spec: str, model: Any, name: str, changes: dict, labels: torch.Tensor,
                 real: torch.Tensor) -> dict:
    """One setting's row, reused from ``work_dir`` when a run with the same weights, setting, samples and threads
    made it (so that a frontier interrupted by the end of a session, or split over processes with
    ``frontier.only``, resumes where it stopped; a retrained generator is measured again)."""
    f = ctx.budget["frontier"]
    key = short_hash([spec, state_fingerprint(model), changes, f["per_class"], f["seeds"], f["speed_batch"],
                      torch.get_num_threads()])
    cache = ctx.work_dir / "frontier" / f"{spec}-{key}.json"
    options = {**sampling_defaults(model, "paper"), **changes}  # every setting changes today's sampler
    if cache.is_file():
        row = json.loads(cache.read_text())
        if "images_per_s_b1" not in row:  # a row cached before the batch-1 timing existed
            row["images_per_s_b1"] = batch1_rate(ctx, model, options)
            _write_json(cache, row)
        return row
    rate, runs = _score_setting(ctx, model, options, labels, real)
    row = {"family": spec, "name": name, "options": changes, "images_per_s": rate,
           "images_per_s_b1": batch1_rate(ctx, model, options), "runs": runs, **_summary(runs)}
    if options.get("uncond_every", 1) > 1 and options.get("sampler") != "paper":
        row["reuse_error"] = reuse_error(ctx, model, options, labels[::max(1, len(labels) // 20)])
    print(f"frontier {spec} {name}: {rate:.2f} images/s, FD {row['fd_cls'][0]:.2f}", flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    _write_json(cache, row)
    return row


def _family_rows(ctx: Context, spec: str, settings: dict[str, dict], labels: torch.Tensor,
                 real: torch.Tensor) -> list[dict]:
    """The family's rows, one per setting (each cached on its own: `_setting_row`)."""
    model = ctx.res.generator(spec)
    return [_setting_row(ctx, spec, model, name, changes, labels, real) for name, changes in settings.items()]


def _plot(ctx: Context, rows: list[dict]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for spec in dict.fromkeys(r["family"] for r in rows):
        own = sorted((r for r in rows if r["family"] == spec), key=lambda r: r["images_per_s"])
        xs, ys = [r["images_per_s"] for r in own], [r["fd_cls"][0] for r in own]
        ax.errorbar(xs, ys, yerr=[r["fd_cls"][1] / 2 for r in own], marker="o", capsize=3, label=spec)
        for r in own:
            ax.annotate(r["name"], (r["images_per_s"], r["fd_cls"][0]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(f"images/s at batch {ctx.budget['frontier']['speed_batch']} (sampling + decode)")
    ax.set_ylabel("FD_cls (lower is better; bar = seed spread)")
    ax.set_title("Sampler toolbox: quality against speed")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, ctx.out_dir / "frontier.png")


def frontier(ctx: Context) -> str:
    f = ctx.budget["frontier"]
    labels = class_labels(int(f["per_class"]))
    real = ctx.res.images("test", None)
    rows, table, by_spec = [], [], {}
    families = {k: v for k, v in f["families"].items() if f.get("only") is None or k in f["only"]}
    for spec, settings in families.items():
        own = _family_rows(ctx, spec, settings, labels, real)
        base = f.get("today_of", {}).get(spec, spec)  # whose today's sampler this family is held against
        if base not in by_spec:
            by_spec[base] = own if base == spec else _family_rows(ctx, base, {"paper": PAPER_SETTING}, labels, real)
        today = next(r for r in by_spec[base] if r["options"] == PAPER_SETTING)
        front = pareto(own if base == spec else own + by_spec[base])
        for r in own:
            r["kept"], r["pareto"] = kept(r, today), r["name"] in front
            table.append([spec, r["name"], fmt(r["images_per_s"], 2), fmt(r["images_per_s"] / today["images_per_s"], 2),
                          fmt(r["images_per_s_b1"], 2), fmt(r["images_per_s_b1"] / today["images_per_s_b1"], 2),
                          *[f"{fmt(r[m][0], 3)} +- {fmt(r[m][1] / 2, 3)}" for m in METRICS],
                          "yes" if r["kept"] else "no", "yes" if r["pareto"] else ""])
        rows += own
    best = {spec: max((r for r in rows if r["family"] == spec and r["kept"]), key=lambda r: r["images_per_s"],
                      default={"name": "none"})["name"] for spec in families}
    _plot(ctx, rows)
    _write_json(ctx.out_dir / "frontier.json", rows)
    ctx.notes += [
        f"{10 * int(f['per_class'])} samples ({f['per_class']} per class) for each setting and each sampling seed "
        f"of {list(f['seeds'])}; metrics against the {len(real)} test images; value +- half the seed range.",
        f"images/s: the samples of a seed over the seconds of their `generate` call (sampling + VAE decode) at "
        f"batch {f['speed_batch']}, median over the seeds; b1: {f['b1_images']} images (one per class) at batch 1; "
        f"torch threads {torch.get_num_threads()}. The settings run "
        "one after the other on a machine shared with other jobs whose load changed during the run, so the speedup "
        "column is indicative only: `python benchmarks/samplers.py` measures speed with the settings alternating.",
        "kept: mean FD <= today's mean FD + today's seed range and mean recall >= today's mean recall - today's "
        "seed range (today = the `paper` row: `--sampler paper` with the recorded defaults).",
        *[f"Fastest setting of {spec} that kept quality: {name}." for spec, name in best.items()],
        *[f"{spec} is held against {base}'s today (its `paper` row): speedup, kept and Pareto (with {base}'s "
          "settings) compare the two generators." for spec, base in f.get("today_of", {}).items() if spec in families],
        *[f"Feature reuse error of {r['family']} {r['name']} (mean over the reusing steps, 20 samples): reused z_u "
          f"{r['reuse_error']['z_u']:.4f}, guidance direction z_c - z_u {r['reuse_error']['guidance']:.4f} "
          "(relative L2 against the backbone's)." for r in rows if r.get("reuse_error")],
        "Settings: " + "; ".join(f"{spec} {name} = {changes}" for spec, s in families.items()
                                 for name, changes in s.items()),
    ]
    return markdown_table(["generator", "setting", "images/s", "speedup", "images/s b1", "speedup b1", *METRICS,
                           "quality kept", "Pareto"], table)
