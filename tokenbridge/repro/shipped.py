"""`tokenbridge repro shipped`: how much of the data's variety the shipped generator covers, as a new user would
score it.

The test split is cut in two: ``shipped.per_class`` images of every class are the *real* row; the rest is the
reference every row is scored against (so no row is scored against itself). Rows: those real images (what real
data scores: the ceiling), their VAE reconstructions (the floor no generator on this VAE can beat in FD), and the
generator's samples for the same labels with its recorded sampling defaults. Metrics: FD_cls, k-NN precision /
recall (k = 3) in the classifier's feature space, class accuracy; the generator's recall as a ratio to the real
images' recall and its FD as a ratio to the reconstructions' FD; per-class precision and recall (each class's
samples against that class's reference images); and a picture of the weakest classes (lowest per-class recall),
real images above samples; the training budget and loss trajectory where the generator's file records them.
"""
from __future__ import annotations

from typing import Any

import torch

from ..classifier import classifier_features, classifier_metrics
from ..generate import generate, sampling_defaults
from ..images import image_grid
from ..markdown import fmt, markdown_table
from ..metrics import precision_recall
from .plots import pyplot, save_figure
from .runs import Context, _write_json, class_labels, first_per_class


def split_test(ctx: Context, per_class: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(real images [10 * per_class, 1, 32, 32], their labels, reference images, reference labels): the first
    ``per_class`` test images of every class, and every other test image."""
    images = ctx.res.images("test", None)
    labels = ctx.res.labels("test")
    picks = first_per_class(labels, per_class)
    if len(picks) < 10 * per_class:
        raise ValueError(f"the test split has fewer than shipped.per_class={per_class} images of some class")
    rest = torch.ones(len(labels), dtype=torch.bool)
    rest[picks] = False
    return images[picks], labels[picks], images[rest], labels[rest]


def per_class_scores(ctx: Context, images: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor,
                     ref_labels: torch.Tensor) -> list[tuple[float, float]]:
    """(precision, recall) of each class's images [N, 1, 32, 32] against that class's reference images."""
    feats = classifier_features(images, ctx.res.classifier, ctx.device)
    ref_feats = classifier_features(ref, ctx.res.classifier, ctx.device)
    return [precision_recall(ref_feats[ref_labels == c], feats[labels == c]) for c in range(10)]


def _weakest_grid(ctx: Context, weakest: list[int], real: torch.Tensor, real_labels: torch.Tensor,
                  fake: torch.Tensor, recalls: list[float], show: int) -> None:
    """shipped.png: for each weak class a row of real test images above a row of samples."""
    plt = pyplot()
    fig, axes = plt.subplots(len(weakest), 1, figsize=(1.1 * show, 2.4 * len(weakest)), squeeze=False)
    for ax, c in zip(axes[:, 0], weakest):
        rows = torch.cat([real[real_labels == c][:show], fake[real_labels == c][:show]])
        ax.imshow(image_grid(rows, nrow=show, scale=2).convert("L"), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"class {c}: real test images (top) vs samples (bottom); per-class recall {recalls[c]:.3f}",
                     fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, ctx.out_dir / "shipped.png")


def training_notes(ctx: Context, record: dict[str, Any]) -> list[str]:
    """What the generator's file records of its training: the budget (steps x batch = images) and, where the file
    carries its loss trajectory, a plot of it (shipped_training.png)."""
    train, trajectory = record.get("train") or {}, record.get("trajectory")
    if not train:
        return ["Training: this file records no recipe (exported before `tokenbridge export` recorded it); see the "
                "README's generators table for its budget."]
    images = int(train.get("steps", 0)) * int(train.get("global_batch", 0))
    notes = [f"Training (recorded in the file): {train.get('steps')} steps x batch {train.get('global_batch')} = "
             f"{images:,} images, lr {train.get('lr')}, warm-up {train.get('warmup_steps')}, EMA {train.get('ema')}."]
    if trajectory:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([s * int(train.get("global_batch", 1)) for s in trajectory["step"]], trajectory["loss"])
        ax.set_xlabel("training images seen")
        ax.set_ylabel(f"training loss ({record.get('family')} objective)")
        ax.set_title(f"{ctx.budget['shipped']['model']}: training loss")
        fig.tight_layout()
        save_figure(fig, ctx.out_dir / "shipped_training.png")
        notes.append(f"Training loss: {trajectory['loss'][0]:.4f} at step {trajectory['step'][0]}, "
                     f"{trajectory['loss'][-1]:.4f} at step {trajectory['step'][-1]} (shipped_training.png).")
    return notes


def _rows(ctx: Context, model: Any, options: dict, per_class: int) -> tuple[dict, dict, torch.Tensor]:
    """Metrics of the three rows against the reference part of the test split, and the generated images."""
    real, real_labels, ref, ref_labels = split_test(ctx, per_class)
    with torch.no_grad():
        recon = torch.cat([ctx.res.vae.decode(ctx.res.vae.encode(real[i:i + 500].to(ctx.device))).cpu()
                           for i in range(0, len(real), 500)]).clamp(-1, 1)
    fake = generate(model, real_labels.tolist(), vae=ctx.res.vae, seed=ctx.eval_seed, device=ctx.device,
                    batch_size=ctx.budget["eval"]["batch_size"], **options)["images"]
    rows = {name: classifier_metrics(x, real_labels, real_images=ref, classifier=ctx.res.classifier,
                                     device=ctx.device)
            for name, x in (("real test images", real), ("VAE reconstructions", recon), ("generator samples", fake))}
    per_class = {name: per_class_scores(ctx, x, real_labels, ref, ref_labels)
                 for name, x in (("real test images", real), ("generator samples", fake))}
    return rows, per_class, (real, real_labels, fake)


def shipped(ctx: Context) -> str:
    s = ctx.budget["shipped"]
    model = ctx.res.generator(s["model"])
    options = sampling_defaults(model)
    rows, per_class, (real, real_labels, fake) = _rows(ctx, model, options, int(s["per_class"]))
    real_row, floor, gen = rows["real test images"], rows["VAE reconstructions"], rows["generator samples"]
    table = markdown_table(["row", "FD_cls", "precision", "recall", "class acc", "recall / real", "FD / VAE floor"],
                           [[name, fmt(m["fd_cls"], 2), m["precision"], m["recall"], m["class_accuracy"],
                             fmt(m["recall"] / real_row["recall"], 3), fmt(m["fd_cls"] / floor["fd_cls"], 3)]
                            for name, m in rows.items()])
    recalls = [r for _, r in per_class["generator samples"]]
    weakest = sorted(range(10), key=lambda c: recalls[c])[:int(s["weakest"])]
    _weakest_grid(ctx, weakest, real, real_labels, fake, recalls, min(10, int(s["per_class"])))
    classes = markdown_table(
        ["class", "samples precision", "samples recall", "real precision", "real recall"],
        [[c, *per_class["generator samples"][c], *per_class["real test images"][c]] for c in range(10)])
    _write_json(ctx.out_dir / "shipped.json", {"rows": rows, "per_class": per_class, "options": options})
    goal = {"recall": gen["recall"] >= s["recall_goal"] * real_row["recall"],
            "fd": gen["fd_cls"] <= s["fd_goal"] * floor["fd_cls"]}
    ctx.notes += [
        f"Generator: `{s['model']}` with its recorded sampling options {options}; {10 * int(s['per_class'])} samples "
        f"({s['per_class']} per class, sampling seed {ctx.eval_seed}), the labels of the real row.",
        f"Real row: the first {s['per_class']} test images of each class; reference: the other "
        f"{len(ctx.res.dataset('test')) - 10 * int(s['per_class'])} test images (every row is scored against them).",
        f"Goals: recall >= {s['recall_goal']} x real ({'met' if goal['recall'] else 'not met'}: "
        f"{gen['recall'] / real_row['recall']:.3f}); FD <= {s['fd_goal']} x the VAE floor "
        f"({'met' if goal['fd'] else 'not met'}: {gen['fd_cls'] / floor['fd_cls']:.3f}).",
        f"Weakest classes by per-class recall: {weakest} (shipped.png).",
        *training_notes(ctx, getattr(model, "provenance", {})),
    ]
    return (f"{table}\n\nPer class (each class's images against that class's reference test images, k = 3):\n\n"
            f"{classes}")
