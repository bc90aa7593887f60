"""The paper's tables and Fig. 8: each function takes a `Context`, writes its PNG, adds its notes to
``ctx.notes`` and returns the markdown table (our numbers next to the paper's).

Our numbers are Fashion-MNIST classifier metrics; the paper's are ImageNet 256x256 Inception FID. Compare the
ordering of the variants, never the values.
"""
from __future__ import annotations

import math
import shlex
from collections.abc import Callable

import torch

from ..generate import confidence_images
from ..markdown import fmt, markdown_table
from ..reconstruct import quantizer_settings, reconstruction_table, save_histograms, save_reconstruction_grid
from .families import table3
from .plots import plot_head_times, plot_orders, plot_variants
from .runs import Context, Variant, VariantResult, count_params, evaluate_samples, run_variant
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


def variant_table(results: list[VariantResult]) -> str:
    header = ["variant", "paper gFID", "head params", "total params", "held-out NLL", "NLL - ln B", "FD_cls",
              "IS_cls", "class acc", "precision", "recall", "train loss", "train min"]
    rows = []
    for r in results:
        m, levels = r.metrics, r.model_config["quantizer"]["levels"]
        rows.append([r.variant.label, _paper(r.variant.paper), _params(r.head_params), _params(r.total_params),
                     fmt(m["nll"], 4), fmt(m["nll"] - math.log(levels), 4), fmt(m["fd_cls"], 2), fmt(m["is_cls"], 2),
                     m["class_accuracy"], m["precision"], m["recall"], fmt(r.train["loss"], 4),
                     fmt(r.train["elapsed_s"] / 60, 1)])
    return markdown_table(header, rows)


def _variant_notes(ctx: Context, results: list[VariantResult]) -> list[str]:
    """Budget, evaluation settings and one line per variant, for the markdown."""
    e, t, bb = ctx.budget["eval"], ctx.budget["train"], results[0].model_config["backbone"]
    notes = [
        PAPER_GEN_NOTE,
        f"Budget per variant: {t['steps']} steps x batch {t['global_batch']} (lr {t.get('lr') or 'blr-scaled'}, "
        f"{t.get('warmup_steps', 0)} warmup steps, cosine to {t.get('min_lr', 0)}, EMA {t['ema']}, grad clip "
        f"{t['grad_clip']}); EMA weights evaluated. Backbone (all variants): MAR width {bb['width']}, "
        f"encoder/decoder depth {bb['encoder_depth']}/{bb['decoder_depth']}, {bb['num_heads']} heads, buffer "
        f"{bb['buffer_size']}.",
        f"Evaluation: {10 * e['per_class']} class-conditional samples ({e['per_class']} per class), {e['num_iter']} "
        f"MAR steps, random order, cfg {e['cfg']} ({e['cfg_schedule']}), temperature {e['temperature']}, seed "
        f"{ctx.eval_seed}; FD_cls / precision / recall against the first {e['real_images']} test images. Held-out NLL: "
        f"first {e['nll_images']} test token grids, mask ratio {e['nll_mask_ratio']}, mask seed {ctx.eval_seed}; NLL "
        "values are comparable only at the same B (more levels = more nats); NLL - ln B removes the ln B that B "
        "equal-probability bins add, leaving (for fine bins) the NLL of the latents relative to the reference "
        "Gaussian of Eq. 2, which is comparable across B.",
        "Variants:",
    ]
    for r in results:
        h, reused = r.model_config["head"], " (reused from an earlier run)" if r.train["reused"] else ""
        group = f", {h['group_size']} channels/group" if h["kind"] == "grouped" else ""
        notes.append(
            f"  - {r.variant.label}: head {h['kind']} width {h['width']} depth {h['depth']}{group}, channel order "
            f"{h.get('order') if h['kind'] != 'parallel' else '-'}, B={r.model_config['quantizer']['levels']}; "
            f"trained {r.train['step']} steps in {r.train['elapsed_s']:.0f} s{reused}; "
            f"evaluation {r.metrics.get('eval_s', 0):.0f} s; run dir `{r.run_dir}`")
    train_s = sum(r.train["elapsed_s"] for r in results)
    eval_s = sum(r.metrics.get("eval_s", 0) for r in results)
    notes.append(f"Compute of all rows, measured when each was made: training {train_s / 60:.1f} min + evaluation "
                 f"{eval_s / 60:.1f} min (wall time; 'train min' and these depend on what else the machine ran, "
                 "so they are not a speed comparison between rows).")
    return notes


