"""`tokenbridge` command line: one subcommand per job; each one is a thin wrapper over the library.

Options left out take the library's defaults (the function each command calls holds them); `--help` says which.
The parser (cli_parser.py) loads none of this: the console script parses first, then imports this module.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from .budget import check_images_request, check_sample_request, duration, is_out_of_memory, out_of_memory
from .checkpoint import SHIPPED, export_weights, load_generator
from .cli_parser import build_parser, parse_args, sampling_fields  # noqa: F401 (tests: cli.build_parser)
from .classifier import class_accuracy, load_classifier
from .config import ConfigError, DataConfig, validate
from .data import as_tensors
from .distributed import TrainingInterrupted
from .edit import class_names, run_edit
from .evaluate import MIN_SAMPLES, evaluate_with_noise, read_samples
from .files import check_target, command_lock, overwriting
from .generate import generate, save_samples
from .inception import InceptionFID
from .metrics import load_reference_stats
from .official import convert as convert_official
from .progress import bar, progress_switch
from .reconstruct import run_reconstruct
from .repro import run_repro
from .shards import cache_shards
from .sources import image_source
from .sweep import describe_best, run_sweep, sweep_table
from .tokens import cache_latents
from .train import load_run_config, train
from .training.classifier import train_classifier
from .training.vae import train_vae
from .training.vq import report_table, token_latents, token_vae, train_vq
from .ui import launch as launch_ui
from .vae import load_vae
from .vq import check_vq_folder


def _device(name: str | None) -> str:
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


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
        check_images_request(args.limit, vae.image_channels, args.resolution, f"reconstruct: {args.limit} "
                             f"images at {args.resolution}x{args.resolution}", "lower --limit or --resolution")
        source = image_source(spec, args.resolution, vae.image_channels, limit=args.limit,
                              **_given(args, strict="strict_images", allow_large_images="allow_large_images"))
        images = torch.stack([source[i][0] for i in range(len(source))])
    else:
        images, _ = as_tensors("test", limit=args.limit)
        features, fd_name = load_classifier(device=device).features, "FD (classifier features)"
        with torch.no_grad():  # calibrated quantizers are fitted on training images, not the evaluated ones
            train_images, _ = as_tensors("train", limit=2000)
            fit_latents = torch.cat([vae.encode(train_images[i:i + 500].to(device)).cpu()
                                     for i in range(0, len(train_images), 500)])
    _, table = run_reconstruct(vae, images, args.out, features=features, fd_name=fd_name, fit_latents=fit_latents,
                               device=device, progress=not args.quiet,
                               **_given(args, levels="levels", ranges="ranges", batch_size="encode_batch"))
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
                                       resolution="resolution", channels="channels", encode_batch="encode_batch",
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
    metrics = train(load_run_config(args.config, args.overrides), resume=args.resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(metrics))


def cmd_export(args: argparse.Namespace) -> None:
    sample = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.sample or [])}
    with bar(total=1, desc="export", unit="file") as steps:  # one long step: read, convert and write the weights
        path = export_weights(args.checkpoint, args.out, ema=not args.raw_weights, half=args.half, sample=sample)
        steps.update()
    print(f"wrote {path}")


def cmd_convert(args: argparse.Namespace) -> None:
    check_target(Path(args.out) / "config.json", what="pretrained folder")
    options = _given(args, num_heads="num_heads", head_num_heads="head_num_heads", vae="vae")
    if args.first_token_timestep is not None:
        options["first_token_timestep"] = args.first_token_timestep
    with bar(total=2, desc="convert", unit="step") as steps:  # read + map the checkpoint, then write the folder
        model = convert_official(args.checkpoint, family=args.family, weights=args.weights,
                                 trust_pickle=args.trust_pickle, **options)
        steps.update()
        folder = model.save_pretrained(args.out)
        steps.update()
    print(f"wrote {folder} ({model.family}, {sum(p.numel() for p in model.parameters()):,} "
          f"parameters, {args.weights}; sampling defaults {model.provenance['sample']})")
    if model.provenance["source"].get("note"):
        print(f"note: {model.provenance['source']['note']}")


# ---------------------------------------------------------------------------------------------- sample / evaluate
def cmd_sample(args: argparse.Namespace) -> None:
    check_target(Path(args.out) / "samples.png", what="sample output")
    device = _device(args.device)
    model = load_generator(device=device, ema=not args.raw_weights, **_given(args, spec="model"))
    options = {name: getattr(args, name) for name in sampling_fields() if getattr(args, name) is not None}
    _check_sample_size(args, model, device, options)
    labels = [label for label in args.labels for _ in range(args.per_class)]
    result = generate(model, labels, vae=args.vae, device=device, allow_other_vae=args.allow_other_vae,
                      progress=not args.quiet, **_given(args, seed="seed", batch_size="batch_size"), **options)
    written = save_samples(result, args.out, nrow=args.per_class if args.per_class > 1 else 10,
                           show_confidence=args.show_confidence, npz=args.npz, class_names=class_names(model))
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


def cmd_edit(args: argparse.Namespace) -> None:
    options = {name: getattr(args, name) for name in sampling_fields() if getattr(args, name) is not None}
    written = run_edit(args.model, args.images, args.keep, args.out, labels=args.labels, per_image=args.per_image,
                       split=args.split, limit=args.limit, npz=args.npz, vae=args.vae, device=_device(args.device),
                       allow_other_vae=args.allow_other_vae, progress=not args.quiet,
                       **_given(args, seed="seed", batch_size="batch_size"), **options)
    for path in written:
        print(f"wrote {path}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    images, labels = read_samples(args.samples)
    device = _device(args.device)
    if len(images) < MIN_SAMPLES:
        print(f"tokenbridge evaluate: warning: {len(images)} samples; below {MIN_SAMPLES} the metrics vary widely "
              "with the draw of samples and FD reads high" + ("" if args.inception_weights else
                                                              " (\"noise\" below estimates by how much)"),
              file=sys.stderr)
    if args.inception_weights:
        if not args.reference:
            raise ValueError("--inception-weights needs --reference (an .npz with mu and sigma)")
        fid = InceptionFID(weights_path=args.inception_weights, device=device)
        fid.update(images, real=False)
        fid.set_reference(*load_reference_stats(args.reference))
        result = {"fid": fid.compute(), "is": fid.inception_score(), "num_samples": len(images)}
    else:
        result = evaluate_with_noise(images, labels, device=device, source=args.samples, progress=not args.quiet)
    print(json.dumps(result, indent=1))


# ---------------------------------------------------------------------------------------------- sweep
def cmd_sweep(args: argparse.Namespace) -> None:
    result = run_sweep(args.model, cfg=args.cfg, temperature=args.temperature, num_iter=args.num_iter,
                       per_class=args.per_class, seed=args.seed, device=_device(args.device), out=args.out,
                       overwrite=args.overwrite, progress=not args.quiet)
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


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default: sys.argv) and run the command (in-process; the console script is cli_parser.main,
    which parses before importing this module)."""
    run(parse_args(argv))


def run(args: argparse.Namespace) -> None:
    """Run the parsed command; bad input, a missing file or a full disk end in a one-line message (exit 2)."""
    try:
        with overwriting(bool(getattr(args, "overwrite", False))), command_lock(args), \
                progress_switch(not getattr(args, "quiet", False)):
            globals()["cmd_" + args.command.replace("-", "_")](args)  # cmd_<subcommand>, looked up when called
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
