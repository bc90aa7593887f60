"""The demo page's editing section (`tokenbridge demo-ui`): pick a Fashion-MNIST test image or upload one, choose the
kept region (a preset, or paint the part to regenerate), pick the class, and watch the rest of the token grid fill
in step by step. Its API endpoint is ``/edit``; tokenbridge.ui builds the rest of the page."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

from .data import FashionMNIST
from .edit import KEEP_PRESETS, encode_images, image_mask_to_tokens, keep_region, token_grid, token_mask_to_latent
from .images import image_grid
from .ui import SCALE, Entry, check_request, drop_repeats

PAINTED = "painted (paint the part to regenerate)"
_TEST_IMAGES: dict[str, FashionMNIST] = {}  # loaded on first use, shared by requests


def test_image(index: int) -> torch.Tensor:
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
    image = test_image(int(index or 0))
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
