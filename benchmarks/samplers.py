"""Sampling speed of each shipped family at its new defaults against today's sampler.

Today's sampler is ``sampler="paper"`` with the generator's record for it (TokenBridge: 16 MAR steps, cfg 3.0
linear on every step; MAR and D2C also 100 DDPM steps per token). The new defaults are what the shipped generator
records now (`repro frontier`'s fastest setting that kept quality; docs/speed.md); ``--KEY-setting NAME`` times a
named frontier setting (tokenbridge.repro.budgets.FRONTIER_SETTINGS) instead. ``tb_ar``: the causal TokenBridge
generator (fmnist-ar, KV-cached raster backbone) at its defaults against TokenBridge's today. One measurement is
`tokenbridge.generate.generate` (sampling + VAE decode) of ``batch`` images; today's and the new setting alternate
(A B A B ...) in one process so that machine load hits both alike, and the median of ``--repeats`` runs is
reported after one untimed warm-up each (at the first batch size). Under load from other processes, --threads 1
avoids the thread oversubscription that slows 2 threads.

    python benchmarks/samplers.py [--batch 64 1] [--repeats 3] [--threads 2] [--compile]
        [--tb-setting NAME] [--mar-setting NAME] [--d2c-setting NAME] [--only tb mar d2c tb_ar]

--compile also times today's sampler with the backbone's forward (and the diffusion head's denoiser) wrapped in
torch.compile (inductor, dynamic shapes: the encoder's visible length and the head's row count change from step
to step), compilation excluded by a warm-up run.

Last line: RESULT tb_speedup_b64=<x> mar_speedup_b64=<x> d2c_speedup_b64=<x> tb_speedup_b1=<x> mar_speedup_b1=<x>
d2c_speedup_b1=<x> [tb_ar_speedup_b64=<x> tb_ar_speedup_b1=<x>] (new images/s over today's).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tokenbridge.checkpoint import SHIPPED, load_generator
from tokenbridge.generate import generate, resolve_vae, sampling_defaults, with_defaults
from tokenbridge.repro.budgets import FRONTIER_SETTINGS

# key -> (today's generator, the generator of the new defaults)
FAMILIES = {"tb": ("fmnist", "fmnist"), "mar": ("fmnist-mar", "fmnist-mar"), "d2c": ("fmnist-d2c", "fmnist-d2c"),
            **({"tb_ar": ("fmnist", "fmnist-ar")} if "fmnist-ar" in SHIPPED else {})}
NEW = "new defaults"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[64, 1])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads (0: leave torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="also time today's sampler under torch.compile")
    p.add_argument("--only", nargs="+", choices=sorted(FAMILIES), default=sorted(FAMILIES),
                   help="families to time (the RESULT line then lacks the others)")
    for key, (_, generator) in FAMILIES.items():
        if generator in FRONTIER_SETTINGS:
            p.add_argument(f"--{key}-setting", choices=sorted(FRONTIER_SETTINGS[generator]),
                           help=f"time this frontier setting of {generator} instead of its recorded defaults")
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


def settings(key: str, args: argparse.Namespace) -> dict[str, tuple[torch.nn.Module, dict]]:
    """{"today": (generator, options), label of the new setting: (generator, options)} of family ``key``."""
    today_spec, new_spec = FAMILIES[key]
    today = load_generator(today_spec, args.device)
    new = today if new_spec == today_spec else load_generator(new_spec, args.device)
    name = getattr(args, f"{key}_setting", None)
    fast = {**sampling_defaults(new, "paper"), **FRONTIER_SETTINGS[new_spec][name]} if name else with_defaults(new, {})
    return {"today": (today, with_defaults(today, {"sampler": "paper"})), name or NEW: (new, fast)}


def measure(args: argparse.Namespace) -> dict[tuple[str, str, int], list[float]]:
    """images/s runs per (family key, setting label, batch)."""
    rates: dict[tuple[str, str, int], list[float]] = {}
    for key in FAMILIES:
        if key not in args.only:
            continue
        runs = settings(key, args)
        vae = resolve_vae(runs["today"][0], device=args.device)
        if args.compile:
            runs["today, compiled"] = (compiled(load_generator(FAMILIES[key][0], args.device)), runs["today"][1])
        for i, batch in enumerate(args.batch):
            for m, options in runs.values():  # warm-up: allocator, first-call dispatch, compilation
                if i == 0 or args.compile:  # (compiled code may specialise on the batch size)
                    images_per_s(m, vae, batch, options, args.device)
            for _ in range(args.repeats):
                for label, (m, options) in runs.items():
                    rates.setdefault((key, label, batch), []).append(images_per_s(m, vae, batch, options,
                                                                                  args.device))
            for label, (m, options) in list(runs.items())[:2]:
                share = head_share(m, vae, batch, options, args.device)
                print(f"# {key} head share of the time of {label} at batch {batch}: {100 * share:.1f} %")
            print(f"# {key} batch {batch}: " + ", ".join(
                f"{label} {statistics.median(rates[(key, label, batch)]):.2f}" for label in runs), flush=True)
        for label, (m, options) in list(runs.items())[:2]:
            print(f"# {key} {label}: {type(m).family} {options}")
    return rates


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rates = measure(args)
    print(f"\ndevice {args.device}, threads {torch.get_num_threads()}, median of {args.repeats} (sampling + decode)\n")
    print("| family | setting | batch | images/s | runs | speedup over today |")
    print("|---|---|---|---|---|---|")
    speedup: dict[str, float] = {}
    for (key, label, batch), values in rates.items():
        ratio = statistics.median(values) / statistics.median(rates[(key, "today", batch)])
        print(f"| {key} ({FAMILIES[key][label != 'today']}) | {label} | {batch} | {statistics.median(values):.2f} | "
              f"{', '.join(f'{v:.2f}' for v in values)} | {ratio:.2f} |")
        if label not in ("today", "today, compiled"):
            speedup[f"{key}_speedup_b{batch}"] = ratio
    order = [f"{k}_speedup_b{b}" for b in sorted(args.batch, reverse=True) for k in ("tb", "mar", "d2c")]
    order += [f"tb_ar_speedup_b{b}" for b in sorted(args.batch, reverse=True)]
    print("\nRESULT " + " ".join(f"{name}={speedup[name]:.2f}" for name in order if name in speedup))


if __name__ == "__main__":
    main()
