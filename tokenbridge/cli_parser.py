"""The `tokenbridge` command line's parser and entry point: subcommands, their options and help (cli.py runs them).

This module imports neither torch nor any tokenbridge module that does: `tokenbridge --help`, `--version` and a
mistyped option answer before the library is loaded (cli_options.py holds what the help shows of the library).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from .cli_options import (LIBRARY_DEFAULTS, QUANTIZER_KINDS, REPRO_NAMES, REPRO_OUT, REPRO_SCALES, SAMPLING_GROUPS,
                          SAMPLING_OPTIONS, SHIPPED_SAMPLING, VERSION, option_help)

DESCRIPTION = "TokenBridge: discrete tokens from a pretrained continuous VAE, and generators that sample them."
EPILOG = """examples:
  tokenbridge sample --labels 0 7 --per-class 4 --out out/samples         # the shipped TokenBridge generator
  tokenbridge sample --model fmnist-mar --num-iter 8 --out out/mar        # continuous MAR, 8 steps
  tokenbridge edit --images fmnist --keep left --limit 4 --out out/edit   # regenerate the right halves
  tokenbridge reconstruct --limit 500                                     # paper Table 1 on Fashion-MNIST
  tokenbridge cache-latents --config configs/fmnist.yaml                  # encode + quantize once
  tokenbridge train --config configs/fmnist.yaml train.steps=200          # then train a generator on it
  tokenbridge sample --model fmnist --npz --out out/s && tokenbridge evaluate out/s/samples.npz
  tokenbridge repro table2a --scale tiny                                  # a paper table into runs/repro-results

`tokenbridge COMMAND --help` lists a command's options and their defaults; -q/--quiet silences progress bars."""
DEVICE_HELP = "torch device: cpu, cuda, cuda:1, mps (default: cuda when available, else cpu)"
SHIPPED_HELP = ", ".join(SHIPPED_SAMPLING)


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count or a size; 0 or -5 would mean nothing sensible)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _key_value(text: str) -> str:
    if "=" not in text or not text.split("=", 1)[0].strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return text


class _Renamed(argparse.Action):
    """An option's old name, kept for one release: hidden from --help, says the new name on stderr when used."""

    def __init__(self, option_strings: list[str], dest: str, new_name: str, **kwargs: Any):
        self.new_name = new_name
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"tokenbridge: {option_string} is now {self.new_name} (the old name goes in the next release)",
              file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def _renamed(p: argparse.ArgumentParser, old: str, new: str, **kwargs: Any) -> None:
    p.add_argument(old, dest=new.lstrip("-").replace("-", "_"), action=_Renamed, new_name=new, **kwargs)


def _flag(p: Any, name: str, help_text: str, default: bool | None = False, shown: str | None = None) -> None:
    """--name / --no-name (a plain `type=bool` would read "False" as True). default None: left to the library,
    whose value ``shown`` names (default: off)."""
    shown = shown or {False: "off", True: "on", None: "off"}[default]
    p.add_argument(name, action=argparse.BooleanOptionalAction, default=default, help=f"{help_text} ({shown})")


def _lib(command: str, key: str) -> str:
    return f"(default: {LIBRARY_DEFAULTS[command][key]})"


# ---------------------------------------------------------------------------------------------- shared options
def _add_common(p: argparse.ArgumentParser, device: bool = True) -> None:
    if device:
        p.add_argument("--device", help=DEVICE_HELP)
    p.add_argument("-q", "--quiet", action=argparse.BooleanOptionalAction, default=False,
                   help="no progress bars on stderr (off)")


def _add_image_options(p: argparse.ArgumentParser) -> None:
    _flag(p, "--strict-images", "fail on an unreadable image in a folder, instead of skipping, counting and "
                                "warning", default=None)
    _flag(p, "--allow-large-images", "open images beyond PIL's decompression-bomb pixel limit", default=None)


def _add_overwrite(p: argparse.ArgumentParser, what: str = "replace files tokenbridge did not write in --out") -> None:
    _flag(p, "--overwrite", what)


