"""Training throughput of the `fmnist` generator through the trainer, this tree against a baseline tree.

    git worktree add /tmp/tb-base 515b4c4        # any earlier commit (the one before the [arch] refactor here)
    python benchmarks/train_speed.py --baseline /tmp/tb-base

Each measurement is a fresh process that trains the fmnist-sized TokenBridge generator (8x8x4 tokens, B = 64,
batch 128) on random tokens through `tokenbridge.train.train` and reads the steps/s of its log windows (the first
window, with warm-up, is dropped). Trees alternate (A B A B ...) so that machine load hits both alike. Prints a
table and a last line `RESULT current_steps_s=... baseline_steps_s=... ratio=...` (ratio = current / baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

# Runs inside the measured tree; knows both the current API and the one before the refactor.
WORKER = r'''
import json, sys, tempfile
from pathlib import Path
import torch
from torch.utils.data import TensorDataset
torch.set_num_threads(int(sys.argv[2]))
steps, window = int(sys.argv[1]), int(sys.argv[3])
g = torch.Generator().manual_seed(0)
data = TensorDataset(torch.randint(0, 64, (128 * steps, 8, 8, 4), generator=g), torch.randint(0, 10, (128 * steps,), generator=g))
train_cfg = {"steps": steps, "global_batch": 128, "lr": 1e-3, "warmup_steps": 10, "ema": 0.998, "log_every": window,
             "ckpt_every": 0, "device": "cpu"}
out = tempfile.mkdtemp()
import tokenbridge
if (Path(tokenbridge.__file__).parent / "generators").is_dir():  # current API
    from tokenbridge.train import train
    train({"out_dir": out, "family": "tokenbridge", "model": {"preset": "fmnist"}, "train": train_cfg}, dataset=data)
else:  # the API before the generator registry
    from tokenbridge.model import DEFAULT_FMNIST_CONFIG, build_generator
    from tokenbridge.train import train
    train({"out_dir": out, "model": DEFAULT_FMNIST_CONFIG, "train": train_cfg}, dataset=data,
          model_fn=build_generator)
rates = [json.loads(line)["it_s"] for line in open(out + "/log.jsonl")]
print("RATES " + json.dumps(rates[1:]))
'''


def measure(tree: Path, steps: int, threads: int, window: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory() as cwd:  # so that the tree on PYTHONPATH, not this checkout, is imported
        res = subprocess.run([sys.executable, "-c", WORKER, str(steps), str(threads), str(window)], env=env,
                             cwd=cwd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"worker in {tree} failed:\n{res.stderr[-3000:]}")
    rates = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("RATES "))[6:])
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="a checkout of the tree to compare against")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--window", type=int, default=10, help="log window (steps); the first one is dropped")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"current": [], "baseline": []}
    for _ in range(args.repeats):
        for name, tree in (("current", HERE), ("baseline", args.baseline.resolve())):
            results[name].append(measure(tree, args.steps, args.threads, args.window))
            print(f"{name:9s} {results[name][-1]:.3f} steps/s", flush=True)
    print("\n| tree | steps/s (median of runs) | runs |\n|---|---|---|")
    for name, rates in results.items():
        print(f"| {name} | {statistics.median(rates):.3f} | {', '.join(f'{r:.3f}' for r in rates)} |")
    cur, base = (statistics.median(results[k]) for k in ("current", "baseline"))
    print(f"RESULT current_steps_s={cur:.4f} baseline_steps_s={base:.4f} ratio={cur / base:.3f}")


if __name__ == "__main__":
    main()
