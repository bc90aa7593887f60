import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    # The models under test are tiny: on 2 shared cores, torch's thread pool costs more than it saves.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture()
def cli_error(capsys):
    """Run the command line in-process, ``tokenbridge.cli.main(argv)``, expecting its error exit (code 2, the
    exit of every bad input); returns what it wrote to stderr. A traceback would escape as an exception here."""
    from tokenbridge import cli

    def run(argv: list[str]) -> str:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    return run


@pytest.fixture()
def tiny_diffusers_vae():
    """Factory: a tiny diffusers AutoencoderKL (16x16 RGB -> 4 x 8 x 8), saved as a folder; returns the model."""
    diffusers = pytest.importorskip("diffusers", reason="the diffusers wrapper needs diffusers (dev extra)")

    def make(folder, **config):
        torch.manual_seed(0)
        model = diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
            latent_channels=4, norm_num_groups=4, sample_size=16, **config,
        ).eval()
        model.save_pretrained(folder)
        return model

    return make


@pytest.fixture()
def fake_fashion_mnist():
    """Factory: the four Fashion-MNIST idx .gz files with random content (24 train, 8 test images) in a folder."""

    def make(root):
        rng = np.random.default_rng(0)
        for prefix, n in (("train", 24), ("t10k", 8)):
            with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
                f.write(struct.pack(">4i", 2051, n, 28, 28) + rng.integers(0, 256, n * 784, dtype=np.uint8).tobytes())
            with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
                f.write(struct.pack(">2i", 2049, n) + rng.integers(0, 10, n, dtype=np.uint8).tobytes())
        return root

    return make


def run_torchrun(script: Path, *args: str, log_dir: Path, nproc: int = 2, timeout: int = 120) -> None:
    """Run ``script`` under torchrun with ``nproc`` CPU processes; on failure, fail with every rank's own output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "PYTHONFAULTHANDLER": "1", "TORCH_SHOW_CPP_STACKTRACES": "1"}
    # --standalone: the rendezvous binds a free port itself (a port picked here and closed again could be taken by
    # another process before torchrun binds it)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "--log-dir", str(log_dir), "--tee", "3", str(script), *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        logs = sorted(log_dir.rglob("*.log"))  # every rank's stdout and stderr (--tee)
        ranks = "\n".join(f"--- {p.relative_to(log_dir)}\n{p.read_text()[-4000:]}" for p in logs)
        pytest.fail(f"torchrun exited with {res.returncode}:\n{res.stderr[-3000:]}\n{ranks}")


# Runs the given job scripts one after another in the same torchrun workers, each as ``script OUT_DIR`` (its own
# __main__). Every job gets its own rendezvous store, a TCPStore that rank 0 opens on a free port and announces
# through torchrun's store: a process group made and destroyed by one job cannot be made again on the same store
# (the second init reads the first one's keys and connects to ports that are closed by then).
TORCHRUN_JOBS = """
import os, runpy, sys
from datetime import timedelta
import torch.distributed as dist

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, False,
                      timeout=timedelta(seconds=60))
servers = []  # rank 0's stores, open until every rank is done
for k, (script, out_dir) in enumerate(zip(sys.argv[1::2], sys.argv[2::2])):
    if rank == 0:
        servers.append(dist.TCPStore("127.0.0.1", 0, world, True, wait_for_workers=False))
        agent.set(f"tokenbridge-job-{k}", str(servers[-1].port))
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", agent.get(f"tokenbridge-job-{k}").decode()
    sys.argv = [script, out_dir]
    print(f"--- job {script}", flush=True)
    runpy.run_path(script, run_name="__main__")
agent.set(f"tokenbridge-done-{rank}", "1")
agent.wait([f"tokenbridge-done-{r}" for r in range(world)])
"""


def pytest_collection_modifyitems(items):
    # Under pytest-xdist (`make test` runs `-n auto --dist loadgroup`) the tests sharing the one torchrun below go
    # to one worker, so that the torchrun workers' start is paid once in the suite, not once per xdist worker.
    for item in items:
        if "torchrun_jobs" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("torchrun"))


@pytest.fixture(scope="session")
def torchrun_jobs(request, tmp_path_factory) -> dict[str, Path]:
    """One torchrun with 2 CPU processes for the DDP job of every selected test that asks for this fixture: the
    ``DDP_SCRIPT`` of each such test module runs in turn in the same two workers (a process group of its own each),
    so that the workers' start (interpreter, torch and tokenbridge imports: seconds) is paid once per session, not
    once per test. Returns {test module name: the folder its script was given as sys.argv[1]}."""
    scripts = {item.module.__name__: item.module.DDP_SCRIPT for item in request.session.items
               if "torchrun_jobs" in getattr(item, "fixturenames", ())}
    root = tmp_path_factory.mktemp("torchrun")
    args, outs = [], {}
    for name, source in sorted(scripts.items()):
        (root / f"{name}.py").write_text(source)
        outs[name] = root / name
        args += [str(root / f"{name}.py"), str(outs[name])]
    (root / "jobs.py").write_text(TORCHRUN_JOBS)
    run_torchrun(root / "jobs.py", *args, log_dir=root / "logs", timeout=120 * len(scripts))
    return outs
