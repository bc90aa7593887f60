"""The paper's tables and Fig. 8: each function takes a `Context`, writes its PNG, adds its notes to
``ctx.notes`` and returns the markdown table (our numbers next to the paper's).

Our numbers are Fashion-MNIST classifier metrics; the paper's are ImageNet 256x256 Inception FID. Compare the
ordering of the variants, never the values.
"""
from __future__ import annotations

import copy
import dataclasses
import shlex
from collections.abc import Callable

import torch

from ..generate import confidence_images
from ..markdown import fmt, markdown_table
from ..reconstruct import quantizer_settings, reconstruction_table, save_histograms, save_reconstruction_grid
from .d2c import d2c
from .families import table3
from .shipped import shipped
from .frontier import frontier
from .plots import plot_head_times, plot_orders, plot_variants
from ..checkpoint import load_generator
from ..classifier import classifier_features
from ..metrics import within_class_diversity
from .runs import (Context, Variant, VariantResult, evaluate_samples, evaluate_variant, first_per_class,
                   run_variant)
from .stats import pm, verdict
from .speed import TimingOptions, time_heads

TITLES = {
    "table1": "Table 1: reconstruction through the dimension-wise quantizer",
    "table2a": "Table 2a: parallel vs dimension-wise autoregressive head",
    "table2b": "Table 2b: frequency-based vs natural channel order",
    "table2c": "Table 2c: quantization levels B for generation",
    "table2d": "Table 2d: channel grouping (channels predicted jointly per head step)",
    "table2e": "Table 2e: autoregressive head width x depth",
    "table5": "Table 5: per-token prediction time, dimension-wise AR head vs MAR diffusion head",
    "fig8": "Fig. 8: confidence-guided vs random-order generation",
    "table3": "Table 3 (headline): TokenBridge vs continuous MAR at equal backbone, data and training steps",
    "shipped": "The shipped generator against real data and the VAE floor",
    "frontier": "Sampler toolbox: speed against quality for every shipped family",
    "d2c": "D2C (discrete coarse tokens, then continuous fine tokens) vs TokenBridge vs continuous MAR",
}

# The paper's numbers (ImageNet 256x256; gFID / rFID are Inception FID-50k; Table 5 on an A100 at batch 1).
PAPER = {
    "table1_vae": 1.11,
    "table1_levels": {8: 3.69, 16: 1.33, 32: 1.12, 64: 1.11},  # at range +-5
    "table1_range": {2: 2.26, 3: 1.22, 4: 1.13, 5: 1.11},  # at B = 64
    "table2a": {"parallel": 15.7, "ar": 1.94},
    "table2b": {"frequency": 1.89, "natural": 1.94},
    "table2c": {16: 2.03, 32: 1.98, 64: 1.94},
    "table2d": {1: 2.28, 2: 2.45, 4: 3.24},
    "table2e": {(256, 3): 2.88, (512, 3): 2.72, (512, 4): 2.65, (1024, 4): 2.03, (1024, 6): 1.94},
    "table5_ms": {"diffusion": 311.25, "ar_uncached": 52.42},  # the official AR head re-runs the prefix (no cache)
}
PAPER_GEN_NOTE = ("paper gFID: ImageNet 256x256, Inception FID-50k of TokenBridge-L (paper Table 2). Ours: "
                  "Fashion-MNIST; NLL = held-out token cross-entropy (nats per channel, masked positions); FD_cls, "
                  "IS_cls, accuracy, precision, recall from the embedded classifier (tokenbridge.classifier). They "
                  "are not comparable in value with FID: compare how the variants are ordered.")


def _paper(x: float | None) -> str:
    return "-" if x is None else f"{x:g}"


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


# ----------------------------------------------------------------------------------------------------------------
# Generator ablations (table2a-e)


SEED_METRICS = ("nll", "density_nll", "fd_cls", "precision", "recall", "class_accuracy")


def _column(rows: list[VariantResult], key: str) -> list[float]:
    return [r.metrics[key] for r in rows]


