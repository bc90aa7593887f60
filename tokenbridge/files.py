"""Atomic file writes: a crash or an error mid-write leaves the previous file as it was."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; on success it replaces `path`, on an error it is removed.

    The temporary name is unique per process, so two processes that make the same file (two repro commands
    needing one token cache) never write into each other's file. The result gets the usual umask permissions
    (safetensors creates 0600 files, which shipped weights and shared caches must not be).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
