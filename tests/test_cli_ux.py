"""What a user touches first: a parser that answers before torch is imported, `--version`, booleans that parse
`--no-...`, help that shows the library's real defaults, progress on stderr for every long command (none with
--quiet), the top-level API and the layout errors that name both shapes."""
from __future__ import annotations

import argparse
import inspect
import re
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import tokenbridge
from tokenbridge import cli, cli_options, cli_parser
from tokenbridge.images import image_grid, labelled_grid

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "scipy", "matplotlib", "tokenbridge.cli", "tokenbridge.generators")
BAR = re.compile(r"\d+/\d+ \[")  # tqdm's "n/total [elapsed<remaining" (the ETA)


def _fresh_python(code: str) -> str:
    """Run ``code`` in a new interpreter (nothing imported yet) from the repository; its stdout."""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _heavy_after(argv: list[str]) -> str:
    return ("import sys, runpy\n"
            f"sys.argv = ['tokenbridge', *{argv!r}]\n"
            "try:\n    runpy.run_module('tokenbridge', run_name='__main__')\n"
            "except SystemExit as stop:\n    print('exit', stop.code)\n"
            f"print('loaded', sorted(m for m in {HEAVY!r} if m in sys.modules))\n")


# ---------------------------------------------------------------------------------------------- a fast parser
def test_help_answers_without_torch():
    out = _fresh_python(_heavy_after(["--help"]))
    assert "examples:" in out and "tokenbridge sample" in out and "exit 0" in out
    assert "loaded []" in out


def test_version_answers_without_torch():
    out = _fresh_python(_heavy_after(["--version"]))
    assert f"tokenbridge {tokenbridge.__version__}" in out and "loaded []" in out


def test_a_bad_option_answers_without_torch():
    code = _heavy_after(["sample", "--num-iterr", "3"]).replace("import sys, runpy", "import io, sys, runpy\n"
                                                                  "sys.stderr = io.StringIO()")
    out = _fresh_python(code + "print('stderr', repr(sys.stderr.getvalue()))\n")
    assert "exit 2" in out and "--num-iterr" in out and "loaded []" in out


def test_version_is_the_package_version():
    pyproject = (REPO / "pyproject.toml").read_text()  # tomllib is Python 3.11+; the package supports 3.10
    assert re.search(r'^version = "(.*)"$', pyproject, re.M).group(1) == cli_options.VERSION == tokenbridge.__version__
    assert 'tokenbridge = "tokenbridge.cli_parser:main"' in pyproject


# ---------------------------------------------------------------------------------------------- the constants the help shows
def _declared_type(kind):
    """The type under the annotation's ranges (samplers' Annotated declarations) and ``| None``."""
    while True:
        if typing.get_origin(kind) is typing.Annotated:
            kind = typing.get_args(kind)[0]
        elif type(None) in typing.get_args(kind):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        else:
            return kind


def test_sampling_table_equals_every_family_signature():
    from tokenbridge.generators import FAMILIES, sample_options
    table = cli_options.SAMPLING_OPTIONS
    for family in {*cli_options.SHIPPED_FAMILY.values(), "tokenbridge-ar"}:  # other tests register toy families
        cls = FAMILIES[family]
        fields = sample_options(cls).model_fields
        assert {n for n, o in table.items() if family in o.defaults} == set(fields), family
        for name, field in fields.items():
            option = table[name]
            assert option.defaults[family] == field.default, (family, name)
            kind = _declared_type(field.annotation)
            if typing.get_origin(kind) is typing.Literal:
                assert option.choices == typing.get_args(kind), name
                continue
            assert ("pair" if typing.get_origin(kind) is tuple else kind) == option.kind, name
    groups = {families for _, families in cli_options.SAMPLING_GROUPS}
    assert all(tuple(o.defaults) in groups for o in table.values())  # every option has its help group


