"""Safe file writes: atomic and durable replacement, one run per folder, and clear messages for a full disk or an
unwritable place."""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_temporaries(path: Path) -> None:
    """Delete ``.<name>.<pid>.tmp`` files that killed writers of ``path`` left behind (their process is gone)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:-len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_full_error(path: Path, error: OSError) -> OSError:
    """The OSError to raise for ENOSPC: names the path and the free space left."""
    free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
    return OSError(error.errno, f"no space left to write {path} ({free / 2**20:.1f} MiB free on that disk)")


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


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; on success it replaces `path`, on an error it is removed.

    The temporary name is unique per process, so two processes that make the same file (two repro commands
    needing one token cache) never write into each other's file; temporaries of writers that were killed are
    removed. The file and its folder are fsynced before and after the rename, so a power loss leaves either the
    old or the new file. The result gets the usual umask permissions (safetensors creates 0600 files, which
    shipped weights and shared caches must not be). A full disk is reported with the path and the free space.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise disk_full_error(path, e) from None
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
