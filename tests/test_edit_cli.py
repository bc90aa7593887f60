"""`tokenbridge edit` end to end on the shipped TokenBridge generator (few MAR steps), and the library helpers it
is made of: presets, painted masks, image sources, bad input named before any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tokenbridge import cli
from tokenbridge import edit as editing
from tokenbridge.checkpoint import load_generator
from tokenbridge.data import as_tensors
from tokenbridge.edit import encode_images, image_mask_to_tokens, keep_region, read_mask
from tokenbridge.tokens import latents_to_indices

FAST = ["--num-iter", "2", "--cfg", "2.0"]


def test_edit_writes_the_grid_and_an_npz_whose_kept_tokens_are_the_originals(tmp_path):
    out = tmp_path / "out"
    cli.main(["edit", "--model", "fmnist", "--images", "fmnist", "--split", "test", "--limit", "3", "--keep", "left",
              "--labels", "5", "--per-image", "2", "--out", str(out), "--npz", *FAST])
    assert Image.open(out / "edits.png").size[0] > 4 * 96  # original | kept | 2 results, 3x upscaled
    data = np.load(out / "edits.npz")
    assert set(data.files) == {"images", "labels", "keep", "source_index"}
    assert data["images"].shape == (6, 32, 32, 1) and data["images"].dtype == np.uint8
    assert data["labels"].tolist() == [5] * 6 and data["source_index"].tolist() == [0, 0, 1, 1, 2, 2]
    assert data["keep"].shape == (6, 8, 8) and data["keep"].dtype == bool
    assert data["keep"][:, :, :4].all() and not data["keep"][:, :, 4:].any()
    # the results' tokens on the kept half are the original's: re-encoding the uint8 result is close to them
    model = load_generator("fmnist")
    originals, _ = as_tensors("test", limit=3)
    ref = latents_to_indices(model.quantizer, encode_images(model, originals))
    again = latents_to_indices(model.quantizer, encode_images(model, torch.from_numpy(
        data["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1))
    left = (again[:, :, :3] - ref[data["source_index"]][:, :, :3]).abs().float().mean()  # away from the seam
    right = (again[:, :, 5:] - ref[data["source_index"]][:, :, 5:]).abs().float().mean()
    assert left < right


def test_a_labelled_folder_and_a_painted_mask_drive_the_edit(tmp_path):
    images, labels = as_tensors("test", limit=2)
    for i, (x, y) in enumerate(zip(images, labels)):
        folder = tmp_path / "data" / f"c{int(y)}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(((x[0] + 1) * 127.5).round().byte().numpy()).save(folder / f"{i}.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255  # keep the center: outpainting
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    cli.main(["edit", "--images", f"folder:{tmp_path / 'data'}", "--keep", str(tmp_path / "mask.png"),
              "--out", str(out), "--npz", "--vae", "fmnist", *FAST])
    data = np.load(out / "edits.npz")
    assert data["keep"].shape == (2, 8, 8) and data["keep"].sum() == 2 * 16
    assert data["labels"].tolist() == [0, 1]  # the class sub-folders' indices (c2, c9), as cache-latents labels them


def test_a_single_image_needs_a_class_and_bad_requests_fail_before_work(tmp_path, monkeypatch, capsys):
    picture = tmp_path / "one.png"
    Image.fromarray(np.full((32, 32), 200, np.uint8)).save(picture)
    monkeypatch.setattr(editing, "edit", lambda *a, **k: pytest.fail("editing started"))
    cases = [(["--images", str(picture), "--keep", "left"], "has no labels: give the class"),
             (["--images", "fmnist", "--keep", "diagonal"], "--keep diagonal: no such mask image"),
             (["--images", "fmnist", "--keep", "left", "--labels", "11"], "--labels must lie in [0, 10]"),
             (["--images", "fmnist", "--keep", "left", "--labels", "1", "2"], "gives 2 classes for 8 images"),
             (["--images", str(tmp_path), "--keep", "left"], "is a folder: write folder:")]
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "small.png")
    cases.append((["--images", "fmnist", "--keep", str(tmp_path / "small.png")], "is 5x5; expected the token grid"))
    for argv, message in cases:
        with pytest.raises(SystemExit):
            cli.main(["edit", "--out", str(tmp_path / "out"), *argv])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_presets_and_painted_masks_on_the_token_grid(tmp_path):
    assert keep_region("left", 4, 4).tolist() == [[True, True, False, False]] * 4
    assert keep_region("bottom", 4, 4)[2:].all() and not keep_region("bottom", 4, 4)[:2].any()
    center = keep_region("center", 8, 8)
    assert center.sum() == 16 and center[2:6, 2:6].all()
    assert torch.equal(keep_region("border", 8, 8), ~center)
    painted = torch.ones(32, 32, dtype=torch.bool)
    painted[5, 9] = False  # one painted pixel regenerates its whole token
    tokens = image_mask_to_tokens(painted, 8, 8)
    assert tokens.sum() == 63 and not tokens[1, 2]
    Image.fromarray(np.where(painted.numpy(), 255, 0).astype(np.uint8)).save(tmp_path / "m.png")
    assert torch.equal(read_mask(tmp_path / "m.png", 8, 8, 32), tokens)
    with pytest.raises(ValueError, match="unknown kept region"):
        keep_region("middle", 8, 8)


def test_images_of_the_wrong_dtype_shape_channels_or_range_are_named_before_encoding(monkeypatch):
    model = load_generator("fmnist")
    vae = editing.resolve_vae(model)
    monkeypatch.setattr(vae, "encode", lambda *a, **k: pytest.fail("encoding started"))
    good = torch.zeros(2, 1, 32, 32)
    cases = [(good.to(torch.uint8), "images must be a float tensor"),
             (good[0], r"images must be \[N, 1, 32, 32\] \(the VAE's 1 channel"),
             (good.expand(2, 3, 32, 32), "the VAE's 1 channel"),
             (good[..., :28, :28], "images must be 32x32 .* got 28x28"),
             (good + 2, r"lie in \[-1, 1\]")]
    for images, message in cases:
        with pytest.raises(ValueError, match=message):
            encode_images(model, images, vae=vae)
    with pytest.raises(ValueError, match=r"keep must be bool \[N=2, 8, 8\]"):
        editing.edit(model, good, torch.ones(2, 4, 4, dtype=torch.bool), [0, 1], vae=vae)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\]"):
        editing.edit(model, good, torch.ones(8, 8, dtype=torch.bool), [0, 12], vae=vae)
