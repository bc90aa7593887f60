"""Per-token prediction time: dimension-wise AR head (KV cache / re-run prefix) vs MAR diffusion head (paper Table 5).

One call predicts `batch` tokens (one per row of z), eval mode, no_grad, no CFG. Default sizes are the paper's L
model: AR head width 1024, depth 4, 8 heads, 16 channels, 64 levels, z_dim 1024; diffusion head width 1024,
depth 3, token_dim 16, 100 sampling steps. `--quick` shrinks everything for a CPU smoke run.

    python benchmarks/heads.py [--device cpu] [--repeats 10] [--budget 20] [--threads 0] [--quick]

Last line: RESULT uncached_over_cached_b256=<x> diffusion_over_cached_b1=<x> diffusion_over_cached_b256=<x>
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from tokenbridge.diffusion import DiffusionHead
from tokenbridge.heads import DimensionwiseARHead


def _time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int, budget_s: float
) -> dict[str, list[float]]:
    """Per-call times in ms of every fn, measured round-robin (one call of each per round) so that load changes
    on a shared machine hit all methods alike. Up to `repeats` rounds after `warmup` untimed ones; stops early,
    after at least one round, once the timed calls have used `budget_s` seconds per method."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    spent = 0.0
    while len(times[next(iter(fns))]) < repeats and spent < budget_s * 1e3 * len(fns):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
            spent += times[name][-1]
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10, help="max timed rounds per batch size (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds per batch size")
    parser.add_argument("--budget", type=float, default=20.0, help="timed seconds per method and batch size")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256], help="tokens predicted per call")
    parser.add_argument("--diffusion-steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave torch's default)")
    parser.add_argument("--quick", action="store_true", help="small sizes (width 256) for a fast CPU smoke run")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.budget <= 0:
        raise ValueError(f"need --repeats >= 1, --warmup >= 0, --budget > 0; got {args.repeats}, {args.warmup}, "
                         f"{args.budget}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    width, z_dim, depth_ar, heads = (256, 256, 2, 4) if args.quick else (1024, 1024, 4, 8)
    channels, levels, depth_diff = 16, 64, (2 if args.quick else 3)

    torch.manual_seed(0)
    ar = DimensionwiseARHead(z_dim, channels, levels, width=width, depth=depth_ar, num_heads=heads)
    diff = DiffusionHead(z_dim, channels, width=width, depth=depth_diff)
    # move the zero-initialised AdaLN weights off zero as training would (the work done is the same either way)
    with torch.no_grad():
        for p in list(ar.parameters()) + list(diff.parameters()):
            p.add_(torch.randn_like(p) * 0.02)
    ar, diff = ar.to(device).eval(), diff.to(device).eval()
    n_ar = sum(p.numel() for p in ar.parameters()) / 1e6
    n_diff = sum(p.numel() for p in diff.parameters()) / 1e6
    print(f"device={device} threads={torch.get_num_threads()} AR head {width}x{depth_ar} ({n_ar:.1f}M params, "
          f"{channels} channels, {levels} levels); diffusion head {width}x{depth_diff} ({n_diff:.1f}M params, "
          f"{args.diffusion_steps} steps); <= {args.repeats} interleaved rounds, median; +- = half range")

    gen = torch.Generator(device=device)
    methods = {
        "ar_cached": lambda z: ar.sample(z, generator=gen, use_cache=True),
        "ar_uncached": lambda z: ar.sample(z, generator=gen, use_cache=False),
        "diffusion": lambda z: diff.sample(z, num_steps=args.diffusion_steps, generator=gen),
    }
    rows, ratios = [], {}
    with torch.no_grad():
        for batch in args.batches:
            z = torch.randn(batch, z_dim, device=device)
            gen.manual_seed(0)
            times = _time_interleaved(
                {name: (lambda f=fn: f(z)) for name, fn in methods.items()}, device, args.repeats, args.warmup,
                args.budget,
            )
            base = statistics.median(times["ar_cached"])
            for name, ts in times.items():
                ms = statistics.median(ts)
                ratios[(name, batch)] = ms / base
                rows.append((name, batch, ms, (max(ts) - min(ts)) / 2, len(ts), ms / batch, ms / base))

    print(f"{'method':<12} {'batch':>5} {'ms/call':>12} {'+-':>8} {'runs':>4} {'ms/token':>10} {'x cached':>9}")
    for name, batch, ms, spread, runs, per_token, ratio in rows:
        print(f"{name:<12} {batch:>5} {ms:>12.2f} {spread:>8.2f} {runs:>4} {per_token:>10.3f} {ratio:>9.2f}")
    big, small = max(args.batches), min(args.batches)
    print(
        f"RESULT uncached_over_cached_b{big}={ratios[('ar_uncached', big)]:.2f} "
        f"diffusion_over_cached_b{small}={ratios[('diffusion', small)]:.2f} "
        f"diffusion_over_cached_b{big}={ratios[('diffusion', big)]:.2f}"
    )


if __name__ == "__main__":
    main()
