"""Image sources beyond folders: webdataset tar shards and local Hugging Face ``datasets`` folders.

`image_source` maps a ``--data`` spec to a map-style Dataset of (image float [C, R, R] in [-1, 1], label int):
``fmnist``, ``folder:PATH``, ``wds:PATTERN`` (`WebDatasetImages`) or ``hf:PATH`` (`HFImages`). Every source decodes
its images with ImageFolder's conversion (data.py): EXIF orientation, every PIL mode to 8 bits, center crop,
bicubic resize. The sources are map-style (index -> item) so that DistributedSampler and exact resume work.

webdataset and datasets are optional (``pip install 'tokenbridge[scale]'``) and imported only when used.
"""

from __future__ import annotations

import glob
import importlib
import io
import operator
import os
import re
import tarfile
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from .data import (
    _SUPPORTED_MODES,
    IMAGE_EXTENSIONS,
    FashionMNIST,
    ImageFolder,
    ImageTooLargeError,
    _few,
    _open,
    _positive_int,
    _read_image,
    _reason,
)
from .images import from_uint8

SCALE_EXTRA = "pip install 'tokenbridge[scale]'"
SOURCE_FORMS = ("'fmnist', 'folder:PATH' (a folder of images), 'wds:PATTERN' (webdataset .tar shards, e.g. "
                "wds:shards/train-{000000..000009}.tar) or 'hf:PATH' (a local Hugging Face datasets folder saved by "
                "save_to_disk, a .parquet file, a folder of them or a glob)")
# webdataset member suffixes taken as the image of a sample, in preference order when a sample has several
WDS_IMAGE_SUFFIXES = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
# webdataset skips "__name__" members (shard metadata); do the same so that the samples are the same
_WDS_META = re.compile(r"__[^/]*__($|/)")
# Hugging Face's split keywords (datasets.data_files): file names and folders carry one of these
_SPLIT_WORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "val", "dev"),
                "test": ("test", "testing", "eval", "evaluation")}


def _optional(module: str) -> ModuleType:
    """Import an optional dependency of the ``scale`` extra, or say how to install it."""
    if module == "datasets":
        # strictly offline: only local paths are ever passed, and this keeps the library itself off the network
        # (the variables are read once, when datasets is first imported)
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"this image source needs the '{module.split('.')[0]}' package: {SCALE_EXTRA}") from e


def _check_channels(channels: object) -> int:
    if isinstance(channels, bool) or channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    return int(channels)


def _checked_index(i: object, n: int) -> int:
    i = operator.index(i)
    if not -n <= i < n:
        raise IndexError(f"index {i} out of range for {n} samples")
    return i % n


class _NamedBytes(io.BytesIO):
    """Encoded image bytes that print as their origin ("shard.tar:key.png"): data.py's helpers name the "path"
    they are given in their messages with str()."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.origin = name

    def __str__(self) -> str:
        return self.origin


def decode_image(data: bytes, name: str, resolution: int, channels: int, allow_large: bool = False) -> torch.Tensor:
    """Encoded image bytes (PNG, JPEG, ...) -> float [channels, R, R] in [-1, 1], converted exactly like an
    ImageFolder item. Undecodable data or a pixel mode ImageFolder refuses (LAB) is a ValueError naming ``name``;
    an image over PIL's pixel limit is an ImageTooLargeError unless ``allow_large``."""
    try:
        im, _ = _open(_NamedBytes(data, name), allow_large)  # header only: refuse modes _to_8bit cannot convert
        with im:
            mode = im.mode
        if mode not in _SUPPORTED_MODES:
            raise ValueError(f"unsupported pixel mode {mode} (convert the image to RGB)")
        arr = _read_image(_NamedBytes(data, name), resolution, channels, allow_large)
    except (ImageTooLargeError, MemoryError):
        raise
    except Exception as e:  # damaged data can make a PIL plugin raise almost anything
        raise ValueError(f"{name}: cannot decode the image ({_reason(e, Path(name))})") from e
    return from_uint8(arr[None])[0]


