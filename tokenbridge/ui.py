"""`tokenbridge demo-ui`: a browser demo (Gradio) of the generators. Pick a class and the sampling knobs, watch the
token grid fill in step by step (each MAR step's partial image is streamed), and see the per-token confidence map,
the tokens themselves and the time taken. Any generator family and checkpoint loads (`--model`, repeatable). Below,
an editing section regenerates a chosen region of a test image or an uploaded one (endpoint ``/edit``).

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
from PIL import Image
from torch import nn

from .checkpoint import load_generator
from .data import FASHION_MNIST_CLASSES, FashionMNIST
from .edit import KEEP_PRESETS, encode_images, image_mask_to_tokens, keep_region, token_grid, token_mask_to_latent
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


def drop_repeats(frames: Iterator[tuple], skip: Any, pictures: int = 3) -> Iterator[tuple]:
    """The frames of ``stream`` with every picture equal to the one last sent for its slot replaced by ``skip``
    (Gradio's "leave unchanged"), except in the last frame. Gradio rewrites a picture's cache file on every yield
    even when it did not change (a MAR stream's token view is the same blank at every step), and a client still
    downloading that file then reads it cut short. ``pictures``: how many leading entries of a frame are pictures."""
    sent: list[np.ndarray | None] = [None] * pictures
    frame = next(frames, None)
    for following in frames:
        shown = list(frame[:pictures])
        for i, picture in enumerate(frame[:pictures]):
            if sent[i] is not None and np.array_equal(sent[i], picture):
                shown[i] = skip
            else:
                sent[i] = picture
        yield (*shown, *frame[pictures:])
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
        build_edit_section(entries, max_images)
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


# ----------------------------------------------------------------------------------------------------------------
# Editing: pick a Fashion-MNIST test image or upload one, choose the kept region (a preset, or paint the part to
# regenerate), pick the class, and watch the rest of the token grid fill in step by step.

PAINTED = "painted (paint the part to regenerate)"
_TEST_IMAGES: dict[str, FashionMNIST] = {}  # loaded on first use, shared by requests


def fmnist_test_image(index: int) -> torch.Tensor:
    """Fashion-MNIST test image ``index``: [1, 32, 32] in [-1, 1]."""
    test = _TEST_IMAGES.setdefault("test", FashionMNIST("test"))
    if not 0 <= index < len(test):
        raise ValueError(f"test image must be between 0 and {len(test) - 1}, got {index}")
    return test[index][0]


def picture_to_image(picture: np.ndarray, resolution: int, channels: int) -> torch.Tensor:
    """An uploaded picture (uint8 [H, W] or [H, W, 3|4]) -> [channels, R, R] in [-1, 1] (resized, grey or RGB)."""
    if not isinstance(picture, np.ndarray) or picture.dtype != np.uint8 or picture.ndim not in (2, 3):
        raise ValueError("the uploaded picture must be an 8-bit grey or colour image")
    im = Image.fromarray(picture).convert("L" if channels == 1 else "RGB").resize((resolution, resolution),
                                                                                   Image.BICUBIC)
    arr = torch.from_numpy(np.asarray(im).copy()).float() / 127.5 - 1
    return arr[None] if channels == 1 else arr.permute(2, 0, 1)


def painted_keep(editor: dict | None, gh: int, gw: int) -> torch.Tensor:
    """The token mask [gh, gw] (True = keep) of an ImageEditor value: every painted pixel (alpha > 0 in any layer)
    is regenerated, and so is every token with a painted pixel under it."""
    layers = [layer for layer in (editor or {}).get("layers") or [] if layer is not None]
    if not layers:
        raise ValueError("nothing painted: paint the part to regenerate, or pick a preset region")
    painted = np.zeros(layers[0].shape[:2], bool)
    for layer in layers:
        painted |= (layer[..., 3] > 0) if layer.ndim == 3 and layer.shape[-1] == 4 else (layer > 0).any(-1)
    size = (gw * 8, gh * 8)  # a multiple of the token grid, so that each token covers whole pixels
    keep = np.asarray(Image.fromarray(~painted).resize(size, Image.NEAREST))
    return image_mask_to_tokens(torch.from_numpy(keep.copy()), gh, gw)


def edit_stream(entry: Entry, image: torch.Tensor, keep: torch.Tensor, label: int, count: int, seed: int,
                options: dict[str, Any], max_images: int) -> Iterator[tuple[np.ndarray, np.ndarray, str]]:
    """Regenerate the part of ``image`` [Ci, R, R] outside ``keep`` [gh, gw] ``count`` times under ``label`` (the
    last class = unconditional); yield (original | kept region, results, status) after every MAR step, the
    not-yet-generated tokens at the prior mean. Deterministic under ``seed``."""
    options = check_request(entry, label, count, options, max_images)
    model = entry.model
    label = model.num_classes if label == len(entry.classes) - 1 else label
    device = next(model.parameters()).device
    (gh, gw), p = token_grid(model)
    known = encode_images(model, image[None], entry.vae, device).expand(count, -1, -1, -1).to(device)
    known_mask = token_mask_to_latent(keep.expand(count, gh, gw), p).to(device)
    shown = torch.nn.functional.interpolate(keep[None, None].float(), size=tuple(image.shape[-2:]))[0]
    header = np.asarray(image_grid(torch.stack([image, image * shown]), nrow=2, scale=SCALE))
    labels = torch.full((count,), label, dtype=torch.long, device=device)
    steps: queue.Queue = queue.Queue()
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["out"] = model.sample(labels, generator=int(seed), callback=steps.put, known=known,
                                         known_mask=known_mask, **options)
        except Exception as error:  # shown in the page
            result["error"] = error
        steps.put(None)

    def picture(latents: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            images = entry.vae.decode(latents).float().cpu().clamp(-1, 1)
        return np.asarray(image_grid(images, nrow=min(count, 8), scale=SCALE))

    start = time.time()
    threading.Thread(target=run, daemon=True).start()
    while (state := steps.get()) is not None:
        yield header, picture(state["latents"]), f"step {int(state['step'])} / {int(state['num_iter'])} - " \
                                                 f"{time.time() - start:.2f} s"
    if "error" in result:
        raise ValueError(str(result["error"]))
    yield header, picture(result["out"]["latents"]), f"done: {count} edit(s) in {time.time() - start:.2f} s"


def request_image(entry: Entry, index: int | None, upload: np.ndarray | None) -> torch.Tensor:
    """The image to edit: the upload when there is one, else Fashion-MNIST test image ``index``."""
    (gh, _), p = token_grid(entry.model)
    resolution = gh * p * entry.vae.stride
    if upload is not None:
        return picture_to_image(upload, resolution, entry.vae.image_channels)
    image = fmnist_test_image(int(index or 0))
    if entry.vae.image_channels != 1 or resolution != image.shape[-1]:
        raise ValueError("this generator's VAE does not take Fashion-MNIST images: upload a picture")
    return image


def build_edit_section(entries: dict[str, Entry], max_images: int) -> None:
    """The editing controls and outputs, inside the caller's gr.Blocks; API endpoint ``/edit`` takes (model, test
    image index, upload, kept region, painting, class name, images, cfg, temperature, num_iter, seed) and streams
    (original | kept region, results, status)."""
    import gradio as gr

    names = list(entries)
    first = entries[names[0]]
    gr.Markdown("## Edit an image\nKeep a region of a test image (or your own), pick a class, and watch the "
                "generator fill in the rest: inpainting, outpainting, or a region regenerated as another class.")
    with gr.Row():
        with gr.Column(scale=1):
            model = gr.Dropdown(names, value=names[0], label="generator (family: weights)")
            index = gr.Number(value=0, precision=0, label="Fashion-MNIST test image (0-9999)")
            upload = gr.Image(label="or upload a picture", type="numpy", format="png")
            region = gr.Radio([*KEEP_PRESETS, PAINTED], value="left", label="region kept")
            editor = gr.ImageEditor(label="painting (with 'painted'): the painted part is regenerated",
                                    type="numpy", format="png")
            label = gr.Dropdown(first.classes, value=first.classes[0], type="index", label="class to generate")
            count = gr.Slider(1, max_images, value=min(4, max_images), step=1, label="results")
            cfg = gr.Slider(1.0, 10.0, value=first.defaults.get("cfg") or 1.0, step=0.1, label="cfg")
            temperature = gr.Slider(0.05, 2.0, value=first.defaults.get("temperature", 1.0), step=0.05,
                                    label="temperature")
            num_iter = gr.Slider(1, 64, value=first.defaults.get("num_iter", 16), step=1, label="num_iter")
            seed = gr.Number(value=0, precision=0, label="seed")
            button = gr.Button("Edit", variant="primary")
        with gr.Column(scale=2):
            header = gr.Image(label="original | kept region", type="numpy", format="png")
            results = gr.Image(label="results (the region fills in step by step)", type="numpy", format="png")
            status = gr.Textbox(label="progress and time", interactive=False)

    def on_edit(name, index_, upload_, region_, editor_, class_index, n, cfg_, temperature_, num_iter_, seed_):
        if name not in entries:
            raise gr.Error(f"unknown generator {name!r}")
        entry = entries[name]
        try:
            (gh, gw), _ = token_grid(entry.model)
            keep = painted_keep(editor_, gh, gw) if region_ == PAINTED else keep_region(region_, gh, gw)
            image = request_image(entry, index_, upload_)
            options = {"cfg": cfg_, "temperature": temperature_, "num_iter": int(num_iter_)}
            yield from drop_repeats(edit_stream(entry, image, keep, int(class_index), int(n), int(seed_ or 0),
                                                options, max_images), gr.skip(), pictures=2)
        except ValueError as error:
            raise gr.Error(str(error)) from None

    model.change(lambda name: gr.Dropdown(choices=entries[name].classes, value=entries[name].classes[0]),
                 model, label)
    button.click(on_edit, [model, index, upload, region, editor, label, count, cfg, temperature, num_iter, seed],
                 [header, results, status], api_name="edit")
