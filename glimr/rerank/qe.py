"""Query expansion on global descriptors.

alpha-QE (Radenovic, Tolias & Chum, TPAMI 2019): the query is replaced by
``normalise(q + sum_{i=1..n} max(q . x_i, 0)^alpha x_i)`` over its top ``n`` results ``x_i``, and searched
again. Average QE (Chum et al., ICCV 2007) is the same with equal weights: ``normalise(q + sum_i x_i)``
(alpha = 0).

Functions work on L2-normalised descriptors; the ``rerank_*`` ones follow glimr's re-ranker contract
``fn(q_desc [Nq, D], db_desc [Ndb, D], ranks [Ndb, Nq], **params) -> ranks``.
"""
from __future__ import annotations

import numpy as np

__all__ = ["expand", "alpha_qe", "average_qe", "rank_full", "rerank_alpha_qe", "rerank_average_qe"]


def _l2n(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def expand(q: np.ndarray, db: np.ndarray, top: np.ndarray, alpha: float | None) -> np.ndarray:
    """Expanded queries: ``q`` [Nq, D], ``db`` [Ndb, D], ``top`` [Nq, n] db indices of each query's top results;
    ``alpha`` None = average QE (weights 1), else weights max(q . x_i, 0)^alpha."""
    q = np.asarray(q, np.float32)
    top = np.asarray(top, np.int64)
    if top.shape[1] == 0:
        return q.copy()
    x = np.asarray(db, np.float32)[top]                     # [Nq, n, D]
    if alpha is None:
        w = np.ones(top.shape, np.float32)
    else:
        s = np.einsum("qd,qnd->qn", q, x)
        w = np.power(np.maximum(s, 0.0), float(alpha)).astype(np.float32)
    return _l2n(q + np.einsum("qn,qnd->qd", w, x)).astype(np.float32)


def alpha_qe(q: np.ndarray, db: np.ndarray, top: np.ndarray, alpha: float = 3.0) -> np.ndarray:
    return expand(q, db, top, alpha)


def average_qe(q: np.ndarray, db: np.ndarray, top: np.ndarray) -> np.ndarray:
    return expand(q, db, top, None)


def rank_full(q: np.ndarray, db: np.ndarray, invalid: np.ndarray | None = None) -> np.ndarray:
    """[Ndb, Nq] ranking by descending inner product (ties: lower index first)."""
    s = np.asarray(db, np.float32) @ np.asarray(q, np.float32).T
    if invalid is not None and len(invalid):
        s[invalid] = -np.inf
    return np.argsort(-s, axis=0, kind="stable")


def _check(n: int, ranks: np.ndarray) -> None:
    if n < 0:
        raise ValueError(f"query expansion needs n >= 0 (got {n})")
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be [Ndb, Nq], got shape {ranks.shape}")


def rerank_alpha_qe(q_desc, db_desc, ranks, n: int = 2, alpha: float = 3.0, **unknown) -> np.ndarray:
    """alpha-QE re-ranker: expand each query with its top ``n`` (``k`` is accepted as an alias) and rank again."""
    n = int(unknown.pop("k", n))
    if unknown:
        raise ValueError(f"alpha-qe takes n (or k) and alpha, not {sorted(unknown)}")
    ranks = np.asarray(ranks)
    _check(n, ranks)
    q2 = alpha_qe(q_desc, db_desc, ranks[:n].T, alpha)
    return _keep_last(rank_full(q2, db_desc), ranks, db_desc)


def rerank_average_qe(q_desc, db_desc, ranks, n: int = 2, **unknown) -> np.ndarray:
    """Average-QE re-ranker: expand each query with the mean of its top ``n`` and rank again."""
    n = int(unknown.pop("k", n))
    if unknown:
        raise ValueError(f"aqe takes n (or k), not {sorted(unknown)}")
    ranks = np.asarray(ranks)
    _check(n, ranks)
    q2 = average_qe(q_desc, db_desc, ranks[:n].T)
    return _keep_last(rank_full(q2, db_desc), ranks, db_desc)


def _keep_last(new: np.ndarray, old: np.ndarray, db: np.ndarray) -> np.ndarray:
    """Images the first ranking put last because they failed (all-zero descriptors) stay last."""
    bad = np.flatnonzero(~np.any(np.asarray(db) != 0, axis=1))
    if not len(bad):
        return new
    out = np.empty_like(new)
    badset = np.zeros(len(db), bool)
    badset[bad] = True
    for j in range(new.shape[1]):
        col = new[:, j]
        out[:, j] = np.concatenate([col[~badset[col]], col[badset[col]]])
    return out


def search_store(store, q: np.ndarray, k: int = 10, n: int = 2, alpha: float | None = 3.0
                 ) -> list[tuple[str, float]]:
    """Search an index folder (glimr.index.store.IndexStore) with alpha-QE (``alpha`` None: average QE):
    FAISS top ``n`` -> expanded query -> FAISS again. Returns [(path, score)] best first."""
    from glimr.index import ann  # noqa: PLC0415

    q = np.asarray(q, np.float32).reshape(1, -1)
    _, ids = ann.search(store.faiss(), q, max(n, 1))
    top = ids[0][ids[0] >= 0][:n]
    if len(top):
        x = np.asarray(store.vectors()[top], np.float32)
        w = np.ones(len(top), np.float32) if alpha is None else np.maximum(x @ q[0], 0.0) ** float(alpha)
        q = _l2n(q + (w[:, None] * x).sum(0)[None]).astype(np.float32)
    return store.search(q, k)[0]
