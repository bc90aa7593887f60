"""Datasets: the embedded Fashion-MNIST default and users' own image folders.

Fashion-MNIST is read from the four standard idx ``.gz`` files (Debian package ``dataset-fashion-mnist`` installs
them in /usr/share/datasets/fashion-mnist). Images come out as float tensors in [-1, 1], 28x28 zero-padded to
32x32 with the background value -1 so that an f4 VAE gives an 8x8 latent grid.
"""

from __future__ import annotations

import contextlib
import gzip
import operator
import os
import struct
import threading
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from .images import from_uint8

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "TOKENBRIDGE_FASHION_MNIST"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IMAGE_MAGIC, _LABEL_MAGIC = 2051, 2049
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Folders that tools leave beside real data: macOS zip resource forks, Synology thumbnails (valid JPEGs!).
JUNK_FOLDERS = frozenset({"__MACOSX", "@eaDir"})
# Transparent pixels are composited on black, the background (-1) of the embedded Fashion-MNIST data and of the
# padding in `to_model_images`; a fully opaque image is unchanged.
ALPHA_BACKGROUND = 0
LARGE_IMAGES_FLAG = "--allow-large-images"
STRICT_IMAGES_FLAG = "--strict-images"


def _positive_int(name: str, value: object) -> int:
    """``value`` as an int >= 1, else a ValueError naming ``name`` (bools and fractional numbers are refused)."""
    try:
        number = operator.index(value)  # refuses 2.5 and "3" instead of truncating them
    except TypeError:
        number = None
    if number is None or isinstance(value, bool) or number < 1:
        raise ValueError(f"{name} must be a positive whole number, got {value!r}")
    return number


def fashion_mnist_root(root: str | os.PathLike | None = None) -> Path:
    """Folder holding the idx files: ``root``, else $TOKENBRIDGE_FASHION_MNIST, else the Debian location."""
    if root is None:
        root = os.environ.get(FASHION_MNIST_ENV) or DEFAULT_FASHION_MNIST_ROOT
    return Path(root)


def _read_idx(path: Path, magic: int, header_ints: int) -> tuple[np.ndarray, tuple[int, ...]]:
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable gzip idx file ({e})") from e
    header = 4 * header_ints
    if len(raw) < header:
        raise ValueError(f"{path}: file too short for an idx header ({len(raw)} bytes)")
    fields = struct.unpack(f">{header_ints}i", raw[:header])
    if fields[0] != magic:
        raise ValueError(f"{path}: bad idx magic number {fields[0]} (expected {magic})")
    dims = fields[1:]
    expected = int(np.prod(dims)) + header
    if len(raw) != expected:
        raise ValueError(f"{path}: size {len(raw)} bytes does not match header dims {dims} ({expected} bytes)")
    return np.frombuffer(raw, np.uint8, offset=header), dims


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load a Fashion-MNIST split.

    Returns (images uint8 [N, 28, 28] in 0..255, labels int64 [N] in 0..9). Works with the same idx files from any
    folder (pass ``root`` or set $TOKENBRIDGE_FASHION_MNIST).
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = fashion_mnist_root(root)
    paths = [folder / name for name in _FILES[split]]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files missing in {folder}: {', '.join(missing)}. Install them with "
            f"`sudo apt-get install dataset-fashion-mnist`, or download the idx .gz files and pass root= "
            f"(or set ${FASHION_MNIST_ENV})."
        )
    images, (n, h, w) = _read_idx(paths[0], _IMAGE_MAGIC, 4)
    labels, (m,) = _read_idx(paths[1], _LABEL_MAGIC, 2)
    if n != m:
        raise ValueError(f"{paths[0].name} has {n} images but {paths[1].name} has {m} labels")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{paths[1]}: label {labels.max()} out of range 0..9")
    return images.reshape(n, h, w).copy(), labels.astype(np.int64)


def to_model_images(images: np.ndarray | torch.Tensor, pad_to: int = 32) -> torch.Tensor:
    """uint8 [N, H, W] -> float [N, 1, pad_to, pad_to] in [-1, 1], padded with -1 (the black background)."""
    x = from_uint8(images)
    h, w = x.shape[-2:]
    if h > pad_to or w > pad_to:
        raise ValueError(f"images {h}x{w} are larger than pad_to={pad_to}")
    top, left = (pad_to - h) // 2, (pad_to - w) // 2
    return torch.nn.functional.pad(x, (left, pad_to - w - left, top, pad_to - h - top), value=-1.0)


