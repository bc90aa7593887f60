"""Argument parsing of the `tokenbridge` command (the subcommands' work is tested in the module tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokenbridge import cli
from tokenbridge.autoencoder import build_vae
from tokenbridge.checkpoint import load_generator
from tokenbridge.generate import generate
from tokenbridge.vae import load_vae, save_vae, vae_fingerprint


def _parse(monkeypatch, argv: list[str]):
    seen = []
    for name in ("cmd_repro", "cmd_reconstruct"):
        monkeypatch.setattr(cli, name, seen.append)
    cli.main(argv)
    return seen[0]


def test_overrides_before_and_after_options_are_all_kept(monkeypatch):
    args = _parse(monkeypatch, ["repro", "table2a", "model.levels=16", "--scale", "tiny", "train.steps=400",
                                "eval.cfg=2.0"])
    assert args.name == "table2a" and args.scale == "tiny"
    assert args.overrides == ["model.levels=16", "train.steps=400", "eval.cfg=2.0"]


def test_unknown_options_are_still_rejected(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(monkeypatch, ["repro", "table2a", "--scale", "tiny", "--bogus"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(monkeypatch, ["reconstruct", "levels=3"])  # reconstruct takes no overrides


# ---------------------------------------------------------------------------------------------- config errors


REPO = Path(__file__).resolve().parents[1]


def test_train_config_typo_fails_before_any_work(cli_error, capsys, monkeypatch):
    # exit 2, the bad key named, nothing trained
    monkeypatch.chdir(REPO)
    assert "unknown config key 'trian'" in cli_error(["train", "--config", "configs/fmnist.yaml", "trian.steps=5"])
    assert "train" not in capsys.readouterr().out


@pytest.mark.parametrize("value, expected", [("abc", "unable to parse string as an integer"),
                                             ("2.7", "got a number with a fractional part")])
def test_train_steps_of_the_wrong_type(tmp_path, capsys, value, expected):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--config", str(REPO / "configs" / "fmnist.yaml"), f"train.steps={value}",
                  f"out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"config key 'train.steps' = {value if value != 'abc' else repr(value)}" in err
    assert expected in err and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- the recorded VAE


def test_sample_refuses_another_vae_unless_asked(tmp_path, capsys):
    torch.manual_seed(0)
    other = save_vae(build_vae("fmnist"), tmp_path / "other_vae.safetensors")  # same shapes, other weights
    with pytest.raises(SystemExit):
        cli.main(["sample", "--vae", str(other), "--labels", "0", "--per-class", "1", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert "trained on the VAE 'fmnist'" in err and str(other) in err and "--allow-other-vae" in err
    assert not (tmp_path / "s").exists()
    cli.main(["sample", "--vae", str(other), "--allow-other-vae", "--labels", "0", "--per-class", "1",
              "--num-iter", "2", "--out", str(tmp_path / "s")])
    assert (tmp_path / "s" / "samples.png").is_file()


def test_shipped_generator_records_the_shipped_vae():
    model = load_generator("fmnist")
    assert model.provenance["family"] == "tokenbridge" and model.provenance["vae"] == "fmnist"
    assert model.provenance["vae_fingerprint"] == vae_fingerprint(load_vae("fmnist"))
    assert model.provenance["sample"] == {"num_iter": 16, "cfg": 3.0, "cfg_schedule": "linear"}
    images = generate(model, [0, 1], num_iter=2)["images"]  # decoded with the recorded VAE, no --vae needed
    assert images.shape == (2, 1, 32, 32) and images.min() >= -1 and images.max() <= 1


@pytest.mark.parametrize("argv, expected", [([], None), (["--released-cfg"], True), (["--no-released-cfg"], False)])
def test_boolean_sampling_options_parse_both_ways(argv, expected):
    args = cli.build_parser().parse_args(["sample", "--labels", "0", *argv])
    assert args.released_cfg is expected  # None: not given, the generator's recorded value stays


def test_a_boolean_sampling_option_takes_no_value():
    with pytest.raises(SystemExit):  # `--released-cfg False` read as True was the old trap
        cli.build_parser().parse_args(["sample", "--labels", "0", "--released-cfg", "False"])
