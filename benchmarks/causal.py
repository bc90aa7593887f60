"""Sampling throughput: causal TokenBridge (tokenbridge-ar, KV-cached raster GPT) vs the MAR TokenBridge generator.

Both draw each 8x8 grid token's 4 channels x 64 levels with the same dimension-wise AR head (64 wide x 2); they
differ in the backbone: the shipped `fmnist` generator re-runs its MAR backbone (192 wide, 3+3 blocks) over the
whole sequence at each of `--num-iter` steps, the causal one runs one new position per step against KV caches
(192 wide x 6 blocks), 64 steps per image. One measurement is `tokenbridge.generate.generate` (sampling + VAE
decode) of `batch` images with guidance (`--cfg`, linear schedule, 2N rows per step) for both; the two alternate
(A B A B ...) so that machine load hits both alike, and the median of `--repeats` runs is reported, as wall-clock
images/s and as images per CPU second of this process (less sensitive to other work on the machine). FLOPs per
image: torch's FlopCounterMode on one batch of 4.

    python benchmarks/causal.py [--ar runs/fmnist-ar/checkpoint.pt] [--tb fmnist] [--batch 1 64] [--repeats 3]

`--ar` defaults to an untrained `fmnist` preset (speed does not depend on the weights' values).
Last line: RESULT ar_over_tb_b1=<x> ar_over_tb_b64=<x> ar_images_s_b64=<x> tb_images_s_b64=<x> (wall clock).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from tokenbridge.checkpoint import load_generator
from tokenbridge.generate import generate, resolve_vae
from tokenbridge.generators import CausalTokenBridgeGenerator


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ar", default=None, help="causal generator (checkpoint / .safetensors); default: untrained")
    p.add_argument("--tb", default="fmnist", help="MAR TokenBridge generator (shipped name, .safetensors, checkpoint)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--num-iter", type=int, default=16, help="MAR steps of the TokenBridge generator")
    p.add_argument("--cfg", type=float, default=3.0, help="guidance scale (linear schedule), both")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads (0: leave torch's default)")
    args = p.parse_args(argv)
    if min(args.batch) < 1 or args.repeats < 1 or args.num_iter < 1:
        p.error("--batch, --repeats and --num-iter must be >= 1")
    return args


def causal_model(spec: str | None) -> torch.nn.Module:
    if spec is not None:
        return load_generator(spec, family="tokenbridge-ar")
    torch.manual_seed(0)
    model = CausalTokenBridgeGenerator.from_config({"preset": "fmnist", "head": {"order": [1, 3, 2, 0]}}).eval()
    model.provenance = {"vae": "fmnist"}  # decoded with the VAE the shipped generator records
    return model


def timed(model: torch.nn.Module, vae: torch.nn.Module, batch: int, options: dict) -> tuple[float, float]:
    """(images per wall-clock second, images per CPU second of this process) of one generate call."""
    labels = [i % 10 for i in range(batch)]
    wall, cpu = time.perf_counter(), time.process_time()
    generate(model, labels, vae=vae, seed=1, **options)
    return batch / (time.perf_counter() - wall), batch / (time.process_time() - cpu)


def flops_per_image(model: torch.nn.Module, vae: torch.nn.Module, options: dict, batch: int = 4) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        generate(model, list(range(batch)), vae=vae, seed=0, **options)
    return counter.get_total_flops() / batch


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {"causal (tokenbridge-ar)": causal_model(args.ar),
              "MAR (tokenbridge)": load_generator(args.tb, family="tokenbridge")}
    vaes = {name: resolve_vae(m) for name, m in models.items()}
    options = {"causal (tokenbridge-ar)": {"cfg": args.cfg, "cfg_schedule": "linear"},
               "MAR (tokenbridge)": {"num_iter": args.num_iter, "cfg": args.cfg, "cfg_schedule": "linear"}}
    flops = {name: flops_per_image(m, vaes[name], options[name]) for name, m in models.items()}
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    rates: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for batch in args.batch:
        for name, m in models.items():  # warm-up (allocator, first-call dispatch)
            timed(m, vaes[name], batch, options[name])
        for _ in range(args.repeats):
            for name, m in models.items():
                rates.setdefault((name, batch), []).append(timed(m, vaes[name], batch, options[name]))
    print(f"threads {torch.get_num_threads()}, cfg {args.cfg} linear, MAR num_iter {args.num_iter}, "
          f"median of {args.repeats} alternating runs\n")
    print("| generator | params | batch | images/s (wall) | runs (wall) | images / CPU s | GFLOP/image |")
    print("|---|---|---|---|---|---|---|")
    med: dict[tuple[str, int], float] = {}
    for (name, batch), values in rates.items():
        med[(name, batch)] = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        runs = ", ".join(f"{v[0]:.2f}" for v in values)
        print(f"| {name} | {params[name] / 1e6:.2f}M | {batch} | {med[(name, batch)]:.2f} | {runs} | {cpu:.2f} | "
              f"{flops[name] / 1e9:.3f} |")
    ar, tb = models
    ratios = " ".join(f"ar_over_tb_b{b}={med[(ar, b)] / med[(tb, b)]:.3f}" for b in args.batch)
    last = max(args.batch)
    print(f"RESULT {ratios} ar_images_s_b{last}={med[(ar, last)]:.2f} tb_images_s_b{last}={med[(tb, last)]:.2f}")


if __name__ == "__main__":
    main()
