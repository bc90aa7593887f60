"""`tokenbridge demo-ui`: a browser demo (Gradio) of the generators. Pick a class and the sampling knobs, watch the
token grid fill in step by step (each MAR step's partial image is streamed), and see the per-token confidence map,
the tokens themselves and the time taken. Any generator family and checkpoint loads (`--model`, repeatable).

Safe by default: it binds to 127.0.0.1, queues requests with a concurrency limit, caps the images per request and
downloads nothing (Gradio's analytics are switched off). Gradio is the optional `ui` extra.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import load_generator
from .data import FASHION_MNIST_CLASSES
from .generate import confidence_images, resolve_vae, sampling_defaults
from .generators import check_sample_options, sample_options
from .images import image_grid
from .vae import VAE

MAX_IMAGES = 16  # per request: one visitor must not exhaust a shared machine
# Gradio keeps every picture it streams as a file; every minute, the ones older than ten minutes are deleted, so the
# server's disk use is bounded by the traffic of ten minutes, not of its lifetime
CACHE_SWEEP = (60, 600)  # (every seconds, older than seconds)
CONCURRENCY = 1  # requests sampled at the same time; the others wait in the queue
QUEUE_SIZE = 16
SCALE = 4  # pixels per image pixel in the shown grids


@dataclass
class Entry:
    """A loaded generator with the VAE that decodes it and its class names."""

    model: nn.Module
    vae: VAE
    classes: list[str]
    defaults: dict[str, Any] = field(default_factory=dict)


def load_entries(specs: Sequence[str], vae: str | None = None, device: str = "cpu",
                 allow_other_vae: bool = False) -> dict[str, Entry]:
    """{name: Entry} for generator specs ("fmnist", checkpoint.pt, exported .safetensors), each with its recorded
    VAE unless ``vae`` names one. The name shows the family and the spec."""
    entries = {}
    for spec in specs:
        model = load_generator(spec, device)
        decoder = resolve_vae(model, vae, device, allow_other_vae)
        fmnist = model.provenance.get("vae") == "fmnist" and model.num_classes == len(FASHION_MNIST_CLASSES)
        classes = list(FASHION_MNIST_CLASSES) if fmnist else [f"class {i}" for i in range(model.num_classes)]
        defaults = {**sample_options(type(model))().model_dump(), **sampling_defaults(model)}
        entries[f"{model.family}: {spec}"] = Entry(model, decoder, classes + ["(unconditional)"], defaults)
    return entries


def _grid(images: torch.Tensor, nrow: int) -> np.ndarray:
    return np.asarray(image_grid(images.clamp(-1, 1), nrow=nrow, scale=SCALE))


def _token_view(indices: torch.Tensor, levels: int, size: int) -> torch.Tensor:
    """Token grid [N, h, w, C] -> a colour picture [N, 3, size, size]: channels 0-2 as RGB (index / levels)."""
    rgb = indices[..., :3].float() / (levels - 1) * 2 - 1
    if rgb.shape[-1] < 3:
        rgb = torch.cat([rgb, rgb[..., :1].expand(*rgb.shape[:-1], 3 - rgb.shape[-1])], -1)
    return torch.nn.functional.interpolate(rgb.permute(0, 3, 1, 2), size=(size, size), mode="nearest")


def render(entry: Entry, out: dict[str, torch.Tensor], nrow: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decoded images, confidence maps and token colours of (partial) sampler outputs, as uint8 grids."""
    with torch.no_grad():
        images = entry.vae.decode(out["latents"]).float().cpu()
    size = images.shape[-1]
    conf = confidence_images(out["confidence"].cpu(), size) if "confidence" in out else torch.zeros_like(images)
    if "mask" in out:  # not generated yet: black in the confidence map
        hidden = torch.nn.functional.interpolate(out["mask"][:, None].float().cpu(), size=(size, size))
        conf = conf.masked_fill(hidden.bool(), -1.0)
    tokens = (_token_view(out["indices"].cpu(), int(entry.model.levels), size) if "indices" in out
              else torch.full_like(images[:, :1], -1.0).expand(-1, 3, -1, -1))
    return _grid(images, nrow), _grid(conf, nrow), _grid(tokens, nrow)


def check_request(entry: Entry, label: int, count: int, options: dict[str, Any], max_images: int) -> dict[str, Any]:
    """The validated sampling options; a ValueError with a message for the page when a request is out of bounds
    (before any sampling). Options the family does not take are dropped."""
    if not 1 <= count <= max_images:
        raise ValueError(f"images must be between 1 and {max_images} per request, got {count}")
    if not 0 <= label < len(entry.classes):
        raise ValueError(f"class must be one of the {len(entry.classes)} listed, got {label}")
    known = sample_options(type(entry.model)).model_fields
    options = check_sample_options(type(entry.model), {k: v for k, v in options.items() if k in known},
                                   prefix="sampling option")
    if not 1 <= options.get("num_iter", 1) <= 256:
        raise ValueError(f"num_iter must be between 1 and 256, got {options['num_iter']}")
    return options


