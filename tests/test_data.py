import gzip
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from tokenbridge import data
from tokenbridge.data import FASHION_MNIST_CLASSES, FashionMNIST, ImageFolder, as_tensors, load_fashion_mnist

REAL = data.fashion_mnist_root(None)
has_real = pytest.mark.skipif(
    not (REAL / "t10k-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST not installed (dataset-fashion-mnist)"
)


def write_idx(folder, split, images, labels, image_magic=2051):
    names = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}[split]
    n, h, w = images.shape
    with gzip.open(folder / names[0], "wb") as f:
        f.write(struct.pack(">4i", image_magic, n, h, w) + images.astype(np.uint8).tobytes())
    with gzip.open(folder / names[1], "wb") as f:
        f.write(struct.pack(">2i", 2049, len(labels)) + labels.astype(np.uint8).tobytes())


@has_real
def test_real_test_split():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [1000] * 10
    assert len(FASHION_MNIST_CLASSES) == 10


@has_real
def test_as_tensors_padding_and_range():
    x, y = as_tensors("test", limit=16)
    assert x.shape == (16, 1, 32, 32) and y.shape == (16,) and y.dtype == torch.long
    assert x.min() >= -1 and x.max() <= 1
    # The 2-pixel border is padding with the background value -1.
    assert torch.all(x[..., :2, :] == -1) and torch.all(x[..., -2:, :] == -1)
    assert torch.all(x[..., :, :2] == -1) and torch.all(x[..., :, -2:] == -1)
    ds = FashionMNIST("test", limit=5)
    img, label = ds[3]
    assert len(ds) == 5 and img.shape == (1, 32, 32) and isinstance(label, int)
    assert torch.equal(img, x[3])


def test_tiny_idx_files_from_root(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 1])
    write_idx(tmp_path, "train", images, labels)
    got_x, got_y = load_fashion_mnist("train", root=tmp_path)
    assert np.array_equal(got_x, images) and np.array_equal(got_y, labels)
    x, _ = as_tensors("train", root=tmp_path)
    assert torch.allclose(x[:, 0, 2:30, 2:30], torch.from_numpy(images).float() / 127.5 - 1)


def test_env_variable_root(tmp_path, monkeypatch):
    write_idx(tmp_path, "test", np.zeros((2, 28, 28), np.uint8), np.array([1, 2]))
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(tmp_path))
    assert load_fashion_mnist("test")[1].tolist() == [1, 2]


def test_missing_files_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz.*apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("val", root=tmp_path)


def test_corrupt_files(tmp_path):
    write_idx(tmp_path, "test", np.zeros((2, 28, 28), np.uint8), np.array([1, 2]), image_magic=1234)
    with pytest.raises(ValueError, match="magic"):
        load_fashion_mnist("test", root=tmp_path)
    write_idx(tmp_path, "test", np.zeros((2, 28, 28), np.uint8), np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="2 images but .* 3 labels"):
        load_fashion_mnist("test", root=tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="gzip"):
        load_fashion_mnist("test", root=tmp_path)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:  # truncated payload
        f.write(struct.pack(">4i", 2051, 2, 28, 28) + bytes(100))
    with pytest.raises(ValueError, match="does not match"):
        load_fashion_mnist("test", root=tmp_path)


def test_image_folder(tmp_path):
    for cls, color in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (40 + 10 * i, 30), color).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dogs" / "notes.txt").write_text("ignored")
    ds = ImageFolder(tmp_path, resolution=16)
    assert ds.classes == ["cats", "dogs"] and len(ds) == 4
    x, label = ds[0]
    assert x.shape == (3, 16, 16) and label == 0
    assert torch.allclose(x[0], torch.ones(16, 16)) and torch.allclose(x[2], -torch.ones(16, 16))
    x, label = ds[3]
    assert label == 1 and torch.allclose(x[2], torch.ones(16, 16))
    grey, _ = ImageFolder(tmp_path, resolution=8, channels=1)[0]
    assert grey.shape == (1, 8, 8) and grey.min() >= -1 and grey.max() <= 1


