"""tokenbridge.sweep and `tokenbridge sweep`: the shipped generator at 2 MAR steps and 1 sample per class, scored
against 64 stand-in "test" images (the numbers mean nothing; the tests check the grid, the files, repeatability
and that bad input is refused before anything is sampled)."""

from __future__ import annotations

import json

import pytest
import torch

from tokenbridge import cli
from tokenbridge import sweep as S

CELL_KEYS = {"fd_cls", "precision", "recall", "class_accuracy", "is_cls", "num_samples", "seconds", "options"}


def _real_images() -> torch.Tensor:
    """64 smooth random images [64, 1, 32, 32] in [-1, 1], standing in for the Fashion-MNIST test split."""
    gen = torch.Generator().manual_seed(0)
    return torch.nn.functional.avg_pool2d(torch.rand(64, 1, 36, 36, generator=gen) * 2 - 1, 5, stride=1)


def _table_rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


@pytest.fixture
def no_sampling(monkeypatch):
    """Sampling fails the test: bad input must be refused before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("sampled despite bad input")
    monkeypatch.setattr(S, "generate", refuse)


def test_grid_files_and_the_same_seed_gives_the_same_numbers(tmp_path):
    out = tmp_path / "sweep"
    result = S.run_sweep("fmnist", cfg=[1.0, 3.0], temperature=[0.5, 1.0], num_iter=[2], per_class=1, seed=3,
                         out=out, real_images=_real_images(), progress=False)
    rows = result["rows"]
    assert [(r["temperature"], r["cfg"]) for r in rows] == [(0.5, 1.0), (0.5, 3.0), (1.0, 1.0), (1.0, 3.0)]
    assert all(CELL_KEYS <= set(r) and r["num_samples"] == 10 for r in rows)
    assert rows[0]["options"] == {**rows[0]["options"], "cfg": 1.0, "temperature": 0.5, "num_iter": 2,
                                  "cfg_schedule": "linear"}  # the generator's recorded schedule, as sampled
    assert result["best"] == min(rows, key=lambda r: r["fd_cls"])

    markdown = (out / "sweep.md").read_text()
    assert (f"`tokenbridge sweep --model fmnist --cfg 1 3 --temperature 0.5 1 --num-iter 2 --per-class 1 --seed 3 "
            f"--out {out}`") in markdown  # the command that repeats it
    table = _table_rows(markdown)
    assert len(table) == 4 and [row[:3] for row in table] == [["1", "0.5", "2"], ["3", "0.5", "2"],
                                                              ["1", "1", "2"], ["3", "1", "2"]]
    assert table[1][3] == f"{rows[1]['fd_cls']:.3f}" and table[1][5] == f"{rows[1]['recall']:.3f}"
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["per_class"] == 1 and saved["seed"] == 3
    assert saved["axes"] == {"cfg": [1.0, 3.0], "temperature": [0.5, 1.0], "num_iter": [2]}
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))

    # one cell again, alone and with the same seed: the same images, so the same numbers
    again = S.run_sweep("fmnist", cfg=[3.0], temperature=[1.0], num_iter=[2], per_class=1, seed=3,
                        out=tmp_path / "again", real_images=_real_images(), progress=False)["rows"][0]
    for key in ("fd_cls", "precision", "recall", "class_accuracy", "is_cls"):
        assert again[key] == rows[3][key], key


def test_cli_prints_the_table_and_refuses_to_overwrite(tmp_path, monkeypatch, capsys):
    splits = []
    monkeypatch.setattr(S, "as_tensors", lambda split: splits.append(split) or (_real_images(), None))
    out = tmp_path / "sweep"
    argv = ["sweep", "--cfg", "1", "2", "--temperature", "1", "--num-iter", "2", "--per-class", "1", "--out", str(out)]
    cli.main(argv)
    printed = capsys.readouterr().out
    assert splits == ["test"]  # scored against the test split, as `tokenbridge evaluate` does
    assert len(_table_rows(printed)) == 2 and "best cell by FD: cfg " in printed
    assert _table_rows(printed) == _table_rows((out / "sweep.md").read_text())
    before = (out / "sweep.json").read_bytes()

    monkeypatch.setattr(S, "generate", lambda *a, **k: pytest.fail("sampled into a folder with results"))
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2 and "already holds sweep results" in capsys.readouterr().err
    assert (out / "sweep.json").read_bytes() == before


@pytest.mark.parametrize("options, message", [
    (["--temperature", "-0.5"], "sweep temperature value -0.5 must be finite and >= 0"),
    (["--cfg", "nan"], "sweep cfg value nan must be finite and >= 0"),
    (["--cfg", "2", "2"], "sweep cfg value 2.0 is given twice"),
    (["--num-iter", "0"], "sweep num_iter value 0 must be an integer >= 1"),
    (["--cfg"], "expected at least one argument"),
    (["--per-class", "0"], "expected a positive integer, got 0"),
    (["--model", "missing.safetensors"], "generator weights not found"),
])
def test_bad_input_exits_2_before_sampling(tmp_path, capsys, no_sampling, options, message):
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit) as stop:
        cli.main(["sweep", "--cfg", "1", "--temperature", "1", "--out", str(out), *options])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_library_refuses_bad_grids_before_sampling(tmp_path, no_sampling):
    with pytest.raises(ValueError, match="sweep cfg: the list of values is empty"):
        S.run_sweep("fmnist", cfg=[], out=tmp_path / "a")
    with pytest.raises(ValueError, match="at least one of cfg, temperature, num_iter"):
        S.run_sweep("fmnist", cfg=None, temperature=None, out=tmp_path / "a")
    with pytest.raises(ValueError, match="sweep num_iter value 2.5 is not an integer"):
        S.run_sweep("fmnist", num_iter=[2.5], out=tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "sweep.md").write_text("earlier results")
    with pytest.raises(ValueError, match="already holds sweep results \\(sweep.md\\)"):
        S.run_sweep("fmnist", out=tmp_path / "b")
    assert not (tmp_path / "a").exists() and (tmp_path / "b" / "sweep.md").read_text() == "earlier results"


class _NoGuidance(torch.nn.Module):
    """A generator family without classifier-free guidance: its only sampling option is the temperature."""

    family = "no-guidance"

    def sample(self, labels: torch.Tensor, temperature: float = 1.0, generator=None) -> dict:
        return {"latents": torch.zeros(len(labels), 4, 8, 8)}


def test_options_the_family_does_not_have_are_refused():
    with pytest.raises(ValueError, match="'no-guidance' generator has no sampling option 'cfg' \\(its options: "
                                         "temperature\\)"):
        S.grid_cells(_NoGuidance(), {"cfg": [1.0], "temperature": [1.0], "num_iter": None})
    cells = S.grid_cells(_NoGuidance(), {"cfg": None, "temperature": [0.5, 1.0], "num_iter": None})
    assert cells == [{"temperature": 0.5}, {"temperature": 1.0}]