def variant_table(results: list[list[VariantResult]]) -> str:
    """One row per variant: mean +- sd over its training seeds."""
    header = ["variant", "paper gFID", "head params", "total params", "held-out NLL", "density NLL", "FD_cls",
              "precision", "recall", "class acc", "train min"]
    rows = []
    for seeds in results:
        r = seeds[0]
        rows.append([r.variant.label, _paper(r.variant.paper), _params(r.head_params), _params(r.total_params),
                     pm(_column(seeds, "nll"), 4), pm(_column(seeds, "density_nll"), 4),
                     pm(_column(seeds, "fd_cls"), 2), pm(_column(seeds, "precision")), pm(_column(seeds, "recall")),
                     pm(_column(seeds, "class_accuracy")),
                     fmt(sum(x.train["elapsed_s"] for x in seeds) / 60 / len(seeds), 1)])
    return markdown_table(header, rows)


def _verdicts(results: list[list[VariantResult]]) -> list[str]:
    """Every later variant against the first one, metric by metric (NLL only at equal B)."""
    first, lines = results[0], []
    for other in results[1:]:
        same_b = first[0].model_config["quantizer"]["levels"] == other[0].model_config["quantizer"]["levels"]
        for m in SEED_METRICS:
            if m != "nll" or same_b:
                lines.append(verdict(m, first[0].variant.label, _column(first, m), other[0].variant.label,
                                     _column(other, m)))
    return lines


def eval_noise(ctx: Context, result: VariantResult) -> str:
    """The evaluation's own noise: the seed-0 generator of the first variant scored again with another sampling
    seed (and NLL mask seed); the metric changes are what one evaluation's randomness alone moves."""
    budget = copy.deepcopy(ctx.budget)
    budget["eval"]["seed"] = ctx.eval_seed + 1
    other = dataclasses.replace(ctx, budget=budget, notes=[])
    model = load_generator(result.run_dir / "checkpoint.pt", device=ctx.device)
    metrics, _ = evaluate_variant(other, model, model.config, result.run_dir)
    diffs = ", ".join(f"{m} {abs(metrics[m] - result.metrics[m]):.3f}" for m in SEED_METRICS)
    return (f"Evaluation noise ({result.variant.label}, training seed {result.seed}, sampling seed {ctx.eval_seed} "
            f"vs {ctx.eval_seed + 1}): |difference| {diffs}.")


def _variant_notes(ctx: Context, results: list[list[VariantResult]]) -> list[str]:
    """Budget, evaluation settings, the verdicts and one line per trained run, for the markdown."""
    e, t, bb = ctx.budget["eval"], ctx.budget["train"], results[0][0].model_config["backbone"]
    notes = [
        PAPER_GEN_NOTE,
        f"Budget per variant and training seed: {t['steps']} steps x batch {t['global_batch']} (lr "
        f"{t.get('lr') or 'blr-scaled'}, {t.get('warmup_steps', 0)} warmup steps, cosine to {t.get('min_lr', 0)}, "
        f"EMA {t['ema']} with warm-up, grad clip {t['grad_clip']}); EMA weights evaluated. Training seeds "
        f"{ctx.budget['train_seeds']}: every cell is mean +- sd over them. Backbone (all variants): MAR width "
        f"{bb['width']}, encoder/decoder depth {bb['encoder_depth']}/{bb['decoder_depth']}, {bb['num_heads']} heads, "
        f"buffer {bb['buffer_size']}.",
        f"Evaluation: {10 * e['per_class']} class-conditional samples ({e['per_class']} per class), {e['num_iter']} "
        f"MAR steps, random order, cfg {e['cfg']} ({e['cfg_schedule']}), temperature {e['temperature']}, seed "
        f"{ctx.eval_seed}; FD_cls / precision / recall against the first {e['real_images']} test images. Held-out NLL: "
        f"first {e['nll_images']} test token grids, mask ratio {e['nll_mask_ratio']}, mask seed {ctx.eval_seed} (nats "
        "per channel; comparable only at equal B: more levels = more nats, even for a perfect model). Density NLL = "
        "held-out NLL + the mean log width of the true tokens' bins in latent units: the NLL of the piecewise-uniform "
        "density the model implies over the continuous latents, comparable across B.",
        "A difference is called real only where the two means differ by more than the sum of their sds:",
        *[f"  - {line}" for line in _verdicts(results)],
        eval_noise(ctx, results[0][0]),
        "Runs:",
    ]
    for seeds in results:
        for r in seeds:
            h, reused = r.model_config["head"], " (reused from an earlier run)" if r.train["reused"] else ""
            group = f", {h['group_size']} channels/group" if h["kind"] == "grouped" else ""
            notes.append(
                f"  - {r.variant.label}, seed {r.seed}: head {h['kind']} width {h['width']} depth {h['depth']}{group}, "
                f"channel order {h.get('order') if h['kind'] != 'parallel' else '-'}, "
                f"B={r.model_config['quantizer']['levels']}; trained {r.train['step']} steps in "
                f"{r.train['elapsed_s']:.0f} s{reused}; evaluation {r.metrics.get('eval_s', 0):.0f} s; `{r.run_dir}`")
    runs = [r for seeds in results for r in seeds]
    notes.append(f"Compute of all runs, measured when each was made: training "
                 f"{sum(r.train['elapsed_s'] for r in runs) / 60:.1f} min + evaluation "
                 f"{sum(r.metrics.get('eval_s', 0) for r in runs) / 60:.1f} min (wall time on a shared machine, not a "
                 "speed comparison between rows).")
    return notes


