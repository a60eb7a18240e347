"""FAISS indexes for inner-product search over L2-normalised descriptors."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import faiss
import numpy as np


def make_index(dim: int, factory: str = "Flat", train: np.ndarray | None = None) -> faiss.Index:
    """An inner-product FAISS index from a factory string ("Flat", "HNSW32", "IVF1024,PQ32", "PCA128,Flat"...),
    wrapped in an IndexIDMap2 so rows keep the ids the store gives them. Trained on `train` if it needs it."""
    try:
        base = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"bad FAISS factory string {factory!r} for dim {dim}: {e}") from None
    if not base.is_trained:
        if train is None or len(train) == 0:
            raise ValueError(f"FAISS index {factory!r} needs training vectors")
        try:
            base.train(np.ascontiguousarray(train, dtype=np.float32))
        except RuntimeError as e:
            raise ValueError(f"FAISS index {factory!r} cannot be trained on {len(train)} vectors: {e}") from None
    return faiss.IndexIDMap2(base)


def save_index(index: faiss.Index, path: str | Path) -> None:
    """Atomic: write to a temporary file next to `path`, fsync, rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        um = os.umask(0)
        os.umask(um)
        os.chmod(tmp, 0o666 & ~um)  # mkstemp makes 0600; an index is read by whoever may search it
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_index(path: str | Path) -> faiss.Index:
    return faiss.read_index(str(path))


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (n_queries, k); ids are -1 where fewer than k results exist."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None]
    return index.search(q, int(k))
