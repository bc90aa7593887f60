"""End-to-end sampling throughput: the TokenBridge generator vs the continuous MAR generator on the same backbone.

Both shipped Fashion-MNIST generators share the MAR backbone (192 wide, 3+3 blocks, 8x8 tokens); TokenBridge draws
each token with its dimension-wise AR head (4 channels x 64 levels), continuous MAR with its diffusion head
(DDPM, `--num-sampling-steps` respaced steps). One measurement is `tokenbridge.generate.generate` (sampling + VAE
decode) of `batch` images at the same num_iter and cfg for both; the families alternate (A B A B ...) so that
machine load hits both alike, and the median of `--repeats` runs is reported. The FLOP count per image comes from
torch's FlopCounterMode on one batch (matmuls, convolutions and attention), so the ratio can be checked against
the hardware: a head's share of the FLOPs is what the paper's speed claim is about.

    python benchmarks/generators.py [--tb fmnist] [--mar fmnist-mar] [--batch 1 64] [--repeats 5] [--threads 2]

Last line: RESULT tb_over_mar_b1=<x> tb_over_mar_b64=<x> (TokenBridge images/s / continuous MAR images/s).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from tokenbridge.checkpoint import load_generator
from tokenbridge.generate import generate, resolve_vae


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tb", default="fmnist", help="TokenBridge generator (shipped name, .safetensors, checkpoint)")
    p.add_argument("--mar", default="fmnist-mar", help="continuous MAR generator")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--num-iter", type=int, default=16, help="MAR steps, both families")
    p.add_argument("--cfg", type=float, default=3.0, help="guidance scale, both families (2N rows per step)")
    p.add_argument("--num-sampling-steps", type=int, default=100, help="DDPM steps of the diffusion head")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="torch threads (0: leave torch's default)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if min(args.batch) < 1 or args.repeats < 1 or args.num_iter < 1:
        p.error("--batch, --repeats and --num-iter must be >= 1")
    return args


def flops_per_image(model: torch.nn.Module, vae: torch.nn.Module, batch: int, options: dict) -> float:
    """FLOPs of sampling + decoding ``batch`` images, divided by ``batch``."""
    counter = FlopCounterMode(display=False)
    with counter:
        generate(model, list(range(batch)), vae=vae, seed=0, device=model_device(model), **options)
    return counter.get_total_flops() / batch


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def images_per_s(model: torch.nn.Module, vae: torch.nn.Module, batch: int, options: dict) -> float:
    labels = [i % 10 for i in range(batch)]
    if model_device(model).type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    generate(model, labels, vae=vae, seed=1, device=model_device(model), **options)
    if model_device(model).type == "cuda":
        torch.cuda.synchronize()
    return batch / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {"TokenBridge": load_generator(args.tb, args.device, family="tokenbridge"),
              "continuous MAR": load_generator(args.mar, args.device, family="mar")}
    vaes = {name: resolve_vae(m, device=args.device) for name, m in models.items()}
    common = {"num_iter": args.num_iter, "cfg": args.cfg}
    options = {"TokenBridge": common, "continuous MAR": {**common, "num_sampling_steps": args.num_sampling_steps}}
    flops = {name: flops_per_image(m, vaes[name], 4, options[name]) for name, m in models.items()}
    rates: dict[tuple[str, int], list[float]] = {}
    for batch in args.batch:
        for name, m in models.items():  # warm-up (allocator, first-call dispatch)
            images_per_s(m, vaes[name], batch, options[name])
        for _ in range(args.repeats):
            for name, m in models.items():
                rates.setdefault((name, batch), []).append(images_per_s(m, vaes[name], batch, options[name]))
    print(f"device {args.device}, threads {torch.get_num_threads()}, num_iter {args.num_iter}, cfg {args.cfg}, "
          f"diffusion steps {args.num_sampling_steps}, median of {args.repeats}\n")
    print("| family | batch | images/s | runs (images/s) | GFLOP/image | achieved GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for (name, batch), values in rates.items():
        med = statistics.median(values)
        runs = ", ".join(f"{v:.2f}" for v in values)
        print(f"| {name} | {batch} | {med:.2f} | {runs} | {flops[name] / 1e9:.3f} | {med * flops[name] / 1e9:.1f} |")
    ratios = {b: statistics.median(rates[("TokenBridge", b)]) / statistics.median(rates[("continuous MAR", b)])
              for b in args.batch}
    print(f"\nFLOPs per image, continuous MAR / TokenBridge: {flops['continuous MAR'] / flops['TokenBridge']:.2f}")
    print("RESULT " + " ".join(f"tb_over_mar_b{b}={r:.3f}" for b, r in ratios.items()))


if __name__ == "__main__":
    main()