def run_variants(ctx: Context, variants: list[Variant]) -> str:
    """Shared body of table2a-e: train + evaluate every variant at every training seed, write the plot, return the
    markdown table."""
    results = [run_variant(ctx, v) for v in variants]
    plot_variants(results, ctx.out_dir / f"{ctx.name}.png", TITLES[ctx.name])
    ctx.notes += _variant_notes(ctx, results)
    return variant_table(results)


def table2a(ctx: Context) -> str:
    return run_variants(ctx, [Variant("parallel head", {"head.kind": "parallel"}, PAPER["table2a"]["parallel"]),
                              Variant("autoregressive head", {}, PAPER["table2a"]["ar"])])


def table2b(ctx: Context) -> str:
    return run_variants(ctx, [Variant("frequency order", {"head.order": "frequency"}, PAPER["table2b"]["frequency"]),
                              Variant("natural order", {"head.order": None}, PAPER["table2b"]["natural"])])


def table2c(ctx: Context) -> str:
    return run_variants(ctx, [Variant(f"B={b}", {"quantizer.levels": int(b)}, PAPER["table2c"].get(int(b)))
                              for b in ctx.budget["table2c"]["levels"]])


def table2d(ctx: Context) -> str:
    t = ctx.budget["table2d"]
    # g=1 is the plain dimension-wise head (GroupedHead(g=1) computes the same), so it shares table2c's B run
    variants = [Variant(f"g={g}, B={t['levels']}",
                        {"quantizer.levels": int(t["levels"]),
                         **({"head.kind": "grouped", "head.group_size": int(g)} if int(g) > 1 else {})},
                        PAPER["table2d"].get(int(g))) for g in t["group_sizes"]]
    ctx.notes.append(f"Grouping g predicts g channels per head step as one of B^g classes (B={t['levels']}), so "
                     "the head's input embeddings and classifiers grow like B^g (see the parameter counts).")
    return run_variants(ctx, variants)


def table2e(ctx: Context) -> str:
    t = ctx.budget["table2e"]
    factor = int(t["head_width_to_paper"])
    variants = [Variant(f"head {w}x{d}", {"head.width": int(w), "head.depth": int(d)},
                        PAPER["table2e"].get((int(w) * factor, int(d)))) for w, d in t["heads"]]
    ctx.notes.append(f"Head sizes are the paper's (256x3 3M, 512x3, 512x4, 1024x4 65M, 1024x6 94M parameters) with "
                     f"widths divided by {factor}; the paper column is that paper size's gFID.")
    return run_variants(ctx, variants)


# ----------------------------------------------------------------------------------------------------------------
# Table 1, Table 5, Fig. 8


def _table1_paper(levels: int | None, value_range: float | None) -> float | None:
    """The paper's rFID of a Table 1 row (None where the paper has no such row)."""
    if levels is None:
        return PAPER["table1_vae"]
    if value_range is None:
        return None
    if float(value_range) == 5.0:
        return PAPER["table1_levels"].get(levels)
    return PAPER["table1_range"].get(int(value_range)) if levels == 64 else None


