"""Per-token prediction time of the heads (paper Table 5): the dimension-wise AR head, with a KV cache or re-running
the channel prefix at every step, vs the MAR diffusion head.

One call predicts `batch` tokens (one per row of z), eval mode, no_grad, no CFG. Default sizes are the paper's L
model: AR head width 1024, depth 4, 8 heads, 16 channels, 64 levels, z_dim 1024; diffusion head width 1024,
depth 3, token_dim 16, 100 sampling steps. ``quick`` shrinks everything for a CPU smoke run.

    timing = time_heads(TimingOptions(quick=True), device="cpu")
    timing.rows        # TimingRow per method and batch size
    timing.report()    # what `python benchmarks/heads.py --quick` prints; its last line is timing.summary()
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..diffusion import DiffusionHead
from ..heads import DimensionwiseARHead

METHODS = ("ar_cached", "ar_uncached", "diffusion")


@dataclass(frozen=True)
class HeadSizes:
    """Sizes of the timed heads: AR head width x ar_depth with num_heads, diffusion head width x diffusion_depth."""

    width: int
    z_dim: int
    ar_depth: int
    num_heads: int
    diffusion_depth: int
    channels: int = 16
    levels: int = 64


PAPER_SIZES = HeadSizes(width=1024, z_dim=1024, ar_depth=4, num_heads=8, diffusion_depth=3)
QUICK_SIZES = HeadSizes(width=256, z_dim=256, ar_depth=2, num_heads=4, diffusion_depth=2)

# one help text per option; the command line flags are the field names (`--diffusion-steps`)
_HELP = {
    "quick": "small sizes (width 256) for a fast CPU smoke run",
    "repeats": "max timed rounds per batch size (median)",
    "warmup": "untimed rounds per batch size",
    "budget": "timed seconds per method and batch size",
    "batches": "tokens predicted per call",
    "diffusion_steps": "sampling steps of the diffusion head",
    "threads": "torch CPU threads (0 = leave torch's default)",
}


@dataclass(frozen=True)
class TimingOptions:
    """What `time_heads` measures and how long; the fields are the flags of benchmarks/heads.py."""

    quick: bool = False
    repeats: int = 10
    warmup: int = 1
    budget: float = 20.0
    batches: tuple[int, ...] = (1, 256)
    diffusion_steps: int = 100
    threads: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "batches", tuple(int(b) for b in self.batches))
        if self.repeats < 1 or self.warmup < 0 or self.budget <= 0:
            raise ValueError(f"need --repeats >= 1, --warmup >= 0, --budget > 0; got {self.repeats}, {self.warmup}, "
                             f"{self.budget}")
        if not self.batches or min(self.batches) < 1 or self.diffusion_steps < 1 or self.threads < 0:
            raise ValueError(f"need --batches >= 1, --diffusion-steps >= 1, --threads >= 0; got {list(self.batches)}, "
                             f"{self.diffusion_steps}, {self.threads}")

    @property
    def sizes(self) -> HeadSizes:
        return QUICK_SIZES if self.quick else PAPER_SIZES

    def command_line(self) -> list[str]:
        """The benchmarks/heads.py flags that give these options (defaults left out)."""
        args: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == f.default:
                continue
            args.append(_flag(f.name))
            if not isinstance(value, bool):
                args += [str(v) for v in value] if isinstance(value, tuple) else [str(value)]
        return args


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class TimingRow:
    """One method at one batch size: median ms per call, half the range of the calls, and the number of calls."""

    method: str
    batch: int
    ms: float
    spread: float
    runs: int
    over_cached: float  # ms / the cached AR head's ms at the same batch size
    gflop: float = 0.0  # floating-point work of one call (torch's FLOP counter: matmuls and attention)

    @property
    def per_token(self) -> float:
        return self.ms / self.batch

    @property
    def gflops(self) -> float:
        """Achieved GFLOP/s of the call."""
        return self.gflop / (self.ms / 1e3)


@dataclass
class HeadTiming:
    """What `time_heads` measured: the setup (device, threads, head sizes) and a row per method and batch size."""

    setup: str
    rows: list[TimingRow]
    matmul_gflops: float = 0.0  # the same run's float32 matmul throughput (the roofline the heads are held to)

    def row(self, method: str, batch: int) -> TimingRow:
        return next(r for r in self.rows if r.method == method and r.batch == batch)

    def summary(self) -> str:
        """``RESULT uncached_over_cached_b<max>=.. diffusion_over_cached_b<min>=.. diffusion_over_cached_b<max>=..``"""
        big, small = max(r.batch for r in self.rows), min(r.batch for r in self.rows)
        return (f"RESULT uncached_over_cached_b{big}={self.row('ar_uncached', big).over_cached:.2f} "
                f"diffusion_over_cached_b{small}={self.row('diffusion', small).over_cached:.2f} "
                f"diffusion_over_cached_b{big}={self.row('diffusion', big).over_cached:.2f}")

    def percent_of_matmul(self, row: TimingRow) -> float:
        """A row's achieved GFLOP/s as a percentage of this run's matmul throughput."""
        return 100 * row.gflops / self.matmul_gflops if self.matmul_gflops else 0.0

    def report(self) -> str:
        """Setup line, a text table and the summary line (the output of benchmarks/heads.py)."""
        lines = [self.setup + f"; matmul throughput of this run {self.matmul_gflops:.1f} GFLOP/s",
                 f"{'method':<12} {'batch':>5} {'ms/call':>12} {'+-':>8} {'runs':>4} {'ms/token':>10} {'x cached':>9} "
                 f"{'GFLOP':>8} {'GFLOP/s':>8} {'% matmul':>8}"]
        lines += [f"{r.method:<12} {r.batch:>5} {r.ms:>12.2f} {r.spread:>8.2f} {r.runs:>4} {r.per_token:>10.3f} "
                  f"{r.over_cached:>9.2f} {r.gflop:>8.3f} {r.gflops:>8.1f} {self.percent_of_matmul(r):>8.1f}"
                  for r in self.rows]
        return "\n".join(lines + [self.summary()])


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int,
                     budget_s: float) -> dict[str, list[float]]:
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


def count_gflop(fn: Callable[[], object]) -> float:
    """GFLOP of one call of ``fn`` by torch's FLOP counter (matmuls, convolutions, attention; elementwise work is
    not counted, so achieved rates are lower bounds)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def matmul_gflops(device: torch.device, size: int = 1024, repeats: int = 5) -> float:
    """float32 GFLOP/s of a [size, size] @ [size, size] matmul on ``device`` (median of ``repeats``): the peak the
    heads' achieved rates are compared with (a roofline)."""
    a = torch.randn(size, size, device=device)
    times = time_interleaved({"mm": lambda: a @ a}, device, repeats, 1, 1e9)["mm"]
    return 2 * size ** 3 / (statistics.median(times) / 1e3) / 1e9