def sampling_fields() -> tuple[str, ...]:
    """The sampling options of every registered family (their names; cli_options.py holds their defaults)."""
    return tuple(SAMPLING_OPTIONS)


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    """One option per sampling option (``--num-iter``), in one argument group per set of families that share it;
    unset ones are not passed (the generator's recorded value, then its family's default, applies)."""
    groups = {families: p.add_argument_group(title, "an option left out takes the generator's recorded value "
                                                    "(`recorded:`), else its family's default" if i == 0 else None)
              for i, (title, families) in enumerate(SAMPLING_GROUPS)}
    for name, option in SAMPLING_OPTIONS.items():
        group = groups[tuple(option.defaults)]
        flag = f"--{name.replace('_', '-')}"
        if option.kind is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                               help=option_help(name))
        elif option.kind == "pair":
            group.add_argument(flag, dest=name, type=float, nargs=2, metavar=("LO", "HI"), help=option_help(name))
        else:
            group.add_argument(flag, dest=name, type=option.kind, choices=option.choices, help=option_help(name))


def _add_generate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vae", help="the VAE that decodes the latents (default: the one the generator was trained on)")
    _flag(p, "--allow-other-vae", "decode with a VAE whose weights differ from the recorded one")
    _add_sampling_options(p)
    p.add_argument("--seed", type=int, help=f"sampling seed {_lib('generate', 'seed')}")
    p.add_argument("--batch-size", type=_positive_int, help=f"images per sampling batch "
                                                            f"{_lib('generate', 'batch_size')}")
    _add_common(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenbridge", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"tokenbridge {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("reconstruct", help="paper Table 1: continuous VAE vs quantized at several B and ranges")
    p.add_argument("--vae", default="fmnist", help="fmnist (embedded), kl16:PATH, diffusers:FOLDER or a .safetensors "
                                                   "(default: %(default)s)")
    p.add_argument("--images", help="your images: a folder, 'wds:shards-{000..009}.tar' or hf:PATH "
                   "(default: the Fashion-MNIST test split)")
    p.add_argument("--resolution", type=_positive_int, default=256, help="crop/resize size for --images "
                                                                         "(default: %(default)s)")
    p.add_argument("--limit", type=_positive_int, default=1000, help="the first N images (default: %(default)s)")
    _renamed(p, "--num-images", "--limit", type=_positive_int)
    p.add_argument("--levels", type=_positive_int, nargs="+", help="quantization levels B, one table row each "
                   "(default: the paper's rows)")
    p.add_argument("--ranges", type=float, nargs="+", help="value ranges +-a, one table row each (default: the "
                                                           "paper's rows)")
    p.add_argument("--encode-batch", type=_positive_int, help=f"images per VAE batch "
                                                              f"{_lib('reconstruct', 'batch_size')}")
    _renamed(p, "--batch-size", "--encode-batch", type=_positive_int)
    p.add_argument("--out", default="out/reconstruct", help="folder for table1.md and the plots (default: %(default)s)")
    _add_overwrite(p)
    _add_image_options(p)
    _add_common(p)

    p = sub.add_parser("train-vae", help="train the embedded Fashion-MNIST KL-VAE")
    p.add_argument("--out", required=True, help="the .safetensors to write (the shipped weights only with --overwrite)")
    _add_overwrite(p, "replace a file of another kind or the shipped weights")
    for flag, kind, text in (("--steps", _positive_int, "optimizer steps"), ("--batch-size", _positive_int,
                             "images per step"), ("--lr", float, "learning rate"), ("--kl-weight", float,
                             "weight of the KL term"), ("--seed", int, "training seed")):
        p.add_argument(flag, type=kind, help=f"{text} {_lib('train-vae', flag[2:].replace('-', '_'))}")
    _add_common(p)

    p = sub.add_parser("train-vq", help="train a VQ tokenizer of a token cache's latents (D2C's coarse codes)")
    p.add_argument("--tokens", required=True, help="a cache-latents file (or shard folder) that stores latents")
    p.add_argument("--test-tokens", help="held-out token file (default: the last 5%% of --tokens)")
    p.add_argument("--out", required=True, help="the tokenizer folder to write (config.json + model.safetensors)")
    _add_overwrite(p, "replace a tokenizer already in --out")
    for flag, kind, text in (("--codebook-size", _positive_int, "codes (the stage-1 vocabulary)"),
                             ("--dim", _positive_int, "code vector size"), ("--downsample", int, "1 (a code per "
                             "latent cell) or 2 (per 2x2 cells)"), ("--steps", _positive_int, "optimizer steps"),
                             ("--batch-size", _positive_int, "latent grids per step"), ("--lr", float,
                             "learning rate"), ("--seed", int, "training seed")):
        p.add_argument(flag, type=kind, help=f"{text} {_lib('train-vq', flag[2:].replace('-', '_'))}")
    _add_common(p)

    p = sub.add_parser("train-classifier", help="train the embedded evaluation classifier")
    p.add_argument("--out", required=True, help="the .safetensors to write (the shipped weights only with --overwrite)")
    _add_overwrite(p, "replace a file of another kind or the shipped weights")
    for flag, kind, text in (("--epochs", _positive_int, "passes over the training split"), ("--batch-size",
                             _positive_int, "images per step"), ("--lr", float, "learning rate"), ("--seed", int,
                             "training seed"), ("--threads", _positive_int, "CPU threads")):
        p.add_argument(flag, type=kind, help=f"{text} {_lib('train-classifier', flag[2:].replace('-', '_'))}")
    _add_common(p)

    p = sub.add_parser("cache-latents", help="encode + quantize a dataset once (where `train --config` reads it)")
    p.add_argument("--config", help="a run config: its data section and model.quantizer; writes data.tokens")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of --config")
    p.add_argument("--out", help="token file to write (default with --config: data.tokens)")
    _add_overwrite(p, "replace an existing token file")
    p.add_argument("--shard-size", type=_positive_int, help="write a folder of shards of this many images (resumable; "
                   "under torchrun every process encodes its share; default: one file)")
    _flag(p, "--flip", "shards also keep horizontally flipped tokens", default=None)
    p.add_argument("--vae", help="without --config: fmnist | kl16:PATH | diffusers:FOLDER | a .safetensors "
                                 "(default: fmnist)")
    p.add_argument("--data", help="without --config: fmnist, folder:PATH, 'wds:shards-{000..009}.tar' or hf:PATH "
                                  "(default: fmnist)")
    p.add_argument("--split", help=f"split of a dataset source {_lib('data', 'split')}")
    p.add_argument("--levels", type=_positive_int, help=f"quantization levels B {_lib('quantizer', 'levels')}")
    p.add_argument("--range", type=float, help="value range +-a (default: 5.0)")
    p.add_argument("--std-range", type=float, help="gaussian bins: the range in latent standard deviations "
                                                   f"{_lib('quantizer', 'std_range')}")
    p.add_argument("--kind", choices=QUANTIZER_KINDS, help="equal-probability gaussian bins (paper) or equal-width "
                                                           f"bins {_lib('quantizer', 'kind')}")
    p.add_argument("--resolution", type=_positive_int, help=f"crop/resize size of folder images "
                                                            f"{_lib('data', 'resolution')}")
    p.add_argument("--channels", type=int, choices=(1, 3), help=f"image channels the VAE takes, for folder images "
                                                                f"{_lib('data', 'channels')}")
    p.add_argument("--limit", type=_positive_int, help="the first N images (default: all)")
    p.add_argument("--encode-batch", type=_positive_int, help=f"images per VAE batch "
                                                              f"{_lib('data', 'encode_batch')}")
    _renamed(p, "--batch-size", "--encode-batch", type=_positive_int)
    _add_image_options(p)
    _add_common(p)

    p = sub.add_parser("train", help="train a generator (works under torchrun for DDP)")
    p.add_argument("--config", required=True, help="the run config (YAML), e.g. configs/fmnist.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    _flag(p, "--resume", "continue from the run folder's checkpoint; --no-resume starts from step 0 (with "
                         "--overwrite if a checkpoint exists)", default=True)
    _add_overwrite(p, "with --no-resume: replace the folder's checkpoint")
    _add_common(p, device=False)

    p = sub.add_parser("export", help="checkpoint.pt -> self-describing .safetensors (EMA weights, config, VAE)")
    p.add_argument("checkpoint", help="a training checkpoint.pt or a pretrained folder")
    p.add_argument("out", help="the .safetensors file to write (every --model option takes it)")
    _add_overwrite(p, "replace a file of another kind (token file, checkpoint)")
    _flag(p, "--raw-weights", "export the raw weights instead of the EMA")
    _renamed(p, "--raw", "--raw-weights", nargs=0, const=True)
    _flag(p, "--half", "store float32 tensors as float16")
    p.add_argument("--sample", action="append", metavar="KEY=VALUE", type=_key_value,
                   help="record this sampling default over the run's (repeatable), e.g. --sample clip_denoised=5")
    _add_common(p, device=False)

    p = sub.add_parser("convert", help="official TokenBridge / MAR checkpoint-last.pth -> a pretrained folder "
                                       "(config.json + model.safetensors) computing the released functions")
    p.add_argument("checkpoint", help="checkpoint-last.pth (or the folder holding it)")
    p.add_argument("out", help="the pretrained folder to write (every --model option takes it)")
    _add_overwrite(p, "replace files tokenbridge did not write in that folder")
    p.add_argument("--family", choices=["tokenbridge", "mar"], help="default: told by the checkpoint's keys")
    p.add_argument("--weights", choices=["model_ema", "model"], default="model_ema",
                   help="which state dict of the checkpoint (default: %(default)s)")
    p.add_argument("--num-heads", type=_positive_int, help="backbone attention heads (default: the released "
                                                            "models' for that width: 768 -> 12, 1024/1280 -> 16)")
    p.add_argument("--head-num-heads", type=_positive_int, help="TokenBridge channel-head attention heads (default: "
                                                                "the released models')")
    _flag(p, "--first-token-timestep", "TokenBridge: keep the released sampler's first-input quirk, see "
                                       "tokenbridge/official", default=None, shown="on")
    p.add_argument("--vae", help="the VAE spec to record, e.g. kl16:/path/kl16.ckpt (else give --vae to sample)")
    _flag(p, "--trust-pickle", "read a checkpoint holding arbitrary Python objects")
    _add_common(p, device=False)

    p = sub.add_parser("sample", help="class-conditional samples from a generator of any family")
    p.add_argument("--model", help=f"{SHIPPED_HELP} (embedded), a checkpoint.pt, an exported .safetensors or a "
                                   "pretrained folder (default: fmnist)")
    _flag(p, "--raw-weights", "a checkpoint's raw weights instead of its EMA")
    p.add_argument("--labels", type=int, nargs="+", default=list(range(10)), help="class indices (default: 0..9)")
    p.add_argument("--per-class", type=_positive_int, default=8, help="samples per label (default: %(default)s)")
    p.add_argument("--out", default="out/samples", help="folder for samples.png (default: %(default)s)")
    _add_overwrite(p)
    _flag(p, "--show-confidence", "also write the per-token confidence maps (confidence.png)")
    _flag(p, "--npz", "also write the images as a uint8 samples.npz (for evaluate)")
    _flag(p, "--evaluate", "report the embedded classifier's accuracy on the conditioning classes")
    _add_generate_options(p)

    p = sub.add_parser("edit", help="inpaint, outpaint or regenerate a region of images under a class, with a "
                                    "generator of any family")
    p.add_argument("--model", default="fmnist", help=f"{SHIPPED_HELP}, a checkpoint.pt, an export or a pretrained "
                                                     "folder (default: %(default)s)")
    p.add_argument("--images", required=True, help="an image file, or a source as cache-latents --data takes: fmnist "
                                                   "(with --split), folder:PATH, 'wds:shards-{000..009}.tar', hf:PATH")
    p.add_argument("--keep", required=True, help="the region kept: left, right, top, bottom, center (outpainting), "
                                                 "border (inpainting) or MASK.png (white = keep, at the token grid's "
                                                 "size or the images'; a token is kept only if all its pixels are)")
    p.add_argument("--labels", type=int, nargs="+", help="class to generate: one for all images or one per image "
                                                         "(default: the source's labels)")
    p.add_argument("--per-image", type=_positive_int, default=1, help="results per image (default: %(default)s)")
    p.add_argument("--split", default="test", help="split of a dataset source (default: %(default)s)")
    p.add_argument("--limit", type=_positive_int, default=8, help="the first N images of a dataset source "
                                                                  "(default: %(default)s)")
    p.add_argument("--out", default="out/edit", help="folder for edits.png and edits.npz (default: %(default)s)")
    _flag(p, "--npz", "also write edits.npz (images, labels, keep, source_index)")
    _add_generate_options(p)

    p = sub.add_parser("evaluate", help="metrics of generated samples (.npz from `sample --npz`), with their "
                                        "sampling noise")
    p.add_argument("samples", help="an .npz with images uint8 [N, H, W, C] and optional labels [N]")
    p.add_argument("--inception-weights", help="local FID Inception weights file (paper-scale FID/IS)")
    p.add_argument("--reference", help="reference statistics .npz (mu, sigma), e.g. ADM's, with --inception-weights")
    _add_common(p)

    p = sub.add_parser("sweep", help="sample a generator over a cfg x temperature (x num_iter) grid and score each "
                                     "cell like `evaluate` (FD, precision, recall, class accuracy)")
    p.add_argument("--model", default="fmnist", help="fmnist (embedded), a checkpoint.pt, an export or a folder "
                                                     "(default: %(default)s)")
    p.add_argument("--cfg", type=float, nargs="+", help="guidance scales (default: the generator's own, not swept)")
    p.add_argument("--temperature", type=float, nargs="+", help="temperatures (default: the generator's own)")
    p.add_argument("--num-iter", type=int, nargs="+", help="MAR steps (default: the generator's own)")
    p.add_argument("--per-class", type=_positive_int, default=100, help="samples of each class in every cell "
                                                                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="one seed for every cell, so that cells differ only in "
                                                       "settings (default: %(default)s)")
    p.add_argument("--out", default="out/sweep", help="folder for sweep.md, sweep.json, sweep.png "
                                                      "(default: %(default)s)")
    _add_overwrite(p, "replace the sweep results already in --out")
    _add_common(p)

    p = sub.add_parser("demo-ui", help="browser demo: pick a class and the knobs, watch the image form (needs the ui "
                                       "extra: pip install 'tokenbridge[ui]')")
    p.add_argument("--model", action="append", help=f"a generator (repeatable): {SHIPPED_HELP}, "
                   "checkpoint, export, folder (default: every shipped one)")
    p.add_argument("--vae", help="default: each generator's recorded VAE")
    _flag(p, "--allow-other-vae", "decode with a VAE whose weights differ from the recorded one")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, loopback only)")
    p.add_argument("--port", type=_positive_int, help="default: Gradio's (7860, or the next free one)")
    p.add_argument("--max-images", type=_positive_int, help=f"images per request {_lib('demo-ui', 'max_images')}")
    _add_common(p)

    p = sub.add_parser("repro", help=f"reproduce a paper table/figure at small scale (into {REPRO_OUT}/)")
    p.add_argument("name", choices=(*REPRO_NAMES, "all"), metavar="NAME",
                   help=f"one of {', '.join(REPRO_NAMES)}, or all")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the budget, e.g. train.steps=400")
    p.add_argument("--scale", choices=REPRO_SCALES, help="tiny (smoke test), small (2 CPU cores) or paper (GPUs) "
                                                         f"{_lib('repro', 'scale')}")
    p.add_argument("--out", help=f"results folder (default: {REPRO_OUT}; the tracked results: --out docs/results "
                                 "--overwrite)")
    _add_overwrite(p, "replace files tokenbridge did not write there")
    _add_common(p)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line (argparse exits with a message on a bad option, before anything is loaded)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `repro table2a --scale small train.steps=400`: argparse stops filling a nargs="*" positional at the first
    # option, so key=value overrides written after options come back here
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> None:
    """The `tokenbridge` console script: parse, then load the library (tokenbridge.cli) and run the command."""
    args = parse_args(argv)
    # imported only now, so that --help and a bad option never wait for torch (tests/test_cli_ux.py checks it)
    importlib.import_module("tokenbridge.cli").run(args)
