"""How long `tokenbridge --help` takes, next to `python -c "import torch"` (what every command used to pay first).

Each is a fresh interpreter run from this checkout; the median of --repeats runs is reported.

    python benchmarks/cli_startup.py --repeats 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = {
    "tokenbridge --help": ["-m", "tokenbridge", "--help"],
    "tokenbridge sample --bad-flag": ["-m", "tokenbridge", "sample", "--bad-flag"],
    "tokenbridge --version": ["-m", "tokenbridge", "--version"],
    'python -c "import torch"': ["-c", "import torch"],
}


def wall_seconds(args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per case (default: %(default)s)")
    repeats = parser.parse_args().repeats
    medians = {name: statistics.median(wall_seconds(args) for _ in range(repeats)) for name, args in CASES.items()}
    print(f"| command | median wall time of {repeats} runs (s) |\n|---|---|")
    for name, seconds in medians.items():
        print(f"| `{name}` | {seconds:.3f} |")
    help_s, torch_s = medians["tokenbridge --help"], medians['python -c "import torch"']
    print(f"RESULT help_s={help_s:.3f} import_torch_s={torch_s:.3f}")


if __name__ == "__main__":
    main()
