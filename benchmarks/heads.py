"""Per-token prediction time: dimension-wise AR head (KV cache / re-run prefix) vs MAR diffusion head (paper Table 5).

One call predicts `batch` tokens (one per row of z), eval mode, no_grad, no CFG. Default sizes are the paper's L
model: AR head width 1024, depth 4, 8 heads, 16 channels, 64 levels, z_dim 1024; diffusion head width 1024,
depth 3, token_dim 16, 100 sampling steps. `--quick` shrinks everything for a CPU smoke run. The measurement is
tokenbridge.repro.speed.time_heads, which `tokenbridge repro table5` calls too.

    python benchmarks/heads.py [--device cpu] [--repeats 10] [--budget 20] [--threads 0] [--quick]

Last line: RESULT uncached_over_cached_b256=<x> diffusion_over_cached_b1=<x> diffusion_over_cached_b256=<x>
"""

from __future__ import annotations

from tokenbridge.repro.speed import parse_args, time_heads


def main(argv: list[str] | None = None) -> None:
    options, device = parse_args(argv, description=__doc__)
    print(time_heads(options, device).report(), flush=True)


if __name__ == "__main__":
    main()
