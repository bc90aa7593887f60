"""Throughput of the kl16 VAE encoder (MAR's KL-16, 256x256x3 -> 16x16x16) on this CPU, and FLOPs per image.

    python benchmarks/encoder_speed.py                      # batch 8 and 32, fp32 and bf16 autocast, 2 threads
    python benchmarks/encoder_speed.py --batches 8 --repeats 5 --no-generator

Random weights (`tokenbridge.autoencoder.build_vae("kl16")`; speed does not depend on the values), random images in
[-1, 1], `torch.no_grad()`, `vae.encode` (posterior mean, what `cache-latents` stores). Each (dtype, batch) is timed
`--repeats` times after one warm-up call; the table shows the median images/s. FLOPs per image are counted with
`torch.utils.flop_counter.FlopCounterMode` (matmul / conv FLOPs, 2 per multiply-add; GroupNorm, SiLU and softmax are
not counted, they are a few % of the total). Unless `--no-generator`, the FLOPs of one TokenBridge-L training step
per image (forward + backward, at the mean MAR mask ratio) are counted as well, for the GPU throughput estimate in
docs/scale.md. Last line: `RESULT kl16_encode_images_s=<best median images/s> kl16_gflops_per_image=<x> ...`.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from tokenbridge.autoencoder import build_vae


def count_flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def mean_mask_ratio(low: float = 0.7, high: float = 1.0, loc: float = 1.0, scale: float = 0.25) -> float:
    """Mean of normal(loc, scale) truncated to [low, high] (the MAR training mask ratio)."""
    def phi(x: float) -> float:
        return math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)

    def cdf(x: float) -> float:
        return 0.5 * (1 + math.erf(x / math.sqrt(2)))

    a, b = (low - loc) / scale, (high - loc) / scale
    return loc - scale * (phi(b) - phi(a)) / (cdf(b) - cdf(a))


def generator_train_flops(preset: str, batch: int = 2) -> tuple[float, int, float]:
    """(FLOPs per image of one training step forward + backward, parameter count, mask ratio used)."""
    from tokenbridge.generators.tokenbridge import TokenBridgeGenerator

    torch.manual_seed(0)
    model = TokenBridgeGenerator({"preset": preset})
    ratio = mean_mask_ratio(low=model.mask_ratio_min)
    h, w = model.grid_size
    indices = torch.randint(0, model.levels, (batch, h, w, model.channels))
    labels = torch.randint(0, model.num_classes, (batch,))

    def step() -> None:
        model.loss((indices, labels), mask_ratio=ratio).backward()

    flops = count_flops(step)
    return flops / batch, sum(p.numel() for p in model.parameters()), ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast measurements")
    parser.add_argument("--no-generator", action="store_true", help="skip counting the generator's training FLOPs")
    parser.add_argument("--generator", default="tokenbridge-l", help="generator preset whose FLOPs to count")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    vae = build_vae("kl16").eval()
    params = sum(p.numel() for p in vae.encoder.parameters()) + sum(p.numel() for p in vae.quant_conv.parameters())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        one = torch.rand(1, 3, args.size, args.size, generator=g) * 2 - 1
        enc_flops = count_flops(lambda: vae.encode(one))
    print(f"kl16 encoder: {params / 1e6:.1f}M parameters, {enc_flops / 1e9:.1f} GFLOPs per {args.size}x{args.size} "
          f"image (FlopCounterMode), torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)

    modes = [("fp32", contextlib.nullcontext)]
    if not args.no_bf16:
        modes.append(("bf16 autocast", lambda: torch.autocast("cpu", dtype=torch.bfloat16)))
    rows = []
    for name, ctx in modes:
        for batch in args.batches:
            images = torch.rand(batch, 3, args.size, args.size, generator=g) * 2 - 1
            rates = []
            with torch.no_grad(), ctx():
                vae.encode(images)  # warm-up
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    out = vae.encode(images)
                    rates.append(batch / (time.perf_counter() - t0))
            assert tuple(out.shape) == (batch, 16, args.size // 16, args.size // 16), out.shape
            med = statistics.median(rates)
            rows.append((name, batch, med, rates))
            print(f"{name:14s} batch {batch:3d}: {med:.2f} images/s  ({', '.join(f'{r:.2f}' for r in rates)})",
                  flush=True)

    print("\n| precision | batch | images/s (median) | runs | achieved GFLOP/s |\n|---|---|---|---|---|")
    for name, batch, med, rates in rows:
        runs = ", ".join(f"{r:.2f}" for r in rates)
        print(f"| {name} | {batch} | {med:.2f} | {runs} | {med * enc_flops / 1e9:.0f} |")
    best = max(rows, key=lambda r: r[2])
    fp32_best = max((r for r in rows if r[0] == "fp32"), key=lambda r: r[2])

    extra = ""
    if not args.no_generator:
        gen_flops, gen_params, ratio = generator_train_flops(args.generator)
        print(f"\n{args.generator}: {gen_params / 1e6:.1f}M parameters, {gen_flops / 1e9:.1f} GFLOPs per image per "
              f"training step (forward + backward, mask ratio {ratio:.3f})")
        extra = f" {args.generator.replace('-', '_')}_train_gflops_per_image={gen_flops / 1e9:.1f}"
    print(f"RESULT kl16_encode_images_s={best[2]:.2f} kl16_encode_images_s_fp32={fp32_best[2]:.2f} "
          f"best=\"{best[0]} batch {best[1]}\" kl16_gflops_per_image={enc_flops / 1e9:.1f}{extra}")


if __name__ == "__main__":
    main()
