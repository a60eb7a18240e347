"""Diffusion re-ranking (Iscen, Tolias, Avrithis, Furon & Chum, CVPR 2017), on global descriptors.

Offline, once per database (at indexing): a k-NN graph of the database descriptors (FAISS), affinities
``a_ij = max(x_i . x_j, 0)^gamma`` kept where i and j are *mutual* k-nearest neighbours, symmetric
normalisation ``S = D^-1/2 A D^-1/2`` (scipy sparse).

Online, per query: ``y_i = max(q . x_i, 0)^gamma`` for the query's ``kq`` nearest database images (0
elsewhere), then the ranking solves ``(I - alpha S) f = y`` by conjugate gradient (the system is symmetric
positive definite for alpha < 1). Truncation: the system is restricted to the query's top ``truncate``
images of the initial ranking (the sub-graph they span), which is what makes it fast; the images beyond
keep their initial order after them.

The graph is saved as ``.npy`` + ``.json`` (never pickle) in ``INDEX/diffusion/``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import sparse
from scipy.sparse.linalg import cg

__all__ = ["DiffusionGraph", "diffuse", "rerank_diffusion"]


@dataclass
class DiffusionGraph:
    """S (n x n, CSR, symmetric normalised affinities) over database rows ``0..n-1``."""

    S: sparse.csr_matrix
    k: int
    gamma: float
    ids: np.ndarray | None = None   # row -> external id (e.g. vid), when the rows are a subset

    @classmethod
    def build(cls, db: np.ndarray, k: int = 50, gamma: float = 3.0, ids: np.ndarray | None = None,
              faiss_index=None) -> DiffusionGraph:
        """Mutual k-NN graph of ``db`` [n, D] (L2-normalised). ``faiss_index``: an index over the same rows
        (ids 0..n-1) to search instead of an exact one."""
        import faiss  # noqa: PLC0415

        x = np.ascontiguousarray(db, dtype=np.float32)
        n = len(x)
        kk = int(min(k + 1, n))
        if n == 0:
            return cls(sparse.csr_matrix((0, 0), dtype=np.float32), k, gamma, ids)
        if faiss_index is None:
            faiss_index = faiss.IndexFlatIP(x.shape[1])
            faiss_index.add(x)
        sims, nn = faiss_index.search(x, kk)
        rows = np.repeat(np.arange(n), kk)
        cols = nn.reshape(-1)
        vals = np.maximum(sims.reshape(-1), 0.0) ** gamma
        ok = (cols >= 0) & (cols != rows)
        A = sparse.csr_matrix((vals[ok], (rows[ok], cols[ok])), shape=(n, n))
        A = A.minimum(A.T)                     # mutual neighbours only (0 where either side lacks the edge)
        A.eliminate_zeros()
        d = np.asarray(A.sum(1)).ravel()
        dinv = np.divide(1.0, np.sqrt(d), out=np.zeros_like(d), where=d > 0)
        S = sparse.diags(dinv) @ A @ sparse.diags(dinv)
        return cls(sparse.csr_matrix(S, dtype=np.float32), int(k), float(gamma), ids)

    @property
    def n(self) -> int:
        return int(self.S.shape[0])

    # ---- persistence ----
    def save(self, directory: str | os.PathLike, state: dict | None = None) -> None:
        from glimr.io.atomic import atomic_write_bytes, atomic_write_npy  # noqa: PLC0415

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_npy(d / "indptr.npy", self.S.indptr.astype(np.int64))
        atomic_write_npy(d / "indices.npy", self.S.indices.astype(np.int32))
        atomic_write_npy(d / "data.npy", self.S.data.astype(np.float32))
        if self.ids is not None:
            atomic_write_npy(d / "ids.npy", np.asarray(self.ids, np.int64))
        atomic_write_bytes(d / "graph.json", json.dumps({**(state or {}), "n": self.n, "k": self.k, "gamma": self.gamma,
                                                    "nnz": int(self.S.nnz), "ids": self.ids is not None}).encode())

    @classmethod
    def load(cls, directory: str | os.PathLike, state: dict | None = None) -> DiffusionGraph | None:
        """The saved graph if it exists and its state matches ``state`` (else None)."""
        d = Path(directory)
        try:
            doc = json.loads((d / "graph.json").read_text())
            if state and any(doc.get(k) != v for k, v in state.items()):
                return None
            indptr = np.load(d / "indptr.npy", allow_pickle=False)
            indices = np.load(d / "indices.npy", allow_pickle=False)
            data = np.load(d / "data.npy", allow_pickle=False)
            if len(data) != doc["nnz"] or len(indptr) != doc["n"] + 1:
                return None
            ids = np.load(d / "ids.npy", allow_pickle=False) if doc.get("ids") else None
            S = sparse.csr_matrix((data, indices, indptr), shape=(doc["n"], doc["n"]))
            return cls(S, int(doc["k"]), float(doc["gamma"]), ids)
        except (OSError, ValueError, KeyError):
            return None


def diffuse(graph: DiffusionGraph, q_sims: np.ndarray, order: np.ndarray, *, kq: int = 10, alpha: float = 0.99,
            truncate: int | None = 1000, iters: int = 20, tol: float = 1e-6, gamma: float | None = None
            ) -> np.ndarray:
    """One query: ``q_sims`` (n,) similarities to every database row, ``order`` (n,) its initial ranking.
    Returns the new ranking (n,) of row indices."""
    gamma = graph.gamma if gamma is None else gamma
    n = graph.n
    order = np.asarray(order, np.int64)
    r = n if truncate is None else int(min(truncate, n))
    sub = order[:r]
    y = np.zeros(r, np.float64)
    top = min(kq, r)
    y[:top] = np.maximum(q_sims[sub[:top]], 0.0) ** gamma
    if not np.any(y):
        return order.copy()
    S = graph.S[sub][:, sub] if r < n else graph.S[order][:, order]
    A = sparse.identity(r, format="csr") - alpha * S
    f, _ = cg(A, y, rtol=tol, maxiter=iters)
    new_top = sub[np.argsort(-f, kind="stable")]
    return np.concatenate([new_top, order[r:]])


def rerank_diffusion(q_desc, db_desc, ranks, k: int = 50, kq: int = 10, gamma: float = 3.0, alpha: float = 0.99,
                     truncate: int = 1000, iters: int = 20, graph: DiffusionGraph | None = None) -> np.ndarray:
    """Diffusion re-ranker with glimr's contract ``fn(q_desc, db_desc, ranks, **params) -> ranks``; the
    database graph is built once per database (cached in this process by the descriptors' fingerprint)."""
    ranks = np.asarray(ranks)
    if graph is None:
        graph = _cached_graph(np.asarray(db_desc, np.float32), int(k), float(gamma))
    sims = np.asarray(db_desc, np.float32) @ np.asarray(q_desc, np.float32).T       # [Ndb, Nq]
    out = np.empty_like(ranks)
    for j in range(ranks.shape[1]):
        out[:, j] = diffuse(graph, sims[:, j], ranks[:, j], kq=int(kq), alpha=float(alpha),
                            truncate=int(truncate) if truncate else None, iters=int(iters))
    return out


_GRAPHS: dict[tuple, DiffusionGraph] = {}


def _cached_graph(db: np.ndarray, k: int, gamma: float) -> DiffusionGraph:
    import hashlib  # noqa: PLC0415

    key = (hashlib.sha1(np.ascontiguousarray(db).view(np.uint8)).hexdigest(), db.shape, k, gamma)
    if key not in _GRAPHS:
        if len(_GRAPHS) > 4:
            _GRAPHS.clear()
        _GRAPHS[key] = DiffusionGraph.build(db, k, gamma)
    return _GRAPHS[key]


def graph_state(store) -> dict:
    vids, _ = store.live()
    return {"n_vectors": int(store.n_vectors), "n_live": int(len(vids)), "live_sum": int(vids.sum())}


def build_for_store(store, k: int = 50, gamma: float = 3.0) -> DiffusionGraph:
    """The database graph of an index folder (over its live images), saved in INDEX/diffusion/."""
    vids, _ = store.live()
    x = np.asarray(store.vectors()[vids], np.float32) if len(vids) else np.zeros((0, store.config.dim), np.float32)
    g = DiffusionGraph.build(x, k=k, gamma=gamma, ids=vids)
    g.save(Path(store.dir) / "diffusion", graph_state(store))
    return g


def search_store(store, q: np.ndarray, k: int = 10, **params) -> list[tuple[str, float]]:
    """Search an index folder by diffusion over its saved graph (``glimr index build --diffusion``).
    Returns [(path, f)] best first (f: the diffusion score)."""
    g = DiffusionGraph.load(Path(store.dir) / "diffusion", graph_state(store))
    if g is None:
        raise FileNotFoundError(f"index '{store.dir}' has no current diffusion graph: run `glimr index build "
                                f"IMAGES --index {store.dir} --diffusion` (it is built once, at indexing)")
    vids = g.ids
    x = np.asarray(store.vectors()[vids], np.float32)
    sims = x @ np.asarray(q, np.float32).reshape(-1)
    order = np.argsort(-sims, kind="stable")
    new = diffuse(g, sims, order, **params)[:k]
    names = store.paths_for(vids[new])
    return [(names[int(vids[i])], float(sims[i])) for i in new]
