"""`tokenbridge sweep`: sample a trained generator of any family over a cfg x temperature (x num_iter) grid and
score every cell with the offline classifier metrics of `tokenbridge evaluate`, to pick sampling settings.

    result = run_sweep("fmnist", cfg=[1.0, 3.0], temperature=[0.9, 1.0], out="out/sweep")

Every cell samples the same labels (``per_class`` of each class) from the same seed, so cells differ only in their
settings. The images are scored exactly as ``tokenbridge evaluate`` scores a samples .npz
(``evaluate.evaluate_samples``: FD in the embedded classifier's feature space, k-NN precision and recall against
the Fashion-MNIST test split, class accuracy); the numbers are comparable within this project only. The out folder
gets sweep.md (the table), sweep.json (every number and the full sampling options of each cell) and sweep.png (FD
against recall and against precision, one curve per temperature, points labelled by cfg).
"""
from __future__ import annotations

import itertools
import json
import math
import operator
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .checkpoint import load_generator
from .classifier import FMNISTClassifier, load_classifier
from .data import as_tensors
from .evaluate import evaluate_samples
from .files import atomic_path, check_writable
from .generate import generate, resolve_vae, sampling_defaults
from .generators import check_sample_options, sample_options
from .markdown import fmt, markdown_table
from .repro.plots import pyplot
from .repro.runs import class_labels
from .vae import VAE

SWEEP_FILES = ("sweep.md", "sweep.json", "sweep.png")
# the swept sampling options, in the order of the table's columns; num_iter is swept only when values are given
AXES = ("cfg", "temperature", "num_iter")
METRICS = (("fd_cls", "FD"), ("precision", "precision"), ("recall", "recall"), ("class_accuracy", "accuracy"))


# ---------------------------------------------------------------------------------------------- input checks
def check_axis(name: str, values: Sequence[Any] | None, integer: bool = False) -> list[Any] | None:
    """The values of one swept option as a list: floats finite and >= 0 (cfg, temperature) or, with ``integer``,
    integers >= 1 (num_iter). None stays None (the option is not swept). ValueError naming the option and the bad
    value for an empty list, a repeated value, a wrong type or a value out of range."""
    if values is None:
        return None
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"sweep {name}: expected a list of values, got {values!r}")
    if len(values) == 0:
        raise ValueError(f"sweep {name}: the list of values is empty; give at least one value")
    checked: list[Any] = []
    for value in values:
        try:
            if isinstance(value, bool):  # True would silently be 1
                raise TypeError
            number = operator.index(value) if integer else float(value)
        except (TypeError, ValueError):
            kind = "an integer" if integer else "a number"
            raise ValueError(f"sweep {name} value {value!r} is not {kind}") from None
        if integer and number < 1:
            raise ValueError(f"sweep {name} value {number} must be an integer >= 1")
        if not integer and not 0 <= number < math.inf:  # also refuses NaN
            raise ValueError(f"sweep {name} value {value!r} must be finite and >= 0")
        if number in checked:  # two identical rows would only cost time
            raise ValueError(f"sweep {name} value {value!r} is given twice")
        checked.append(number)
    return checked


def check_out_folder(out: str | Path, overwrite: bool) -> Path:
    """The out folder, refused (ValueError naming it) when it already holds sweep results and ``overwrite`` is
    False, or when it could not be written. Creates nothing."""
    out = Path(out)
    found = [name for name in SWEEP_FILES if (out / name).exists()]
    if found and not overwrite:
        raise ValueError(f"out folder {out} already holds sweep results ({', '.join(found)}); choose another folder "
                         f"or pass --overwrite (overwrite=True) to replace them")
    for name in SWEEP_FILES:
        check_writable(out / name, "sweep output")
    return out


def grid_cells(model: nn.Module, axes: dict[str, list[Any] | None]) -> list[dict[str, Any]]:
    """The grid's cells as sampling options {option: value} (cfg innermost, so that each temperature's curve is
    one run of rows), each validated for ``model``'s family. ValueError when a swept option is not one of the
    family's sampling options (names the family and its options)."""
    family = type(model)
    known = sample_options(family).model_fields
    swept = {name: values for name, values in axes.items() if values is not None}
    for name in swept:
        if name not in known:
            raise ValueError(f"the {getattr(family, 'family', family.__name__)!r} generator has no sampling option "
                             f"{name!r} (its options: {', '.join(known)}); leave {name} out of the sweep")
    order = [name for name in reversed(AXES) if name in swept]  # outermost first: num_iter, temperature, cfg
    cells = [dict(zip(order, values)) for values in itertools.product(*(swept[name] for name in order))]
    for cell in cells:
        check_sample_options(family, cell, prefix="sweep option")
    return cells