def test_shipped_sampling_and_repro_tables_equal_the_library():
    from tokenbridge.checkpoint import SHIPPED, load_generator
    from tokenbridge.repro import REPRO_NAMES, SCALES, run_repro
    assert set(cli_options.SHIPPED_SAMPLING) == set(SHIPPED)
    for name in SHIPPED:
        model = load_generator(name)
        assert model.provenance["sample"] == cli_options.SHIPPED_SAMPLING[name], name
        assert model.provenance.get("sample_paper") == cli_options.SHIPPED_PAPER_SAMPLING.get(name), name
        assert model.family == cli_options.SHIPPED_FAMILY[name]
    assert cli_options.REPRO_NAMES == tuple(REPRO_NAMES) and cli_options.REPRO_SCALES == tuple(SCALES)
    assert inspect.signature(run_repro).parameters["out_dir"].default == cli_options.REPRO_OUT


def _defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()}


def test_library_defaults_shown_in_help_equal_the_signatures():
    from tokenbridge.config import DataConfig
    from tokenbridge.quantizer import DimensionwiseQuantizer
    from tokenbridge.repro import run_repro
    from tokenbridge.vq import VQTokenizer
    shown = cli_options.LIBRARY_DEFAULTS
    for command, fn in (("train-vae", cli.train_vae), ("train-vq", cli.train_vq),
                        ("train-classifier", cli.train_classifier), ("generate", cli.generate),
                        ("reconstruct", cli.run_reconstruct), ("demo-ui", cli.launch_ui), ("repro", run_repro)):
        signature = {**_defaults(fn), **(_defaults(VQTokenizer) if command == "train-vq" else {})}
        assert {k: signature[k] for k in shown[command]} == shown[command], command
    assert {k: _defaults(cli.run_edit)[k] for k in shown["generate"]} == shown["generate"]
    assert {k: DataConfig.model_fields[k].default for k in shown["data"]} == shown["data"]
    quantizer = _defaults(DimensionwiseQuantizer)
    assert {k: quantizer[k] for k in shown["quantizer"]} == shown["quantizer"]


