"""Safe file writes: one path for everything the package writes (atomic and durable replacement, never through a
symbolic link, never over a file of another kind without being asked), cross-process locks on outputs, one run
per folder, and one-line messages for a full disk or an unwritable place."""
from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import functools
import hashlib
import inspect
import json
import os
import re
import shutil
import socket
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# the kind of a file tokenbridge wrote rides on the file itself (an extended attribute), so a file a user puts in
# its place later, or copies there, does not carry it
KIND_ATTR = "user.tokenbridge.kind"
SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights"
# the two files of a pretrained folder (generators, VQ tokenizers): the diffusers / huggingface_hub convention
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
LOCK_DIR = Path(tempfile.gettempdir()) / f"tokenbridge-locks-{os.getuid()}"
LOCK_WAIT_S = 30.0  # how long a short write waits for another writer of the same file before giving up
_OVERWRITE: contextvars.ContextVar[bool] = contextvars.ContextVar("tokenbridge_overwrite", default=False)
_HELD: dict[Path, int] = {}  # lock files this process holds (a write must not wait for its own command's lock)
_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
# how libraries that wrap the OS error word it (safetensors: "StorageFull"; torch.save: "file write failed")
_FULL_WORDS = ("No space left", "StorageFull", "File too large", "FileTooLarge", "Disk quota", "file write failed",
               "unexpected pos")
_KIND_NAMES = {"tokenbridge-tokens": "a token file", "tokenbridge-train-checkpoint": "a training checkpoint",
               "tokenbridge-generator": "an exported generator", "tokenbridge-pretrained": "pretrained weights",
               "tokenbridge-vae": "VAE weights", "tokenbridge-vq": "a VQ tokenizer",
               "tokenbridge-shard": "a token shard"}


@contextmanager
def overwriting(allowed: bool = True) -> Iterator[None]:
    """Within this block, writes may replace files of another kind (the CLI's ``--overwrite``)."""
    token = _OVERWRITE.set(bool(allowed))
    try:
        yield
    finally:
        _OVERWRITE.reset(token)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> None:
    """Delete ``.<name>.<pid>.tmp`` / ``.old`` files or folders that killed writers of ``path`` left behind (their
    process is gone)."""
    path = Path(path)
    for tmp in [*path.parent.glob(f".{path.name}.*.tmp"), *path.parent.glob(f".{path.name}.*.old")]:
        pid = tmp.name[len(path.name) + 2:-len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def disk_full_error(path: Path, error: BaseException | None = None, needed: int | None = None,
                    written: int | None = None) -> OSError:
    """The OSError to raise when ``path`` cannot be written for lack of space: one line naming the path, what was
    needed (or written before the disk filled) and the free space left."""
    free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
    if needed is not None:
        need = f"it needs {_mib(needed)}"
    elif written is not None:
        need = f"{_mib(written)} were written before it stopped"
    else:
        need = "the write stopped"
    why = "a file-size limit" if isinstance(error, OSError) and error.errno == errno.EFBIG else "no space left"
    kept = "; the previous file is unchanged" if path.exists() else ""
    # a file of a folder written whole (train-vq's temporary folder) is named where it was to land
    folder = re.fullmatch(r"\.(.+)\.[0-9]+\.tmp", path.parent.name)
    shown = path.parent.with_name(folder.group(1)) / path.name if folder else path
    return OSError(errno.ENOSPC, f"{why} to write {shown}: {need}, {_mib(free)} free on that disk{kept}")


def _is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in _FULL_ERRNOS:
        return True
    return any(word in str(error) for word in _FULL_WORDS)


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj`` (nested dicts / lists / tuples): what writing them will need, about."""
    if hasattr(obj, "element_size") and hasattr(obj, "numel"):
        return obj.element_size() * obj.numel()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Fail now, not after hours of work, if ``path`` could not be written: it is a directory, a parent is a file,
    or the nearest existing folder is not writable. Creates nothing. Returns the path."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory; give a file path")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot create the folder of {what} {path}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {what} {path}: folder {existing} is not writable")
    return path


# ------------------------------------------------------------------------------------------------ kinds of files
def _safetensors_format(path: Path) -> str | None:
    """The ``format`` metadata of a safetensors file (read from its header only), None if it has none."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 2**24:
                return None
            header = json.loads(f.read(size))
        fmt = (header.get("__metadata__") or {}).get("format")
    except (OSError, ValueError, AttributeError):
        return None
    return fmt if isinstance(fmt, str) and fmt.startswith("tokenbridge") else None


def _checkpoint_format(path: Path) -> str | None:
    if not zipfile.is_zipfile(path):
        return None
    import torch  # only here: most writes are of other files

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a torch file, or one holding objects weights_only refuses: not one of ours
        return None
    fmt = obj.get("format") if isinstance(obj, dict) else None
    return fmt if isinstance(fmt, str) and fmt.startswith("tokenbridge") else None


def _json_format(path: Path) -> str | None:
    """The ``format`` key of a JSON file tokenbridge wrote (a shard manifest, a pretrained config.json)."""
    try:
        if path.stat().st_size > 2**24:
            return None
        fmt = json.loads(path.read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None
    return fmt if isinstance(fmt, str) and fmt.startswith("tokenbridge") else None


def content_kind(path: str | os.PathLike) -> str | None:
    """The format tag a tokenbridge safetensors file, training checkpoint or JSON record carries in its content,
    else None."""
    path = Path(path)
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        json_like = f.read(1) == b"{"
    return (json_like and _json_format(path)) or _safetensors_format(path) or _checkpoint_format(path)


def _default_kind(path: Path) -> str:
    return path.suffix.lstrip(".").lower() or "file"


def file_kind(path: str | os.PathLike) -> str | None:
    """What tokenbridge wrote at ``path``: the format tag in its content, else the kind it marked on the file when
    writing it; None for a file tokenbridge did not write (or one replaced since). Where the filesystem keeps no
    extended attributes the file's suffix stands in for its mark."""
    path = Path(path)
    kind = content_kind(path)
    if kind:
        return kind
    try:
        return os.getxattr(path, KIND_ATTR, follow_symlinks=False).decode()
    except AttributeError:  # no extended attributes on this platform (macOS' Python)
        return _default_kind(path)
    except OSError as e:
        return _default_kind(path) if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP) else None


def _mark(path: Path, kind: str) -> None:
    try:
        os.setxattr(path, KIND_ATTR, kind.encode(), follow_symlinks=False)
    except (AttributeError, OSError):  # not kept by this filesystem: file_kind goes by the suffix there
        pass


def _describe(kind: str | None) -> str:
    if kind is None:
        return "a file tokenbridge did not write"
    return _KIND_NAMES.get(kind, f"a tokenbridge {kind} file")


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder)
    except ValueError:
        return False
    return True