def stream(entry: Entry, label: int, count: int, seed: int, options: dict[str, Any],
           max_images: int = MAX_IMAGES) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, str]]:
    """Sample ``count`` images of class ``label`` (the last class = unconditional) and yield (images, confidence,
    tokens, status) after every sampling step; the last yield is the finished batch. Deterministic under ``seed``."""
    options = check_request(entry, label, count, options, max_images)
    model = entry.model
    label = model.num_classes if label == len(entry.classes) - 1 else label
    labels = torch.full((count,), label, dtype=torch.long, device=next(model.parameters()).device)
    steps: queue.Queue = queue.Queue()
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["out"] = model.sample(labels, generator=int(seed), callback=steps.put, **options)
        except Exception as error:  # shown in the page
            result["error"] = error
        steps.put(None)

    start, nrow = time.time(), min(count, 8)
    threading.Thread(target=run, daemon=True).start()
    while (state := steps.get()) is not None:
        status = f"step {int(state['step'])} / {int(state['num_iter'])} - {time.time() - start:.2f} s"
        yield (*render(entry, state, nrow), status)
    if "error" in result:
        raise ValueError(str(result["error"]))
    yield (*render(entry, result["out"], nrow), f"done: {count} image(s) in {time.time() - start:.2f} s")


def drop_repeats(frames: Iterator[tuple], skip: Any) -> Iterator[tuple]:
    """The frames of ``stream`` with every picture equal to the one last sent for its slot replaced by ``skip``
    (Gradio's "leave unchanged"), except in the last frame. Gradio rewrites a picture's cache file on every yield
    even when it did not change (a MAR stream's token view is the same blank at every step), and a client still
    downloading that file then reads it cut short."""
    sent: list[np.ndarray | None] = [None, None, None]
    frame = next(frames, None)
    for following in frames:
        pictures = list(frame[:3])
        for i, picture in enumerate(frame[:3]):
            if sent[i] is not None and np.array_equal(sent[i], picture):
                pictures[i] = skip
            else:
                sent[i] = picture
        yield (*pictures, *frame[3:])
        frame = following
    if frame is not None:
        yield frame


# ----------------------------------------------------------------------------------------------------------------
# The page


def build_app(entries: dict[str, Entry], max_images: int = MAX_IMAGES) -> Any:
    """The Gradio Blocks app: controls on the left, the live images, confidence map and tokens on the right. Its API
    endpoint ``/generate`` takes (model, class name, images, cfg, cfg_schedule, temperature, num_iter, order,
    seed) and streams (images, confidence, tokens, status)."""
    import gradio as gr

    names = list(entries)
    first = entries[names[0]]
    with gr.Blocks(title="tokenbridge", delete_cache=CACHE_SWEEP) as app:
        gr.Markdown("# tokenbridge: watch a generator fill the token grid\nEach step of the masked-autoregressive "
                    "sampler predicts a chunk of tokens; tokens not generated yet are decoded at the prior mean (0).")
        with gr.Row():
            with gr.Column(scale=1):
                model = gr.Dropdown(names, value=names[0], label="generator (family: weights)")
                label = gr.Dropdown(first.classes, value=first.classes[0], type="index", label="class")
                count = gr.Slider(1, max_images, value=min(8, max_images), step=1, label="images")
                cfg = gr.Slider(1.0, 10.0, value=first.defaults.get("cfg") or 1.0, step=0.1, label="cfg")
                schedule = gr.Radio(["linear", "constant"], value=first.defaults.get("cfg_schedule", "linear"),
                                    label="cfg schedule")
                temperature = gr.Slider(0.05, 2.0, value=first.defaults.get("temperature", 1.0), step=0.05,
                                        label="temperature")
                num_iter = gr.Slider(1, 64, value=first.defaults.get("num_iter", 16), step=1, label="num_iter")
                order = gr.Radio(["random", "confidence"], value=first.defaults.get("order", "random"),
                                 label="order")
                seed = gr.Number(value=0, precision=0, label="seed")
                button = gr.Button("Generate", variant="primary")
            with gr.Column(scale=2):
                images = gr.Image(label="images", type="numpy", format="png")
                with gr.Row():
                    confidence = gr.Image(label="confidence (white = most confident)", type="numpy", format="png")
                    tokens = gr.Image(label="tokens (channels 0-2 as RGB)", type="numpy", format="png")
                status = gr.Textbox(label="progress and time", interactive=False)

        def on_generate(name, class_index, n, cfg_, schedule_, temperature_, num_iter_, order_, seed_):
            if name not in entries:
                raise gr.Error(f"unknown generator {name!r}")
            options = {"cfg": cfg_, "cfg_schedule": schedule_, "temperature": temperature_,
                       "num_iter": int(num_iter_), "order": order_}
            try:
                yield from drop_repeats(stream(entries[name], int(class_index), int(n), int(seed_ or 0), options,
                                               max_images), gr.skip())
            except ValueError as error:
                raise gr.Error(str(error)) from None

        model.change(lambda name: gr.Dropdown(choices=entries[name].classes, value=entries[name].classes[0]),
                     model, label)
        button.click(on_generate, [model, label, count, cfg, schedule, temperature, num_iter, order, seed],
                     [images, confidence, tokens, status], api_name="generate")
    app.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
    return app


def launch(specs: Sequence[str], vae: str | None = None, device: str = "cpu", host: str = "127.0.0.1",
           port: int | None = None, max_images: int = MAX_IMAGES, allow_other_vae: bool = False,
           block: bool = True) -> Any:
    """Load the generators and serve the page on ``host:port`` (loopback unless told otherwise). ``block=False``
    returns the running app (tests)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a demo
    import gradio as gr

    app = build_app(load_entries(specs, vae, device, allow_other_vae), max_images)
    # system fonts: the default theme would make every visitor's browser fetch fonts from Google
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block, show_error=True,
               theme=theme)
    return app