def test_help_groups_sampling_options_per_family_with_real_defaults(capsys):
    with pytest.raises(SystemExit):
        cli_parser.parse_args(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for title, _ in cli_options.SAMPLING_GROUPS:
        assert f"{title}:" in text
    # the shipped generators record their own steps: the help says so next to the signature's 64
    assert "masked-generation (MAR) steps, capped at the number of tokens (default 64; recorded: fmnist 16, " \
           "fmnist-mar 8, fmnist-d2c 8)" in text
    assert "every diffusion step (default unclipped; recorded: fmnist-mar 5.0, fmnist-d2c 5.0)" in text
    assert "(default: the library's)" not in text


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli_parser.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_option_has_help_and_every_positional_choice_is_listed():
    for name, sub in _subparsers().items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    repro = _subparsers()["repro"]
    name = next(a for a in repro._actions if a.dest == "name")
    assert set(cli_options.REPRO_NAMES) | {"all"} == set(name.choices)
    assert {"shipped", "d2c", "frontier", "edit"} <= set(name.help.replace(",", "").split())
    assert next(a for a in repro._actions if a.dest == "scale").choices == cli_options.REPRO_SCALES


def _required_argv(sub: argparse.ArgumentParser) -> list[str]:
    argv = []
    for action in sub._actions:
        if action.required and action.option_strings:
            argv += [action.option_strings[0], "x"]
        elif not action.option_strings and action.nargs is None:
            argv.append(action.choices[0] if action.choices else "x")
    return argv


def test_every_boolean_option_parses_its_no_form():
    seen = 0
    for name, sub in _subparsers().items():
        for action in sub._actions:
            if action.nargs == 0 and action.help not in (argparse.SUPPRESS,) and action.dest != "help":
                assert isinstance(action, argparse.BooleanOptionalAction), f"{name} {action.option_strings}"
            if isinstance(action, argparse.BooleanOptionalAction):
                long = next(o for o in action.option_strings if o.startswith("--") and not o.startswith("--no-"))
                on = sub.parse_args(_required_argv(sub) + [long])
                off = sub.parse_args(_required_argv(sub) + ["--no-" + long[2:]])
                assert getattr(on, action.dest) is True and getattr(off, action.dest) is False, (name, long)
                seen += 1
    assert seen > 40


def test_old_option_names_still_work_hidden_and_say_the_new_one(capsys):
    args = cli_parser.parse_args(["reconstruct", "--num-images", "7", "--batch-size", "9"])
    assert args.limit == 7 and args.encode_batch == 9
    assert cli_parser.parse_args(["cache-latents", "--batch-size", "5"]).encode_batch == 5
    assert cli_parser.parse_args(["export", "a", "b", "--raw"]).raw_weights is True
    assert cli_parser.parse_args(["train", "--config", "c", "--no-resume"]).resume is False
    err = capsys.readouterr().err
    assert "--num-images is now --limit" in err and "--raw is now --raw-weights" in err
    with pytest.raises(SystemExit):
        cli_parser.parse_args(["reconstruct", "--help"])
    assert "--num-images" not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- progress on stderr
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Tiny inputs made once: a Fashion-MNIST token cache (64 test images, with latents), a run config on it and
    a samples .npz."""
    root = tmp_path_factory.mktemp("ux")
    tokens = root / "tokens.safetensors"
    cli.main(["cache-latents", "--data", "fmnist", "--split", "test", "--limit", "64", "--levels", "16",
              "--out", str(tokens), "--quiet"])
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump({
        "out_dir": str(root / "run"), "seed": 0, "family": "tokenbridge", "data": {"tokens": str(tokens)},
        "model": {"preset": "tiny", "quantizer": {"levels": 16}}, "train": {"steps": 3, "global_batch": 16, "warmup_steps": 1,
                                               "ckpt_every": 0, "log_every": 1, "device": "cpu"}}))
    cli.main(["sample", "--labels", "0", "1", "--per-class", "8", "--num-iter", "2", "--npz", "--out",
              str(root / "samples"), "--quiet"])
    return root


@pytest.fixture()
def few_real_images(monkeypatch):
    """evaluate and sweep score against the first 300 test images instead of 10,000 (k-NN radii dominate), and
    reconstruct fits its calibrated quantizers on 300 training images instead of 2,000 (their encoding dominates)."""
    import tokenbridge.evaluate
    import tokenbridge.sweep
    from tokenbridge.data import as_tensors
    few = lambda split, limit=None, **kw: as_tensors(split, limit=min(limit or 300, 300), **kw)  # noqa: E731
    monkeypatch.setattr(tokenbridge.evaluate, "as_tensors", few)
    monkeypatch.setattr(tokenbridge.sweep, "as_tensors", few)
    monkeypatch.setattr(cli, "as_tensors", few)


def _convert(root: Path, out: Path) -> list[str]:
    """`convert` of a released-layout MAR checkpoint (tests/official_format.py builds it)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import official_format as off
    path = root / "mar.pth"
    if not path.exists():
        torch.save(off.mar_checkpoint(), path)
    return ["convert", str(path), str(out), "--num-heads", str(off.HEADS)]


COMMANDS = {
    "sample": lambda w, o: ["sample", "--labels", "3", "--per-class", "1", "--num-iter", "2", "--out", str(o)],
    "edit": lambda w, o: ["edit", "--images", "fmnist", "--keep", "left", "--limit", "1", "--num-iter", "2",
                          "--out", str(o)],
    "cache-latents": lambda w, o: ["cache-latents", "--data", "fmnist", "--split", "test", "--limit", "8",
                                   "--out", str(o / "t.safetensors")],
    "cache-latents --shard-size": lambda w, o: ["cache-latents", "--data", "fmnist", "--split", "test", "--limit",
                                                "8", "--shard-size", "4", "--out", str(o / "shards")],
    "train": lambda w, o: ["train", "--config", str(w / "run.yaml"), f"out_dir={o}"],
    "train-vq": lambda w, o: ["train-vq", "--tokens", str(w / "tokens.safetensors"), "--out", str(o), "--steps",
                              "2", "--batch-size", "8", "--codebook-size", "4", "--dim", "4"],
    "train-vae": lambda w, o: ["train-vae", "--out", str(o / "vae.safetensors"), "--steps", "2", "--batch-size",
                               "4"],  # on the 24 + 8 stand-in images of fake_fashion_mnist
    "evaluate": lambda w, o: ["evaluate", str(w / "samples" / "samples.npz")],
    "sweep": lambda w, o: ["sweep", "--per-class", "1", "--num-iter", "2", "--out", str(o)],
    "convert": _convert,
    "reconstruct": lambda w, o: ["reconstruct", "--limit", "8", "--levels", "8", "--ranges", "3", "--out", str(o)],
}


@pytest.mark.parametrize("quiet", [False, True], ids=["bars", "quiet"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_long_command_shows_progress_on_stderr_unless_quiet(command, quiet, workspace, tmp_path, capsys,
                                                            monkeypatch, fake_fashion_mnist, few_real_images):
    if command == "train-vae":  # the real splits would make this a minutes-long test (5,000 + 10,000 encodes)
        (tmp_path / "fmnist").mkdir()
        monkeypatch.setenv("TOKENBRIDGE_FASHION_MNIST", str(fake_fashion_mnist(tmp_path / "fmnist")))
    cli.main(COMMANDS[command](workspace, tmp_path / "out") + (["--quiet"] if quiet else []))
    captured = capsys.readouterr()
    assert any(word in captured.out for word in ("wrote", "fd_cls", "checkpoint.pt"))  # it ran to the end
    assert bool(BAR.search(captured.err)) is not quiet, captured.err[-500:]


@pytest.mark.parametrize("quiet", [False, True], ids=["bars", "quiet"])
def test_export_and_repro_show_progress_unless_quiet(quiet, workspace, tmp_path, capsys):
    flag = ["--quiet"] if quiet else []
    cli.main(["train", "--config", str(workspace / "run.yaml"), f"out_dir={tmp_path / 'run'}", "--quiet"])
    capsys.readouterr()
    cli.main(["export", str(tmp_path / "run" / "checkpoint.pt"), str(tmp_path / "g.safetensors"), *flag])
    assert bool(BAR.search(capsys.readouterr().err)) is not quiet
    cli.main(["repro", "table1", "--scale", "tiny", "--out", str(tmp_path / "results"), *flag])
    captured = capsys.readouterr()
    assert (tmp_path / "results" / "table1.md").is_file() and bool(BAR.search(captured.err)) is not quiet


def test_evaluate_warns_on_few_samples_and_reports_its_noise(workspace, capsys, few_real_images):
    cli.main(["evaluate", str(workspace / "samples" / "samples.npz"), "--quiet"])
    captured = capsys.readouterr()
    assert "warning: 16 samples; below 300" in captured.err
    result = __import__("json").loads(captured.out)
    assert set(result["noise"]) == {k for k in result if k not in ("num_samples", "noise", "noise_method")}
    assert all(v >= 0 for v in result["noise"].values()) and result["num_samples"] == 16


def test_repro_writes_into_a_run_folder_by_default():
    args = cli_parser.parse_args(["repro", "table1"])
    assert args.out is None  # the library's default applies
    from tokenbridge.repro import run_repro
    assert not str(inspect.signature(run_repro).parameters["out_dir"].default).startswith("docs")
    assert "--out docs/results --overwrite" in (REPO / "Makefile").read_text()


# ---------------------------------------------------------------------------------------------- the API
def test_top_level_api_is_lazy_and_complete():
    out = _fresh_python("import sys, tokenbridge\nprint(sorted(m for m in ('torch', 'scipy') if m in sys.modules))\n"
                        "import tokenbridge.edit  # imports the module tokenbridge.generate\n"
                        "print(callable(tokenbridge.generate), tokenbridge.generate.__module__)\n")
    assert out.splitlines() == ["[]", "True tokenbridge.generate"]
    from tokenbridge.checkpoint import load_generator
    from tokenbridge.generate import generate
    from tokenbridge.generators import D2CGenerator, TokenBridgeGenerator
    from tokenbridge.quantizer import DimensionwiseQuantizer
    from tokenbridge.vae import load_vae
    assert tokenbridge.generate is generate and tokenbridge.load_generator is load_generator
    assert tokenbridge.load_vae is load_vae and tokenbridge.DimensionwiseQuantizer is DimensionwiseQuantizer
    assert tokenbridge.TokenBridgeGenerator is TokenBridgeGenerator and tokenbridge.D2CGenerator is D2CGenerator
    assert set(tokenbridge.__all__) <= set(dir(tokenbridge))
    with pytest.raises(AttributeError):
        tokenbridge.no_such_name  # noqa: B018


def test_layout_mismatches_raise_naming_both_shapes():
    with pytest.raises(ValueError, match=re.escape("[16, 4, 8, 8]") + ".*" + re.escape("[16, 8, 8, 4]")):
        tokenbridge.frequency_channel_order(torch.randn(16, 8, 8, 4))
    with pytest.raises(ValueError, match=re.escape("[16, 4, 8, 8]") + ".*" + re.escape("[16, 8, 8, 8]")):
        tokenbridge.frequency_channel_order(torch.randn(16, 8, 8, 8), channels=4)
    order, inverse = tokenbridge.frequency_channel_order(torch.randn(16, 4, 8, 8), channels=4)
    assert sorted(order.tolist()) == [0, 1, 2, 3] and torch.equal(order[inverse], torch.arange(4))
    vae = tokenbridge.load_vae("fmnist")
    latents = vae.encode(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match=re.escape("[2, 4, 8, 8]") + ".*" + re.escape("[2, 8, 8, 4]")):
        vae.decode(tokenbridge.channel_last(latents))
    fitted = tokenbridge.DimensionwiseQuantizer(16, calibration="standardize").fit(torch.randn(100, 4))
    with pytest.raises(ValueError, match=re.escape("[2, 8, 8, 4]") + ".*" + re.escape("[2, 4, 8, 8]")):
        fitted.quantize(latents)  # a channel-first vae.encode output
    indices = fitted.quantize(tokenbridge.channel_last(latents))
    assert indices.shape == (2, 8, 8, 4)


def test_decode_runs_without_autograd_and_unclamped():
    vae = tokenbridge.load_vae("fmnist")
    latents = (torch.randn(2, 4, 8, 8) * 6).requires_grad_()
    images = vae.decode(latents)
    assert not images.requires_grad
    assert torch.equal(vae.reconstruct(torch.zeros(2, 1, 32, 32)).clamp(-1, 1),
                       vae.reconstruct(torch.zeros(2, 1, 32, 32)))


# ---------------------------------------------------------------------------------------------- labelled pictures
def test_labelled_grid_keeps_the_images_and_adds_names_and_a_colour_bar():
    images = torch.rand(6, 1, 8, 8) * 2 - 1
    plain = np.asarray(image_grid(images, nrow=3, scale=2))
    labelled = labelled_grid(images, ["T-shirt/top", "Bag"], nrow=3, scale=2, colour_bar=("log p -3.00", "log p 0"))
    arr = np.asarray(labelled)
    left = next(x for x in range(arr.shape[1]) if np.array_equal(arr[:, x:x + plain.shape[1]], plain))
    assert left > 0 and arr.shape[1] > left + plain.shape[1]  # names on the left, the bar on the right
    assert (arr[:, :left] < 128).any()  # the row names are drawn
    bar = arr[16:-16, left + plain.shape[1] + 6]
    assert bar[0] == 255 and bar[-1] == 0 and (np.diff(bar.astype(int)) <= 0).all()  # white (high) to black (low)
    with pytest.raises(ValueError, match="2 rows of images but 3 row labels"):
        labelled_grid(images, ["a", "b", "c"], nrow=3)


def test_sample_rows_carry_class_names(tmp_path):
    from PIL import Image
    from tokenbridge.generate import save_samples
    result = tokenbridge.generate("fmnist", [0, 0, 9, 9], num_iter=2)
    result["confidence"] = torch.rand(4, 8, 8).log()
    save_samples(result, tmp_path, nrow=2, show_confidence=True, class_names=[f"c{i}" for i in range(10)])
    samples = np.asarray(Image.open(tmp_path / "samples.png"))
    plain = np.asarray(image_grid(result["images"], nrow=2, scale=3))
    assert samples.shape[1] > plain.shape[1] and np.array_equal(samples[:, -plain.shape[1]:], plain)
    confidence = Image.open(tmp_path / "confidence.png")
    assert confidence.width > samples.shape[1]  # the colour bar's margin
