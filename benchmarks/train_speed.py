"""Training throughput of every family's `fmnist` generator against this machine's matmul throughput, and the
trainer's speed levers (train.compile, train.fused_adamw) against today's trainer (levers off).

    python benchmarks/train_speed.py                      # all families, then the lever comparison
    python benchmarks/train_speed.py --families tokenbridge --repeats 5

1. Per family: FLOPs of one training step (forward + backward, torch's FlopCounterMode, batch 64), the step time
   through `tokenbridge.train.train` with the levers off (median of its log windows, the first dropped), the
   achieved GFLOP/s, and 1024^3 float32 matmuls timed for 3 s in the same process just before and after (median
   and best GFLOP/s: the machine's practical peak at that moment); from a profiled step, the share of CPU time in
   matmuls + attention and in AdamW (1 / matmul share bounds what removing everything else could gain), host
   synchronisations per step (aten::_local_scalar_dense: item/int/float/bool of a tensor, and aten::nonzero:
   boolean indexing) and the time to load one batch.
2. Levers (default: train.fused_adamw; --compile adds train.compile): the tokenbridge family trained with the
   levers off and on, alternating (off on off on ...) in this
   process so that the load of a shared machine hits both alike. Last line:
   ``RESULT train_speedup=<median over alternations of steps/s with levers / steps/s without>``.

The machine's load average is printed with every measurement: on a shared CPU the absolute numbers move with it,
the ratios (step over matmul, levers over today) much less.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import TensorDataset
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenbridge.generators import FAMILIES, get_family  # noqa: E402
from tokenbridge.optim import adamw, param_groups  # noqa: E402
from tokenbridge.train import train  # noqa: E402

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero")
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
              "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward")
TODAY = {"compile": False, "fused_adamw": False}  # the trainer before the levers (its default is fused_adamw)


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def random_batches(family: str, n: int, generator: torch.Generator) -> TensorDataset:
    """n random training items in the family's format: token indices [n, 8, 8, 4] or latents [n, 8, 8, 4]."""
    cls = get_family(family)
    labels = torch.randint(0, 10, (n,), generator=generator)
    if getattr(cls, "items", "indices") == "latents":
        return TensorDataset(torch.randn(n, 8, 8, 4, generator=generator), labels)
    return TensorDataset(torch.randint(0, 64, (n, 8, 8, 4), generator=generator), labels)


