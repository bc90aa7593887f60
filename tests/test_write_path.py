"""The one write path (tokenbridge.files): never through a symbolic link, never over a file of another kind, a
shipped weights file or a file tokenbridge did not write unless asked, one writer per output at a time, no
leftovers of killed writers, and a full disk (or a file-size limit) as one line with the previous file intact.
Kills, locks and full disks run in real subprocesses and on a real small tmpfs where this machine allows one."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import TensorDataset

from tokenbridge.checkpoint import export_weights
from tokenbridge.config import DataConfig
from tokenbridge.files import SHIPPED_WEIGHTS, atomic_path, file_kind, output_lock, overwriting
from tokenbridge.generators.tokenbridge import TokenBridgeGenerator
from tokenbridge.images import save_image_grid
from tokenbridge.tokens import TOKENS_FORMAT, cache_latents
from tokenbridge.vq import VQTokenizer

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


class _Encoder(torch.nn.Module):
    """A stand-in VAE: 8x8 grey images -> 4 x 4 x 4 latents."""

    scaling_factor = 1.0

    def encode(self, x, sample=False):
        return torch.nn.functional.pixel_unshuffle(x, 2) * 2.0


def _cache(path: Path, **kwargs) -> Path:
    images = TensorDataset(torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1,
                           torch.arange(16) % 10)
    return cache_latents(DataConfig(), path, quantizer={"levels": 16}, vae=_Encoder(), dataset=images, **kwargs)


def _grid() -> torch.Tensor:
    return torch.zeros(2, 1, 4, 4)


# ------------------------------------------------------------------------------------------------ links and kinds
def test_a_symbolic_link_is_never_written_through(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "samples.png").symlink_to(outside)
    for allowed in (False, True):  # not even with overwrite
        with overwriting(allowed), pytest.raises(ValueError, match=r"samples.png is a symbolic link .*outside.txt"):
            save_image_grid(_grid(), tmp_path / "out" / "samples.png")
    assert outside.read_text() == "precious"


def test_a_file_of_another_kind_needs_overwrite(tmp_path):
    tokens = _cache(tmp_path / "tokens.safetensors")
    before = tokens.read_bytes()
    folder = TokenBridgeGenerator.from_config({"preset": "tiny"}).save_pretrained(tmp_path / "gen")
    with pytest.raises(ValueError, match="already holds a token file, not an exported generator; pass --overwrite"):
        export_weights(folder, tokens)
    assert tokens.read_bytes() == before and file_kind(tokens) == TOKENS_FORMAT
    with overwriting():
        export_weights(folder, tokens)
    assert file_kind(tokens) == "tokenbridge-generator"


def test_a_file_tokenbridge_did_not_write_is_kept_unless_asked(tmp_path):
    target = tmp_path / "samples.png"
    target.write_bytes(b"the user's own picture")
    with pytest.raises(ValueError, match="already holds a file tokenbridge did not write"):
        save_image_grid(_grid(), target)
    assert target.read_bytes() == b"the user's own picture"
    with overwriting():
        save_image_grid(_grid(), target)
    save_image_grid(_grid(), target)  # now tokenbridge's own picture: the next run replaces it
    target.unlink()
    target.write_bytes(b"put back by the user")  # a new file in its place carries no mark
    with pytest.raises(ValueError, match="did not write"):
        save_image_grid(_grid(), target)


def test_shipped_weights_are_refused_before_any_work(cli_error):
    shipped = SHIPPED_WEIGHTS / "fmnist_vae.safetensors"
    before = shipped.stat().st_mtime_ns
    err = cli_error(["train-vae", "--out", str(shipped), "--steps", "1"])
    assert "is one of the shipped weights; pass --overwrite" in err
    assert shipped.stat().st_mtime_ns == before


# ------------------------------------------------------------------------------------------------ two writers, kills
_HOLD = """
import sys
from tokenbridge.files import output_lock
with output_lock(sys.argv[1], "token file"):
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes stdin or kills this process
"""


def test_a_second_writer_of_one_output_fails_at_once_and_a_killed_holder_frees_it(tmp_path):
    out = tmp_path / "tokens.safetensors"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], env=ENV, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"token file {out} is being written by process {holder.pid}"):
            _cache(out)
        assert not out.exists()
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs; the operating system drops the lock
        holder.wait()
    assert _cache(out) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens.safetensors"]  # no lock file or temporary left


_KILLED_MID_WRITE = """
import os, signal, sys
from tokenbridge.files import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("half of a fi")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_temporaries_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "table.md"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_MID_WRITE, str(target)], env=ENV)
    assert proc.wait(timeout=120) == -signal.SIGKILL
    assert [p.name for p in tmp_path.iterdir()] == [f".table.md.{proc.pid}.tmp"]
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.md"]