def as_tensors(
    split: str = "train", limit: int | None = None, root: str | os.PathLike | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole split in memory: (images float [N, 1, 32, 32] in [-1, 1], labels long [N]); first ``limit`` items.

    ``limit`` must be None (all) or >= 1; anything else is a ValueError.
    """
    if limit is not None:  # checked before the load: a negative slice bound would mean "all but the last -limit"
        limit = _positive_int("limit", limit)
    images, labels = load_fashion_mnist(split, root)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return to_model_images(images), torch.from_numpy(labels)


class FashionMNIST(Dataset):
    """Fashion-MNIST as (image float [1, 32, 32] in [-1, 1], label int). Kept in memory (60k x 32x32 floats)."""

    classes = FASHION_MNIST_CLASSES

    def __init__(self, split: str = "train", root: str | os.PathLike | None = None, limit: int | None = None):
        self.images, self.labels = as_tensors(split, limit, root)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


# ---------------------------------------------------------------------------------------------- reading one image
# Pixel modes a file may decode to that `_to_8bit` turns into L or RGB. LAB is left out on purpose: PIL copies its
# channels into RGB without a colour transform, which would be silently wrong colours.
_INT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_SUPPORTED_MODES = frozenset({"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV", "F", *_INT_MODES, *_ALPHA_MODES})
# PIL's decompression-bomb limit is one process-wide setting, Image.MAX_IMAGE_PIXELS. Every open here lifts it
# under this lock and applies the limit itself, so a large image that is allowed does not lift it for other
# threads of this module. (DataLoader workers are processes, each with its own copy.)
_PIXEL_LIMIT_LOCK = threading.Lock()


class ImageTooLargeError(ValueError):
    """An image over PIL's decompression-bomb pixel limit, opened without ``allow_large_images``.

    Attributes ``path``, ``size`` (w, h) and ``limit``; built by `_too_large` so that the plain one-message
    constructor still works (DataLoader workers and pickle rebuild exceptions from their message).
    """

    path: Path
    size: tuple[int, int]
    limit: int


def _too_large(path: Path, size: tuple[int, int], limit: int) -> ImageTooLargeError:
    w, h = size
    error = ImageTooLargeError(
        f"{path}: {w}x{h} = {w * h:,} pixels is over PIL's decompression-bomb limit of {limit:,} pixels; if you "
        f"trust the file, pass {LARGE_IMAGES_FLAG} (ImageFolder(..., allow_large_images=True))"
    )
    error.path, error.size, error.limit = path, size, limit
    return error


@contextlib.contextmanager
def _pixel_limit_lifted() -> Iterator[int | None]:
    """Lift Image.MAX_IMAGE_PIXELS while the block runs; yields the limit in force before (None: no limit)."""
    with _PIXEL_LIMIT_LOCK:
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield limit
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def _open(path: Path, allow_large: bool) -> tuple[Image.Image, bool]:
    """Open ``path`` lazily (header only) -> (image, is_large). Raises ImageTooLargeError for a large image when
    not allowed, before any pixel is decoded; PIL's own errors (unidentified, corrupt header) pass through."""
    with _pixel_limit_lifted() as limit:
        im = Image.open(path)  # reads the header only: the size is known, no pixel is decoded yet
    large = limit is not None and max(im.width, 1) * max(im.height, 1) > limit  # PIL's own pixel count
    if large and not allow_large:
        im.close()
        raise _too_large(path, im.size, limit)
    return im, large


def _bit_depth(im: Image.Image) -> int:
    """Bits per sample of an integer-mode image: TIFF says it (e.g. 12-bit scans in I;16); otherwise 16."""
    tags = getattr(im, "tag_v2", None)  # only TIFF images have it
    bits = tags.get(258) if tags is not None else None  # 258 = BitsPerSample, a tuple (one entry per channel)
    if isinstance(bits, tuple):
        bits = bits[0] if bits else None
    return int(bits) if isinstance(bits, int) and 1 <= bits <= 32 else 16


def _to_8bit(im: Image.Image, bits: int) -> Image.Image:
    """Any supported mode -> an 8-bit mode that PIL converts to L/RGB correctly (values in [0, 255]).

    I;16 / I: [0, 2**bits - 1] scaled to [0, 255] (16 bits: / 257), values outside clipped. F: assumed in [0, 1],
    clipped (NaN -> 0), times 255. Alpha modes: composited on ALPHA_BACKGROUND (black). Others are left to PIL.
    """
    if im.mode in _INT_MODES:
        top = float(2**bits - 1)
        arr = np.clip(np.asarray(im, dtype=np.float64), 0.0, top) * (255.0 / top)
        return Image.fromarray(np.round(arr).astype(np.uint8))  # uint8 [H, W] -> mode L
    if im.mode == "F":
        arr = np.clip(np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0), 0.0, 1.0) * 255.0
        return Image.fromarray(np.round(arr).astype(np.uint8))
    if im.mode == "P" and "transparency" in im.info:  # a palette with a transparent entry
        im = im.convert("RGBA")
    if im.mode in _ALPHA_MODES:
        rgba = im.convert("RGBA") if im.mode != "La" else im.convert("LA").convert("RGBA")  # PIL: no La -> RGBA
        background = Image.new("RGBA", rgba.size, (ALPHA_BACKGROUND,) * 3 + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im


def _read_image(path: Path, resolution: int, channels: int, allow_large: bool) -> np.ndarray:
    """Decode ``path`` -> uint8 [R, R] (channels 1) or [R, R, 3] in [0, 255]: EXIF orientation applied, every
    mode brought to 8 bits (`_to_8bit`), center crop to a square, bicubic resize to ``resolution``."""
    im, large = _open(path, allow_large)
    # PIL checks the limit again in crop() (and GIF frames): keep it lifted through an allowed large decode
    with im, (_pixel_limit_lifted() if large else contextlib.nullcontext()):
        im.load()  # the full decode: damage past the header (a truncated file) surfaces here
        bits = _bit_depth(im)  # read before exif_transpose, whose result is a plain copy without TIFF tags
        im = _to_8bit(ImageOps.exif_transpose(im), bits)
        im = im.convert("RGB" if channels == 3 else "L")
        w, h = im.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s)).resize((resolution,) * 2, Image.BICUBIC)
        return np.array(im)  # writable uint8 [R, R] ("L") or [R, R, 3] ("RGB")