def cell_options(model: nn.Module, cell: dict[str, Any]) -> dict[str, Any]:
    """Every sampling option a cell runs with: the cell's, else the generator's recorded default (for the cell's
    sampler: `sampling_defaults`), else the family's signature default (what `generate` resolves), so the json says
    exactly what was sampled."""
    signature = sample_options(type(model))().model_dump(mode="json")
    return {**signature, **sampling_defaults(model, cell.get("sampler")), **cell}


# ---------------------------------------------------------------------------------------------- one cell
def score_cell(model: nn.Module, labels: torch.Tensor, cell: dict[str, Any], *, seed: int,
               device: str | torch.device, vae: VAE, classifier: FMNISTClassifier, real_images: torch.Tensor,
               batch_size: int = 256) -> dict[str, Any]:
    """Sample labels [N] with the cell's options from ``seed`` and score the images [N, 1, 32, 32] as
    `tokenbridge evaluate` does against real_images [M, 1, 32, 32]. Returns the cell's options, fd_cls,
    precision, recall, class_accuracy, is_cls, num_samples and seconds (sampling + scoring)."""
    start = time.time()
    result = generate(model, labels.tolist(), vae=vae, seed=seed, device=device, batch_size=batch_size, **cell)
    metrics = evaluate_samples(result["images"], labels, device=device, classifier=classifier,
                               real_images=real_images)
    return {**cell, **metrics, "options": cell_options(model, cell), "seconds": time.time() - start}


# ---------------------------------------------------------------------------------------------- the sweep
def run_sweep(model: str | Path | nn.Module = "fmnist", cfg: Sequence[float] | None = (3.0,),
              temperature: Sequence[float] | None = (1.0,), num_iter: Sequence[int] | None = None,
              per_class: int = 100, seed: int = 0, device: str | torch.device = "cpu",
              out: str | Path = "out/sweep", overwrite: bool = False, *, vae: str | VAE | None = None,
              classifier: FMNISTClassifier | None = None, real_images: torch.Tensor | None = None,
              batch_size: int = 256, progress: bool = True) -> dict[str, Any]:
    """Sample ``model`` (a generator, or any spec `load_generator` takes) at every cell of the grid and score it.

    cfg, temperature, num_iter: the values of each swept option (None: not swept, the generator's default).
    per_class: samples of each of the classifier's classes per cell (10 classes: 10 * per_class samples).
    vae: default the generator's recorded VAE; classifier: default the shipped one; real_images float
    [M, 1, 32, 32] in [-1, 1]: default the Fashion-MNIST test split (as `tokenbridge evaluate`). Every input is
    checked (ValueError naming the bad value) before anything is sampled; existing results in ``out`` are replaced
    only with ``overwrite``. Writes out/sweep.md, sweep.json, sweep.png atomically. Returns the json's content:
    rows (one dict per cell), best (the row with the lowest FD) and the settings.
    """
    axes = {"cfg": check_axis("cfg", cfg), "temperature": check_axis("temperature", temperature),
            "num_iter": check_axis("num_iter", num_iter, integer=True)}
    if all(values is None for values in axes.values()):
        raise ValueError("sweep: give the values of at least one of cfg, temperature, num_iter")
    per_class = check_axis("per_class", [per_class], integer=True)[0]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"sweep seed {seed!r} is not an integer")
    out = check_out_folder(out, overwrite)
    spec = str(model) if isinstance(model, (str, Path)) else type(model).__name__
    model = load_generator(model, device) if isinstance(model, (str, Path)) else model.to(device).eval()
    cells = grid_cells(model, axes)
    vae = resolve_vae(model, vae, device)
    classifier = classifier if classifier is not None else load_classifier(device=device)
    labels = class_labels(per_class, classifier.num_classes)
    if getattr(model, "num_classes", classifier.num_classes) < classifier.num_classes:
        raise ValueError(f"the generator knows {model.num_classes} classes but the classifier scores "
                         f"{classifier.num_classes}: a sweep samples every class")
    real_images = real_images if real_images is not None else as_tensors("test")[0]
    rows = []
    for cell in tqdm(cells, desc="sweep cells", disable=not progress):
        rows.append(score_cell(model, labels, cell, seed=seed, device=device, vae=vae, classifier=classifier,
                               real_images=real_images, batch_size=batch_size))
    result = {"model": spec, "family": getattr(type(model), "family", None), "per_class": per_class,
              "num_samples": len(labels), "real_images": len(real_images), "seed": seed, "device": str(device),
              "axes": {name: values for name, values in axes.items() if values is not None},
              "rows": rows, "best": best_cell(rows)}
    write_results(out, result)
    return result


