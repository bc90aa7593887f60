"""Image sources beyond folders (tokenbridge.sources): webdataset shards, local HF datasets, the spec dispatcher."""

from __future__ import annotations

import io
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

from tokenbridge.data import ImageFolder
from tokenbridge.sources import HFImages, WebDatasetImages, image_source

pytest.importorskip("webdataset")
datasets = pytest.importorskip("datasets")

N, PER_SHARD, RES = 12, 6, 16


def _image(i: int) -> Image.Image:
    """A non-square RGB image that differs per index (so crop, resize and order are all visible)."""
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8))


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_shards(folder: Path, labels: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(N // PER_SHARD):
        with tarfile.open(folder / f"train-{s:06d}.tar", "w") as tar:
            for i in range(s * PER_SHARD, (s + 1) * PER_SHARD):
                _add(tar, f"sample{i:04d}.png", _png(_image(i)))
                if labels:
                    _add(tar, f"sample{i:04d}.cls", f"{i % 3}\n".encode())
    return folder


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pngs")
    for i in range(N):
        _image(i).save(folder / f"sample{i:04d}.png")
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return _write_shards(tmp_path_factory.mktemp("wds"))


def test_webdataset_items_match_image_folder(shards, pngs):
    ds = WebDatasetImages(str(shards / "train-{000000..000001}.tar"), RES, 3)
    folder = ImageFolder(pngs, RES, 3)
    assert len(ds) == N and [s.name for s in ds.shards] == ["train-000000.tar", "train-000001.tar"]
    for i in range(N):
        image, label = ds[i]
        assert image.shape == (3, RES, RES) and image.dtype == torch.float32
        assert -1.0 <= image.min() and image.max() <= 1.0
        assert label == i % 3  # tar order across shards in pattern order
        assert torch.equal(image, folder[i][0])  # same pixels as ImageFolder for the same PNG files
    assert torch.equal(ds[-1][0], ds[N - 1][0])
    with pytest.raises(IndexError):
        ds[N]


def test_webdataset_grey_unlabelled_and_pickled(tmp_path, pngs):
    import pickle

    ds = WebDatasetImages(str(_write_shards(tmp_path, labels=False) / "train-00000{0,1}.tar"), RES, 1)
    folder = ImageFolder(pngs, RES, 1)
    assert not ds.labelled and ds[3][1] == 0
    assert ds[3][0].shape == (1, RES, RES) and torch.equal(ds[3][0], folder[3][0])
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers under spawn get a pickled copy
    assert torch.equal(clone[5][0], ds[5][0])


def test_webdataset_bad_inputs(tmp_path, shards):
    with pytest.raises(FileNotFoundError, match="missing"):
        WebDatasetImages(str(shards / "train-{000000..000002}.tar"), RES, 3)
    (tmp_path / "x.tar").write_bytes(b"not a tar file" * 100)
    with pytest.raises(ValueError, match="uncompressed tar"):
        WebDatasetImages(str(tmp_path / "x.tar"), RES, 3)
    with tarfile.open(tmp_path / "mixed.tar", "w") as tar:
        _add(tar, "a.png", _png(_image(0)))
        _add(tar, "a.cls", b"1")
        _add(tar, "b.png", _png(_image(1)))
    with pytest.raises(ValueError, match="b.cls: missing"):
        WebDatasetImages(str(tmp_path / "mixed.tar"), RES, 3)
    with tarfile.open(tmp_path / "broken.tar", "w") as tar:
        _add(tar, "a.png", b"\x89PNG garbage")
        _add(tar, "b.json", b"{}")  # a sample without an image: skipped with a warning
    with pytest.warns(UserWarning, match="without an image"):
        ds = WebDatasetImages(str(tmp_path / "broken.tar"), RES, 3)
    with pytest.raises(ValueError, match=r"broken.tar:a.png: cannot decode"):
        ds[0]


def _features():
    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})


def test_hf_save_to_disk_and_parquet(tmp_path, pngs):
    images = [_image(i) for i in range(N)]
    ds = datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(N)]}, features=_features())
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(4))}).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "train-00000-of-00001.parquet"))
    folder = ImageFolder(pngs, RES, 3)
    for source in (HFImages(str(tmp_path / "saved"), RES, 3), HFImages(str(tmp_path / "pq"), RES, 3, split="train"),
                   HFImages(str(tmp_path / "pq" / "*.parquet"), RES, 3), HFImages(str(tmp_path / "dict"), RES, 3,
                                                                                 split="train")):
        assert len(source) == N and source.classes == ["a", "b", "c"]
        for i in (0, 5, N - 1):
            image, label = source[i]
            assert label == i % 3 and image.shape == (3, RES, RES)
            assert torch.equal(image, folder[i][0])
    assert len(HFImages(str(tmp_path / "dict"), RES, 3, split="test")) == 4
    with pytest.raises(ValueError, match="has test, train"):
        HFImages(str(tmp_path / "dict"), RES, 3, split="validation")
    with pytest.raises(ValueError, match="no parquet files for split 'test'"):
        HFImages(str(tmp_path / "pq"), RES, 3, split="test")
    with pytest.raises(ValueError, match="no image column 'picture'"):
        HFImages(str(tmp_path / "saved"), RES, 3, image_column="picture")


def test_hf_bytes_column_unlabelled(tmp_path, pngs):
    datasets.Dataset.from_dict({"image": [_png(_image(i)) for i in range(3)]}).save_to_disk(str(tmp_path / "raw"))
    source = image_source(f"hf:{tmp_path / 'raw'}", RES, 1, split=None)
    assert len(source) == 3 and not source.labelled and source[2][1] == 0
    assert torch.equal(source[2][0], ImageFolder(pngs, RES, 1)[2][0])
    datasets.Dataset.from_dict({"image": [b"garbage"]}).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r"\[0\]: cannot decode"):
        HFImages(str(tmp_path / "bad"), RES, 3)[0]


def test_hf_never_downloads(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise AssertionError("tried the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.chdir(tmp_path)
    for name in ("mnist", "uoft-cs/cifar10"):
        with pytest.raises(ValueError, match="not a local path"):
            image_source(f"hf:{name}", RES, 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="save_to_disk"):
        image_source("hf:empty", RES, 3)


def test_image_source_specs(shards, pngs):
    wds = image_source(f"wds:{shards}/train-{{000000..000001}}.tar", RES, 3, limit=5)
    assert isinstance(wds, Subset) and len(wds) == 5
    folder = image_source(f"folder:{pngs}", RES, 3, limit=100)
    assert len(folder) == N
    for bad in ("imagenet", "tar:x.tar", "wds:", "", "folder"):
        with pytest.raises(ValueError, match="folder:PATH"):
            image_source(bad, RES, 3)
    with pytest.raises(ValueError, match="limit"):
        image_source(f"folder:{pngs}", RES, 3, limit=0)
    with pytest.raises(FileNotFoundError):
        image_source("folder:/no/such/folder", RES, 3)
    with pytest.raises(FileNotFoundError, match="missing"):
        image_source("wds:/no/such/shard-{0..1}.tar", RES, 3)