# ------------------------------------------------------------------------------------------- webdataset shards
def expand_shards(pattern: str) -> list[Path]:
    """Shard paths of a webdataset pattern: braces expanded as webdataset does ("a-{000..009}.tar", "::" joins
    patterns); each must be an existing local file."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError(f"wds: needs a shard pattern such as shards/train-{{000000..000009}}.tar, got {pattern!r}")
    if re.match(r"^[a-z][a-z0-9+.-]*://", pattern) or pattern.startswith("pipe:"):
        raise ValueError(f"wds:{pattern}: only local .tar shards are read (random access needs seekable files); "
                         f"download the shards first")
    urls = _optional("webdataset.shardlists").expand_urls(pattern)
    shards = [Path(u) for u in urls]
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"wds:{pattern}: {len(missing)} of {len(shards)} shard file(s) missing: "
                                f"{_few(missing)}")
    return shards


def _index_shard(shard: Path, label_key: str) -> tuple[list[tuple[str, str, int, int, int, int]], int]:
    """One pass over the tar headers (data is skipped by seeking) -> ([(key, image suffix, image offset, image
    size, label offset, label size)], samples without an image). Members are grouped into samples like
    webdataset: consecutive members with the same key ("dir/key" before the first dot of the name); a label
    offset of -1 means no ``label_key`` member."""
    split_name = _optional("webdataset.tariterators").base_plus_ext
    samples, no_image = [], 0
    members: dict[str, tuple[int, int]] = {}
    key = None

    def flush() -> None:
        nonlocal no_image
        if key is None:
            return
        suffix = next((s for s in WDS_IMAGE_SUFFIXES if s in members), None)
        if suffix is None:
            no_image += 1
            return
        label = members.get(label_key, (-1, 0))
        samples.append((key, suffix, *members[suffix], *label))

    try:
        with tarfile.open(shard, "r:") as tar:  # "r:": uncompressed only; a compressed tar cannot be read at random
            for info in tar:
                if not info.isreg() or _WDS_META.match(info.name):
                    continue
                prefix, suffix = split_name(info.name)
                if prefix is None:
                    continue
                if prefix != key:
                    flush()
                    key, members = prefix, {}
                if suffix.lower() in members:
                    raise ValueError(f"{shard}: member {info.name} repeats suffix {suffix.lower()!r} of sample {key}")
                members[suffix.lower()] = (info.offset_data, info.size)
            flush()
    except tarfile.TarError as e:
        raise ValueError(f"{shard}: not a readable uncompressed tar file ({e}); compressed shards (.tar.gz) cannot "
                         f"be read at random: decompress them") from e
    return samples, no_image


class WebDatasetImages(Dataset):
    """Local webdataset shards as a map-style dataset of (image float [channels, R, R] in [-1, 1], label int).

    ``pattern``: shard paths with webdataset's brace expansion, e.g. ``shards/train-{000000..000009}.tar``. A sample
    is webdataset's group of consecutive members ``key.suffix``; its image is the first of WDS_IMAGE_SUFFIXES
    present (png, jpg, ...), its label the text integer in the ``label_key`` member (``key.cls``). Samples without
    an image are skipped with a warning; if no sample has a label member every label is 0 (one class), and a label
    missing from only some samples is a ValueError. Order: shards in pattern order, samples in tar order.

    The index (shard, byte offset and size of each image and label) is built once at construction from the tar
    headers alone and kept in numpy arrays (about 40 bytes + the key per sample, shared copy-on-write with
    DataLoader workers); items are read with one seek per member, so shards must be uncompressed local files.
    Images are decoded on access (an undecodable one is a ValueError naming shard and member when it is read;
    they are not checked at construction, which would read every shard in full).
    """

    def __init__(self, pattern: str, resolution: int = 256, channels: int = 3, label_key: str = "cls",
                 allow_large_images: bool = False):
        self.resolution = _positive_int("resolution", resolution)
        self.channels = _check_channels(channels)
        self.pattern, self.label_key = pattern, str(label_key).lower().lstrip(".")
        self.allow_large_images = bool(allow_large_images)
        self.shards = expand_shards(pattern)
        rows, per_shard, no_image = [], [], 0
        for shard in self.shards:
            samples, skipped = _index_shard(shard, self.label_key)
            rows += samples
            per_shard.append(len(samples))
            no_image += skipped
        if not rows:
            raise ValueError(f"wds:{pattern}: no samples with an image member ({', '.join(WDS_IMAGE_SUFFIXES)}) in "
                             f"{len(self.shards)} shard(s)")
        if no_image:
            warnings.warn(f"wds:{pattern}: skipped {no_image} sample(s) without an image member", stacklevel=2)
        self._set_index(rows, per_shard)

    def _set_index(self, rows: list[tuple[str, str, int, int, int, int]], per_shard: list[int]) -> None:
        # numpy arrays, not lists of tuples: forked DataLoader workers would copy every touched Python object
        self._shard = np.repeat(np.arange(len(per_shard), dtype=np.int32), per_shard)
        keys, suffixes, *numbers = zip(*rows)
        self._keys = np.array([k.encode() for k in keys], dtype=np.bytes_)
        self._suffix = np.array([WDS_IMAGE_SUFFIXES.index(s) for s in suffixes], dtype=np.int8)
        self._image_at, self._image_size, self._label_at, self._label_size = (np.array(n, np.int64) for n in numbers)
        labelled = self._label_at >= 0
        self.labelled = bool(labelled.any())
        if self.labelled and not labelled.all():
            first = int(np.argmin(labelled))
            raise ValueError(f"{self._name(first, self.label_key)}: missing, while other samples have a "
                             f"'.{self.label_key}' label member; every sample needs one (or none)")

    def _name(self, i: int, suffix: str) -> str:
        return f"{self.shards[self._shard[i]]}:{self._keys[i].decode()}.{suffix}"

    def _read(self, i: int, offset: int, size: int, suffix: str) -> bytes:
        # a fresh handle per read: no file offset shared between DataLoader workers forked after a read
        with open(self.shards[self._shard[i]], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise ValueError(f"{self._name(i, suffix)}: shard is shorter than its index says (changed since?)")
        return data

    def label(self, i: int) -> int:
        """Label of sample ``i`` (0 when the shards have no label members)."""
        i = _checked_index(i, len(self))
        if not self.labelled:
            return 0
        text = self._read(i, int(self._label_at[i]), int(self._label_size[i]), self.label_key)
        try:
            return int(text.decode("utf-8").strip())
        except ValueError as e:
            raise ValueError(f"{self._name(i, self.label_key)}: label {text[:40]!r} is not an integer") from e

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i = _checked_index(i, len(self))
        suffix = WDS_IMAGE_SUFFIXES[self._suffix[i]]
        data = self._read(i, int(self._image_at[i]), int(self._image_size[i]), suffix)
        image = decode_image(data, self._name(i, suffix), self.resolution, self.channels, self.allow_large_images)
        return image, self.label(i)


# ------------------------------------------------------------------------------------- Hugging Face datasets
def _parquet_files(spec: str) -> list[Path] | None:
    """The parquet files ``spec`` names (a file, a folder searched recursively, or a glob), None if none."""
    if any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if p.endswith(".parquet"))
    elif Path(spec).is_dir():
        files = sorted(p for p in Path(spec).rglob("*.parquet") if p.is_file())
    else:
        files = [Path(spec)] if Path(spec).is_file() and spec.endswith(".parquet") else []
    return files or None


def _split_of(path: Path, base: Path) -> str | None:
    """Hugging Face's split of a data file from its folders below ``base`` or its name prefix
    ("data/train-00000-of-00004.parquet"); the folders above ``base`` say nothing (a /tmp/test/ checkout)."""
    words = [*path.parent.relative_to(base).parts, re.split(r"[-_.]", path.name)[0]]
    for split, names in _SPLIT_WORDS.items():
        if any(word.lower() in names for word in words):
            return split
    return None


def _select_parquet(files: list[Path], split: str | None, spec: str) -> list[Path]:
    """The files of ``split`` when the files are named by split (``split`` None: the only split); all files when
    none is."""
    base = Path(spec) if Path(spec).is_dir() else Path(os.path.commonpath([f.parent for f in files]))
    by_split: dict[str | None, list[Path]] = {}
    for f in files:
        by_split.setdefault(_split_of(f, base), []).append(f)
    if set(by_split) == {None}:
        return files  # no split in the names: one dataset, as a folder: or wds: source
    named = sorted(s for s in by_split if s is not None)
    if split is None and len(by_split) == 1:
        return by_split[named[0]]
    wanted = next((s for s, names in _SPLIT_WORDS.items() if split is not None and split.lower() in names), split)
    if wanted not in by_split:
        raise ValueError(f"hf:{spec}: no parquet files for split {split!r}; the files' names give split(s) "
                         f"{', '.join(named)}" + (" and files of no split" if None in by_split else ""))
    return by_split[wanted]


def _pick_split(loaded: object, split: str | None, spec: str) -> object:
    """A Dataset from what load_from_disk returned: a Dataset as is, a DatasetDict's ``split``."""
    if not hasattr(loaded, "keys"):
        return loaded  # a single Dataset: no splits to choose among
    names = sorted(loaded.keys())
    if split is None and len(names) == 1:
        return loaded[names[0]]
    if split not in names:
        raise ValueError(f"hf:{spec}: split {split!r} not in the saved DatasetDict; it has {', '.join(names)}")
    return loaded[split]