def test_image_folder_flat_and_errors(tmp_path):
    Image.new("L", (10, 10), 128).save(tmp_path / "a.jpg")
    ds = ImageFolder(tmp_path, resolution=4)
    assert len(ds) == 1 and ds[0][1] == 0 and ds[0][0].shape == (3, 4, 4)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------- hardening: pixels
def one_pixel_value(ds, i=0):
    """The image of item i back in 0..255 (float), channel 0, all pixels (the test images are constant)."""
    x, _ = ds[i]
    return ((x + 1) * 127.5).round()


def old_pipeline(path, resolution, channels):
    """The pre-hardening reading of an 8-bit image, kept to prove valid images stay bit-identical."""
    with Image.open(path) as im:
        im = im.convert("RGB" if channels == 3 else "L")
        w, h = im.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s)).resize((resolution,) * 2, Image.BICUBIC)
        return data.from_uint8(np.array(im)[None])[0]


def test_valid_8bit_images_bit_identical(tmp_path):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (41, 29), dtype=np.uint8)).save(tmp_path / "grey.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).convert("P").save(tmp_path / "pal.gif")
    for channels in (1, 3):
        ds = ImageFolder(tmp_path, resolution=16, channels=channels)
        for i, (path, _) in enumerate(ds.samples):
            assert torch.equal(ds[i][0], old_pipeline(path, 16, channels)), path.name


def test_high_bit_depth_and_float_images(tmp_path):
    Image.fromarray(np.full((8, 8), 128 * 257, np.uint16)).save(tmp_path / "a16.png")  # opens as I;16
    Image.fromarray(np.full((8, 8), 0.25, np.float32)).save(tmp_path / "b_float.tif")  # mode F
    Image.fromarray(np.full((8, 8), 7.0, np.float32)).save(tmp_path / "c_float_over.tif")  # clipped to 1
    Image.fromarray(np.full((8, 8), 1000 * 257, np.int32).clip(0, 65535).astype(np.uint16)).save(tmp_path / "d.tif")
    ds = ImageFolder(tmp_path, resolution=4, channels=1)
    assert [p.name for p, _ in ds.samples] == ["a16.png", "b_float.tif", "c_float_over.tif", "d.tif"]
    assert Image.open(tmp_path / "a16.png").mode.startswith("I") and Image.open(tmp_path / "b_float.tif").mode == "F"
    assert torch.all(one_pixel_value(ds, 0) == 128)  # 16-bit / 257, not near-white
    assert torch.all(one_pixel_value(ds, 1) == 64)  # round(0.25 * 255), not all -1
    assert torch.all(one_pixel_value(ds, 2) == 255)
    assert torch.all(one_pixel_value(ds, 3) == 255)  # 257000 clipped to the 16-bit maximum
    rgb = ImageFolder(tmp_path, resolution=4, channels=3)[0][0]
    assert rgb.shape == (3, 4, 4) and torch.all(((rgb + 1) * 127.5).round() == 128)


def test_mode_I_without_bit_depth_is_16_bit():
    im = Image.fromarray(np.array([[0, 257, 65535, 70000, -5]], np.int32))  # mode I (older Pillow's 16-bit PNG)
    assert im.mode == "I"
    assert np.asarray(data._to_8bit(im, 16)).tolist() == [[0, 1, 255, 255, 0]]
    assert np.asarray(data._to_8bit(im, 12)).tolist() == [[0, 16, 255, 255, 0]]  # 257 * 255 / 4095 = 16.0


def test_alpha_palette_cmyk_modes(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # fully transparent red: composited on black
    Image.fromarray(rgba).save(tmp_path / "a_transparent.png")
    rgba[..., 3] = 255
    Image.fromarray(rgba).save(tmp_path / "b_opaque.png")
    Image.new("LA", (8, 8), (200, 128)).save(tmp_path / "c_la.png")
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 90, 90, 90] + [0] * 762)
    pal.save(tmp_path / "d_pal_transparent.png", transparency=1)
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(tmp_path / "e_cmyk.jpg")
    ds = ImageFolder(tmp_path, resolution=4, channels=3)
    assert torch.all(one_pixel_value(ds, 0) == 0)
    assert one_pixel_value(ds, 1)[:, 0, 0].tolist() == [200, 0, 0]
    assert torch.all(one_pixel_value(ds, 2) == 100)  # 200 * 128 / 255 on black
    assert torch.all(one_pixel_value(ds, 3) == 0)  # the transparent palette entry
    assert torch.all(one_pixel_value(ds, 4) >= 254)  # CMYK 0,0,0,0 is white
    assert ImageFolder(tmp_path, resolution=4, channels=1)[2][0].shape == (1, 4, 4)