def build_heads(sizes: HeadSizes, device: str | torch.device) -> tuple[DimensionwiseARHead, DiffusionHead]:
    """The two heads with seed-0 random weights, in eval mode on `device` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ar = DimensionwiseARHead(sizes.z_dim, sizes.channels, sizes.levels, width=sizes.width, depth=sizes.ar_depth,
                                 num_heads=sizes.num_heads)
        diff = DiffusionHead(sizes.z_dim, sizes.channels, width=sizes.width, depth=sizes.diffusion_depth)
        # move the zero-initialised AdaLN weights off zero as training would (the work done is the same either way)
        with torch.no_grad():
            for p in list(ar.parameters()) + list(diff.parameters()):
                p.add_(torch.randn_like(p) * 0.02)
    return ar.to(device).eval(), diff.to(device).eval()


def _count(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


@torch.no_grad()
def _measure(options: TimingOptions, device: torch.device) -> HeadTiming:
    sizes = options.sizes
    ar, diff = build_heads(sizes, device)
    setup = (f"device={device} threads={torch.get_num_threads()} AR head {sizes.width}x{sizes.ar_depth} "
             f"({_count(ar):.1f}M params, {sizes.channels} channels, {sizes.levels} levels); diffusion head "
             f"{sizes.width}x{sizes.diffusion_depth} ({_count(diff):.1f}M params, {options.diffusion_steps} steps); "
             f"<= {options.repeats} interleaved rounds, median; +- = half range")
    gen = torch.Generator(device=device)
    methods = {
        "ar_cached": lambda z: ar.sample(z, generator=gen, use_cache=True),
        "ar_uncached": lambda z: ar.sample(z, generator=gen, use_cache=False),
        "diffusion": lambda z: diff.sample(z, num_steps=options.diffusion_steps, generator=gen),
    }
    rows = []
    for batch in options.batches:
        z = torch.randn(batch, sizes.z_dim, device=device, generator=gen.manual_seed(0))
        gen.manual_seed(0)
        times = time_interleaved({name: (lambda f=fn: f(z)) for name, fn in methods.items()}, device,
                                 options.repeats, options.warmup, options.budget)
        base = statistics.median(times["ar_cached"])
        rows += [TimingRow(name, batch, statistics.median(ts), (max(ts) - min(ts)) / 2, len(ts),
                           statistics.median(ts) / base, count_gflop(lambda f=methods[name]: f(z)))
                 for name, ts in times.items()]
    return HeadTiming(setup, rows, matmul_gflops(device))


def time_heads(options: TimingOptions | None = None, device: str | torch.device | None = None) -> HeadTiming:
    """Time the cached and uncached AR head and the diffusion head at every batch size of `options`.

    device: None = cuda when available, else cpu. ``options.threads`` sets torch's CPU threads for the
    measurement only (the previous number is restored)."""
    options = options or TimingOptions()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = torch.get_num_threads()
    if options.threads:
        torch.set_num_threads(options.threads)
    try:
        return _measure(options, device)
    finally:
        torch.set_num_threads(threads)


def parse_args(argv: Sequence[str] | None = None, description: str | None = None) -> tuple[TimingOptions, str]:
    """(options, device) from the command line of benchmarks/heads.py: ``--device`` plus one flag per option."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for f in dataclasses.fields(TimingOptions):
        if isinstance(f.default, bool):
            parser.add_argument(_flag(f.name), action="store_true", help=_HELP[f.name])
        elif isinstance(f.default, tuple):
            parser.add_argument(_flag(f.name), type=int, nargs="+", default=list(f.default), help=_HELP[f.name])
        else:
            parser.add_argument(_flag(f.name), type=type(f.default), default=f.default, help=_HELP[f.name])
    args = vars(parser.parse_args(argv))
    device = args.pop("device")
    return TimingOptions(**args), device
