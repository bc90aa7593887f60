"""Sharded token caches: encode a dataset of any size across torchrun processes, and train from shards read row
by row (positional reads), with RAM bounded by one shard, not the dataset.

A shard folder holds
  ``shard-00000.safetensors`` ... : ``indices`` [n, h, w, C] (uint8 when levels <= 256, else int16; channel-last),
      ``labels`` int64 [n], ``index`` int64 [n] (global image indices: image i lies in shard i // shard_size),
      optionally ``latents`` [n, C, h, w] (float16/float32, scaled, channel-first) and ``indices_flip`` (the tokens
      of the horizontally flipped image, as MAR/TokenBridge cache both flips);
  ``shard-00000.json``: the sidecar written after its shard (count, sha256, setup key): a shard is finished when
      its file matches its sidecar, and a restarted cache skips it;
  ``quantizer.safetensors``: the quantizer's state_dict (fitted calibration included), written once;
  ``manifest.json``: written last by rank 0 (format, version, count, grid, levels, index dtype, num_classes, data,
      vae + fingerprint, scaling_factor, quantizer config, flip, latents dtype, shards with count and sha256).

`ShardedTokens` reads such a folder (or a `tokens.cache_latents` file) as (indices long [h, w, C], label) items.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Subset

from .config import DataConfig
from .distributed import barrier, init_distributed
from .files import atomic_path, check_writable, tensor_bytes
from .progress import bar
from .reading import inside
from .quantizer import DimensionwiseQuantizer
from .rows import FileTensor, LazyRows, read_tensors
from .tokens import LATENT_DTYPES as TOKEN_LATENT_DTYPES
from .tokens import (TOKENS_FORMAT, CachedTokens, fit_quantizer, encode_latents, image_dataset, index_dtype,
                     latents_to_indices, rebuild_quantizer)
from .vae import VAE, load_vae, vae_fingerprint

MANIFEST = "manifest.json"
QUANTIZER_FILE = "quantizer.safetensors"
SHARDS_FORMAT = "tokenbridge-shards"
SHARD_FORMAT = "tokenbridge-shard"
FORMAT_VERSION = 1
LATENT_DTYPES = {None: None, **TOKEN_LATENT_DTYPES}


def shard_file(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def _sidecar(out_dir: Path, k: int) -> Path:
    return out_dir / f"shard-{k:05d}.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# Writing


def _write_shard(out_dir: Path, k: int, tensors: dict[str, torch.Tensor], setup: str) -> dict[str, Any]:
    """Write shard k atomically, then its sidecar (so a sidecar always describes a complete shard)."""
    path = out_dir / shard_file(k)
    with atomic_path(path, SHARD_FORMAT, needed=tensor_bytes(tensors)) as tmp:
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp),
                  # one metadata key: safetensors writes several in a random order, and shards must be byte-identical
                  metadata={"shard": json.dumps({"format": SHARD_FORMAT, "version": FORMAT_VERSION, "shard": k})})
    labels = tensors["labels"]
    record = {"file": path.name, "count": int(labels.numel()), "sha256": _sha256(path), "setup": setup,
              "grid": list(tensors["indices"].shape[1:]), "max_label": int(labels.max()) if labels.numel() else -1}
    with atomic_path(_sidecar(out_dir, k)) as tmp:
        tmp.write_text(json.dumps(record))
    return record


def _finished(out_dir: Path, k: int, setup: str, count: int) -> dict[str, Any] | None:
    """The sidecar of shard k when the shard is complete and was made by this setup (else None: encode it)."""
    side, path = _sidecar(out_dir, k), out_dir / shard_file(k)
    try:
        record = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    if record.get("setup") != setup or record.get("count") != count or not path.is_file():
        return None
    return record if _sha256(path) == record.get("sha256") else None


def _dtype_name(levels: int) -> str:
    return str(index_dtype(levels)).removeprefix("torch.")  # "uint8" / "int16", as numpy names them


def _encode_shard(vae: VAE, quant: DimensionwiseQuantizer, dataset: Dataset, start: int, stop: int,
                  data: DataConfig, device: torch.device, flip: bool, latents_dtype: str | None) -> dict:
    """Tensors of the shard holding images [start, stop) (module docstring); RAM: this shard only."""
    dtype = index_dtype(quant.levels)
    parts: dict[str, list[torch.Tensor]] = {"indices": [], "labels": [], "latents": [], "indices_flip": []}
    loader = DataLoader(Subset(dataset, range(start, stop)), batch_size=data.encode_batch, shuffle=False)
    for images, label in loader:
        images = images.to(device)
        lat = encode_latents(vae, images, data.sample_posterior)
        parts["indices"].append(latents_to_indices(quant, lat).to("cpu", dtype))
        parts["labels"].append(torch.as_tensor(label).to("cpu", torch.int64))
        if latents_dtype is not None:
            parts["latents"].append(lat.to("cpu", LATENT_DTYPES[latents_dtype]))
        if flip:
            flipped = encode_latents(vae, images.flip(-1), data.sample_posterior)
            parts["indices_flip"].append(latents_to_indices(quant, flipped).to("cpu", dtype))
    tensors = {name: torch.cat(ts) for name, ts in parts.items() if ts}
    tensors["index"] = torch.arange(start, stop, dtype=torch.int64)
    return tensors


def _prepare_quantizer(out_dir: Path, quantizer: dict[str, Any] | None, vae: VAE, dataset: Dataset,
                       data: DataConfig, fit_samples: int, seed: int, device: torch.device, rank: int,
                       fit_key: str) -> DimensionwiseQuantizer:
    """Rank 0 fits a calibrated quantizer (or reuses the one a killed run stored for the same setup) and writes
    quantizer.safetensors; every rank then loads that file, so all ranks quantize with the same tables."""
    path = out_dir / QUANTIZER_FILE
    quant = DimensionwiseQuantizer(**(quantizer or {}))
    if rank == 0:
        stored = None
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                stored = (f.metadata() or {}).get("setup")
        if stored != fit_key:
            quant = quant.to(device)
            if not quant.fitted:
                torch.manual_seed(seed)  # posterior sampling draws from the global RNG: a reproducible fit
                fit_quantizer(quant, vae, dataset, data, fit_samples, device)
            with atomic_path(path) as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in quant.state_dict().items()}, str(tmp),
                          metadata={"setup": fit_key})  # one key: byte-identical files (see _write_shard)
    barrier()
    quant = DimensionwiseQuantizer(**(quantizer or {}))
    quant.load_state_dict(load_file(str(path)))
    return quant.to(device)


def _check_args(out_dir: Path, shard_size: int, latents_dtype: str | None) -> None:
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an integer >= 1, got {shard_size!r}")
    if latents_dtype not in LATENT_DTYPES:
        raise ValueError(f"latents_dtype must be None, 'float16' or 'float32', got {latents_dtype!r}")
    check_writable(out_dir / MANIFEST, "shard manifest")


def _write_manifest(out_dir: Path, records: list[dict[str, Any]], info: dict[str, Any],
                    num_classes: int | None) -> Path:
    """manifest.json (rank 0, after every shard is written): what ShardedTokens checks and reads."""
    max_label = max(r["max_label"] for r in records)
    manifest = {"format": SHARDS_FORMAT, "version": FORMAT_VERSION, "count": sum(r["count"] for r in records),
                "grid": records[0]["grid"], **info,
                "num_classes": num_classes if num_classes is not None else max_label + 1,
                "shards": [{"file": r["file"], "count": r["count"], "sha256": r["sha256"]} for r in records]}
    path = out_dir / MANIFEST
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    return path


def cache_shards(data: DataConfig, out_dir: str | os.PathLike, quantizer: dict[str, Any] | None = None,
                 shard_size: int = 10000, device: str | torch.device = "cpu", seed: int = 0,
                 fit_samples: int = 10000, vae: VAE | None = None, dataset: Dataset | None = None,
                 flip: bool = False, latents_dtype: str | None = None) -> Path:
    """Encode ``data``'s images with its VAE into token shards under ``out_dir`` (module docstring); returns the
    manifest path.

    Image i goes to shard i // shard_size. Under torchrun (a process group, or WORLD_SIZE > 1: a group is then made
    and destroyed here) rank r encodes the shards k with k % world == r. A shard that a killed run finished (its
    sidecar matches the file and this setup) is skipped. RAM holds one shard. quantizer: DimensionwiseQuantizer
    keyword arguments; a calibrated one is fitted by rank 0 on ``fit_samples`` evenly spaced images. ``vae`` /
    ``dataset`` replace the ones ``data`` names. Shard k's posterior samples draw from seed + 1 + k.
    latents_dtype: None (no latents stored), "float16" or "float32".
    """
    out_dir = Path(out_dir)
    _check_args(out_dir, shard_size, latents_dtype)
    quant_cfg = DimensionwiseQuantizer(**(quantizer or {})).config()  # validates the quantizer arguments
    if quant_cfg["levels"] > 32768:
        raise ValueError(f"levels={quant_cfg['levels']} does not fit int16 token storage")
    rank, world, device, created = init_distributed(str(device))
    rng_state = torch.random.get_rng_state()
    try:
        if dataset is None:
            dataset = image_dataset(data)
        elif data.limit is not None:
            dataset = Subset(dataset, range(min(data.limit, len(dataset))))
        n = len(dataset)
        if n == 0:
            raise ValueError(f"dataset {data.dataset}:{data.split} is empty")
        vae = (load_vae(data.vae, device) if vae is None else vae).to(device).eval()
        fingerprint, data_spec = vae_fingerprint(vae), data.model_dump(mode="json")
        fit_key = _key([data_spec, fingerprint, quant_cfg, fit_samples, seed, n])
        quant = _prepare_quantizer(out_dir, quantizer, vae, dataset, data, fit_samples, seed, device, rank, fit_key)
        state_key = _key({k: v.tolist() for k, v in quant.state_dict().items()})
        setup = _key([fit_key, state_key, shard_size, flip, latents_dtype])
        num_shards = -(-n // shard_size)
        # this process's shards, with an ETA (rank 0 draws it; every process encodes its share)
        mine = range(rank, num_shards, world)
        for k in bar(mine, desc="shards", unit="shard", requested=None if rank == 0 else False):
            start, stop = k * shard_size, min((k + 1) * shard_size, n)
            if _finished(out_dir, k, setup, stop - start) is None:
                torch.manual_seed(seed + 1 + k)  # each shard reproducible whichever rank encodes it
                tensors = _encode_shard(vae, quant, dataset, start, stop, data, device, flip, latents_dtype)
                _write_shard(out_dir, k, tensors, setup)
                del tensors  # RAM bound: one shard at a time
        barrier()
        if rank == 0:
            records = [_finished(out_dir, k, setup, min((k + 1) * shard_size, n) - k * shard_size)
                       for k in range(num_shards)]
            missing = [shard_file(k) for k, r in enumerate(records) if r is None]
            if missing:
                raise ValueError(f"shards {missing} in {out_dir} are missing or incomplete after caching")
            classes = getattr(dataset, "classes", None)
            scaling = getattr(vae, "scaling_factor", None)
            info = {"levels": quant.levels, "index_dtype": _dtype_name(quant.levels),
                    "data": data_spec, "vae": str(data.vae), "vae_fingerprint": fingerprint,
                    "scaling_factor": None if scaling is None else float(scaling), "quantizer": quant.config(),
                    "quantizer_file": QUANTIZER_FILE, "flip": bool(flip), "latents_dtype": latents_dtype,
                    "shard_size": shard_size, "seed": seed}
            _write_manifest(out_dir, records, info, len(classes) if classes is not None else None)
        barrier()
    finally:
        torch.random.set_rng_state(rng_state)
        if created:
            dist.destroy_process_group()
    return out_dir / MANIFEST


def write_synthetic_shards(out_dir: str | os.PathLike, num_items: int, grid: tuple[int, int, int] = (16, 16, 16),
                           levels: int = 64, shard_size: int = 100_000, num_classes: int = 1000,
                           seed: int = 0) -> Path:
    """Uniformly random tokens [num_items, *grid] in [0, levels) and labels in [0, num_classes), in the shard format
    (manifest included, vae "synthetic"), written shard by shard (RAM: one shard). Returns the manifest path."""
    out_dir = Path(out_dir)
    _check_args(out_dir, shard_size, None)
    if num_items < 1 or levels < 2 or levels > 32768 or num_classes < 1:
        raise ValueError(f"need num_items >= 1, 2 <= levels <= 32768, num_classes >= 1; got {num_items}, "
                         f"{levels}, {num_classes}")
    quant = DimensionwiseQuantizer(levels=levels)
    with atomic_path(out_dir / QUANTIZER_FILE) as tmp:
        save_file({k: v.contiguous() for k, v in quant.state_dict().items()}, str(tmp),
                  metadata={"setup": "synthetic"})
    dtype = index_dtype(levels)
    setup = _key(["synthetic", num_items, list(grid), levels, shard_size, num_classes, seed])
    records = []
    for k in range(-(-num_items // shard_size)):
        start, stop = k * shard_size, min((k + 1) * shard_size, num_items)
        record = _finished(out_dir, k, setup, stop - start)
        if record is None:
            g = torch.Generator().manual_seed(seed * 1_000_003 + k)
            tensors = {"indices": torch.randint(0, levels, (stop - start, *grid), generator=g, dtype=dtype),
                       "labels": torch.randint(0, num_classes, (stop - start,), generator=g),
                       "index": torch.arange(start, stop, dtype=torch.int64)}
            record = _write_shard(out_dir, k, tensors, setup)
            del tensors
        records.append(record)
    info = {"levels": levels, "index_dtype": _dtype_name(levels), "data": {"dataset": "synthetic"},
            "vae": "synthetic", "vae_fingerprint": None, "scaling_factor": None, "quantizer": quant.config(),
            "quantizer_file": QUANTIZER_FILE, "flip": False, "latents_dtype": None, "shard_size": shard_size,
            "seed": seed}
    return _write_manifest(out_dir, records, info, num_classes)


# ----------------------------------------------------------------------------------------------------------------
# Reading


def _load_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"shard manifest {path} cannot be read as JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != SHARDS_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{path} is not a tokenbridge shard manifest (format={found!r}, expected {SHARDS_FORMAT!r})")
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"shard manifest {path} has version {manifest.get('version')!r}; this code reads "
                         f"version {FORMAT_VERSION}")
    missing = [k for k in ("count", "grid", "levels", "quantizer", "shards", "num_classes") if k not in manifest]
    if missing or not manifest["shards"]:
        raise ValueError(f"shard manifest {path} lacks {missing or ['shards']}")
    if sum(s["count"] for s in manifest["shards"]) != manifest["count"]:
        raise ValueError(f"shard manifest {path}: shard counts sum to {sum(s['count'] for s in manifest['shards'])}, "
                         f"manifest count is {manifest['count']}")
    return manifest


class ShardedTokens(Dataset):
    """A token shard folder (or its manifest.json, or a single cache_latents file) as (indices long [h, w, C],
    label long scalar) items, read lazily from memory-mapped shards. With flip shards, each item is the plain or
    the flipped tokens with probability 1/2 (torch's global RNG, so that the trainer's exact resume holds).

    Attributes like CachedTokens: levels, num_classes, grid_shape (h, w, C), quantizer_config, quantizer_state,
    scaling_factor, vae, vae_fingerprint, metadata (str -> str), manifest (dict; None for a single file), path;
    indices / labels / latents / image_index (global image numbers) support ``[:n]`` (torch tensors in the stored dtype; latents None when not stored).
    verify=True also checks every shard's sha256 and index range (reads everything).
    """

    def __init__(self, path: str | os.PathLike, verify: bool = False):
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"token shards {path} do not exist (make them with cache_shards)")
        self.path, self.manifest, self.flip, self._single = path, None, False, None
        if path.suffix != ".json":
            self._open_single(path)
            return
        m = self.manifest = _load_manifest(path)
        arrays = [self._open_shard(path.parent, s, verify) for s in m["shards"]]
        self._starts = list(np.cumsum([0] + [s["count"] for s in m["shards"]])[:-1].tolist())
        self.levels, self.num_classes, self.flip = int(m["levels"]), int(m["num_classes"]), bool(m.get("flip"))
        self.grid_shape = tuple(int(x) for x in m["grid"])
        self.quantizer_config, self.scaling_factor = dict(m["quantizer"]), m.get("scaling_factor")
        self.vae, self.vae_fingerprint = m.get("vae"), m.get("vae_fingerprint")
        qpath = inside(path.parent, m.get("quantizer_file", QUANTIZER_FILE), f"shard manifest {path}", "quantizer file")
        if not qpath.is_file():
            raise ValueError(f"shard manifest {path} names quantizer file {qpath}, which does not exist")
        self.quantizer_state = load_file(str(qpath))
        rows = {name: LazyRows([a[name] for a in arrays], self._starts) for name in arrays[0]}
        self.indices, self.labels = rows["indices"], rows["labels"]
        self.latents, self._flipped, self.image_index = rows.get("latents"), rows.get("indices_flip"), rows["index"]
        if self.flip and self._flipped is None:
            raise ValueError(f"shard manifest {path} says flip=true but its shards hold no 'indices_flip'")
        data = m.get("data") or {}
        self.metadata = {"format": SHARDS_FORMAT, "version": str(m["version"]), "vae": str(self.vae),
                         "vae_fingerprint": str(self.vae_fingerprint), "quantizer": json.dumps(self.quantizer_config),
                         "levels": str(self.levels), "scaling_factor": json.dumps(self.scaling_factor),
                         "data": str(data.get("dataset")), "split": str(data.get("split")),
                         "num_classes": str(self.num_classes), "sample_posterior": json.dumps(data.get("sample_posterior"))}

    def _open_single(self, path: Path) -> None:
        """A cache_latents file is one shard: CachedTokens reads and checks it."""
        try:
            with safe_open(str(path), framework="pt") as f:
                fmt = (f.metadata() or {}).get("format")
        except Exception as e:  # safetensors raises its own error types for garbled files
            raise ValueError(f"{path} is neither a shard manifest nor a token file: {e}") from e
        if fmt != TOKENS_FORMAT:
            raise ValueError(f"{path} is not a tokenbridge token file (format={fmt!r}); give a shard folder, its "
                             f"{MANIFEST} or a cache_latents file")
        single = self._single = CachedTokens(path)
        for name in ("levels", "num_classes", "grid_shape", "quantizer_config", "quantizer_state", "scaling_factor",
                     "vae", "vae_fingerprint", "metadata", "indices", "labels", "latents"):
            setattr(self, name, getattr(single, name))

    def _open_shard(self, folder: Path, entry: dict[str, Any], verify: bool) -> dict[str, FileTensor]:
        path = inside(folder, entry.get("file"), f"shard manifest {self.path}", "shard")
        if not path.is_file():
            raise ValueError(f"shard {path} listed in {self.path} is missing")
        if verify and _sha256(path) != entry.get("sha256"):
            raise ValueError(f"shard {path} does not match its sha256 in {self.path} (changed or truncated)")
        arrays = read_tensors(path)
        grid = tuple(self.manifest["grid"])
        for name in ("indices", "labels", "index"):
            if name not in arrays:
                raise ValueError(f"shard {path} has no '{name}' tensor")
        for name, a in arrays.items():
            if len(a) != entry["count"]:
                raise ValueError(f"shard {path}: '{name}' holds {len(a)} items, {self.path} says {entry['count']}")
        if arrays["indices"].shape[1:] != grid or arrays["indices"].dtype.name != self.manifest.get("index_dtype",
                                                                                                      "uint8"):
            raise ValueError(f"shard {path}: indices {arrays['indices'].dtype} {list(arrays['indices'].shape)} "
                             f"do not match the manifest grid {list(grid)} / {self.manifest.get('index_dtype')}")
        if verify:
            for name in ("indices", "indices_flip"):
                if name in arrays and arrays[name].size and int(arrays[name][:].max()) >= int(self.manifest["levels"]):
                    raise ValueError(f"shard {path}: '{name}' outside [0, {self.manifest['levels']})")
        return arrays

    def __reduce__(self) -> tuple:
        # DataLoader workers started by spawn get the path and read the manifest again
        return ShardedTokens, (self.path,)

    def __len__(self) -> int:
        return len(self.labels)

    def make_quantizer(self) -> DimensionwiseQuantizer:
        """The DimensionwiseQuantizer that made these tokens (fitted calibration included)."""
        return rebuild_quantizer(self.quantizer_config, self.quantizer_state, f"token shards {self.path}")

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._single is not None:
            return self._single[i]
        i = int(i)
        rows = self._flipped if self.flip and int(torch.randint(2, ())) else self.indices
        return rows[i].long(), self.labels[i]
