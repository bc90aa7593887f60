"""The one read path (tokenbridge.reading, tokenbridge.budget): a file handed in is checked before it is trusted
(size budget on the meta device, finite floating-point weights, paths inside their folder, token ranges in
training), requests of known size are checked before the work, and what a user can get wrong is a message."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tokenbridge import cli
from tokenbridge.budget import check_sample_request, is_out_of_memory
from tokenbridge.checkpoint import load_checkpoint, load_generator
from tokenbridge.config import ConfigError, RunConfig, apply_overrides, validate
from tokenbridge.generators.tokenbridge import TokenBridgeGenerator
from tokenbridge.shards import ShardedTokens, write_synthetic_shards
from tokenbridge.train import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def folder(tmp_path) -> Path:
    """A tiny TokenBridge generator as a pretrained folder (config.json + model.safetensors)."""
    torch.manual_seed(0)
    model = TokenBridgeGenerator.from_config({"preset": "tiny"})
    model.provenance = {"vae": "fmnist", "sample": {"num_iter": 2}}
    return model.save_pretrained(tmp_path / "gen")


def _edit_weights(folder: Path, change) -> None:
    path = folder / "model.safetensors"
    state = load_file(str(path))
    change(state)
    save_file(state, str(path), metadata={"format": "tokenbridge-pretrained"})


# ------------------------------------------------------------------------------------------------ generator files
def test_a_config_asking_for_a_huge_model_is_refused_before_allocation(folder):
    config = json.loads((folder / "config.json").read_text())
    config["config"]["backbone"]["width"] = 1 << 16  # about 0.5 TB of parameters
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"describes a generator of [0-9.]+ GiB .* set TOKENBRIDGE_MAX_MODEL_GB"):
        load_generator(folder)


def test_the_size_limit_is_raised_and_lowered_by_its_variable(folder, monkeypatch):
    monkeypatch.setenv("TOKENBRIDGE_MAX_MODEL_GB", "1e-6")  # 1 KiB: the tiny model is over it
    with pytest.raises(ValueError, match="over the limit of 0.00 GiB"):
        load_generator(folder)
    monkeypatch.setenv("TOKENBRIDGE_MAX_MODEL_GB", "1")
    assert load_generator(folder).provenance["vae"] == "fmnist"


@pytest.mark.parametrize("bad", ["nan", "inf", "integer"])
def test_nan_inf_and_integer_weights_are_refused_naming_the_tensor(folder, bad):
    def change(state):
        name = next(k for k, v in state.items() if v.dtype == torch.float32 and v.ndim == 2)
        if bad == "integer":
            state[name] = torch.ones_like(state[name], dtype=torch.int32)
        else:
            state[name][0, 0] = float(bad)
        change.name = name

    _edit_weights(folder, change)
    expected = "torch.int32 values where torch.float32 weights belong" if bad == "integer" else "1 NaN or infinite"
    with pytest.raises(ValueError, match=rf"tensor '{change.name}' holds {expected}"):
        load_generator(folder)


def test_sample_with_nan_weights_writes_nothing(folder, tmp_path, cli_error):
    _edit_weights(folder, lambda state: state.update({k: v * float("nan") for k, v in state.items()
                                                       if v.dtype == torch.float32}))
    err = cli_error(["sample", "--model", str(folder), "--labels", "0", "--per-class", "1", "--out",
                     str(tmp_path / "out")])
    assert "NaN or infinite" in err
    assert not (tmp_path / "out" / "samples.png").exists()


def test_a_vq_tokenizer_folder_is_read_the_same_way(tmp_path):
    from tokenbridge.vq import VQTokenizer

    model = VQTokenizer(channels=4, latent_grid=(4, 4), codebook_size=8, dim=4, hidden=8)
    folder = model.save_pretrained(tmp_path / "vq")
    state = load_file(str(folder / "model.safetensors"))
    state["decoder.0.bias"][0] = float("inf")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "tokenbridge-vq"})
    with pytest.raises(ValueError, match="tensor 'decoder.0.bias' holds 1 NaN or infinite value"):
        VQTokenizer.from_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["config"]["codebook_size"] = 1 << 34
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"describes a VQ tokenizer of [0-9.]+ GiB"):
        VQTokenizer.from_pretrained(folder)


# ------------------------------------------------------------------------------------------------ shard caches
@pytest.fixture()
def shards(tmp_path) -> Path:
    return write_synthetic_shards(tmp_path / "shards", 16, grid=(4, 4, 4), levels=16, shard_size=8, num_classes=10)


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.safetensors", "sub/../../outside.safetensors"])
def test_manifest_paths_outside_the_folder_are_refused(shards, name):
    manifest = json.loads(shards.read_text())
    manifest["shards"][0]["file"] = name
    shards.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"names shard '{name}'"):
        ShardedTokens(shards.parent)
    manifest["shards"][0]["file"] = "shard-00000.safetensors"
    manifest["quantizer_file"] = name
    shards.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"names quantizer file '{name}'"):
        ShardedTokens(shards.parent)


def _run(tmp_path: Path, tokens: Path, steps: int, **train_cfg) -> dict:
    return {"out_dir": str(tmp_path / "run"), "seed": 0, "family": "tokenbridge", "data": {"tokens": str(tokens)},
            "model": {"preset": "tiny", "grid_size": [4, 4], "quantizer": {"levels": 16}},
            "train": {"steps": steps, "global_batch": 8, "lr": 1e-3, "warmup_steps": 0, "ckpt_every": 0,
                      "log_every": 1, "device": "cpu", **train_cfg}}


def test_an_index_past_the_levels_in_a_shard_stops_training_with_a_message(tmp_path, shards):
    path = shards.parent / "shard-00001.safetensors"
    tensors = load_file(str(path))
    tensors["indices"][3, 0, 0, 0] = 16  # levels is 16
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"token indices span \[0, 16\], outside \[0, 16\)"):
        train(_run(tmp_path, shards.parent, steps=2))


# ------------------------------------------------------------------------------------------------ configs and resumes
def test_an_unknown_train_device_is_a_config_message():
    cfg = _run(Path("/tmp"), Path("t"), 1, device="gpu")
    with pytest.raises(ConfigError, match="unknown device 'gpu': use auto, cpu, cuda or cuda:N"):
        validate(RunConfig, cfg, "run config")


def test_a_yaml_tag_in_an_override_is_a_config_message():
    with pytest.raises(ConfigError, match=r"override 'train.steps=!!python/object/apply:os.system \[ls\]'"):
        apply_overrides({}, ["train.steps=!!python/object/apply:os.system [ls]"])


def test_malformed_rng_state_and_a_run_past_its_steps_are_messages(tmp_path, shards):
    train(_run(tmp_path, shards.parent, steps=2))
    with pytest.raises(ValueError, match="is at step 2, past the 1 steps the config asks for: nothing to train"):
        train(_run(tmp_path, shards.parent, steps=1))
    ckpt_path = tmp_path / "run" / "checkpoint.pt"
    for rng in ([{"torch": torch.zeros(3, dtype=torch.uint8)}], "not a list"):
        ckpt = torch.load(ckpt_path, weights_only=True)
        ckpt["rng"] = rng
        torch.save(ckpt, ckpt_path)
        with pytest.raises(ValueError, match="holds a malformed RNG state"):
            train(_run(tmp_path, shards.parent, steps=3))
    assert load_checkpoint(ckpt_path)["step"] == 2  # nothing replaced the checkpoint


# ------------------------------------------------------------------------------------------------ requests
def test_requests_beyond_memory_or_time_are_refused_before_the_work(monkeypatch):
    one = {"images": torch.zeros(1, 3, 256, 256)}  # 768 KiB per image
    with pytest.raises(ValueError, match=r"sampling 100,000,000 images needs about [0-9,.]+ GiB of memory"):
        check_sample_request(None, 10**8, 256, lambda: one)
    monkeypatch.setenv("TOKENBRIDGE_MAX_REQUEST_HOURS", "1e-12")
    over = r"sampling 1,000 images would take about .*over the limit of 1e-12 h \(TOKENBRIDGE_MAX_REQUEST_HOURS\)"
    with pytest.raises(ValueError, match=over):
        check_sample_request(None, 1000, 1, lambda: {"images": torch.zeros(1, 1, 4, 4)})
    monkeypatch.delenv("TOKENBRIDGE_MAX_REQUEST_HOURS")
    assert check_sample_request(None, 1000, 256, lambda: {"images": torch.zeros(1, 1, 4, 4)}) >= 0
    assert check_sample_request(None, 100, 256, lambda: pytest.fail("small requests are not probed")) is None


def test_sample_per_class_beyond_memory_is_a_message_before_sampling(tmp_path, cli_error):
    err = cli_error(["sample", "--labels", "0", "1", "--per-class", "1000000000", "--num-iter", "1", "--out",
                     str(tmp_path / "out")])
    assert "sampling 2,000,000,000 images needs about" in err and "ask for fewer (--per-class" in err
    assert not (tmp_path / "out" / "samples.png").exists()


def test_the_demo_servers_file_cache_is_swept():
    from tokenbridge.ui import CACHE_SWEEP, build_app, load_entries

    every, age = CACHE_SWEEP
    assert 0 < every <= age <= 3600  # pictures of a request live minutes, not the server's lifetime
    assert build_app(load_entries(["fmnist"])).delete_cache == CACHE_SWEEP


def test_running_out_of_memory_anyway_is_one_line(monkeypatch, capsys):
    try:
        torch.empty(1 << 62, dtype=torch.uint8)
    except RuntimeError as e:  # the CPU allocator's own words
        error = e
    assert is_out_of_memory(error)

    def explode(args):
        raise error

    monkeypatch.setattr(cli, "cmd_evaluate", explode)
    with pytest.raises(SystemExit) as stop:
        cli.main(["evaluate", "x.npz"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("tokenbridge evaluate: error: out of memory in evaluate (one allocation of")
    assert "free now" in err