def table1(ctx: Context) -> str:
    """Reconstruction through the quantizer: continuous VAE, B and range sweeps, calibrated quantizers."""
    t = ctx.budget["table1"]
    vae, classifier = ctx.res.vae, ctx.res.classifier
    images = ctx.res.images("test", t["images"])
    fit_images = ctx.res.images("train", t["fit_images"])
    with torch.no_grad():  # calibrated quantizers are fitted on training images, not on the evaluated ones
        fit_latents = torch.cat([vae.encode(fit_images[i:i + 500].to(ctx.device)).cpu()
                                 for i in range(0, len(fit_images), 500)])
    settings = quantizer_settings(tuple(t["levels"]), tuple(float(r) for r in t["ranges"]))
    rows, samples = reconstruction_table(vae, images, settings, features=classifier.features, batch_size=250,
                                         device=ctx.device, fit_latents=fit_latents, progress=False)
    base = rows[0].psnr
    table = markdown_table(
        ["setting", "paper rFID", "FD_cls", "PSNR (dB)", "PSNR vs VAE", "SSIM", "latent MSE"],
        [[r.name, _paper(_table1_paper(r.levels, r.value_range)), fmt(r.fd, 3), fmt(r.psnr, 2),
          f"{100 * (r.psnr - base) / base:+.2f}%", fmt(r.ssim, 4), fmt(r.latent_mse, 5)] for r in rows])
    save_reconstruction_grid(samples, rows, ctx.out_dir / "table1.png")
    save_histograms(samples["latents"], ctx.out_dir / "table1_histograms.png")
    ctx.notes += [
        "paper rFID: ImageNet 256x256, KL-16 VAE, Inception FID-50k (paper Table 1). Ours: the embedded Fashion-MNIST "
        f"VAE on the first {len(images)} test images; FD_cls = Frechet distance between the classifier features of "
        "reconstructions and originals (an rFID analogue, not comparable in value). PSNR on images in [-1, 1].",
        f"Calibrated quantizers are fitted on the latents of the first {len(fit_images)} training images. Rows "
        "'B=.., +-r' use the paper's fixed range [-r, r] (std range 3).",
        "Plot: table1.png = originals, continuous VAE, then B at range +-5 (paper Fig. 6); table1_histograms.png = "
        "latent densities vs the B=64 histogram (paper Fig. 3).",
    ]
    return table


def table5(ctx: Context) -> str:
    """Per-token prediction time of the heads: tokenbridge.repro.speed.time_heads with the budget's options."""
    options = TimingOptions(**ctx.budget["table5"])
    timing = time_heads(options, ctx.device)
    paper_ms = PAPER["table5_ms"]
    rows = []
    for r in timing.rows:
        paper = paper_ms.get(r.method) if r.batch == 1 else None
        diffusion_ms = timing.row("diffusion", r.batch).ms
        rows.append([r.method, r.batch, fmt(r.ms, 2), fmt(r.spread, 2), r.runs, fmt(r.per_token, 3),
                     f"{diffusion_ms / r.ms:.2f}x", fmt(r.gflop, 3), fmt(r.gflops, 1),
                     f"{timing.percent_of_matmul(r):.1f}%", _paper(paper),
                     f"{paper_ms['diffusion'] / paper:.2f}x" if paper else "-"])
    table = markdown_table(["method", "tokens per call", "ms per call (median)", "+-", "runs", "ms per token",
                            "speed-up vs diffusion", "GFLOP per call", "GFLOP/s", "of matmul peak",
                            "paper ms (A100, batch 1)", "paper speed-up"], rows)
    plot_head_times(timing, ctx.out_dir / "table5.png")
    ctx.notes += [
        "Paper: MAR diffusion head (100 steps) 311.25 ms vs dimension-wise AR head 52.42 ms (5.94x), A100, batch 1; "
        "the official AR head re-runs the channel prefix at every step, so the paper's numbers sit on the ar_uncached "
        "row (like for like); ar_cached (a KV cache over the channels) is this project's addition and is compared "
        "with the diffusion head on its own rows, never with the paper's 5.94x.",
        f"Roofline: GFLOP per call by torch's FLOP counter (matmuls and attention); GFLOP/s = that / the median time; "
        f"'of matmul peak' = GFLOP/s / this run's float32 1024 x 1024 matmul throughput "
        f"({timing.matmul_gflops:.1f} GFLOP/s). At batch 1 every head runs far below the peak (small matmuls, "
        "per-call overhead): time follows the number of sequential calls (channels for the AR head, denoising steps "
        "for the diffusion head), which is where the paper's GPU ratio comes from; at large batches the heads "
        "approach the matmul rate and time follows the FLOPs, so the CPU ratio shrinks towards the FLOP ratio.",
        f"Benchmark: `{shlex.join(['python', 'benchmarks/heads.py', *options.command_line()])}` (the same "
        f"measurement, tokenbridge.repro.speed.time_heads); its setup line: `{timing.setup}`",
        f"Its summary: `{timing.summary()}`",
    ]
    return table