def run_variants(ctx: Context, variants: list[Variant]) -> str:
    """Shared body of table2a-e: train + evaluate every variant, write the plot, return the markdown table."""
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
    if t.get("train_steps"):  # this table's own step budget, for every row alike
        ctx.budget["train"]["steps"] = int(t["train_steps"])
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
                     f"{diffusion_ms / r.ms:.2f}x", _paper(paper),
                     f"{paper_ms['diffusion'] / paper:.2f}x" if paper else "-"])
    table = markdown_table(["method", "tokens per call", "ms per call (median)", "+-", "runs", "ms per token",
                            "speed-up vs diffusion", "paper ms (A100, batch 1)", "paper speed-up"], rows)
    plot_head_times(timing, ctx.out_dir / "table5.png")
    ctx.notes += [
        "Paper: MAR diffusion head (100 steps) 311.25 ms vs dimension-wise AR head 52.42 ms (5.94x), A100, batch 1; "
        "the official AR head re-runs the channel prefix at every step, like our ar_uncached.",
        f"Benchmark: `{shlex.join(['python', 'benchmarks/heads.py', *options.command_line()])}` (the same "
        f"measurement, tokenbridge.repro.speed.time_heads); its setup line: `{timing.setup}`",
        f"Its summary: `{timing.summary()}`",
    ]
    return table


def fig8(ctx: Context) -> str:
    """Random-order vs confidence-ordered samples of the shipped generator: same labels, same seed."""
    model = ctx.res.generator()
    e, show = ctx.budget["eval"], int(ctx.budget["fig8"]["show_per_class"])
    per_class = int(e["per_class"])
    results = {order: evaluate_samples(ctx, model, order) for order in ("random", "confidence")}
    table = markdown_table(
        ["order", "paper", "mean token log-prob", "FD_cls", "IS_cls", "class acc", "precision", "recall"],
        [[order, "qualitative", fmt(m["confidence"], 3), fmt(m["fd_cls"], 2), fmt(m["is_cls"], 2),
          m["class_accuracy"], m["precision"], m["recall"]] for order, (m, _) in results.items()])

    picks = torch.tensor([c * per_class + k for k in range(min(show, per_class)) for c in range(10)])
    images = {order: r["images"][picks] for order, (_, r) in results.items()}
    conf = torch.cat([r["confidence"][picks] for _, r in results.values()])
    maps = confidence_images(conf, images["random"].shape[-1]).chunk(2)  # one scale for both orders
    plot_orders(images, dict(zip(images, maps)), ctx.out_dir / "fig8.png")
    cfg = getattr(model, "config", None) or {}
    backbone, head = cfg.get("backbone", {}), cfg.get("head", {})
    ctx.notes += [
        "The paper's Fig. 8 is qualitative (no numbers); confidence-guided generation is not in the official code.",
        f"Generator: {_params(count_params(model))} parameters (head {_params(count_params(model.head))}), config "
        f"backbone {backbone.get('width')} wide, head {head.get('kind')} {head.get('width')}x{head.get('depth')}.",
        f"Sampling: {10 * per_class} samples ({per_class} per class), {e['num_iter']} MAR steps, cfg {e['cfg']} "
        f"({e['cfg_schedule']}), temperature {e['temperature']}, seed {ctx.eval_seed}, both orders with the same "
        f"labels and seed. Confidence = the head's log-probability of each sampled token (summed over its channels); "
        f"'mean token log-prob' averages it over all tokens. FD_cls / precision / recall against the first "
        f"{e['real_images']} test images.",
        "confidence order: at every step all masked positions are sampled and the most confident ones are kept; "
        "random order: a random permutation's next chunk is kept (MAR).",
    ]
    return table


TABLES: dict[str, Callable[[Context], str]] = {"table1": table1, "table2a": table2a, "table2b": table2b,
                                              "table2c": table2c, "table2d": table2d, "table2e": table2e,
                                              "table5": table5, "fig8": fig8, "table3": table3}
