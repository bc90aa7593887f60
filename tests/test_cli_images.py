"""The CLI on users' image folders (`reconstruct --images`, `cache-latents --data folder:`) as a user runs it:
bad inputs end with `tokenbridge <command>: error: <message>` and exit 2 before any work; odd but valid images
run. The cases call `cli.main` in-process (the one subprocess run of the CLI is in test_cli_errors.py)."""
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tokenbridge import cli


def reconstruct_args(images, out):
    return ["reconstruct", "--images", str(images), "--num-images", "4", "--resolution", "32", "--levels", "8",
            "--ranges", "3", "--out", str(out)]


def cache_args(images, out):
    return ["cache-latents", "--data", f"folder:{images}", "--channels", "1", "--resolution", "32",
            "--levels", "8", "--out", str(out)]


def huge_png(path, side=14000):
    """A valid 1-bit side x side PNG of zeros in a few KB (beyond PIL's default decompression-bomb limit)."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    rows = zlib.compress(bytes(side * (1 + (side + 7) // 8)), 9)
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def odd_but_valid_folder(root):
    """One class folder of valid images in the modes that used to come out wrong, plus junk to ignore/skip."""
    folder = root / "cls"
    folder.mkdir(parents=True)
    Image.fromarray(np.full((40, 40), 30000, np.uint16)).save(folder / "a16.png")
    Image.fromarray(np.full((40, 40), 0.5, np.float32)).save(folder / "b_float.tif")
    Image.new("RGBA", (40, 40), (200, 100, 0, 128)).save(folder / "c_rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("L", (40, 32), 90).save(folder / "d_rotated.jpg", exif=exif)
    (folder / "._d_rotated.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # ignored, not even counted
    (folder / "notes.png").write_text("text with an image name")  # skipped with a warning
    return root


def test_stray_top_level_images(tmp_path, cli_error):
    root = tmp_path / "data"
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        Image.new("L", (32, 32), 100).save(root / cls / "0.png")
    Image.new("L", (32, 32), 100).save(root / "stray.png")
    err = cli_error(reconstruct_args(root, tmp_path / "out"))
    assert "tokenbridge reconstruct: error:" in err
    assert "1 image file(s) directly in it (stray.png) beside class sub-folders" in err
    assert not (tmp_path / "out").exists()


def test_odd_modes_run_and_unreadable_file_is_skipped(tmp_path, capsys):
    root = odd_but_valid_folder(tmp_path / "data")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file\(s\) of 5 .*notes\.png"):
        cli.main(reconstruct_args(root, tmp_path / "out"))
    assert (tmp_path / "out" / "table1.md").is_file() and "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("make_args", [reconstruct_args, cache_args])
def test_strict_images_names_the_file(tmp_path, cli_error, make_args):
    root = odd_but_valid_folder(tmp_path / "data")
    err = cli_error(make_args(root, tmp_path / "out.safetensors") + ["--strict-images"])
    assert f"tokenbridge {make_args(root, '')[0]}: error: {root / 'cls' / 'notes.png'}: unreadable image" in err


@pytest.mark.parametrize("make_args", [reconstruct_args, cache_args])
def test_large_image_names_file_size_and_flag(tmp_path, cli_error, make_args):
    (tmp_path / "data").mkdir()
    huge_png(tmp_path / "data" / "huge.png")
    err = cli_error(make_args(tmp_path / "data", tmp_path / "out.safetensors"))
    assert "huge.png: 14000x14000 = 196,000,000 pixels" in err and "--allow-large-images" in err


def test_allow_large_images_opens_them(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 40x40 image counts as large
    (tmp_path / "data").mkdir()
    for i in range(2):  # the calibrated quantizer rows need two images' latents
        Image.new("L", (40, 40), 60 + i).save(tmp_path / "data" / f"big{i}.png")
    cli.main(reconstruct_args(tmp_path / "data", tmp_path / "out") + ["--allow-large-images"])
    assert (tmp_path / "out" / "table1.md").is_file() and Image.MAX_IMAGE_PIXELS == 1000


def test_bad_numbers(tmp_path, cli_error):
    (tmp_path / "data").mkdir()
    Image.new("L", (40, 40), 60).save(tmp_path / "data" / "a.png")
    err = cli_error(cache_args(tmp_path / "data", tmp_path / "t.safetensors") + ["--limit", "-5"])
    assert "--limit" in err
    err = cli_error(cache_args(tmp_path / "data", tmp_path / "t.safetensors")[:-6] + ["--channels", "2",
                    "--out", str(tmp_path / "t.safetensors")])
    assert "channels" in err
