"""What a training run can rely on: save on SIGTERM / Ctrl-C and exact resume, one run per folder, no checkpoint
replaced unasked, the same data on resume, durable atomic writes. Run through the CLI: in a subprocess where a
signal or a second process is the point, in-process (`cli.main`) otherwise."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import TensorDataset

from tokenbridge import checkpoint as C
from tokenbridge import cli
from tokenbridge.config import DataConfig
from tokenbridge.files import FolderLock, atomic_path
from tokenbridge.tokens import cache_latents
from tokenbridge.train import train

REPO = Path(__file__).resolve().parents[1]


class _Encoder(torch.nn.Module):
    """A stand-in VAE: 8x8 grey images -> 4 x 4 x 4 latents (no weights to train)."""

    scaling_factor = 1.0

    def encode(self, x, sample=False):
        return torch.nn.functional.pixel_unshuffle(x, 2) * 2.0


@pytest.fixture(scope="module")
def token_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tokens")
    g = torch.Generator().manual_seed(0)
    images = TensorDataset(torch.rand(256, 1, 8, 8, generator=g) * 2 - 1, torch.arange(256) % 10)
    first = cache_latents(DataConfig(), folder / "a.safetensors", quantizer={"levels": 16}, vae=_Encoder(),
                          dataset=images)
    second = cache_latents(DataConfig(limit=128), folder / "b.safetensors", quantizer={"levels": 16},
                           vae=_Encoder(), dataset=images)
    return first, second


def _config(folder: Path, tokens: Path, steps: int = 60) -> Path:
    """A run config for the tiny TokenBridge preset on the 4x4x4 stand-in tokens."""
    cfg = {"out_dir": str(folder / "run"), "seed": 3, "family": "tokenbridge",
           "data": {"tokens": str(tokens)},
           "model": {"preset": "tiny", "grid_size": [4, 4], "quantizer": {"levels": 16}},
           "train": {"steps": steps, "global_batch": 32, "lr": 1e-3, "warmup_steps": 5, "ckpt_every": 0,
                     "log_every": 1, "device": "cpu"}}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "tokenbridge.cli", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _wait_for_log(log: Path, steps: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if log.is_file() and len(log.read_text().splitlines()) >= steps:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("training did not log in time")


def test_a_second_run_into_a_folder_in_use_fails_at_once(tmp_path, token_files, cli_error):
    config = _config(tmp_path, token_files[0], steps=100_000)
    first = _cli("train", "--config", str(config))
    _wait_for_log(tmp_path / "run" / "log.jsonl", 2, first)
    err = cli_error(["train", "--config", str(config)])  # the second run: this process
    first.send_signal(signal.SIGTERM)
    _, first_err = first.communicate(timeout=60)
    assert f"run folder {tmp_path / 'run'} is in use by process {first.pid}" in err
    assert first.returncode == 128 + signal.SIGTERM and "Traceback" not in first_err


def test_sigterm_saves_and_the_same_command_resumes_exactly(tmp_path, token_files):
    config = _config(tmp_path / "a", token_files[0])
    proc = _cli("train", "--config", str(config))
    _wait_for_log(tmp_path / "a" / "run" / "log.jsonl", 5, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    stopped = C.load_checkpoint(tmp_path / "a" / "run" / C.CHECKPOINT_NAME)
    assert 5 <= stopped["step"] < 60 and f"stopped by SIGTERM after saving step {stopped['step']}" in err
    cli.main(["train", "--config", str(config)])  # the same command resumes (in this process)
    # the same run without interruption, in another folder
    cli.main(["train", "--config", str(_config(tmp_path / "b", token_files[0]))])
    a = C.load_checkpoint(tmp_path / "a" / "run" / C.CHECKPOINT_NAME)
    b = C.load_checkpoint(tmp_path / "b" / "run" / C.CHECKPOINT_NAME)
    assert a["step"] == b["step"] == 60
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    steps = [json.loads(line)["step"] for line in (tmp_path / "a" / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 61))


def test_ctrl_c_in_process_saves_the_current_step(tmp_path, token_files):
    cfg = yaml.safe_load(_config(tmp_path, token_files[0], steps=20).read_text())
    original = torch.optim.AdamW.step
    calls = []

    def step_then_interrupt(self, *a, **k):  # Ctrl-C arrives during the 7th update
        calls.append(1)
        if len(calls) == 7:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *a, **k)

    torch.optim.AdamW.step = step_then_interrupt
    try:
        with pytest.raises(Exception) as info:
            train(cfg)
    finally:
        torch.optim.AdamW.step = original
    assert type(info.value).__name__ == "TrainingInterrupted" and info.value.step == 7
    assert C.load_checkpoint(Path(cfg["out_dir"]) / C.CHECKPOINT_NAME)["step"] == 7
    assert train(cfg)["step"] == 20  # and the folder is free again


def test_checkpoints_are_not_replaced_unasked_and_resume_needs_the_same_tokens(tmp_path, token_files, cli_error):
    config = _config(tmp_path, token_files[0], steps=3)
    cli.main(["train", "--config", str(config)])
    err = cli_error(["train", "--config", str(config), "--no-resume"])
    assert "already holds a checkpoint" in err and "--overwrite" in err
    err = cli_error(["train", "--config", str(config), "train.steps=6", f"data.tokens={token_files[1]}"])
    assert "was trained with tokens" in err and str(token_files[1]) in err
    before = C.load_checkpoint(tmp_path / "run" / C.CHECKPOINT_NAME)
    assert before["step"] == 3 and before["provenance"]["tokens"] == str(token_files[0])  # kept as it was
    cli.main(["train", "--config", str(config), "--no-resume", "--overwrite"])


def test_cuda_without_a_gpu_and_unwritable_folders_fail_before_work(tmp_path, token_files, cli_error):
    config = _config(tmp_path, token_files[0], steps=3)
    if not torch.cuda.is_available():
        assert "no CUDA GPU is visible" in cli_error(["train", "--config", str(config), "train.device=cuda"])
    (tmp_path / "file").write_text("x")
    assert "cannot create the folder" in cli_error(["train", "--config", str(config),
                                                    f"out_dir={tmp_path / 'file' / 'run'}"])


def test_folder_lock_and_stale_temporaries(tmp_path):
    with FolderLock(tmp_path / "run"):
        with pytest.raises(ValueError, match=f"in use by process {os.getpid()}"):
            FolderLock(tmp_path / "run").acquire()
    FolderLock(tmp_path / "run").acquire().release()  # released on exit
    target = tmp_path / "w.bin"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".w.bin.{int(dead.stdout)}.tmp"  # left by a writer that was killed
    stale.write_bytes(b"partial")
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"complete")
    assert target.read_bytes() == b"complete" and not stale.exists()