def _jpeg_ends_cleanly(path: Path) -> bool:
    """Whether the file ends with the JPEG end-of-image marker (some writers pad it with zeros)."""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 64))
        return f.read().rstrip(b"\0").endswith(b"\xff\xd9")


def _check_image(path: Path, allow_large: bool) -> str | None:
    """Readability check of one file, as cheap as the format allows: None if readable, else the reason it is not.

    Every file: header and pixel mode. PNG: verify() (chunk CRCs, truncation) without decompressing. JPEG: a full
    decode only when the end-of-image marker is missing (truncated, or data appended after it). Other formats
    (BMP, GIF, TIFF, WebP) have no cheap integrity check and are rare in large datasets: a full decode.
    ImageTooLargeError is raised, not returned: a large image is an error to act on, not an unreadable file.
    """
    try:
        im, large = _open(path, allow_large)
        with im, (_pixel_limit_lifted() if large else contextlib.nullcontext()):
            if im.mode not in _SUPPORTED_MODES:
                return f"unsupported pixel mode {im.mode} (convert the file to RGB)"
            if im.format == "PNG":
                im.verify()
            elif im.format not in ("JPEG", "MPO") or not _jpeg_ends_cleanly(path):
                im.load()
    except (ImageTooLargeError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - a damaged file can make a PIL plugin raise almost anything
        return _reason(e, path)
    return None


def _reason(error: BaseException, path: Path) -> str:
    """A one-line reason without the path (the caller names it): PIL's OSErrors read well alone ("cannot identify
    image file"), others get their type."""
    text = str(error).replace(f" {str(path)!r}", "").replace(str(path), "").strip() or type(error).__name__
    return text if isinstance(error, OSError) else f"{type(error).__name__}: {text}"


def _is_hidden(relative: Path) -> bool:
    """Hidden files and folders (".x", macOS "._x" AppleDouble files) and known junk folders, at any depth."""
    return any(part.startswith(".") or part in JUNK_FOLDERS for part in relative.parts)


def _is_image_name(path: Path, root: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not _is_hidden(path.relative_to(root)) and path.is_file()


def _list_samples(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(classes, [(path, label)]) of a folder: sorted class sub-folders, or images directly in ``root`` (one class).

    Images directly in ``root`` beside class sub-folders that hold images are an error: they have no class.
    """
    entries = sorted(p for p in root.iterdir() if not _is_hidden(p.relative_to(root)))
    top = [p for p in entries if _is_image_name(p, root)]
    subdirs = [p for p in entries if p.is_dir()]
    per_class = {d: sorted(p for p in d.rglob("*") if _is_image_name(p, root)) for d in subdirs}
    class_dirs = [d for d in subdirs if per_class[d]]
    if top and class_dirs:
        raise ValueError(
            f"{root} has {len(top)} image file(s) directly in it ({_few(p.name for p in top)}) beside class "
            f"sub-folders ({_few(d.name for d in class_dirs)}): a folder of class sub-folders labels each image by "
            f"its sub-folder, so these have no class. Move them into a class sub-folder or out of {root}"
        )
    if top:
        return [root.name], [(p, 0) for p in top]
    empty = [d.name for d in subdirs if not per_class[d]]
    if class_dirs and empty:
        warnings.warn(f"class sub-folder(s) of {root} without images: {_few(empty)}; they are still classes "
                      f"(labels follow the sorted sub-folder names) but have no samples", stacklevel=3)
    return [d.name for d in subdirs], [(p, label) for label, d in enumerate(subdirs) for p in per_class[d]]


def _few(items: Iterable[str], shown: int = 3) -> str:
    """'a, b, c and 4 more': the first ``shown`` items and a count of the rest."""
    names = list(items)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


class ImageFolder(Dataset):
    """Users' own images: ``root/<class>/**/*.png`` (class = sorted sub-folder name; label = its index) or images
    directly in ``root`` (one class, label 0). Items are (image float [channels, R, R] in [-1, 1], label int);
    EXIF orientation applied, center crop to a square, bicubic resize to R = ``resolution``.

    Pixels: every mode is first brought to 8-bit [0, 255], then to L (channels=1, ITU-R 601 luma) or RGB
    (channels=3). 16-bit (I;16, I) images are scaled by 255 / (2**bits - 1), i.e. / 257 for 16 bits (TIFFs give
    their bit depth, e.g. 12); float (F) images are assumed in [0, 1] and clipped; transparent pixels (RGBA, LA,
    PA, palette transparency) are composited on black (ALPHA_BACKGROUND). LAB images are refused as unreadable.

    Files: hidden files and folders (".x", macOS "._x" AppleDouble), ``__MACOSX`` and ``@eaDir`` are ignored, as
    are files without an image extension. Images directly in ``root`` beside class sub-folders are a ValueError.

    Readability is checked at construction, as cheaply as the format allows: header and mode of every file; PNG:
    chunk CRCs (``verify()``); JPEG: a full decode only if the end marker is missing; BMP/GIF/TIFF/WebP: a full
    decode. Unreadable files are skipped by default, listed in ``self.skipped`` as (path, reason) with one warning
    (an error if none is left); ``strict=True`` raises a ValueError naming the first one instead. Damage the check
    cannot see (a JPEG broken before its end marker, a file changed since) makes ``__getitem__`` raise a ValueError
    naming the file. An image over PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS) is a ValueError
    (ImageTooLargeError) at construction naming file and size, unless ``allow_large_images=True`` opens it.
    """

    def __init__(self, root: str | os.PathLike, resolution: int = 256, channels: int = 3, strict: bool = False,
                 allow_large_images: bool = False):
        self.resolution = _positive_int("resolution", resolution)
        if isinstance(channels, bool) or channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        self.root, self.channels = Path(root), int(channels)
        self.strict, self.allow_large_images = bool(strict), bool(allow_large_images)
        if not self.root.exists():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        if not self.root.is_dir():
            raise ValueError(f"image folder {self.root} is a file, not a folder")
        self.classes, listed = _list_samples(self.root)
        if not listed:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {self.root} or its sub-folders")
        self.samples: list[tuple[Path, int]] = []
        self.skipped: list[tuple[Path, str]] = []
        self._check_all(listed)

    def _check_all(self, listed: list[tuple[Path, int]]) -> None:
        """Fill samples/skipped from the listed files; every error comes before any image is decoded for use."""
        too_large: list[ImageTooLargeError] = []
        for path, label in listed:
            try:
                reason = _check_image(path, self.allow_large_images)
            except ImageTooLargeError as e:
                too_large.append(e)
                continue
            if reason is None:
                self.samples.append((path, label))
            elif self.strict:
                raise ValueError(f"{path}: unreadable image ({reason}); without {STRICT_IMAGES_FLAG} (strict=True) "
                                 f"unreadable files are skipped with a warning")
            else:
                self.skipped.append((path, reason))
        if len(too_large) == 1:
            raise too_large[0]
        if too_large:
            raise ValueError(
                f"{len(too_large)} images in {self.root} are over PIL's decompression-bomb limit of "
                f"{too_large[0].limit:,} pixels: {_few(f'{e.path} ({e.size[0]}x{e.size[1]})' for e in too_large)}; "
                f"if you trust them, pass {LARGE_IMAGES_FLAG} (ImageFolder(..., allow_large_images=True))")
        if self.skipped:
            summary = _few(f"{p.relative_to(self.root)} ({why})" for p, why in self.skipped)
            message = (f"skipped {len(self.skipped)} unreadable image file(s) of {len(listed)} in {self.root}: "
                       f"{summary}; ImageFolder.skipped lists them; {STRICT_IMAGES_FLAG} (strict=True) stops instead")
            if not self.samples:
                raise ValueError(f"no readable images in {self.root}: {message}")
            warnings.warn(message, stacklevel=3)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        try:
            arr = _read_image(path, self.resolution, self.channels, self.allow_large_images)
        except (ImageTooLargeError, MemoryError):
            raise
        except Exception as e:  # a damaged file can make a PIL plugin raise almost anything
            raise ValueError(f"{path}: cannot decode the image ({_reason(e, path)}); it passed the check when the "
                             f"folder was listed, so its data is damaged past that check or the file changed since: "
                             f"re-save or remove it") from e
        return from_uint8(arr[None])[0], label