FIG8_METRICS = ("fd_cls", "precision", "recall", "class_accuracy", "diversity")


def _order_metrics(ctx: Context, model: torch.nn.Module, order: str) -> tuple[dict, dict]:
    """evaluate_samples plus the per-class diversity of the samples' classifier features."""
    metrics, result = evaluate_samples(ctx, model, order)
    feats = classifier_features(result["images"], ctx.res.classifier, ctx.device)
    metrics["diversity"] = within_class_diversity(feats, result["labels"])
    return metrics, result


def _real_diversity(ctx: Context) -> float:
    """Per-class diversity of as many real test images per class as the samples have."""
    per_class = int(ctx.budget["eval"]["per_class"])
    ds = ctx.res.dataset("test")
    labels = ctx.res.labels("test")
    picks = first_per_class(labels, per_class)
    images = torch.stack([ds[int(i)][0] for i in picks])
    feats = classifier_features(images, ctx.res.classifier, ctx.device)
    return within_class_diversity(feats, labels[picks])


def fig8(ctx: Context) -> str:
    """Random-order vs confidence-ordered samples of the default variant at every training seed: same labels, same
    sampling seed; judged by FD, precision, recall, accuracy and per-class diversity, never by the log-probability
    that confidence order selects by."""
    e, show = ctx.budget["eval"], int(ctx.budget["fig8"]["show_per_class"])
    per_class, runs = int(e["per_class"]), []
    for r in run_variant(ctx, Variant("default", {})):
        model = load_generator(r.run_dir / "checkpoint.pt", device=ctx.device)
        runs.append({order: _order_metrics(ctx, model, order) for order in ("random", "confidence")})
    table = markdown_table(
        ["order", "paper", "FD_cls", "precision", "recall", "class acc", "per-class diversity",
         "mean token log-prob (selection score)"],
        [[order, "qualitative", *[pm([run[order][0][m] for run in runs], 2 if m == "fd_cls" else 3)
                                  for m in FIG8_METRICS], pm([run[order][0]["confidence"] for run in runs])]
         for order in ("random", "confidence")])
    picks = torch.tensor([c * per_class + k for k in range(min(show, per_class)) for c in range(10)])
    images = {order: result["images"][picks] for order, (_, result) in runs[0].items()}
    conf = torch.cat([result["confidence"][picks] for _, result in runs[0].values()])
    maps = confidence_images(conf, images["random"].shape[-1]).chunk(2)  # one scale for both orders
    plot_orders(images, dict(zip(images, maps)), ctx.out_dir / "fig8.png")
    ctx.notes += [
        "The paper's Fig. 8 is qualitative (no numbers); confidence-guided generation is not in the official code.",
        f"Generators: the budget's default variant (the Table 2 AR row) at training seeds {ctx.budget['train_seeds']}, "
        f"{ctx.budget['train']['steps']} steps each; every cell is mean +- sd over them; the picture is seed "
        f"{ctx.budget['train_seeds'][0]}'s.",
        f"Sampling: {10 * per_class} samples ({per_class} per class), {e['num_iter']} MAR steps, cfg {e['cfg']} "
        f"({e['cfg_schedule']}), temperature {e['temperature']}, seed {ctx.eval_seed}, both orders with the same "
        f"labels and seed. FD_cls / precision / recall against the first {e['real_images']} test images. Per-class "
        f"diversity: mean pairwise distance of the classifier features within a class, averaged over classes; "
        f"{per_class} real test images per class give {_real_diversity(ctx):.3f}.",
        "The mean token log-prob is what confidence order maximises when it picks tokens, so it cannot judge that "
        "order (circular); it is shown only to make that visible.",
        *[f"  - {verdict(m, 'confidence', [run['confidence'][0][m] for run in runs], 'random', [run['random'][0][m] for run in runs])}"
          for m in FIG8_METRICS],
        "confidence order: at every step all masked positions are sampled and the most confident ones are kept; "
        "random order: a random permutation's next chunk is kept (MAR).",
    ]
    return table


TABLES: dict[str, Callable[[Context], str]] = {"table1": table1, "table2a": table2a, "table2b": table2b,
                                              "table2c": table2c, "table2d": table2d, "table2e": table2e,
                                              "table5": table5, "fig8": fig8, "table3": table3,
                                              "shipped": shipped, "d2c": d2c, "frontier": frontier}