def best_cell(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The row with the lowest FD (the first one on a tie)."""
    return min(rows, key=lambda row: row["fd_cls"])


# ---------------------------------------------------------------------------------------------- outputs
def _setting(value: Any) -> str:
    """A sampling setting as written: 1.0 -> "1", 0.9 -> "0.9" (fmt's three decimals suit metrics, not knobs)."""
    return f"{value:g}" if isinstance(value, float) else fmt(value)


def sweep_table(rows: Sequence[dict[str, Any]]) -> str:
    """The markdown table: one row per cell, its sampling settings (num_iter as run, swept or not), the metrics
    and its seconds."""
    header = [*AXES, *(title for _, title in METRICS), "seconds"]
    body = [[_setting(row["options"].get(name)) for name in AXES] + [row[key] for key, _ in METRICS]
            + [f"{row['seconds']:.1f}"] for row in rows]
    return markdown_table(header, body)


def describe_best(result: dict[str, Any]) -> str:
    """One line naming the best cell by FD and its metrics."""
    best = result["best"]
    settings = ", ".join(f"{name} {_setting(best['options'].get(name))}" for name in AXES)
    scores = ", ".join(f"{title} {fmt(best[key])}" for key, title in METRICS)
    return f"best cell by FD: {settings} ({scores})"


def plot_sweep(rows: Sequence[dict[str, Any]]) -> Any:
    """A matplotlib figure: FD against recall and FD against precision (two panels); one curve per temperature (and
    num_iter when it is swept), through the cells in cfg order, each point labelled with its cfg."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    curves: dict[tuple[Any, Any], list[dict[str, Any]]] = {}
    for row in rows:
        curves.setdefault((row["options"].get("temperature"), row.get("num_iter")), []).append(row)
    for ax, key, title in zip(axes, ("recall", "precision"), ("FD against recall", "FD against precision")):
        for (temp, steps), members in curves.items():
            members = sorted(members, key=lambda row: row["options"].get("cfg") or 0.0)
            label = f"temperature {_setting(temp)}" + (f", num_iter {steps}" if steps is not None else "")
            ax.plot([r[key] for r in members], [r["fd_cls"] for r in members], marker="o", label=label)
            for r in members:
                ax.annotate(f"cfg {_setting(r['options'].get('cfg'))}", (r[key], r["fd_cls"]), fontsize=7,
                            textcoords="offset points", xytext=(4, 3))
        ax.set(title=title, xlabel=f"{key} (higher = better)", ylabel="FD, classifier features (lower = better)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def sweep_command(result: dict[str, Any], out: Path) -> str:
    """The `tokenbridge sweep` command line that repeats a sweep (of a generator given by its spec)."""
    parts = ["tokenbridge", "sweep", "--model", result["model"]]
    for name, values in result["axes"].items():
        parts += [f"--{name.replace('_', '-')}", *(_setting(v) for v in values)]
    parts += ["--per-class", str(result["per_class"]), "--seed", str(result["seed"]), "--out", str(out)]
    return shlex.join(parts + (["--device", result["device"]] if result["device"] != "cpu" else []))


def _markdown(result: dict[str, Any], out: Path) -> str:
    """sweep.md: the command, what was swept and how it was scored, the table and the best cell."""
    axes = "; ".join(f"{name} {', '.join(_setting(v) for v in values)}" for name, values in result["axes"].items())
    total = sum(row["seconds"] for row in result["rows"])
    return (f"# Sampling sweep of `{result['model']}` ({result['family']})\n\n`{sweep_command(result, out)}`\n\n"
            f"{axes}; {result['per_class']} samples per class ({result['num_samples']} per cell), seed "
            f"{result['seed']}, device {result['device']}, {total:.0f} s in all. Scored as `tokenbridge evaluate` "
            f"scores samples: FD in the embedded classifier's feature space and k-NN precision / recall (k = 3) "
            f"against {result['real_images']} test images, class accuracy of the conditioning labels. Comparable "
            f"within this project only.\n\n{sweep_table(result['rows'])}\n\n{describe_best(result)}\n")


def write_results(out: Path, result: dict[str, Any]) -> list[Path]:
    """Write out/sweep.md, sweep.json and sweep.png, each atomically; returns their paths."""
    paths = [out / name for name in SWEEP_FILES]
    with atomic_path(paths[0]) as tmp:
        tmp.write_text(_markdown(result, out))
    with atomic_path(paths[1]) as tmp:
        tmp.write_text(json.dumps(result, indent=1) + "\n")
    fig = plot_sweep(result["rows"])
    try:
        with atomic_path(paths[2]) as tmp:
            fig.savefig(tmp, format="png", dpi=110)  # the temporary's name has no .png suffix to go by
    finally:
        pyplot().close(fig)
    return paths
