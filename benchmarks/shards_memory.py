"""Train over a synthetic sharded token set >= 20x larger than a RAM budget; measure peak RSS and loader speed.

    python benchmarks/shards_memory.py                          # 1 GiB budget -> >= 20 GiB of tokens in /tmp
    python benchmarks/shards_memory.py --dir /data/shards --budget-mib 1024 --ratio 20 --steps 20

1. Writes (or reuses, when `--dir` already holds a large enough set) `ceil(ratio * budget / 4096)` items of random
   16x16x16 uint8 tokens (4 KiB each) with `tokenbridge.shards.write_synthetic_shards`, in a fresh process whose
   time and peak RSS are printed.
2. Trains the `tiny` generator (16x16x16 tokens, 1000 classes, levels 64) for `--steps` steps of global batch
   `--batch` (default 16: at 64 the tiny model's own activations take ~1.1 GiB whatever the data) through
   `tokenbridge.train.train(..., dataset=ShardedTokens(dir))`, CPU, num_workers 0, in a fresh process. Its peak
   RSS is measured from outside (`os.wait4` rusage ru_maxrss of that child) and inside (/proc/self/status VmHWM,
   with RssAnon / RssFile at the end: memory-mapped token pages count as RssFile, they are clean page cache).
3. In another fresh process: a shuffling DataLoader over ShardedTokens (RandomSampler, batch `--loader-batch`),
   `--loader-batches` batches after 5 warm-up batches, with 0 and 2 workers: images/s and tokens/s (one token =
   one 16-channel position of the 16x16 grid, 256 per image) and that process's peak RSS.

Measured here (docs/scale.md): the anonymous memory stays small, but every item read through the memory map maps
~1.4 MiB of page cache into the process (RssFile), so RSS grows with the number of items touched, up to the
dataset size; the script reports RssAnon / RssFile so that this shows.

Prints a table and a last line
`RESULT peak_rss_mib=<x> budget_mib=<y> dataset_gib=<z> loader_tokens_s=<t>` (peak of the training process;
loader tokens/s: the best worker setting). Exit status 1 when the training peak exceeds the budget.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
ITEM_BYTES = 16 * 16 * 16  # uint8 indices of one 16x16 grid with 16 channels

STATUS = r'''
def _status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) / 1024  # MiB
    return out
'''

WRITER = STATUS + r'''
import json, sys, time
from tokenbridge.shards import write_synthetic_shards
out_dir, num_items, shard_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t0 = time.perf_counter()
write_synthetic_shards(out_dir, num_items, grid=(16, 16, 16), levels=64, shard_size=shard_size, num_classes=1000)
print("STATS " + json.dumps({"seconds": time.perf_counter() - t0, **_status()}))
'''

TRAINER = STATUS + r'''
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[4]))
from tokenbridge.shards import ShardedTokens
from tokenbridge.train import train
data_dir, out_dir, steps, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[5])
after_import = _status()
dataset = ShardedTokens(data_dir)
after_open = _status()
config = {"out_dir": out_dir, "family": "tokenbridge",
          "model": {"preset": "tiny", "grid_size": [16, 16], "channels": 16, "num_classes": 1000,
                    "quantizer": {"levels": 64}},
          "train": {"steps": steps, "global_batch": batch, "lr": 1e-3, "ckpt_every": 0, "log_every": 1,
                    "device": "cpu", "num_workers": 0}}
t0 = time.perf_counter()
train(config, overwrite=True, dataset=dataset)
seconds = time.perf_counter() - t0
print("STATS " + json.dumps({"items": len(dataset), "seconds": seconds, "after_import": after_import,
                             "after_open": after_open, "end": _status()}))
'''

LOADER = STATUS + r'''
import json, sys, time
import torch
from torch.utils.data import DataLoader
torch.set_num_threads(int(sys.argv[5]))
from tokenbridge.shards import ShardedTokens
data_dir, batch, batches, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
dataset = ShardedTokens(data_dir)
loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                    generator=torch.Generator().manual_seed(0), persistent_workers=False)
it = iter(loader)
for _ in range(5):  # warm-up (worker start, first pages)
    next(it)
t0 = time.perf_counter()
n = 0
for _ in range(batches):
    idx, lab = next(it)
    n += idx.shape[0]
seconds = time.perf_counter() - t0
h, w, c = idx.shape[1:]
print("STATS " + json.dumps({"images": n, "seconds": seconds, "images_s": n / seconds,
                             "tokens_s": n * h * w / seconds, "index_bytes_s": n * h * w * c / seconds,
                             "dtype": str(idx.dtype), **_status()}))
'''


def run_child(code: str, args: list[str], threads: int) -> tuple[dict, float]:
    """Run `code` in a fresh interpreter; (its STATS dict, its peak RSS in MiB from wait4's rusage)."""
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": str(threads)}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, cwd=cwd, stdout=out,
                                stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if proc.returncode:
        raise RuntimeError(f"child failed (exit {proc.returncode}):\n{text[-4000:]}")
    stats = json.loads(next(line for line in text.splitlines() if line.startswith("STATS "))[6:])
    return stats, usage.ru_maxrss / 1024  # Linux: KiB


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def existing_items(path: Path) -> int:
    """Items in an existing shard folder (0 when there is none or it does not open)."""
    if not (path / "manifest.json").is_file():
        return 0
    code = "import sys\nfrom tokenbridge.shards import ShardedTokens\nprint('N', len(ShardedTokens(sys.argv[1])))"
    res = subprocess.run([sys.executable, "-c", code, str(path)], env={**os.environ, "PYTHONPATH": str(HERE)},
                         capture_output=True, text=True, check=False)
    lines = [s for s in res.stdout.splitlines() if s.startswith("N ")]
    return int(lines[-1][2:]) if res.returncode == 0 and lines else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/tokenbridge-shards"))
    parser.add_argument("--budget-mib", type=int, default=1024, help="peak RSS budget of the training process")
    parser.add_argument("--ratio", type=float, default=20.0, help="token bytes on disk / budget, at least")
    parser.add_argument("--shard-size", type=int, default=100_000, help="items per shard")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16,
                        help="training global batch (the tiny model's activations alone need ~1.1 GiB at 64)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--loader-batch", type=int, default=256)
    parser.add_argument("--loader-batches", type=int, default=200)
    parser.add_argument("--loader-workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()

    budget = args.budget_mib * 2**20
    need = math.ceil(args.ratio * budget / ITEM_BYTES)
    have = existing_items(args.dir)
    if have >= need:
        print(f"reusing {args.dir}: {have:,} items (need {need:,})", flush=True)
        write = None
    else:
        print(f"writing {need:,} items ({need * ITEM_BYTES / 2**30:.1f} GiB of tokens) to {args.dir} ...", flush=True)
        write, write_rss = run_child(WRITER, [str(args.dir), str(need), str(args.shard_size)], args.threads)
        have = need
        print(f"  written in {write['seconds']:.0f} s ({need * ITEM_BYTES / 2**20 / write['seconds']:.0f} MiB/s), "
              f"writer peak RSS {write_rss:.0f} MiB", flush=True)
    size = dir_bytes(args.dir)
    files = sum(1 for p in args.dir.rglob("*") if p.is_file())
    print(f"dataset: {have:,} items, {size / 2**30:.2f} GiB in {files} files = {size / budget:.1f}x the budget",
          flush=True)

    with tempfile.TemporaryDirectory() as run_dir:
        train_stats, train_rss = run_child(TRAINER, [str(args.dir), run_dir, str(args.steps), str(args.threads),
                                                     str(args.batch)],
                                           args.threads)
        rates = [json.loads(line).get("it_s") for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
    print(f"training: {args.steps} steps of {args.batch} in {train_stats['seconds']:.1f} s; "
          f"peak RSS {train_rss:.0f} MiB "
          f"(VmHWM {train_stats['end']['VmHWM']:.0f}); after imports {train_stats['after_import']['VmRSS']:.0f} MiB, "
          f"after opening the shards {train_stats['after_open']['VmRSS']:.0f} MiB, at the end RssAnon "
          f"{train_stats['end']['RssAnon']:.0f} + RssFile {train_stats['end']['RssFile']:.0f} MiB", flush=True)

    loads = []
    for workers in args.loader_workers:
        stats, rss = run_child(LOADER, [str(args.dir), str(args.loader_batch), str(args.loader_batches),
                                        str(workers), str(args.threads)], args.threads)
        loads.append((workers, stats, rss))
        print(f"loader, {workers} workers: {stats['images_s']:,.0f} images/s = {stats['tokens_s']:,.0f} tokens/s "
              f"({stats['index_bytes_s'] / 2**20:.1f} MiB/s of indices, items as {stats['dtype']}), main process "
              f"peak RSS {rss:.0f} MiB", flush=True)

    print("\n| measurement | value |\n|---|---|")
    print(f"| RAM budget (peak RSS of the training process) | {args.budget_mib} MiB |")
    print(f"| dataset | {have:,} items x 16x16x16 uint8, {size / 2**30:.2f} GiB on disk in {files} files "
          f"({size / budget:.1f}x the budget) |")
    if write is not None:
        print(f"| writing it | {write['seconds']:.0f} s, writer peak RSS {write_rss:.0f} MiB |")
    print(f"| training ({args.steps} steps, batch {args.batch}, tiny preset, CPU) | {train_stats['seconds']:.1f} s, "
          f"median {sorted(r for r in rates if r)[len(rates) // 2] if any(rates) else float('nan'):.2f} it/s |")
    print(f"| training peak RSS (wait4 ru_maxrss / VmHWM) | {train_rss:.0f} / {train_stats['end']['VmHWM']:.0f} MiB |")
    print(f"| training RSS after imports / after opening the shards | {train_stats['after_import']['VmRSS']:.0f} / "
          f"{train_stats['after_open']['VmRSS']:.0f} MiB |")
    print(f"| training RSS at the end: anonymous / file-backed | {train_stats['end']['RssAnon']:.0f} / "
          f"{train_stats['end']['RssFile']:.0f} MiB |")
    for workers, stats, rss in loads:
        print(f"| loader, shuffle, batch {args.loader_batch}, {workers} workers | {stats['images_s']:,.0f} images/s, "
              f"{stats['tokens_s']:,.0f} tokens/s, peak RSS {rss:.0f} MiB |")
    best = max(s["tokens_s"] for _, s, _ in loads) if loads else float("nan")
    print(f"RESULT peak_rss_mib={train_rss:.0f} budget_mib={args.budget_mib} dataset_gib={size / 2**30:.2f} "
          f"loader_tokens_s={best:.0f}")
    if train_rss > args.budget_mib:
        print(f"OVER BUDGET: training peak RSS {train_rss:.0f} MiB > {args.budget_mib} MiB", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
