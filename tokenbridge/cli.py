"""`tokenbridge` command line: one subcommand per job; each one is a thin wrapper over the library."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch


def _device(name: str | None) -> str:
    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------- reconstruct
def cmd_reconstruct(args: argparse.Namespace) -> None:
    from .data import ImageFolder, as_tensors
    from .reconstruct import run_reconstruct
    from .vae import load_vae

    device = _device(args.device)
    vae = load_vae(args.vae, device=device).eval()
    features, fd_name, fit_latents = None, "FD", None
    if args.images:
        folder = ImageFolder(args.images, resolution=args.resolution, channels=vae.image_channels)
        count = min(args.num_images, len(folder))
        images = torch.stack([folder[i][0] for i in range(count)])
    else:
        from .metrics import load_classifier

        images, _ = as_tensors("test", limit=args.num_images)
        classifier = load_classifier(device=device)
        features, fd_name = classifier.features, "FD (classifier features)"
        with torch.no_grad():  # calibrated quantizers are fitted on training images, not the evaluated ones
            train_images, _ = as_tensors("train", limit=2000)
            fit_latents = torch.cat([vae.encode(train_images[i:i + 500].to(device)).cpu()
                                     for i in range(0, len(train_images), 500)])
    rows, table = run_reconstruct(vae, images, args.out, features=features, fd_name=fd_name,
                                  fit_latents=fit_latents, levels=args.levels, ranges=args.ranges,
                                  batch_size=args.batch_size, device=device)
    print(table)
    print(f"\nwrote {args.out}/table1.md, reconstruction_grid.png, latent_histograms.png")


# ---------------------------------------------------------------------------------------------- train-vae
def cmd_train_vae(args: argparse.Namespace) -> None:
    from .vae import train_vae

    train_vae(out_path=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
              kl_weight=args.kl_weight, seed=args.seed, device=_device(args.device))


# ---------------------------------------------------------------------------------------------- train-classifier
def cmd_train_classifier(args: argparse.Namespace) -> None:
    from .metrics import train_classifier

    result = train_classifier(out_path=args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              seed=args.seed, device=_device(args.device), threads=args.threads)
    print(f"test accuracy {result['test_accuracy']:.4f}, {result['train_seconds']:.0f} s -> {args.out}")


# ---------------------------------------------------------------------------------------------- cache-latents
def cmd_cache_latents(args: argparse.Namespace) -> None:
    from .train import cache_latents

    quantizer = dict(levels=args.levels, value_range=(-args.range, args.range), std_range=args.std_range,
                     kind=args.kind)
    path = cache_latents(args.vae, args.out, data=args.data, split=args.split, quantizer=quantizer,
                         batch_size=args.batch_size, device=_device(args.device), resolution=args.resolution,
                         limit=args.limit, store_latents=args.store_latents)
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> None:
    from .train import load_config, train

    metrics = train(load_config(args.config, args.overrides), resume=not args.no_resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(metrics))


def cmd_export(args: argparse.Namespace) -> None:
    from .train import export_weights

    print(f"wrote {export_weights(args.checkpoint, args.out, ema=not args.raw, half=args.half)}")


# ---------------------------------------------------------------------------------------------- sample
def cmd_sample(args: argparse.Namespace) -> None:
    from .generate import generate, save_samples

    device = _device(args.device)
    labels = [label for label in args.labels for _ in range(args.per_class)]
    result = generate(args.model, args.vae, labels, num_iter=args.num_iter, cfg=args.cfg,
                      cfg_schedule=args.cfg_schedule, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, order=args.order, seed=args.seed, device=device,
                      batch_size=args.batch_size)
    written = save_samples(result, args.out, nrow=args.per_class if args.per_class > 1 else 10,
                           show_confidence=args.show_confidence, npz=args.npz)
    for path in written:
        print(f"wrote {path}")
    if args.evaluate:
        from .metrics import class_accuracy, load_classifier

        accuracy = class_accuracy(result["images"], torch.tensor(labels), classifier=load_classifier(device=device))
        print(f"classifier accuracy of the samples on their conditioning class: {accuracy:.3f} "
              f"({len(labels)} samples)")


# ---------------------------------------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> None:
    import numpy as np

    path = Path(args.samples)
    if not path.exists():
        raise FileNotFoundError(f"samples file not found: {path} (write one with `tokenbridge sample --npz`)")
    with np.load(path) as data:
        if "images" not in data:
            raise ValueError(f"{path} has no 'images' array (uint8 [N, H, W, C])")
        images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1
        labels = torch.from_numpy(data["labels"]) if "labels" in data else None
    device = _device(args.device)
    if args.inception_weights:
        from .metrics import InceptionFID, load_reference_stats

        if not args.reference:
            raise ValueError("--inception-weights needs --reference (an .npz with mu and sigma)")
        fid = InceptionFID(weights_path=args.inception_weights, device=device)
        fid.update(images, real=False)
        fid.set_reference(*load_reference_stats(args.reference))
        result = {"fid": fid.compute(), "is": fid.inception_score()}
    else:
        from .data import as_tensors
        from .metrics import classifier_metrics

        real, _ = as_tensors("test")
        result = classifier_metrics(images, labels, real_images=real, device=device)
    result["num_samples"] = len(images)
    print(json.dumps(result, indent=1))


# ---------------------------------------------------------------------------------------------- repro
def cmd_repro(args: argparse.Namespace) -> None:
    from .repro import run_repro

    run_repro(args.name, out_dir=args.out, scale=args.scale, overrides=args.overrides, device=_device(args.device))


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenbridge", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("reconstruct", help="paper Table 1: continuous VAE vs quantized at several B and ranges")
    p.add_argument("--vae", default="fmnist", help="fmnist (embedded), kl16:PATH, diffusers:FOLDER or a .safetensors")
    p.add_argument("--images", help="folder of your images (default: Fashion-MNIST test split)")
    p.add_argument("--resolution", type=int, default=256, help="crop/resize size for --images")
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--levels", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--ranges", type=float, nargs="+", default=[2, 3, 4, 5])
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--out", default="out/reconstruct")
    p.add_argument("--device")
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("train-vae", help="train the embedded Fashion-MNIST KL-VAE")
    p.add_argument("--out", default="tokenbridge/weights/fmnist_vae.safetensors")
    p.add_argument("--steps", type=int, default=1400)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device")
    p.set_defaults(func=cmd_train_vae)

    p = sub.add_parser("train-classifier", help="train the embedded evaluation classifier")
    p.add_argument("--out", default="tokenbridge/weights/fmnist_classifier.safetensors")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device")
    p.set_defaults(func=cmd_train_classifier)

    p = sub.add_parser("cache-latents", help="encode + quantize a dataset once; indices stored as uint8")
    p.add_argument("--vae", default="fmnist")
    p.add_argument("--data", default="fmnist", help="fmnist or folder:PATH")
    p.add_argument("--split", default="train")
    p.add_argument("--out", default="runs/fmnist_tokens.safetensors")
    p.add_argument("--levels", type=int, default=64)
    p.add_argument("--range", type=float, default=5.0)
    p.add_argument("--std-range", type=float, default=3.0)
    p.add_argument("--kind", default="gaussian", choices=["gaussian", "uniform"])
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--limit", type=int)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--store-latents", action="store_true", help="also keep continuous latents (channel order)")
    p.add_argument("--device")
    p.set_defaults(func=cmd_cache_latents)

    p = sub.add_parser("train", help="train the generator (works under torchrun for DDP)")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    p.add_argument("--no-resume", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="checkpoint.pt -> shippable .safetensors (EMA weights + model config)")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    p.add_argument("--half", action="store_true", help="store float32 tensors as float16")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("sample", help="class-conditional samples from a generator")
    p.add_argument("--model", default="fmnist", help="fmnist (embedded), a checkpoint.pt or exported .safetensors")
    p.add_argument("--vae", default="fmnist")
    p.add_argument("--labels", type=int, nargs="+", default=list(range(10)))
    p.add_argument("--per-class", type=int, default=8)
    p.add_argument("--num-iter", type=int, default=16)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--cfg-schedule", default="linear", choices=["linear", "constant"])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--order", default="random", choices=["random", "confidence"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", default="out/samples")
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

    p = sub.add_parser("repro", help="reproduce a paper table/figure at small scale into docs/results/")
    p.add_argument("name", help="table1, table2a..table2e, table5, fig8 or all")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the run config")
    p.add_argument("--scale", default="small", help="tiny (smoke test), small (2 CPU cores) or paper (GPUs)")
    p.add_argument("--out", default="docs/results")
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
        args.func(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"tokenbridge {args.command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
