"""Diffusion (Iscen et al., CVPR 2017): mutual k-NN graph, (I - alpha S) f = y by conjugate gradient."""
import numpy as np
from scipy import sparse

from glimr.rerank.diffusion import DiffusionGraph, diffuse, rerank_diffusion
from glimr.rerank.qe import rank_full


def _l2n(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _manifold(n=40, seed=0):
    """Points along an arc (one object seen under gradually changing views) plus random distractors."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1.6, n)
    arc = np.stack([np.cos(t), np.sin(t)] + [0.02 * rng.standard_normal(n) for _ in range(6)], 1)
    noise = rng.standard_normal((60, 8))
    noise[:, 0] = np.abs(noise[:, 0]) + 0.9          # distractors rather close to the query's direction
    return _l2n(np.vstack([arc, noise])).astype(np.float32)


def test_graph_is_mutual_knn_and_symmetric(tmp_path):
    x = _manifold()
    g = DiffusionGraph.build(x, k=5, gamma=3.0)
    S = g.S.toarray()
    assert np.allclose(S, S.T, atol=1e-6) and (np.diag(S) == 0).all()
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    knn = np.argsort(-sims, 1)[:, :5]
    for i in range(0, 100, 7):
        for j in np.flatnonzero(S[i]):
            assert j in knn[i] and i in knn[j]          # edges only between mutual neighbours
    g.save(tmp_path / "g", {"n_vectors": 100})
    back = DiffusionGraph.load(tmp_path / "g", {"n_vectors": 100})
    assert back is not None and np.allclose(back.S.toarray(), S)
    assert DiffusionGraph.load(tmp_path / "g", {"n_vectors": 99}) is None


def test_cg_solves_the_linear_system():
    x = _manifold()
    g = DiffusionGraph.build(x, k=6)
    q = x[0]
    sims = x @ q
    order = np.argsort(-sims, kind="stable")
    new = diffuse(g, sims, order, kq=5, alpha=0.9, truncate=None, iters=200, tol=1e-10)
    # the direct solution on the full graph (rows in the order of the initial ranking)
    S = g.S.toarray()[np.ix_(order, order)]
    y = np.zeros(len(x))
    y[:5] = np.maximum(sims[order[:5]], 0) ** 3
    f = np.linalg.solve(np.eye(len(x)) - 0.9 * S, y)
    assert (new == order[np.argsort(-f, kind="stable")]).all()


def test_diffusion_follows_the_manifold():
    x = _manifold()
    q = x[:1]
    ranks = rank_full(q, x)
    out = rerank_diffusion(q, x, ranks, k=4, kq=3, truncate=80)
    arc = set(range(40))
    hits_before = len(arc & set(ranks[:40, 0].tolist()))
    hits_after = len(arc & set(out[:40, 0].tolist()))
    assert hits_after >= hits_before + 5                 # the arc comes up (22 -> 30 of 40 here)
    assert out.shape == ranks.shape and sorted(out[:, 0]) == list(range(100))
    assert isinstance(DiffusionGraph.build(x, 4).S, sparse.csr_matrix)
