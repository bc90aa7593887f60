"""repro at scale "tiny" on stand-ins: a random f4 VAE, a small random classifier, 256 + 64 random images and a tiny
random generator (no shipped weights and no Fashion-MNIST files needed). The numbers mean nothing; the tests check
the plumbing: token caches, variant training + evaluation, reuse, files and table rows."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import TensorDataset

from tokenbridge import repro
from tokenbridge.metrics import FMNISTClassifier
from tokenbridge.model import build_generator
from tokenbridge.train import CachedTokens
from tokenbridge.vae import build_vae


def _images(n: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    # blurred noise: smoother than white noise, so the VAE latents have some spatial structure
    x = torch.nn.functional.avg_pool2d(torch.rand(n, 1, 36, 36, generator=gen) * 2 - 1, 5, stride=1)
    return TensorDataset(x.clamp(-1, 1), torch.arange(n) % 10)


@pytest.fixture(scope="module")
def resources() -> repro.Resources:
    torch.manual_seed(0)
    splits = {"train": _images(256, 1), "test": _images(64, 2)}
    generator_cfg = copy.deepcopy(repro.SCALES["tiny"]["model"])
    generator_cfg["head"]["order"] = [1, 3, 2, 0]
    return repro.Resources(
        vae=build_vae("fmnist").eval(),
        classifier=FMNISTClassifier(widths=(4, 4, 4), feature_dim=8).eval(),
        dataset=splits.__getitem__,
        generator=lambda: build_generator(generator_cfg),
        vae_spec="random-test-vae",
    )


def test_table2a_trains_evaluates_and_reuses(tmp_path, resources, capsys):
    out, work = tmp_path / "results", tmp_path / "work"
    table = repro.run_repro("table2a", out_dir=out, scale="tiny", work_dir=work, resources=resources,
                            overrides=["eval.per_class=2"])
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["parallel head", "autoregressive head"]
    assert "15.7" in rows[0] and "1.94" in rows[1]  # the paper's gFID next to ours
    assert (out / "table2a.png").stat().st_size > 0
    md = (out / "table2a.md").read_text()
    assert table in md
    assert "`tokenbridge repro table2a --scale tiny --out" in md and "eval.per_class=2" in md
    assert "2 steps x batch 32" in md and "seed 0" in md and "wall time" in md
    assert "table2a" in capsys.readouterr().out
    assert len(list(work.glob("tokens_B64_train_256_*.safetensors"))) == 1
    assert len(list(work.glob("tokens_B64_test_64_*.safetensors"))) == 1
    assert len(list((work / "runs").iterdir())) == 2

    # same budget again: both generators and their evaluations are reused, with identical numbers
    again = repro.run_repro("table2a", out_dir=out, scale="tiny", work_dir=work, resources=resources,
                            overrides=["eval.per_class=2"])
    assert again == table
    assert (out / "table2a.md").read_text().count("reused from an earlier run") == 2

    # table2b's frequency row is table2a's AR configuration: trained once; only the natural order is new
    repro.run_repro("table2b", out_dir=out, scale="tiny", work_dir=work, resources=resources,
                    overrides=["eval.per_class=2"])
    assert (out / "table2b.md").read_text().count("reused from an earlier run") == 1
    assert len(list((work / "runs").iterdir())) == 3

    # another evaluation seed re-evaluates the same generators (no training) with new samples
    reseeded = repro.run_repro("table2a", out_dir=tmp_path / "seed1", scale="tiny", work_dir=work,
                               resources=resources, overrides=["eval.per_class=2", "eval.seed=1"])
    md = (tmp_path / "seed1" / "table2a.md").read_text()
    assert md.count("reused from an earlier run") == 2 and "seed 1;" in md
    assert reseeded != table and len(list((work / "runs").iterdir())) == 3


def test_fig8_side_by_side(tmp_path, resources):
    out = tmp_path / "results"
    table = repro.run_repro("fig8", out_dir=out, scale="tiny", work_dir=tmp_path / "work", resources=resources)
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["random", "confidence"]
    assert (out / "fig8.png").stat().st_size > 0
    md = (out / "fig8.md").read_text()
    assert "mean token log-prob" in md and "`tokenbridge repro fig8 --scale tiny" in md


def test_heldout_nll_is_deterministic_and_keeps_the_global_rng(tmp_path, resources):
    path = tmp_path / "tokens.safetensors"
    from tokenbridge.train import cache_latents

    cache_latents("random-test-vae", path, quantizer={"levels": 64}, vae=resources.vae,
                  dataset=resources.dataset("test"))
    tokens = CachedTokens(path)
    model = resources.generator()
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = repro.heldout_nll(model, tokens, mask_ratio=0.875, seed=0, batch_size=16)
    assert torch.equal(torch.rand(1), expected_next)
    b = repro.heldout_nll(model, tokens, mask_ratio=0.875, seed=0, batch_size=16)
    assert a == pytest.approx(b, abs=1e-6) and 0 < a < 10


def test_budget_overrides():
    budget = repro.resolve_budget("small", ["train.steps=5", "eval.cfg=1.5", "model.head.width=32"])
    assert budget["train"]["steps"] == 5 and budget["eval"]["cfg"] == 1.5 and budget["model"]["head"]["width"] == 32
    assert repro.SCALES["small"]["train"]["steps"] != 5  # the shared budget is not modified
    with pytest.raises(ValueError, match="eval.cgf"):
        repro.resolve_budget("small", ["eval.cgf=1.5"])
    with pytest.raises(ValueError, match="unknown scale"):
        repro.resolve_budget("huge")
    with pytest.raises(ValueError, match="unknown repro name"):
        repro.run_repro("table9", scale="tiny")
    assert set(repro.REPRO_NAMES) == set(repro.TABLES)