def load_local_hf(spec: str, split: str | None = None) -> object:
    """A ``datasets.Dataset`` from a local path, never the network: a folder saved by ``save_to_disk`` (a
    DatasetDict gives its ``split``), or parquet files (a file, a folder, a glob). Anything else is a ValueError."""
    path = Path(spec)
    if not spec or (not path.exists() and not any(c in spec for c in "*?[")):
        raise ValueError(f"hf:{spec}: not a local path. Only local datasets are read (offline); to use a Hub "
                         f"dataset, save it once with datasets.load_dataset(NAME).save_to_disk(FOLDER) or download "
                         f"its parquet files, then pass hf:FOLDER")
    saved = path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))
    files = None if saved else _parquet_files(spec)
    if not saved and files is None:
        raise ValueError(f"hf:{spec}: neither a folder saved by datasets' save_to_disk (dataset_dict.json or "
                         f"state.json) nor parquet files")
    datasets = _optional("datasets")
    if saved:
        return _pick_split(datasets.load_from_disk(str(path)), split, spec)
    chosen = [str(f) for f in _select_parquet(files, split, spec)]
    return datasets.load_dataset("parquet", data_files=chosen, split="train")  # "train": the one split built here


class HFImages(Dataset):
    """A local Hugging Face ``datasets`` dataset as (image float [channels, R, R] in [-1, 1], label int).

    ``path``: a folder saved by ``save_to_disk`` (a Dataset, or a DatasetDict of which ``split`` is read), or
    parquet files: one file, a folder (recursively; files named by split, e.g. ``train-00000-of-00004.parquet``,
    are filtered by ``split``) or a glob. Strictly offline: a path that does not exist is a ValueError, never a
    download. ``image_column``: an Image feature (its bytes, or its path), a binary column of encoded images, or a
    string column of file paths; decoded like ImageFolder. ``label_column``: integers (ClassLabel names become
    ``classes``); when the dataset has no such column every label is 0 (one class).
    """

    def __init__(self, path: str, resolution: int = 256, channels: int = 3, image_column: str = "image",
                 label_column: str = "label", split: str | None = None, allow_large_images: bool = False):
        self.resolution = _positive_int("resolution", resolution)
        self.channels = _check_channels(channels)
        self.path, self.allow_large_images = str(path), bool(allow_large_images)
        ds = load_local_hf(self.path, split)
        datasets = _optional("datasets")
        columns = list(ds.column_names)
        if image_column not in columns:
            raise ValueError(f"hf:{path}: no image column {image_column!r}; columns: {', '.join(columns)}")
        feature = ds.features[image_column]
        if isinstance(feature, datasets.Image):
            # undecoded {"bytes", "path"}: our decoder, not PIL objects from datasets, gives ImageFolder's pixels
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        elif getattr(feature, "dtype", None) not in ("binary", "large_binary", "string", "large_string"):
            raise ValueError(f"hf:{path}: column {image_column!r} is {feature}; expected an Image feature, encoded "
                             f"image bytes or file paths")
        self.labelled = label_column in columns
        self.classes = getattr(ds.features[label_column], "names", None) if self.labelled else None
        self.image_column, self.label_column = image_column, label_column
        self.dataset = ds.select_columns([image_column, label_column] if self.labelled else [image_column])

    def __len__(self) -> int:
        return len(self.dataset)

    def _encoded(self, value: object, i: int) -> tuple[bytes, str]:
        """(encoded bytes, a name for messages) of one image cell."""
        name = f"hf:{self.path}[{i}]"
        if isinstance(value, dict):  # an Image feature read undecoded
            if value.get("bytes") is not None:
                return value["bytes"], name + (f" ({value['path']})" if value.get("path") else "")
            value = value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return bytes(value), name
        if isinstance(value, str) and value:
            try:
                return Path(value).read_bytes(), f"{name} ({value})"
            except OSError as e:
                raise ValueError(f"{name}: cannot read image file {value} ({e})") from e
        raise ValueError(f"{name}: no image data (got {type(value).__name__})")

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i = _checked_index(i, len(self))
        row = self.dataset[i]
        data, name = self._encoded(row[self.image_column], i)
        image = decode_image(data, name, self.resolution, self.channels, self.allow_large_images)
        label = row[self.label_column] if self.labelled else 0
        try:
            return image, operator.index(label)  # refuses floats and strings instead of truncating them
        except TypeError as e:
            raise ValueError(f"{name}: label {label!r} in column {self.label_column!r} is not an integer") from e


