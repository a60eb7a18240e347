"""Atomic file writes that every stage uses: a reader sees the old file or the new one, never a part.

The bytes go to a temporary file in the target's folder, which is flushed and fsynced, then renamed over the
target (``os.replace``, atomic on POSIX), then the folder is fsynced so that the rename survives a power cut.
The file gets the mode an ordinary ``open(path, "w")`` would give (0666 minus the umask, usually 0644), not
the 0600 of ``tempfile.mkstemp``. On any error the temporary file is removed and the target is unchanged.
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["atomic_write_bytes", "atomic_write_npy", "fsync_dir"]


def _umask() -> int:
    mask = os.umask(0)   # the only portable way to read it; set back at once
    os.umask(mask)
    return mask


def fsync_dir(folder: str | Path) -> None:
    """fsync a folder so that a rename or a new file in it is durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename + fsync of the folder), mode 0666 & ~umask.
    Creates the parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_npy(path: str | Path, a: np.ndarray) -> None:
    """Save one array as ``.npy`` (no pickle: object arrays are refused) atomically."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(a), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())