def check_target(path: str | os.PathLike, kind: str | None = None, overwrite: bool | None = None,
                 what: str = "output") -> Path:
    """Refuse (ValueError naming it) to write ``path`` when it is a symbolic link (never, even with overwrite), or,
    unless ``overwrite`` (default: the ``overwriting`` block's setting), when it is a shipped weights file or holds
    a file of another kind than ``kind`` (None: any file tokenbridge wrote). Creates nothing. Returns the path."""
    path = Path(path)
    if path.is_symlink():
        raise ValueError(f"{what} {path} is a symbolic link (to {os.readlink(path)}); tokenbridge never writes "
                         "through a link: remove the link or choose another path")
    check_writable(path, what)
    if not path.exists() or (_OVERWRITE.get() if overwrite is None else overwrite):
        return path
    if _inside(path, SHIPPED_WEIGHTS):
        raise ValueError(f"{path} is one of the shipped weights; pass --overwrite (overwrite=True) to replace it, "
                         "or choose another path")
    old = file_kind(path)
    if old is None or (kind is not None and old != kind):
        new = f", not {_describe(kind)}" if kind is not None and old is not None else ""
        raise ValueError(f"{what} {path} already holds {_describe(old)}{new}; pass --overwrite (overwrite=True) to "
                         "replace it, or choose another path")
    return path


# ------------------------------------------------------------------------------------------------ locks
def _lock_file(path: Path) -> Path:
    """Where the lock of output ``path`` lives: a folder of this machine's temporary space, named by the resolved
    path, so that taking it creates nothing beside the output (whose folder may not exist yet)."""
    LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
    return LOCK_DIR / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32] + ".lock")


def _acquire(lock: Path, wait_s: float, what: str, target: Path) -> int:
    """flock ``lock`` (created if needed), waiting up to ``wait_s``; the holder's name goes into it."""
    deadline = time.monotonic() + wait_s
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if time.monotonic() >= deadline:
                raise ValueError(f"{what} {target} is being written by {holder}; wait for it, stop it, or choose "
                                 "another path") from None
            time.sleep(0.05)
            continue
        try:  # the holder before us unlinks the file on release: a lock on an unlinked file would guard nothing
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            os.ftruncate(fd, 0)
            os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
            return fd
        os.close(fd)


def _release(lock: Path, fd: int) -> None:
    lock.unlink(missing_ok=True)  # while still locked, so that no one waits on a file about to vanish
    os.close(fd)