def matmul_gflops(size: int = 1024, seconds: float = 3.0) -> tuple[float, float]:
    """float32 [size, size] @ [size, size] products repeated for about ``seconds``: (median, best) GFLOP/s. On a
    loaded machine the median is the share of the cores a long computation gets, comparable with the median step."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 5:
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * size**3 / statistics.median(times) / 1e9, 2 * size**3 / min(times) / 1e9


def step_cost(family: str, batch: int) -> dict[str, float]:
    """One training step of the family's fmnist generator (forward + backward of its loss, AdamW), counted on the
    third step (the first ones build lazy state): GFLOP, host syncs, the share of its CPU time spent in matmuls and
    attention (torch profiler, self time), the share in the optimizer, and the seconds to load one batch."""
    torch.manual_seed(0)
    model = get_family(family).from_config({"preset": "fmnist"})
    opt = adamw(param_groups(model, 0.02), 1e-4, (0.9, 0.95), 1e-8, fused=False)
    data = random_batches(family, batch, torch.Generator().manual_seed(1))
    t = time.perf_counter()
    cols = tuple(torch.stack(c) for c in zip(*[data[i] for i in range(batch)]))  # a DataLoader batch
    load_s = time.perf_counter() - t

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model.loss(cols).backward()
        with torch.profiler.record_function("optimizer"):
            opt.step()

    step()
    with FlopCounterMode(display=False) as flops:
        step()
    with torch.profiler.profile() as prof:
        step()
    with torch.profiler.profile() as model_only:  # syncs of the model's step (CPU AdamW reads its step counts)
        model.loss(cols).backward()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    syncs = sum(e.count for e in model_only.key_averages() if e.key in SYNC_OPS)
    return {"gflop": flops.get_total_flops() / 1e9, "syncs": syncs,
            "matmul": sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / total,
            "optimizer": next(e.cpu_time_total for e in events if e.key == "optimizer") / total, "load_s": load_s}


def train_rates(family: str, steps: int, window: int, batch: int, levers: dict) -> list[float]:
    """Steps/s of each log window after the first of a `train` run of ``steps`` on random items."""
    data = random_batches(family, batch * steps, torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as out:
        train({"out_dir": out, "family": family, "model": {"preset": "fmnist"},
               "train": {"steps": steps, "global_batch": batch, "lr": 1e-3, "warmup_steps": 2, "ema": 0.999,
                         "log_every": window, "ckpt_every": 0, "device": "cpu", **levers}}, dataset=data)
        rates = [json.loads(line)["it_s"] for line in open(Path(out) / "log.jsonl")]
    return rates[1:]


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def families_table(families: list[str], args: argparse.Namespace) -> None:
    print("| family | GFLOP/step | step s (median [min, max]) | GFLOP/s | matmul GFLOP/s (median, best) "
          "| step / matmul median | matmul+attention share of step | AdamW share | host syncs/step | batch load s "
          "| load avg |\n|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for family in families:
        cost = step_cost(family, args.batch)
        before = matmul_gflops()
        rates = train_rates(family, args.table_steps, args.window, args.batch, TODAY)
        after = matmul_gflops()
        median, best = (before[0] + after[0]) / 2, max(before[1], after[1])
        step_s = [1 / r for r in rates]
        achieved = cost["gflop"] / statistics.median(step_s)
        print(f"| {family} | {cost['gflop']:.1f} | {spread(step_s)} | {achieved:.1f} | {median:.1f}, {best:.1f} | "
              f"{achieved / median:.0%} | {cost['matmul']:.0%} | {cost['optimizer']:.0%} | {cost['syncs']:.0f} | "
              f"{cost['load_s']:.4f} | {load()} |", flush=True)


def adamw_table(repeats: int = 20) -> None:
    """The AdamW update alone on the tokenbridge fmnist generator's parameters (random gradients): the multi-tensor
    update (today) and the fused one alternating, ``repeats`` times each."""
    torch.manual_seed(0)
    model = get_family("tokenbridge").from_config({"preset": "fmnist"})
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opts = {"foreach (today)": adamw(param_groups(model, 0.02), 1e-4, (0.9, 0.95), 1e-8, fused=False),
            "fused": adamw(param_groups(model, 0.02), 1e-4, (0.9, 0.95), 1e-8, fused=True)}
    times: dict[str, list[float]] = {name: [] for name in opts}
    for i in range(repeats + 1):
        for name, opt in opts.items():
            t = time.perf_counter()
            opt.step()
            if i:  # the first step creates the optimizer state
                times[name].append(time.perf_counter() - t)
    print(f"\n| AdamW update, {sum(p.numel() for p in model.parameters()):,} parameters | ms (median [min, max]) |"
          "\n|---|---|")
    for name, values in times.items():
        print(f"| {name} | {spread([v * 1e3 for v in values])} |")
    print(f"load avg {load()}", flush=True)


def lever_comparison(args: argparse.Namespace) -> float:
    """Median over alternations of (levers' median steps/s) / (today's median steps/s in the same alternation):
    paired, so that a change of the machine's load between alternations cancels."""
    levers = {"compile": args.compile, "fused_adamw": args.fused_adamw}
    print(f"\nlevers: {levers}; tokenbridge fmnist, batch {args.batch}, {args.steps} steps per run, log window "
          f"{args.window}\n", flush=True)
    rates: dict[str, list[float]] = {"today": [], "levers": []}
    ratios = []
    for _ in range(args.repeats):
        pair = {}
        for name, options in (("today", TODAY), ("levers", levers)):
            pair[name] = train_rates("tokenbridge", args.steps, args.window, args.batch, options)
            rates[name] += pair[name]
            print(f"{name:7s} steps/s {spread(pair[name])}  load {load()}", flush=True)
        ratios.append(statistics.median(pair["levers"]) / statistics.median(pair["today"]))
        print(f"levers / today in this alternation: {ratios[-1]:.3f}", flush=True)
    print("\n| trainer | steps/s (median [min, max] of windows) | windows |\n|---|---|---|")
    for name, values in rates.items():
        print(f"| {name} | {spread(values)} | {len(values)} |")
    print(f"levers / today per alternation: {', '.join(f'{r:.3f}' for r in ratios)}")
    return statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="*", default=None, help="default: every family with an fmnist preset")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6, help="steps per training run of the lever comparison")
    parser.add_argument("--table-steps", type=int, default=5, help="steps per training run of the family table")
    parser.add_argument("--window", type=int, default=1, help="log window (steps); the first one is dropped")
    parser.add_argument("--repeats", type=int, default=4,
                        help="alternations of today's trainer and the levers (0: no comparison, no RESULT line)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="also train.compile (its compilation falls in the first, dropped, window)")
    parser.add_argument("--fused-adamw", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    if min(args.steps, args.table_steps) // args.window < 2:
        parser.error("--steps and --table-steps must cover at least two log windows (the first is dropped)")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    families = args.families if args.families is not None else [
        name for name, cls in FAMILIES.items() if "fmnist" in getattr(cls, "presets", {})]
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, load avg {load()}\n")
    if families:
        families_table(families, args)
    adamw_table()
    if args.repeats:
        print(f"RESULT train_speedup={lever_comparison(args):.3f}")


if __name__ == "__main__":
    main()
