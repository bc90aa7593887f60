"""Each class of bad input through the command line: exit code 2, one line naming the problem, no traceback, and
nothing written. The cases call `tokenbridge.cli.main` in-process (a traceback would escape as an exception);
one runs `python -m tokenbridge.cli` as a user does, in a subprocess. The per-module tests cover the many cases
of each class."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tokenbridge.checkpoint import SHIPPED

REPO = Path(__file__).resolve().parents[1]


def _files(tmp: Path) -> dict[str, str]:
    """Bad inputs a user could hand over."""
    float_npz = tmp / "float.npz"  # images in [0, 1] floats: would be meaningless metrics
    np.savez(float_npz, images=np.random.rand(8, 32, 32, 1).astype(np.float32), labels=np.zeros(8, np.int64))
    labels_npz = tmp / "labels.npz"  # a class the classifier does not have
    np.savez(labels_npz, images=np.zeros((8, 32, 32, 1), np.uint8), labels=np.full(8, 12))
    data = SHIPPED["fmnist"].read_bytes()
    (tmp / "cut.safetensors").write_bytes(data[: len(data) // 3])  # a download that stopped
    (tmp / "bad.yaml").write_text("out_dir: runs/x\ntrain: {steps: 5\n")  # YAML syntax error
    (tmp / "a_file").write_text("not a folder")
    return {"float_npz": str(float_npz), "labels_npz": str(labels_npz), "cut": str(tmp / "cut.safetensors"),
            "yaml": str(tmp / "bad.yaml"), "file": str(tmp / "a_file"), "out": str(tmp / "out")}


CASES = {
    # 1. silently wrong results -> errors
    "evaluate float images": (["evaluate", "{float_npz}"], "must hold uint8 images"),
    "evaluate unknown labels": (["evaluate", "{labels_npz}"], "labels must be in 0..9"),
    "sample nan temperature": (["sample", "--temperature", "nan", "--out", "{out}"], "'sampling option.temperature'"),
    "train typo": (["train", "--config", "configs/fmnist.yaml", "trian.steps=5", "out_dir={out}"],
                   "unknown config key 'trian'"),
    # 2. work endangered: refused before anything is written
    "train-vae without --out": (["train-vae"], "the following arguments are required: --out"),
    "sample into a file": (["sample", "--out", "{file}"], "cannot create the folder of sample output"),
    # 3. tracebacks -> messages
    "config YAML syntax": (["train", "--config", "{yaml}"], "is not valid YAML"),
    "truncated generator": (["sample", "--model", "{cut}", "--out", "{out}"], "is corrupt or not a safetensors"),
    "zero per class": (["sample", "--per-class", "0", "--out", "{out}"], "expected a positive integer, got 0"),
    # 4. limits
    "huge levels": (["cache-latents", "--levels", "16777216", "--limit", "8", "--out", "{out}/t.safetensors"],
                    "levels (B) must be"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_through_the_cli(tmp_path, monkeypatch, cli_error, case):
    args, message = CASES[case]
    files = _files(tmp_path)
    monkeypatch.chdir(REPO)  # the cases name configs/ as a user in the repository would
    err = cli_error([a.format(**files) for a in args])
    assert message in err, err[-2000:]
    assert not Path(files["out"]).exists()  # nothing written


def test_bad_input_through_the_command_a_user_types(tmp_path):
    # the one subprocess: `python -m tokenbridge.cli` exits 2 with the message and no traceback, writes nothing
    files = _files(tmp_path)
    res = subprocess.run([sys.executable, "-m", "tokenbridge.cli", "sample", "--model", files["cut"], "--out",
                          files["out"]], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "is corrupt or not a safetensors" in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert not Path(files["out"]).exists()
