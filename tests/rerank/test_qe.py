"""alpha-QE and average QE on global descriptors."""
import numpy as np
import pytest

from glimr.rerank.qe import alpha_qe, average_qe, rank_full, rerank_alpha_qe, rerank_average_qe


def _l2n(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    db = _l2n(rng.standard_normal((80, 16))).astype(np.float32)
    q = _l2n(db[:5] + 0.3 * rng.standard_normal((5, 16))).astype(np.float32)
    return q, db


def test_alpha_qe_is_the_weighted_average():
    q, db = _data()
    ranks = rank_full(q, db)
    top = ranks[:3].T
    got = alpha_qe(q, db, top, alpha=3.0)
    for j in range(len(q)):
        v = q[j].astype(np.float64).copy()
        for i in top[j]:
            v += max(float(q[j] @ db[i]), 0.0) ** 3 * db[i]      # weight (q . x_i)^alpha
        assert np.allclose(got[j], v / np.linalg.norm(v), atol=1e-6)
    avg = average_qe(q, db, top)
    v = q[0] + db[top[0]].sum(0)
    assert np.allclose(avg[0], v / np.linalg.norm(v), atol=1e-6)
    assert np.allclose(alpha_qe(q, db, top, alpha=0.0), avg, atol=1e-6)   # alpha 0 = average QE


def test_rerankers_follow_the_contract():
    q, db = _data(1)
    ranks = rank_full(q, db)
    for fn, kw in ((rerank_alpha_qe, {"n": 2, "alpha": 3}), (rerank_average_qe, {"n": 3})):
        out = fn(q, db, ranks, **kw)
        assert out.shape == ranks.shape and out.dtype.kind == "i"
        assert all(sorted(out[:, j]) == list(range(80)) for j in range(5))
    # n = 0: the query alone, the same ranking
    assert (rerank_alpha_qe(q, db, ranks, n=0) == ranks).all()
    assert (rerank_alpha_qe(q, db, ranks, k=2) == rerank_alpha_qe(q, db, ranks, n=2)).all()
    with pytest.raises(ValueError):
        rerank_alpha_qe(q, db, ranks, beta=1)


def test_qe_recovers_a_neighbour_of_a_neighbour():
    """x1 is far from q but close to x0, q's nearest image: QE brings x1 up."""
    d = 8
    e = np.eye(d, dtype=np.float32)
    q = e[0]
    x0 = _l2n(e[0] + 0.6 * e[1])
    x1 = _l2n(e[0] + 1.35 * e[1] + 0.2 * e[2])
    distract = _l2n(np.stack([e[0] + 1.25 * e[k] for k in range(3, 8)]))
    db = np.vstack([x0, x1, distract]).astype(np.float32)
    before = rank_full(q[None], db)[:, 0]
    after = rerank_alpha_qe(q[None], db, rank_full(q[None], db), n=1, alpha=1)[:, 0]
    assert list(before).index(1) > 1 and list(after).index(1) == 1


def test_eval_registry_has_the_rerankers():
    from glimr.eval import evaluate as E

    names = E.available_rerankers()
    assert {"alpha-qe", "aqe", "diffusion", "coattention"} <= set(names)
    q, db = _data(2)
    ranks = E.rank_by_inner_product(q, db)
    for spec in ("alpha-qe:n=2,alpha=3", "aqe:n=2", "diffusion:k=5,kq=3,alpha=0.8"):
        out = E.apply_rerank(spec, q, db, ranks)
        assert out.shape == ranks.shape
    with pytest.raises(E.EvalError, match="needs the evaluation set.s images"):
        E.apply_rerank("coattention", q, db, ranks)          # no evalset, no dataset=
