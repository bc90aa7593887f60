"""The `tokenbridge` command line's parser: subcommands, their options and help (cli.py runs them).

Sampling options come from the registered families' sample() signatures, so a new family's options appear here
without an edit."""

from __future__ import annotations

import argparse
import typing
from typing import Any

from .generators import FAMILIES, sample_options

DESCRIPTION = '`tokenbridge` command line: one subcommand per job; each one is a thin wrapper over the library.'


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


# ---------------------------------------------------------------------------------------------- parser
def _add_image_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strict-images", action="store_true", default=None,
                   help="fail on an unreadable image in a folder (default: skip it, count it and warn)")
    p.add_argument("--allow-large-images", action="store_true", default=None,
                   help="open images beyond PIL's decompression-bomb pixel limit")


def sampling_fields() -> dict[str, Any]:
    """The sampling options of every registered family (name -> pydantic field), from their sample() signatures."""
    fields: dict[str, Any] = {}
    for family in FAMILIES.values():
        for name, field in sample_options(family).model_fields.items():
            fields.setdefault(name, field)
    return fields


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    """One option per sampling option (``--num-iter``), typed from its annotation; unset ones are not passed."""
    for name, field in sampling_fields().items():
        kind, choices = field.annotation, None
        if typing.get_origin(kind) is typing.Literal:
            kind, choices = str, typing.get_args(kind)
        kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)  # X | None -> X
        if typing.get_origin(kind) is typing.Annotated:  # a declared range (tokenbridge.samplers) -> its type
            kind = typing.get_args(kind)[0]
        help_text = f"sampling option (default: the generator's recorded value, else {field.default!r})"
        if kind is bool:  # --released-cfg / --no-released-cfg (type=bool would read "False" as True)
            p.add_argument(f"--{name.replace('_', '-')}", dest=name, action=argparse.BooleanOptionalAction,
                           default=None, help=help_text)
            continue
        nargs = None
        if typing.get_origin(kind) is tuple:  # cfg_interval: --cfg-interval LO HI
            nargs, kind = len(typing.get_args(kind)), typing.get_args(kind)[0]
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, choices=choices, nargs=nargs,
                       metavar=("LO", "HI") if nargs == 2 else None, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenbridge", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    lib = "(default: the library's)"

    p = sub.add_parser("reconstruct", help="paper Table 1: continuous VAE vs quantized at several B and ranges")
    p.add_argument("--vae", default="fmnist", help="fmnist (embedded), kl16:PATH, diffusers:FOLDER or a .safetensors")
    p.add_argument("--images", help="your images: a folder, 'wds:shards-{000..009}.tar' or hf:PATH "
                   "(default: Fashion-MNIST test split)")
    p.add_argument("--resolution", type=_positive_int, default=256, help="crop/resize size for --images")
    p.add_argument("--num-images", type=_positive_int, default=1000)
    p.add_argument("--levels", type=_positive_int, nargs="+", help=f"quantization levels B of the rows {lib}")
    p.add_argument("--ranges", type=float, nargs="+", help=f"value ranges +-a of the rows {lib}")
    p.add_argument("--batch-size", type=_positive_int, help=lib)
    p.add_argument("--out", default="out/reconstruct")
    p.add_argument("--overwrite", action="store_true", help="replace files tokenbridge did not write in --out")
    _add_image_options(p)
    p.add_argument("--device")

    p = sub.add_parser("train-vae", help="train the embedded Fashion-MNIST KL-VAE")
    p.add_argument("--out", required=True, help="the .safetensors to write (the shipped weights only with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a file of another kind or the shipped weights")
    for flag, kind in (("--steps", _positive_int), ("--batch-size", _positive_int), ("--lr", float),
                       ("--kl-weight", float), ("--seed", int)):
        p.add_argument(flag, type=kind, help=lib)
    p.add_argument("--device")

    p = sub.add_parser("train-vq", help="train a VQ tokenizer of a token cache's latents (D2C's coarse codes)")
    p.add_argument("--tokens", required=True, help="a cache-latents file (or shard folder) that stores latents")
    p.add_argument("--test-tokens", help="held-out token file (default: the last 5 %% of --tokens)")
    p.add_argument("--out", required=True, help="the tokenizer folder to write (config.json + model.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace a tokenizer already in --out")
    for flag, kind in (("--codebook-size", _positive_int), ("--dim", _positive_int), ("--downsample", int),
                       ("--steps", _positive_int), ("--batch-size", _positive_int), ("--lr", float), ("--seed", int)):
        p.add_argument(flag, type=kind, help=lib)
    p.add_argument("--device")

    p = sub.add_parser("train-classifier", help="train the embedded evaluation classifier")
    p.add_argument("--out", required=True, help="the .safetensors to write (the shipped weights only with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a file of another kind or the shipped weights")
    for flag, kind in (("--epochs", _positive_int), ("--batch-size", _positive_int), ("--lr", float), ("--seed", int),
                       ("--threads", _positive_int)):
        p.add_argument(flag, type=kind, help=lib)
    p.add_argument("--device")

    p = sub.add_parser("cache-latents", help="encode + quantize a dataset once (where `train --config` reads it)")
    p.add_argument("--config", help="a run config: its data section and model.quantizer; writes data.tokens")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of --config")
    p.add_argument("--out", help="token file to write (default with --config: data.tokens)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing token file")
    p.add_argument("--shard-size", type=_positive_int, help="write a folder of shards of this many images (resumable; "
                   "under torchrun every process encodes its share)")
    p.add_argument("--flip", action="store_true", default=None, help="shards also keep horizontally flipped tokens")
    p.add_argument("--vae", help="without --config: fmnist | kl16:PATH | diffusers:FOLDER | a .safetensors")
    p.add_argument("--data", help="without --config: fmnist, folder:PATH, 'wds:shards-{000..009}.tar' or hf:PATH")
    p.add_argument("--split")
    p.add_argument("--levels", type=_positive_int, help="quantization levels B")
    p.add_argument("--range", type=float, help="value range +-a")
    p.add_argument("--std-range", type=float)
    p.add_argument("--kind", help="gaussian or uniform bins")
    p.add_argument("--resolution", type=_positive_int)
    p.add_argument("--channels", type=int, help="image channels the VAE takes (1 or 3) for folder images")
    p.add_argument("--limit", type=_positive_int)
    p.add_argument("--batch-size", type=_positive_int)
    _add_image_options(p)
    p.add_argument("--device")

    p = sub.add_parser("train", help="train a generator (works under torchrun for DDP)")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    p.add_argument("--no-resume", action="store_true", help="start from step 0 (with --overwrite if a checkpoint exists)")
    p.add_argument("--overwrite", action="store_true", help="with --no-resume: replace the folder's checkpoint")

    p = sub.add_parser("export", help="checkpoint.pt -> self-describing .safetensors (EMA weights, config, VAE)")
    p.add_argument("checkpoint", help="a training checkpoint.pt or a pretrained folder")
    p.add_argument("out")
    p.add_argument("--overwrite", action="store_true", help="replace a file of another kind (token file, checkpoint)")
    p.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    p.add_argument("--half", action="store_true", help="store float32 tensors as float16")
    p.add_argument("--sample", action="append", metavar="KEY=VALUE", type=_key_value,
                   help="record this sampling default over the run's (repeatable), e.g. --sample clip_denoised=5")

    p = sub.add_parser("convert", help="official TokenBridge / MAR checkpoint-last.pth -> a pretrained folder "
                                       "(config.json + model.safetensors) computing the released functions")
    p.add_argument("checkpoint", help="checkpoint-last.pth (or the folder holding it)")
    p.add_argument("out", help="the pretrained folder to write (every --model option takes it)")
    p.add_argument("--overwrite", action="store_true", help="replace files tokenbridge did not write in that folder")
    p.add_argument("--family", choices=["tokenbridge", "mar"], help="default: told by the checkpoint's keys")
    p.add_argument("--weights", choices=["model_ema", "model"], default="model_ema")
    p.add_argument("--num-heads", type=_positive_int, help="backbone attention heads (default: the released "
                                                            "models' for that width: 768 -> 12, 1024/1280 -> 16)")
    p.add_argument("--head-num-heads", type=_positive_int, help=f"TokenBridge channel-head attention heads ({lib})")
    p.add_argument("--no-first-token-timestep", action="store_true",
                   help="TokenBridge: leave out the released sampler's first-input quirk (see tokenbridge/official)")
    p.add_argument("--vae", help="the VAE spec to record, e.g. kl16:/path/kl16.ckpt (else give --vae to sample)")
    p.add_argument("--trust-pickle", action="store_true", help="read a checkpoint holding arbitrary Python objects")

    p = sub.add_parser("sample", help="class-conditional samples from a generator of any family")
    p.add_argument("--model", help="fmnist (embedded, the default), a checkpoint.pt, an exported .safetensors or a "
                                   "pretrained folder")
    p.add_argument("--vae", help="default: the VAE the generator was trained on")
    p.add_argument("--allow-other-vae", action="store_true", help="decode with a VAE other than the recorded one")
    p.add_argument("--raw-weights", action="store_true", help="a checkpoint's raw weights instead of its EMA")
    p.add_argument("--labels", type=int, nargs="+", default=list(range(10)))
    p.add_argument("--per-class", type=_positive_int, default=8)
    _add_sampling_options(p)
    p.add_argument("--seed", type=int, help=lib)
    p.add_argument("--batch-size", type=_positive_int, help=lib)
    p.add_argument("--out", default="out/samples")
    p.add_argument("--overwrite", action="store_true", help="replace files tokenbridge did not write in --out")
    p.add_argument("--show-confidence", action="store_true", help="also write the per-token confidence maps")
    p.add_argument("--npz", action="store_true", help="also write the images as a uint8 .npz")
    p.add_argument("--evaluate", action="store_true", help="report the embedded classifier's accuracy")
    p.add_argument("--device")

    p = sub.add_parser("edit", help="inpaint, outpaint or regenerate a region of images under a class, with a "
                                    "generator of any family")
    p.add_argument("--model", default="fmnist", help="fmnist, fmnist-mar, fmnist-d2c, a checkpoint.pt, an export or "
                                                     "a pretrained folder")
    p.add_argument("--images", required=True, help="an image file, or a source as cache-latents --data takes: fmnist "
                                                   "(with --split), folder:PATH, 'wds:shards-{000..009}.tar', hf:PATH")
    p.add_argument("--keep", required=True, help="the region kept: left, right, top, bottom, center (outpainting), "
                                                 "border (inpainting) or MASK.png (white = keep, at the token grid's "
                                                 "size or the images'; a token is kept only if all its pixels are)")
    p.add_argument("--labels", type=int, nargs="+", help="class to generate: one for all images or one per image "
                                                         "(default: the source's labels)")
    p.add_argument("--per-image", type=_positive_int, default=1, help="results per image")
    p.add_argument("--split", default="test", help="split of a dataset source")
    p.add_argument("--limit", type=_positive_int, default=8, help="edit the first N images of a dataset source")
    p.add_argument("--out", default="out/edit", help="folder for edits.png (and edits.npz)")
    p.add_argument("--npz", action="store_true", help="also write edits.npz (images, labels, keep, source_index)")
    p.add_argument("--vae", help="default: the VAE the generator was trained on")
    p.add_argument("--allow-other-vae", action="store_true", help="a VAE other than the recorded one")
    _add_sampling_options(p)
    p.add_argument("--seed", type=int, help=lib)
    p.add_argument("--batch-size", type=_positive_int, help=lib)
    p.add_argument("--device")

    p = sub.add_parser("evaluate", help="metrics of generated samples (.npz from `sample --npz`)")
    p.add_argument("samples", help="an .npz with images uint8 [N, H, W, C] and optional labels [N]")
    p.add_argument("--inception-weights", help="local FID Inception weights file (paper-scale FID/IS)")
    p.add_argument("--reference", help="reference statistics .npz (mu, sigma), e.g. ADM's, with --inception-weights")
    p.add_argument("--device")

    p = sub.add_parser("sweep", help="sample a generator over a cfg x temperature (x num_iter) grid and score each "
                                     "cell like `evaluate` (FD, precision, recall, class accuracy)")
    p.add_argument("--model", default="fmnist", help="fmnist (embedded), a checkpoint.pt, an export or a folder")
    p.add_argument("--cfg", type=float, nargs="+", help="guidance scales (left out: the generator's own, not swept)")
    p.add_argument("--temperature", type=float, nargs="+", help="temperatures (left out: the generator's own)")
    p.add_argument("--num-iter", type=int, nargs="+", help="MAR steps (left out: the generator's own)")
    p.add_argument("--per-class", type=_positive_int, default=100, help="samples of each class in every cell")
    p.add_argument("--seed", type=int, default=0, help="one seed for every cell (cells differ only in settings)")
    p.add_argument("--out", default="out/sweep", help="folder for sweep.md, sweep.json, sweep.png")
    p.add_argument("--overwrite", action="store_true", help="replace the sweep results already in --out")
    p.add_argument("--device")

    p = sub.add_parser("demo-ui", help="browser demo: pick a class and the knobs, watch the image form (needs the ui "
                                       "extra: pip install 'tokenbridge[ui]')")
    p.add_argument("--model", action="append", help="a generator (repeatable): fmnist, fmnist-mar, fmnist-d2c, "
                   "checkpoint, export, folder (default: every shipped one)")
    p.add_argument("--vae", help="default: each generator's recorded VAE")
    p.add_argument("--allow-other-vae", action="store_true")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=_positive_int, help="default: Gradio's (7860, or the next free one)")
    p.add_argument("--max-images", type=_positive_int, help=f"images per request {lib}")
    p.add_argument("--device")

    p = sub.add_parser("repro", help="reproduce a paper table/figure at small scale into docs/results/")
    p.add_argument("name", help="table1, table2a..table2e, table5, fig8, table3 (TokenBridge vs continuous MAR) or all")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the run config")
    p.add_argument("--scale", help=f"tiny (smoke test), small (2 CPU cores) or paper (GPUs) {lib}")
    p.add_argument("--out", help=f"results folder {lib}")
    p.add_argument("--overwrite", action="store_true", help="replace files tokenbridge did not write there")
    p.add_argument("--device")
    return parser