@contextmanager
def output_lock(path: str | os.PathLike, what: str = "output") -> Iterator[Path]:
    """Hold ``path``'s lock (a file or a folder; see `_lock_file`) for a whole command: a second command that wants
    to write the same output fails at once naming the process that holds it. The operating system drops the lock
    when the holder exits, however it exits."""
    path = Path(path)
    lock = _lock_file(path)
    if lock in _HELD:
        yield path
        return
    fd = _HELD[lock] = _acquire(lock, 0.0, what, path)
    try:
        yield path
    finally:
        del _HELD[lock]
        _release(lock, fd)


def holds_output(argument: str, what: str) -> Callable:
    """Decorator: each call holds `output_lock` on the path passed as ``argument`` (unless it is None), from
    before its checks until its last write, so that two commands cannot both make one output."""
    def wrap(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            path = signature.bind(*args, **kwargs).arguments.get(argument)
            if path is None:
                return fn(*args, **kwargs)
            with output_lock(path, what):
                return fn(*args, **kwargs)
        return call
    return wrap


# commands whose --out another command could be writing at the same time: held locked for the whole command
COMMAND_OUTPUTS = {"sample": "sample output folder", "edit": "edit output folder", "convert": "pretrained folder",
                   "export": "export", "train-vae": "VAE output", "train-vq": "VQ tokenizer folder",
                   "cache-latents": "token file", "train-classifier": "classifier output"}


def command_lock(args: Any) -> Any:
    """`output_lock` on a CLI command's ``args.out`` for the commands of COMMAND_OUTPUTS, else a no-op context.
    Not for a sharded cache (under torchrun every process writes its own shards into one folder)."""
    out = getattr(args, "out", None)
    sharded = getattr(args, "shard_size", None) is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if getattr(args, "command", None) not in COMMAND_OUTPUTS or not out or sharded:
        return contextlib.nullcontext()
    return output_lock(out, COMMAND_OUTPUTS[args.command])


@contextmanager
def _short_lock(path: Path) -> Iterator[None]:
    lock = _lock_file(path)
    if lock in _HELD:
        yield
        return
    fd = _acquire(lock, LOCK_WAIT_S, "output", path)
    try:
        yield
    finally:
        _release(lock, fd)


# ------------------------------------------------------------------------------------------------ writes
def _check_space(path: Path, needed: int | None) -> None:
    if needed is not None and shutil.disk_usage(path.parent).free < needed:
        raise disk_full_error(path, needed=needed)


def _install(tmp: Path, path: Path, kind: str | None, overwrite: bool | None) -> None:
    """fsync the finished temporary, mark its kind, and rename it over ``path`` under the file's lock (checking
    again what is there now: another process may have written it meanwhile)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600 files, which shipped weights and caches must not be
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    kind = content_kind(tmp) or kind or _default_kind(path)
    _mark(tmp, kind)
    with _short_lock(path):
        check_target(path, kind, overwrite)
        os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextmanager
def atomic_path(path: str | os.PathLike, kind: str | None = None, *, overwrite: bool | None = None,
                needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; on success it replaces `path`, on an error it is removed.

    The one write path of the package. `path` is checked first (`check_target`: never a symbolic link; a shipped
    weights file or a file of another kind only with ``overwrite``), and again just before the rename, under the
    file's lock. ``kind``: what is written (default: the format tag in the written content, else the suffix); it is
    marked on the file. ``needed``: bytes the write needs, if known (checked against the free space first).
    The temporary name is unique per process; temporaries of writers that were killed are removed. The file and
    its folder are fsynced, so a power loss leaves either the old or the new file. A full disk (or a file-size
    limit) is one OSError naming the path, what was needed and the free space; the previous file is unchanged.
    """
    path = Path(path)
    check_target(path, kind, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    _check_space(path, needed)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        _install(tmp, path, kind, overwrite)
    except Exception as e:
        if _is_disk_full(e):
            raise disk_full_error(path, e, needed, tmp.stat().st_size if tmp.exists() else None) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


class FolderLock:
    """An exclusive lock on a run folder (``<folder>/.lock``, flock): a second process that wants the folder fails at
    once with a message naming the folder and the process that holds it. The operating system drops the lock when
    the holder exits, however it exits."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / ".lock"
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ValueError(f"run folder {self.folder} is in use by {holder}; wait for it, stop it, or choose "
                             "another out_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def write_text(path: str | os.PathLike, text: str, kind: str | None = None) -> Path:
    """Write ``text`` through `atomic_path` (markdown tables, JSON, YAML). Returns the path."""
    with atomic_path(path, kind) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure through `atomic_path` (the format from the suffix: the temporary has none)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=dpi)
    return path