# ------------------------------------------------------------------------------------------------ the dispatcher
def image_source(spec: str, resolution: int = 256, channels: int = 3, split: str | None = "train",
                 limit: int | None = None, strict: bool = False, allow_large_images: bool = False) -> Dataset:
    """The map-style dataset of (image float [channels, R, R] in [-1, 1], label int) that ``spec`` names.

    ``fmnist``: Fashion-MNIST ``split`` (images [1, 32, 32]; resolution and channels do not apply);
    ``folder:PATH``: ImageFolder (``strict`` applies here only: shards and HF datasets are not checked image by
    image at construction, an undecodable image is a ValueError when read); ``wds:PATTERN``: WebDatasetImages;
    ``hf:PATH``: HFImages of ``split`` (when the source has splits). ``limit``: the first N items (a Subset).
    """
    if limit is not None:
        limit = _positive_int("limit", limit)
    kind, sep, rest = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if spec == "fmnist":
        return FashionMNIST(split or "train", limit=limit)
    if not sep or kind not in ("folder", "wds", "hf"):
        raise ValueError(f"unknown image source {spec!r}: expected {SOURCE_FORMS}")
    if not rest:
        raise ValueError(f"image source {spec!r} names no path: expected {SOURCE_FORMS}")
    if kind == "folder":
        ds = ImageFolder(rest, resolution, channels, strict=strict, allow_large_images=allow_large_images)
    elif kind == "wds":
        ds = WebDatasetImages(rest, resolution, channels, allow_large_images=allow_large_images)
    else:
        ds = HFImages(rest, resolution, channels, split=split, allow_large_images=allow_large_images)
    return Subset(ds, range(min(limit, len(ds)))) if limit is not None else ds
