"""`tokenbridge` command line: one subcommand per job; each one is a thin wrapper over the library.

Options left out take the library's defaults (the function each command calls holds them); `--help` says which.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

import torch
import yaml

from .budget import check_images_request, check_sample_request, duration, is_out_of_memory, out_of_memory
from .checkpoint import SHIPPED, export_weights, load_generator
from .classifier import class_accuracy, load_classifier, train_classifier
from .config import ConfigError, DataConfig, validate
from .convert import convert as convert_official
from .data import as_tensors
from .distributed import TrainingInterrupted
from .evaluate import evaluate_samples, read_samples
from .files import check_target, command_lock, overwriting
from .generate import generate, save_samples
from .generators import FAMILIES, sample_options
from .inception import InceptionFID
from .metrics import load_reference_stats
from .reconstruct import run_reconstruct
from .repro import run_repro
from .shards import cache_shards
from .sources import image_source
from .sweep import describe_best, run_sweep, sweep_table
from .tokens import cache_latents
from .train import load_run_config, train
from .ui import launch as launch_ui
from .vae import load_vae, train_vae
from .vq import check_vq_folder, report_table, token_latents, token_vae, train_vq


def _device(name: str | None) -> str:
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


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


def _given(args: argparse.Namespace, **names: str) -> dict[str, Any]:
    """{keyword: value} for the options that were given (not None); names maps keyword -> argparse dest."""
    return {key: getattr(args, dest) for key, dest in names.items() if getattr(args, dest) is not None}


# ---------------------------------------------------------------------------------------------- reconstruct
def cmd_reconstruct(args: argparse.Namespace) -> None:
    check_target(Path(args.out) / "table1.md", what="reconstruct output")
    device = _device(args.device)
    vae = load_vae(args.vae, device=device).eval()
    features, fd_name, fit_latents = None, "FD", None
    if args.images:  # a folder, or any image source spec (wds:PATTERN, hf:PATH, folder:PATH)
        spec = args.images if args.images.split(":", 1)[0] in ("folder", "wds", "hf") else f"folder:{args.images}"
        check_images_request(args.num_images, vae.image_channels, args.resolution, f"reconstruct: {args.num_images} "
                             f"images at {args.resolution}x{args.resolution}", "lower --num-images or --resolution")
        source = image_source(spec, args.resolution, vae.image_channels, limit=args.num_images,
                              **_given(args, strict="strict_images", allow_large_images="allow_large_images"))
        images = torch.stack([source[i][0] for i in range(len(source))])
    else:
        images, _ = as_tensors("test", limit=args.num_images)
        features, fd_name = load_classifier(device=device).features, "FD (classifier features)"
        with torch.no_grad():  # calibrated quantizers are fitted on training images, not the evaluated ones
            train_images, _ = as_tensors("train", limit=2000)
            fit_latents = torch.cat([vae.encode(train_images[i:i + 500].to(device)).cpu()
                                     for i in range(0, len(train_images), 500)])
    _, table = run_reconstruct(vae, images, args.out, features=features, fd_name=fd_name, fit_latents=fit_latents,
                               device=device, **_given(args, levels="levels", ranges="ranges", batch_size="batch_size"))
    print(table)
    print(f"\nwrote {args.out}/table1.md, reconstruction_grid.png, latent_histograms.png")


# ---------------------------------------------------------------------------------------------- train-vae / classifier
def cmd_train_vae(args: argparse.Namespace) -> None:
    train_vae(args.out, device=_device(args.device),
              **_given(args, steps="steps", batch_size="batch_size", lr="lr", kl_weight="kl_weight", seed="seed"))
    print(f"wrote {args.out}")


def cmd_train_vq(args: argparse.Namespace) -> None:
    train, test, tokens = token_latents(args.tokens, args.test_tokens)  # bad input fails here, before training
    check_vq_folder(args.out, args.overwrite)
    device = _device(args.device)
    vae, note = token_vae(tokens, device)
    config = _given(args, codebook_size="codebook_size", dim="dim", downsample="downsample")
    record = {"tokens": str(args.tokens), "test_tokens": args.test_tokens, "vae": tokens.vae,
              "vae_fingerprint": tokens.vae_fingerprint}
    report = train_vq(train, test, config, out_dir=args.out, vae=vae, device=device, overwrite=args.overwrite,
                      record=record, **_given(args, steps="steps", batch_size="batch_size", lr="lr", seed="seed"))
    print(report_table(report))
    if note:
        print(note)
    print(f"wrote {args.out}")


def cmd_train_classifier(args: argparse.Namespace) -> None:
    check_target(args.out, what="classifier output")
    result = train_classifier(args.out, device=_device(args.device),
                              **_given(args, epochs="epochs", batch_size="batch_size", lr="lr", seed="seed",
                                       threads="threads"))
    print(f"test accuracy {result['test_accuracy']:.4f}, {result['train_seconds']:.0f} s -> {args.out}")


# ---------------------------------------------------------------------------------------------- cache-latents
def _cache_job(args: argparse.Namespace) -> tuple[DataConfig, dict, str]:
    """(data section, quantizer kwargs, output path) from a run config (--config) or from the options alone."""
    if args.config:
        run = load_run_config(args.config, args.overrides)
        if args.shard_size is not None or args.flip:
            run = run.model_copy(update={"data": run.data.model_copy(update=_given(args, shard_size="shard_size",
                                                                                   flip="flip"))})
        out = args.out or run.data.tokens
        if not out:
            raise ConfigError(f"{args.config} sets no data.tokens: give --out")
        return run.data, run.model.get("quantizer"), out
    if args.overrides:
        raise ConfigError(f"key=value overrides {args.overrides} need --config")
    if not args.out:
        raise ConfigError("give --out (or --config, whose data.tokens names the file)")
    data = validate(DataConfig, _given(args, vae="vae", dataset="data", split="split", limit="limit",
                                       resolution="resolution", channels="channels", encode_batch="batch_size",
                                       strict_images="strict_images", allow_large_images="allow_large_images",
                                       shard_size="shard_size", flip="flip"), "data")
    quantizer = _given(args, levels="levels", std_range="std_range", kind="kind")
    if args.range is not None:
        quantizer["value_range"] = (-args.range, args.range)
    return data, quantizer, args.out


def cmd_cache_latents(args: argparse.Namespace) -> None:
    data, quantizer, out = _cache_job(args)
    device = _device(args.device)
    if data.shard_size is None:
        print(f"wrote {cache_latents(data, out, quantizer=quantizer, device=device, overwrite=args.overwrite)}")
        return
    manifest = cache_shards(data, out, quantizer=quantizer, shard_size=data.shard_size, device=device, flip=data.flip,
                            latents_dtype=data.latents_dtype if data.store_latents else None)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {manifest}")


# ---------------------------------------------------------------------------------------------- train / export
def cmd_train(args: argparse.Namespace) -> None:
    metrics = train(load_run_config(args.config, args.overrides), resume=not args.no_resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(metrics))


def cmd_export(args: argparse.Namespace) -> None:
    sample = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.sample or [])}
    print(f"wrote {export_weights(args.checkpoint, args.out, ema=not args.raw, half=args.half, sample=sample)}")


def cmd_convert(args: argparse.Namespace) -> None:
    check_target(Path(args.out) / "config.json", what="pretrained folder")
    options = _given(args, num_heads="num_heads", head_num_heads="head_num_heads", vae="vae")
    if args.no_first_token_timestep:
        options["first_token_timestep"] = False
    model = convert_official(args.checkpoint, family=args.family, weights=args.weights,
                             trust_pickle=args.trust_pickle, **options)
    print(f"wrote {model.save_pretrained(args.out)} ({model.family}, {sum(p.numel() for p in model.parameters()):,} "
          f"parameters, {args.weights}; sampling defaults {model.provenance['sample']})")
    if model.provenance["source"].get("note"):
        print(f"note: {model.provenance['source']['note']}")


# ---------------------------------------------------------------------------------------------- sample / evaluate
def cmd_sample(args: argparse.Namespace) -> None:
    check_target(Path(args.out) / "samples.png", what="sample output")
    device = _device(args.device)
    model = load_generator(device=device, ema=not args.raw_weights, **_given(args, spec="model"))
    options = {name: getattr(args, name) for name in _sampling_fields() if getattr(args, name) is not None}
    _check_sample_size(args, model, device, options)
    labels = [label for label in args.labels for _ in range(args.per_class)]
    result = generate(model, labels, vae=args.vae, device=device, allow_other_vae=args.allow_other_vae,
                      **_given(args, seed="seed", batch_size="batch_size"), **options)
    written = save_samples(result, args.out, nrow=args.per_class if args.per_class > 1 else 10,
                           show_confidence=args.show_confidence, npz=args.npz)
    for path in written:
        print(f"wrote {path}")
    if args.evaluate:
        accuracy = class_accuracy(result["images"], torch.tensor(labels), classifier=load_classifier(device=device))
        print(f"classifier accuracy of the samples on their conditioning class: {accuracy:.3f} "
              f"({len(labels)} samples)")


def _check_sample_size(args: argparse.Namespace, model: Any, device: str, options: dict[str, Any]) -> None:
    """Labels x per-class against the free memory and a time estimate (one image sampled first), before the work."""
    batch_size = args.batch_size or inspect.signature(generate).parameters["batch_size"].default
    seconds = check_sample_request(model, len(args.labels) * args.per_class, batch_size, lambda: generate(
        model, args.labels[:1], vae=args.vae, device=device, allow_other_vae=args.allow_other_vae, **options))
    if seconds is not None and seconds > 60:
        print(f"sampling {len(args.labels) * args.per_class:,} images: about {duration(seconds)} here", file=sys.stderr)


def cmd_evaluate(args: argparse.Namespace) -> None:
    images, labels = read_samples(args.samples)
    device = _device(args.device)
    if args.inception_weights:
        if not args.reference:
            raise ValueError("--inception-weights needs --reference (an .npz with mu and sigma)")
        fid = InceptionFID(weights_path=args.inception_weights, device=device)
        fid.update(images, real=False)
        fid.set_reference(*load_reference_stats(args.reference))
        result = {"fid": fid.compute(), "is": fid.inception_score(), "num_samples": len(images)}
    else:
        result = evaluate_samples(images, labels, device=device, source=args.samples)
    print(json.dumps(result, indent=1))


# ---------------------------------------------------------------------------------------------- sweep
def cmd_sweep(args: argparse.Namespace) -> None:
    result = run_sweep(args.model, cfg=args.cfg, temperature=args.temperature, num_iter=args.num_iter,
                       per_class=args.per_class, seed=args.seed, device=_device(args.device), out=args.out,
                       overwrite=args.overwrite)
    print(sweep_table(result["rows"]))
    print(f"\n{describe_best(result)}\nwrote {args.out}/sweep.md, sweep.json, sweep.png")


# ---------------------------------------------------------------------------------------------- demo-ui
def cmd_demo_ui(args: argparse.Namespace) -> None:
    launch_ui(args.model or sorted(SHIPPED), vae=args.vae, device=_device(args.device), host=args.host, port=args.port,
              allow_other_vae=args.allow_other_vae, **_given(args, max_images="max_images"))


# ---------------------------------------------------------------------------------------------- repro
def cmd_repro(args: argparse.Namespace) -> None:
    run_repro(args.name, device=_device(args.device), overrides=args.overrides,
              **_given(args, out_dir="out", scale="scale"))


# ---------------------------------------------------------------------------------------------- parser
def _add_image_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strict-images", action="store_true", default=None,
                   help="fail on an unreadable image in a folder (default: skip it, count it and warn)")
    p.add_argument("--allow-large-images", action="store_true", default=None,
                   help="open images beyond PIL's decompression-bomb pixel limit")


def _sampling_fields() -> dict[str, Any]:
    """The sampling options of every registered family (name -> pydantic field), from their sample() signatures."""
    fields: dict[str, Any] = {}
    for family in FAMILIES.values():
        for name, field in sample_options(family).model_fields.items():
            fields.setdefault(name, field)
    return fields


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    """One option per sampling option (``--num-iter``), typed from its annotation; unset ones are not passed."""
    for name, field in _sampling_fields().items():
        kind, choices = field.annotation, None
        if typing.get_origin(kind) is typing.Literal:
            kind, choices = str, typing.get_args(kind)
        kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)  # X | None -> X
        nargs = None
        if typing.get_origin(kind) is tuple:  # cfg_interval: --cfg-interval LO HI
            nargs, kind = len(typing.get_args(kind)), typing.get_args(kind)[0]
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, choices=choices, nargs=nargs,
                       metavar=("LO", "HI") if nargs == 2 else None,
                       help=f"sampling option (default: the generator's recorded value, else {field.default!r})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenbridge", description=__doc__.split("\n")[0])
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
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("train-vae", help="train the embedded Fashion-MNIST KL-VAE")
    p.add_argument("--out", required=True, help="the .safetensors to write (the shipped weights only with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a file of another kind or the shipped weights")
    for flag, kind in (("--steps", _positive_int), ("--batch-size", _positive_int), ("--lr", float),
                       ("--kl-weight", float), ("--seed", int)):
        p.add_argument(flag, type=kind, help=lib)
    p.add_argument("--device")
    p.set_defaults(func=cmd_train_vae)

    p = sub.add_parser("train-vq", help="train a VQ tokenizer of a token cache's latents (D2C's coarse codes)")
    p.add_argument("--tokens", required=True, help="a cache-latents file (or shard folder) that stores latents")
    p.add_argument("--test-tokens", help="held-out token file (default: the last 5 %% of --tokens)")
    p.add_argument("--out", required=True, help="the tokenizer folder to write (config.json + model.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace a tokenizer already in --out")
    for flag, kind in (("--codebook-size", _positive_int), ("--dim", _positive_int), ("--downsample", int),
                       ("--steps", _positive_int), ("--batch-size", _positive_int), ("--lr", float), ("--seed", int)):
        p.add_argument(flag, type=kind, help=lib)
    p.add_argument("--device")
    p.set_defaults(func=cmd_train_vq)

    p = sub.add_parser("train-classifier", help="train the embedded evaluation classifier")
    p.add_argument("--out", required=True, help="the .safetensors to write (the shipped weights only with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a file of another kind or the shipped weights")
    for flag, kind in (("--epochs", _positive_int), ("--batch-size", _positive_int), ("--lr", float), ("--seed", int),
                       ("--threads", _positive_int)):
        p.add_argument(flag, type=kind, help=lib)
    p.add_argument("--device")
    p.set_defaults(func=cmd_train_classifier)

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
    p.set_defaults(func=cmd_cache_latents)

    p = sub.add_parser("train", help="train a generator (works under torchrun for DDP)")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    p.add_argument("--no-resume", action="store_true", help="start from step 0 (with --overwrite if a checkpoint exists)")
    p.add_argument("--overwrite", action="store_true", help="with --no-resume: replace the folder's checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="checkpoint.pt -> self-describing .safetensors (EMA weights, config, VAE)")
    p.add_argument("checkpoint", help="a training checkpoint.pt or a pretrained folder")
    p.add_argument("out")
    p.add_argument("--overwrite", action="store_true", help="replace a file of another kind (token file, checkpoint)")
    p.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    p.add_argument("--half", action="store_true", help="store float32 tensors as float16")
    p.add_argument("--sample", action="append", metavar="KEY=VALUE", type=_key_value,
                   help="record this sampling default over the run's (repeatable), e.g. --sample clip_denoised=5")
    p.set_defaults(func=cmd_export)

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
                   help="TokenBridge: leave out the released sampler's first-input quirk (see official_head.py)")
    p.add_argument("--vae", help="the VAE spec to record, e.g. kl16:/path/kl16.ckpt (else give --vae to sample)")
    p.add_argument("--trust-pickle", action="store_true", help="read a checkpoint holding arbitrary Python objects")
    p.set_defaults(func=cmd_convert)

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
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("evaluate", help="metrics of generated samples (.npz from `sample --npz`)")
    p.add_argument("samples", help="an .npz with images uint8 [N, H, W, C] and optional labels [N]")
    p.add_argument("--inception-weights", help="local FID Inception weights file (paper-scale FID/IS)")
    p.add_argument("--reference", help="reference statistics .npz (mu, sigma), e.g. ADM's, with --inception-weights")
    p.add_argument("--device")
    p.set_defaults(func=cmd_evaluate)

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
    p.set_defaults(func=cmd_sweep)

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
    p.set_defaults(func=cmd_demo_ui)

    p = sub.add_parser("repro", help="reproduce a paper table/figure at small scale into docs/results/")
    p.add_argument("name", help="table1, table2a..table2e, table5, fig8, table3 (TokenBridge vs continuous MAR) or all")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the run config")
    p.add_argument("--scale", help=f"tiny (smoke test), small (2 CPU cores) or paper (GPUs) {lib}")
    p.add_argument("--out", help=f"results folder {lib}")
    p.add_argument("--overwrite", action="store_true", help="replace files tokenbridge did not write there")
    p.add_argument("--device")
    p.set_defaults(func=cmd_repro)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `repro table2a --scale small train.steps=400`: argparse stops filling a nargs="*" positional at the first
    # option, so key=value overrides written after options come back here
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        with overwriting(bool(getattr(args, "overwrite", False))), command_lock(args):
            args.func(args)
    except TrainingInterrupted as stop:  # the checkpoint is saved: a message, not a traceback
        print(f"tokenbridge {args.command}: {stop}", file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None
    except (OSError, ValueError) as error:  # bad input, a missing file, a full disk: the message names it
        print(f"tokenbridge {args.command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except (MemoryError, RuntimeError) as error:  # torch.OutOfMemoryError is a RuntimeError
        if not is_out_of_memory(error):
            raise
        print(f"tokenbridge {args.command}: error: {out_of_memory(error, args)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