def test_exif_orientation_applied(tmp_path):
    arr = np.zeros((32, 32), np.uint8)
    arr[:16, :16] = 255  # stored: white top-left quadrant
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(arr).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    x = one_pixel_value(ImageFolder(tmp_path, resolution=8, channels=1))[0]
    assert x[:4, 4:].mean() > 200 and x[:4, :4].mean() < 50 and x[4:].mean() < 50  # displayed: top-right


# ---------------------------------------------------------------------------------------------- hardening: labels
def test_top_level_images_beside_class_folders_are_an_error(tmp_path):
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        Image.new("L", (8, 8), 5).save(tmp_path / cls / "x.png")
    Image.new("L", (8, 8)).save(tmp_path / "stray1.png")
    Image.new("L", (8, 8)).save(tmp_path / "stray2.jpg")
    with pytest.raises(ValueError, match=r"has 2 image file\(s\) directly in it .*stray1.png.*beside class"):
        ImageFolder(tmp_path, resolution=4)


def test_hidden_junk_and_empty_folders(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.new("L", (8, 8), 5).save(tmp_path / cls / "x.png")
    (tmp_path / "a" / "._x.png").write_bytes(b"\x00\x05\x16\x07AppleDouble resource fork")
    Image.new("L", (8, 8)).save(tmp_path / "a" / ".hidden.png")
    for junk in (".git", "__MACOSX", ".thumbs"):
        (tmp_path / junk).mkdir()
        (tmp_path / junk / "._y.jpg").write_bytes(b"junk")
        Image.new("L", (8, 8)).save(tmp_path / junk / "z.png")
    (tmp_path / "._stray.jpg").write_bytes(b"junk")  # AppleDouble at the top: not an image beside the classes
    ds = ImageFolder(tmp_path, resolution=4)
    assert ds.classes == ["a", "b"] and [label for _, label in ds.samples] == [0, 1] and ds.skipped == []
    (tmp_path / "c_empty").mkdir()
    with pytest.warns(UserWarning, match="without images: c_empty"):
        assert ImageFolder(tmp_path, resolution=4).classes == ["a", "b", "c_empty"]
    flat = tmp_path / "a"
    (flat / "thumbs").mkdir()  # an empty sub-folder beside flat images: still one class
    assert ImageFolder(flat, resolution=4).classes == ["a"]


# ---------------------------------------------------------------------------------------------- hardening: unreadable
def make_bad_files(folder):
    """A good image plus one of each unreadable kind; returns the bad names."""
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (16, 16), (1, 2, 3)).save(folder / "good.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "whole.jpg")
    raw = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "whole.png")
    raw = (folder / "whole.png").read_bytes()
    (folder / "truncated.png").write_bytes(raw[: len(raw) // 2])
    (folder / "notes.png").write_text("this is text, not a PNG")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "whole.bmp")
    raw = (folder / "whole.bmp").read_bytes()
    (folder / "truncated.bmp").write_bytes(raw[: len(raw) // 2])
    return {"truncated.jpg", "truncated.png", "notes.png", "truncated.bmp"}


def test_unreadable_files_skipped_with_one_warning(tmp_path):
    bad = make_bad_files(tmp_path)
    with pytest.warns(UserWarning, match=r"skipped 4 unreadable image file\(s\) of 8 in .*--strict-images") as rec:
        ds = ImageFolder(tmp_path, resolution=8)
    assert len(rec) == 1
    assert {p.name for p, _ in ds.skipped} == bad and len(ds) == 4
    reasons = {p.name: why for p, why in ds.skipped}
    assert "cannot identify image file" in reasons["notes.png"] and "truncated" in reasons["truncated.jpg"]
    assert all(str(tmp_path) not in why for why in reasons.values())
    assert all(ds[i][0].shape == (3, 8, 8) for i in range(len(ds)))


def test_unreadable_files_strict(tmp_path):
    make_bad_files(tmp_path)
    with pytest.raises(ValueError, match=r"notes\.png: unreadable image \(cannot identify image file\)"):
        ImageFolder(tmp_path, resolution=8, strict=True)
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "x.jpg").write_bytes(b"nope")
    with pytest.raises(ValueError, match=r"no readable images in .*x\.jpg"):
        ImageFolder(only_bad)


def test_getitem_decode_failure_names_the_file(tmp_path):
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "ok.png")
    ds = ImageFolder(tmp_path, resolution=4)
    (tmp_path / "ok.png").write_bytes(b"replaced by garbage after listing")
    with pytest.raises(ValueError, match=r"ok\.png: cannot decode the image"):
        ds[0]


# ---------------------------------------------------------------------------------------------- hardening: large
def huge_png(path, side=14000):
    """A valid 1-bit side x side PNG of zeros in a few KB (side**2 pixels: beyond PIL's default limit)."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    rows = zlib.compress(bytes(side * (1 + (side + 7) // 8)), 9)  # filter byte 0 + packed bits per row
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def test_large_image_clear_error(tmp_path):
    huge_png(tmp_path / "huge.png")
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ValueError, match=r"huge\.png: 14000x14000 = 196,000,000 pixels .*--allow-large-images"):
        ImageFolder(tmp_path, resolution=4)
    assert Image.MAX_IMAGE_PIXELS == limit


def test_large_image_allowed(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 = 4096 pixels counts as large (over 2x: an error)
    Image.new("L", (64, 64), 77).save(tmp_path / "big.png")
    Image.new("L", (64, 48), 99).save(tmp_path / "big2.png")
    with pytest.raises(ValueError, match=r"2 images in .* limit of 1,000 pixels: .*big\.png \(64x64\)"):
        ImageFolder(tmp_path, resolution=4)
    (tmp_path / "big2.png").unlink()
    with pytest.raises(data.ImageTooLargeError, match=r"big\.png: 64x64 = 4,096 pixels"):
        ImageFolder(tmp_path, resolution=4)
    ds = ImageFolder(tmp_path, resolution=4, channels=1, allow_large_images=True)
    assert torch.all(one_pixel_value(ds) == 77)
    assert Image.MAX_IMAGE_PIXELS == 1000  # lifted for that open only
    with ThreadPoolExecutor(4) as pool:  # threads reading at once leave the process-wide limit as it was
        items = list(pool.map(lambda i: ds[0][0], range(16)))
    assert all(torch.equal(x, items[0]) for x in items)
    assert Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(data.ImageTooLargeError):  # the flag is per dataset, read at every open
        ImageFolder(tmp_path, resolution=4)


# ---------------------------------------------------------------------------------------------- hardening: arguments
@pytest.mark.parametrize("limit", [-5, 0, 2.5, True])
def test_limit_must_be_positive(tmp_path, limit):
    write_idx(tmp_path, "test", np.zeros((3, 28, 28), np.uint8), np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="limit"):
        as_tensors("test", limit=limit, root=tmp_path)
    with pytest.raises(ValueError, match="limit"):
        FashionMNIST("test", root=tmp_path, limit=limit)
    assert len(FashionMNIST("test", root=tmp_path, limit=2)) == 2


def test_image_folder_arguments(tmp_path):
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    for resolution in (0, -3, 2.5):
        with pytest.raises(ValueError, match="resolution"):
            ImageFolder(tmp_path, resolution=resolution)
    for channels in (0, 2, 4, True):
        with pytest.raises(ValueError, match="channels"):
            ImageFolder(tmp_path, resolution=4, channels=channels)
    with pytest.raises(ValueError, match="not a folder"):
        ImageFolder(tmp_path / "a.png")
