"""Sampling speed of the sampler toolbox: each shipped family at a fast setting against today's sampler.

Today's sampler is ``sampler="paper"`` with the generator's recorded defaults (TokenBridge: 16 MAR steps, cfg 3.0
linear on every step; MAR and D2C also 100 DDPM steps per token). A fast setting is one of the frontier's named
settings (tokenbridge.repro.budgets.FRONTIER_SETTINGS; `tokenbridge repro frontier` scores their quality),
merged over the recorded defaults. One measurement is `tokenbridge.generate.generate` (sampling + VAE decode) of
``batch`` images; today's and the fast setting alternate (A B A B ...) in one process so that machine load hits
both alike, and the median of ``--repeats`` runs is reported after one untimed warm-up each (at the first batch
size). Under load from other processes, --threads 1 avoids the thread oversubscription that slows 2 threads.

    python benchmarks/samplers.py [--batch 1 64] [--repeats 3] [--threads 2] [--compile]
        [--tb-setting NAME] [--mar-setting NAME] [--d2c-setting NAME] [--only tb mar d2c]

--compile also times today's sampler with the backbone's forward (and the diffusion head's denoiser) wrapped in
torch.compile (inductor, dynamic shapes: the encoder's visible length and the head's row count change from step
to step), compilation excluded by a warm-up run.

Last line: RESULT tb_speedup_b64=<x> mar_speedup_b64=<x> d2c_speedup_b64=<x> tb_speedup_b1=<x> mar_speedup_b1=<x>
d2c_speedup_b1=<x> (fast images/s over today's).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tokenbridge.checkpoint import load_generator
from tokenbridge.generate import generate, resolve_vae, sampling_defaults
from tokenbridge.repro.budgets import FRONTIER_SETTINGS

FAMILIES = {"tb": "fmnist", "mar": "fmnist-mar", "d2c": "fmnist-d2c"}
# the fastest setting of each family that kept quality in `repro frontier` (a name in FRONTIER_SETTINGS[generator])
FAST = {"tb": "interval+reuse", "mar": "8 steps+ddim 25-5+interval", "d2c": "8 steps+ddim 25-5+interval"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads (0: leave torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="also time today's sampler under torch.compile")
    p.add_argument("--only", nargs="+", choices=sorted(FAMILIES), default=sorted(FAMILIES),
                   help="families to time (the RESULT line then lacks the others)")
    for key, generator in FAMILIES.items():
        p.add_argument(f"--{key}-setting", default=FAST[key], choices=sorted(FRONTIER_SETTINGS[generator]),
                       help=f"fast setting of {generator} (default: {FAST[key]!r})")
    args = p.parse_args(argv)
    if min(args.batch) < 1 or args.repeats < 1 or args.threads < 0:
        p.error("--batch and --repeats must be >= 1, --threads >= 0")
    return args


def images_per_s(model: torch.nn.Module, vae: torch.nn.Module, batch: int, options: dict, device: str) -> float:
    labels = [i % 10 for i in range(batch)]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    generate(model, labels, vae=vae, seed=1, device=device, batch_size=batch, **options)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return batch / (time.perf_counter() - start)


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    """The same generator with its backbone (and diffusion denoiser) compiled in place of the eager modules."""
    loop = model.stage2 if hasattr(model, "stage2") else model
    loop.backbone.forward = torch.compile(loop.backbone.forward, dynamic=True)
    if hasattr(loop.head, "denoise"):
        loop.head.denoise = torch.compile(loop.head.denoise, dynamic=True)
    return model


def head_share(model: torch.nn.Module, vae: torch.nn.Module, batch: int, options: dict, device: str) -> float:
    """Fraction of one `generate` call's time spent in the head's sample (TokenBridge: what speculative / Jacobi
    decoding of the head could at most save; MAR, D2C: the diffusion head's share); the rest is mostly backbone."""
    head = (model.stage2 if hasattr(model, "stage2") else model).head
    spent, real = [0.0], head.sample

    def timed(*a, **kw):
        start = time.perf_counter()
        out = real(*a, **kw)
        spent[0] += time.perf_counter() - start
        return out

    head.sample = timed
    try:
        start = time.perf_counter()
        generate(model, [i % 10 for i in range(batch)], vae=vae, seed=1, device=device, batch_size=batch, **options)
        return spent[0] / (time.perf_counter() - start)
    finally:
        del head.sample


def measure(args: argparse.Namespace) -> dict[tuple[str, str, int], list[float]]:
    """images/s runs per (family key, setting label, batch)."""
    rates: dict[tuple[str, str, int], list[float]] = {}
    for key, generator in FAMILIES.items():
        if key not in args.only:
            continue
        model = load_generator(generator, args.device)
        vae = resolve_vae(model, device=args.device)
        recorded = sampling_defaults(model)
        setting = getattr(args, f"{key}_setting")
        runs = {"today": (model, {**recorded, "sampler": "paper"}),
                setting: (model, {**recorded, **FRONTIER_SETTINGS[generator][setting]})}
        if args.compile:
            runs["today, compiled"] = (compiled(load_generator(generator, args.device)), runs["today"][1])
        for i, batch in enumerate(args.batch):
            for m, options in runs.values():  # warm-up: allocator, first-call dispatch, compilation
                if i == 0 or args.compile:  # (compiled code may specialise on the batch size)
                    images_per_s(m, vae, batch, options, args.device)
            for _ in range(args.repeats):
                for label, (m, options) in runs.items():
                    rates.setdefault((key, label, batch), []).append(images_per_s(m, vae, batch, options,
                                                                                  args.device))
            for label in ("today", setting):
                share = head_share(model, vae, batch, runs[label][1], args.device)
                print(f"# {generator} head share of the time of {label} at batch {batch}: {100 * share:.1f} %")
            print(f"# {generator} batch {batch}: " + ", ".join(
                f"{label} {statistics.median(rates[(key, label, batch)]):.2f}" for label in runs), flush=True)
    return rates


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rates = measure(args)
    print(f"\ndevice {args.device}, threads {torch.get_num_threads()}, median of {args.repeats} (sampling + decode)\n")
    print("| generator | setting | options | batch | images/s | runs | speedup over today |")
    print("|---|---|---|---|---|---|---|")
    speedup: dict[str, float] = {}
    for (key, label, batch), values in rates.items():
        today = statistics.median(rates[(key, "today", batch)])
        ratio = statistics.median(values) / today
        generator = FAMILIES[key]
        options = FRONTIER_SETTINGS[generator].get(label, {"sampler": "paper"})
        print(f"| {generator} | {label} | {options} | {batch} | {statistics.median(values):.2f} | "
              f"{', '.join(f'{v:.2f}' for v in values)} | {ratio:.2f} |")
        if label not in ("today", "today, compiled"):
            speedup[f"{key}_speedup_b{batch}"] = ratio
    order = [f"{k}_speedup_b{b}" for b in sorted(args.batch, reverse=True) for k in FAMILIES]
    print("\nRESULT " + " ".join(f"{name}={speedup[name]:.2f}" for name in order if name in speedup))


if __name__ == "__main__":
    main()
