"""Quantize + dequantize throughput of DimensionwiseQuantizer against two baselines measured in the same run.

Baselines:
  clamp+copy      `x.clamp(a_min, a_max)` into a new tensor: one read and one write of the latents, the floor for
                  any quantizer that returns a new tensor (ours writes an int64 index and a float value per input).
  argmin [N,C,B]  Eq. 1 then Eq. 4 literally: distances from every normalised value to all B reconstruction values,
                  argmin, then Eq. 5; in row chunks so that the [n, C, B] distance tensor stays about 64 MB.
  torch-op lookup our CPU lookup without numba (a few torch ops per cache-sized chunk; same integers).
  binary search   our own exact fallback (searchsorted over the midpoints), used on devices other than the CPU.
  output floor    allocating and filling the two outputs (int64 indices + float32 values, 12 bytes per value):
                  what any quantizer with this interface pays before doing any work (not a baseline of RESULT).
  released arith. `arithmetic="float32"`: the released code's float32 arithmetic (not a baseline of RESULT); the
                  indices it gives other than ours are counted (float-rounding ties), and so are those where the
                  released expression run on the CPU (exact division) differs from its GPU arithmetic.

All methods get the same latents (channel-last, N(0, std^2)); the methods are timed round-robin so that a busy
machine slows them alike, and the best time of --repeats is reported. The argmin baseline must give the same
indices except for values within float rounding of a midpoint (a tie in exact arithmetic), which are counted.

    python benchmarks/quantizer.py [--device cpu] [--levels 64] [--repeats 3] [--shape 64 64 64 64]

Last line: `RESULT vs_copy=<ours speed / clamp+copy speed> vs_argmin=<ours speed / argmin speed>`.
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import torch

from tokenbridge import quantizer as quantizer_module
from tokenbridge.quantizer import DimensionwiseQuantizer

ARGMIN_CHUNK_BYTES = 64 * 2**20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def argmin_quantize(x: torch.Tensor, quantizer: DimensionwiseQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1, 4, 5 by brute force over all B levels, chunked over rows of the flattened [N, C] latents."""
    a_min, a_max = quantizer.value_range
    r = quantizer.std_range
    gamma = quantizer.reconstruction_values.to(x.device, torch.float32)  # [B]
    latent_gamma = (gamma + r) / (2 * r) * (a_max - a_min) + a_min  # Eq. 5
    rows = x.reshape(-1, x.shape[-1])
    n, channels = rows.shape
    step = max(1, ARGMIN_CHUNK_BYTES // (4 * channels * gamma.numel()))
    indices = torch.empty(n, channels, dtype=torch.int64, device=x.device)
    for start in range(0, n, step):
        chunk = rows[start : start + step].float()
        x_hat = (2 * r * (chunk - a_min) / (a_max - a_min) - r).clamp_(-r, r)  # Eq. 1
        indices[start : start + step] = (x_hat[..., None] - gamma).abs_().argmin(-1)  # Eq. 4
    return latent_gamma[indices].view(x.shape), indices.view(x.shape)


def nearest_first(x_hat: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """argmin_i |x_hat - values_i| (the first i on ties), chunked like argmin_quantize."""
    flat = x_hat.reshape(-1)
    step = max(1, ARGMIN_CHUNK_BYTES // (4 * values.numel()))
    out = torch.empty(flat.shape, dtype=torch.int64, device=flat.device)
    for start in range(0, flat.numel(), step):
        out[start : start + step] = (flat[start : start + step, None] - values).abs_().argmin(-1)
    return out.view(x_hat.shape)


def tie_mask(x: torch.Tensor, quantizer: DimensionwiseQuantizer, tol: float = 1e-5) -> torch.Tensor:
    """Values within `tol` (relative) of a latent-scale midpoint: their nearest level is a float-rounding tie."""
    mids = quantizer._midpoints[0]
    pos = torch.bucketize(x.float(), mids).clamp_(1, mids.numel()) - 1
    near = (x.float() - mids[pos]).abs()
    above = (x.float() - mids[(pos + 1).clamp_(max=mids.numel() - 1)]).abs()
    return torch.minimum(near, above) <= tol * (1 + x.float().abs())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--levels", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shape", type=int, nargs="+", default=[64, 64, 64, 64], help="latent shape, channel-last")
    parser.add_argument("--std", type=float, default=1.6, help="latent standard deviation (KL-16 latents: ~1.6)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    x = (torch.randn(*args.shape) * args.std).to(device)
    quantizer = DimensionwiseQuantizer(args.levels).to(device)
    a_min, a_max = quantizer.value_range
    n = x.numel()

    # Same results first: ours against the literal definition and our own binary search.
    values, indices = quantizer(x)
    ref_values, ref_indices = argmin_quantize(x, quantizer)
    differ = indices != ref_indices
    ties = int(differ.sum())
    if ties and not bool(tie_mask(x[differ], quantizer).all()):
        raise SystemExit(f"FAIL: {ties} indices differ from argmin away from any midpoint")
    if not torch.equal(quantizer._search(x), indices):
        raise SystemExit("FAIL: lookup and binary search disagree")
    del values, ref_values, ref_indices, differ

    released = DimensionwiseQuantizer(args.levels, tails=quantizer.tails, arithmetic="float32").to(device)
    released_indices = released.quantize(x)
    released_ties = int((released_indices != indices).sum())
    r = quantizer.std_range
    cpu_division = ((x.float() - a_min) / (a_max - a_min) * (2 * r) - r).clamp(-r, r)  # the expression, divided exactly
    division_diff = int((nearest_first(cpu_division, released._released_values) != released_indices).sum())
    del released_indices, cpu_division

    fallback = copy.copy(quantizer)
    fallback.use_fused_kernel = False
    if not torch.equal(fallback(x)[1], indices):
        raise SystemExit("FAIL: the fused kernel and the torch-op lookup disagree")

    methods = {
        "tokenbridge forward": lambda: quantizer(x),
        "torch-op lookup": lambda: fallback(x),
        "clamp+copy": lambda: x.clamp(a_min, a_max),
        "argmin [N,C,B]": lambda: argmin_quantize(x, quantizer),
        "binary search": lambda: quantizer._values_at(quantizer._search(x)),
        "released arith.": lambda: released(x),
        "output floor": lambda: (torch.empty(n, dtype=torch.int64, device=device).fill_(0),
                                 torch.empty(n, device=device).fill_(0)),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    for name in ("clamp+copy", "output floor"):  # the others ran in the check above
        methods[name]()
    sync(device)
    for _ in range(args.repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            out = fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
            del out

    best = {name: min(t) for name, t in times.items()}
    ours = best["tokenbridge forward"]
    print(f"device {device}, threads {torch.get_num_threads()}, latents {list(x.shape)} channel-last "
          f"({n:,} values, std {args.std}), B={args.levels}, best of {args.repeats}")
    fused = device.type == "cpu" and quantizer_module.numba is not None
    print(f"tokenbridge forward: {'fused numba kernel' if fused else 'torch ops'}")
    print(f"argmin agreement: {n - ties} of {n} indices equal, {ties} float-rounding ties at midpoints")
    print(f"released arithmetic: {released_ties} of {n} indices differ from ours (ties); the released expression "
          f"divided exactly (as on the CPU) gives {division_diff} indices other than its GPU arithmetic")
    print(f"{'method':<22}{'best ms':>10}{'median ms':>11}{'Mvalues/s':>11}{'ours/this':>11}")
    for name, t in times.items():
        print(f"{name:<22}{best[name] * 1e3:>10.1f}{statistics.median(t) * 1e3:>11.1f}"
              f"{n / best[name] / 1e6:>11.1f}{best[name] / ours:>11.3f}")
    vs_copy, vs_argmin = best["clamp+copy"] / ours, best["argmin [N,C,B]"] / ours
    assert math.isfinite(vs_copy) and math.isfinite(vs_argmin)
    print(f"RESULT vs_copy={vs_copy:.3f} vs_argmin={vs_argmin:.2f}")


if __name__ == "__main__":
    main()
