"""tokenbridge.config: YAML loading, command-line overrides, the shipped config, and bad keys named."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenbridge import train as T
from tokenbridge.config import ConfigError, apply_overrides, read_yaml
from tokenbridge.quantizer import DimensionwiseQuantizer


def test_overrides_and_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("out_dir: runs/x\nmodel:\n  depth: 2\ntrain:\n  lr: 1e-4\n  betas: [0.9, 0.95]\n")
    cfg = apply_overrides(read_yaml(path), ["train.lr=3e-4", "model.depth=4", "train.betas=[0.8, 0.9]",
                                            "new.sub.key=abc", "data.tokens=null", "train.bf16=false", "seed=3"])
    assert cfg["train"]["lr"] == 3e-4 and isinstance(cfg["train"]["lr"], float)
    assert cfg["model"]["depth"] == 4 and cfg["train"]["betas"] == [0.8, 0.9]
    assert cfg["new"]["sub"]["key"] == "abc" and cfg["data"]["tokens"] is None
    assert cfg["train"]["bf16"] is False and cfg["seed"] == 3
    assert read_yaml(path)["train"]["lr"] == 1e-4  # YAML "1e-4" is a float here
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"out_dir": "x"}, ["out_dir.x=1"])
    with pytest.raises(FileNotFoundError):
        read_yaml(tmp_path / "nope.yaml")


SHIPPED_CONFIG = Path(T.__file__).parents[1] / "configs" / "fmnist.yaml"


def test_shipped_fmnist_config_parses():
    run = T.load_run_config(SHIPPED_CONFIG)
    assert run == T.load_run_config("fmnist")  # the package ships its configs; the repository links to them
    assert run.train.grad_clip == 3.0 and run.train.betas == (0.9, 0.95) and run.seed == 0
    assert run.data.source == "tokens" and run.data.tokens.startswith("runs/")
    assert run.model["backbone"]["width"] == 192 and run.model["head"]["order"] == "frequency"
    assert run.sample == {"num_iter": 16, "cfg": 3.0}  # the config gives only what differs from the defaults
    assert run.model["quantizer"] == DimensionwiseQuantizer().config() and run.model["mask_ratio_min"] == 0.7


@pytest.mark.parametrize("override, message", [
    ("trian.steps=5", "unknown config key 'trian'"),
    ("train.steps=abc", "'train.steps' = 'abc': Input should be a valid integer"),
    ("train.steps=2.7", "'train.steps' = 2.7: Input should be a valid integer"),
    ("model.backbone.widht=3", "unknown config key 'model.backbone.widht' \\(known here: attn_dropout"),
    ("model.head.kind=vq", "'model.head.kind' = 'vq'"),
    ("model.quantizer.levels=1", "levels \\(B\\) must be an integer"),
    ("model.preset=huge", "unknown tokenbridge preset"),
    ("sample.temperature=nan", "'sample.temperature' = 'nan': Input should be a finite number"),
    ("sample.order=rnd", "'sample.order' = 'rnd': Input should be 'random' or 'confidence'"),
    ("data.limit=-5", "'data.limit' = -5: Input should be greater than 0"),
    ("family=gan", "unknown generator family"),
])
def test_bad_config_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        T.load_run_config(SHIPPED_CONFIG, [override])