def test_the_temporary_folder_of_a_killed_train_vq_is_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited: its temporaries are leftovers
    leftover = tmp_path / f".vq.{pid}.tmp"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    model = VQTokenizer(channels=4, latent_grid=(4, 4), codebook_size=8, dim=4, hidden=8)
    model.save_pretrained(tmp_path / "vq")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vq"]


# ------------------------------------------------------------------------------------------------ full disk
_FULL = """
import resource, signal, sys, torch
from safetensors.torch import save_file
from tokenbridge.files import atomic_path
from tokenbridge.checkpoint import save_checkpoint


def _raw(path):  # without the size told in advance: the write itself fails (safetensors wraps the OS error)
    with atomic_path(path) as tmp:
        save_file({"x": torch.ones(1 << 17)}, str(tmp), metadata={"format": "tokenbridge-tokens"})


if sys.argv[2] == "limit":  # no tmpfs here: a file-size limit stands in for a full disk
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 18, 1 << 18))
big = {"x": torch.ones(1 << 17)}  # 512 KiB
for write in (lambda: save_checkpoint(sys.argv[1] + "/checkpoint.pt", {"format": "f", "model": big}),
              lambda: _raw(sys.argv[1] + "/tokens.safetensors")):
    try:
        write()
    except OSError as e:
        print(e)
"""


def _small_disk(folder: Path) -> bool:
    """Mount a 256 KiB tmpfs on ``folder`` where this process may (root); False where it may not."""
    folder.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def test_a_full_disk_is_one_line_naming_the_path_and_the_previous_file_stays(tmp_path):
    disk = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mounted = _small_disk(disk)
    try:
        save_file({"x": torch.zeros(4)}, str(disk / "tokens.safetensors"), metadata={"format": TOKENS_FORMAT})
        previous = (disk / "tokens.safetensors").read_bytes()
        res = subprocess.run([sys.executable, "-c", _FULL, str(disk), "tmpfs" if mounted else "limit"], env=ENV,
                             capture_output=True, text=True, timeout=120)
        lines = res.stdout.strip().splitlines()
        assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
        assert len(lines) == 2, lines
        assert f"to write {disk}/checkpoint.pt: it needs 0.5 MiB" in lines[0]  # refused before writing
        assert f"to write {disk}/tokens.safetensors:" in lines[1] and "free on that disk" in lines[1]
        assert "the previous file is unchanged" in lines[1] and "SafetensorError" not in lines[1]
        assert (disk / "tokens.safetensors").read_bytes() == previous
        assert sorted(p.name for p in disk.iterdir()) == ["tokens.safetensors"]
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)


def test_a_run_folder_from_before_the_marks_still_resumes(tmp_path):
    from tokenbridge.files import KIND_ATTR
    from tokenbridge.shards import write_synthetic_shards
    from tokenbridge.train import train

    shards = write_synthetic_shards(tmp_path / "shards", 8, grid=(4, 4, 4), levels=16, num_classes=10)
    run = {"out_dir": str(tmp_path / "run"), "data": {"tokens": str(shards.parent)},
           "model": {"preset": "tiny", "grid_size": [4, 4], "quantizer": {"levels": 16}},
           "train": {"steps": 2, "global_batch": 8, "warmup_steps": 0, "ckpt_every": 0, "log_every": 1,
                     "device": "cpu"}}
    train(run, stop_at=1)
    for path in (tmp_path / "run").iterdir():  # as an earlier version left them: no kinds marked
        if path.is_file() and KIND_ATTR in os.listxattr(path):
            os.removexattr(path, KIND_ATTR)
    assert train(run)["step"] == 2
