"""Co-attention scoring (Hu & Bors 2023, eqs. (8)-(10)) and search."""
import numpy as np
import pytest

from glimr.extract.local import RecordCodec, l2n_np
from glimr.rerank.coattention import (CoAttentionIndex, coattention_weights, rerank_coattention, score_dense,
                                      search_with_qe)


def _random_db(m=120, k=6, d=24, seed=0, empty=True):
    rng = np.random.default_rng(seed)
    u = l2n_np(rng.standard_normal((m, k, d)).astype(np.float32))
    n = rng.uniform(0.5, 2.0, size=(m, k)).astype(np.float32)
    if empty:                       # some images have fewer clusters than K
        n[:10, k - 2:] = 0
        u[:10, k - 2:] = 0
    return u, n


def _direct(q, u, n, T=10.0, pool="unit"):
    """Eqs. (8)-(10) per candidate, as printed (with eq. (9)'s a_i read as the normalised a'_i)."""
    out = []
    for m in range(len(u)):
        valid = n[m] > 0
        x = u[m][valid] * (n[m][valid][:, None] if pool == "norm" else 1.0)
        a = u[m][valid] @ q                                   # cosine similarities
        e = np.exp(a * T)
        a_norm = e / e.sum()                                  # eq. (8)
        v_c = (a_norm[:, None] * x).sum(0) / valid.sum()      # eq. (9)
        out.append(float(q @ v_c / np.linalg.norm(q) / np.linalg.norm(v_c)))   # eq. (10)
    return np.array(out)


def _index(u, n, dtype="float32", proxy_dim=8):
    k, d = u.shape[1], u.shape[2]
    scale = (np.abs(u).max((0, 1)) / 127).astype(np.float32) if dtype == "int8" else None
    codec = RecordCodec(k, d, dtype, proxy_dim, 0, 16, scale)
    recs = np.stack([codec.encode(u[i], n[i], l2n_np(u[i].sum(0)[:proxy_dim]), None) for i in range(len(u))])
    return CoAttentionIndex.from_records(recs, codec)


def test_weights_sum_to_one_and_are_eq_8():
    rng = np.random.default_rng(1)
    a = rng.uniform(-1, 1, size=(50, 10))
    valid = rng.random((50, 10)) > 0.3
    valid[:, 0] = True
    for T in (1.0, 10.0, 30.0):
        w = coattention_weights(a, valid, T)
        assert np.allclose(w.sum(1), 1.0, atol=1e-6)
        assert (w[~valid] == 0).all() and (w >= 0).all()
        e = np.exp(a[3][valid[3]] * T)
        assert np.allclose(w[3][valid[3]], e / e.sum(), rtol=1e-5)
    # temperature sharpens: the weight of the best cluster grows with T
    assert coattention_weights(a[:1], None, 20.0).max() > coattention_weights(a[:1], None, 1.0).max()


@pytest.mark.parametrize("pool", ["unit", "norm"])
def test_vectorised_scores_equal_the_direct_formula(pool):
    u, n = _random_db()
    q = l2n_np(np.random.default_rng(2).standard_normal(24).astype(np.float32))
    ref = _direct(q, u, n, pool=pool)
    assert np.allclose(score_dense(q, u, n, pool=pool), ref, atol=1e-5)
    for dtype, tol in (("float32", 2e-4), ("float16", 2e-3), ("int8", 2e-2)):   # gram is stored in float16
        got = _index(u, n, dtype).scores(q, pool=pool, chunk=37)                 # odd blocks on purpose
        assert np.allclose(got, ref, atol=tol), dtype


def test_one_cluster_equals_plain_cosine_ranking():
    rng = np.random.default_rng(3)
    u, n = _random_db(m=200, k=1, empty=False)
    idx = _index(u, n)
    for _ in range(3):
        q = l2n_np(rng.standard_normal(24).astype(np.float32))
        cos = u[:, 0] @ q
        res = idx.search(q, k=None, ivf=False)
        assert np.allclose(res.scores, np.sort(cos)[::-1], atol=1e-6)
        assert (res.ids == np.argsort(-cos, kind="stable")).all()


def test_query_sensitivity():
    """The same candidate scores higher for a query that matches one of its clusters, whatever the others."""
    rng = np.random.default_rng(4)
    d = 32
    parts = l2n_np(rng.standard_normal((4, d)).astype(np.float32))     # 4 'objects' in one image
    u, n = parts[None], np.ones((1, 4), np.float32)
    idx = _index(u, n, proxy_dim=4)
    for j in range(4):
        s_ca = idx.scores(parts[j])[0]
        s_uniform = idx.scores(parts[j], temperature=0.0)[0]           # T = 0: query-insensitive pooling
        assert s_ca > 0.9 > s_uniform


def test_search_fallback_shortlist_and_qe():
    u, n = _random_db(m=300, k=4, d=16, seed=5, empty=False)
    idx = _index(u, n, proxy_dim=16)
    q = l2n_np(u[7].sum(0))
    full = idx.search(q, k=None, ivf=False)
    assert full.n_scored == 300 and sorted(full.ids.tolist()) == list(range(300)) and full.ids[0] == 7
    # a shortlist scores only that many; the best (by co-attention) is kept when the proxy keeps it
    sl = idx.search(q, k=10, ivf=False, shortlist=20)
    assert sl.n_scored == 20 and sl.ids[0] == 7
    # removed images are never returned
    idx.live[7] = False
    assert 7 not in idx.search(q, k=None, ivf=False).ids
    idx.live[7] = True
    r = search_with_qe(idx, q, None, k=5, qe=2, alpha=3.0, ivf=False)
    assert r.ids[0] == 7 and len(r.ids) == 5
    ranks = rerank_coattention(np.stack([q, l2n_np(u[9].sum(0))]), idx, None, None, ivf=False)
    assert ranks.shape == (300, 2) and ranks[0, 0] == 7 and ranks[0, 1] == 9


def test_inverted_file_filters_and_fallback():
    from glimr.rerank.invfile import InvertedFile

    u, n = _random_db(m=50, k=3, d=8, seed=6, empty=False)
    words = np.full((50, 4), 65535, np.int64)
    words[:, 0] = np.arange(50) % 10                       # image i has word i % 10
    idx = _index(u, n)
    idx.ivf = InvertedFile.from_words(words, 10, 65535)
    q = l2n_np(u[3].sum(0))
    r = idx.search(q, np.array([3]), k=None, fallback="last")
    assert r.n_candidates == 5 and set(r.ids[:5].tolist()) == {3, 13, 23, 33, 43} and (r.scores[5:] < -1).all()
    prior = np.arange(50)[::-1].copy()                     # unscored images in the prior's order
    r = idx.search(q, np.array([3]), k=None, fallback="last", prior=prior)
    assert r.ids[5:].tolist() == [i for i in range(49, -1, -1) if i % 10 != 3]
    z = idx.search(q, np.array([3]), k=None, fallback="zero")
    assert np.isclose(z.scores[z.ids.tolist().index(0)], 0.0)


def test_index_with_coattention_records(shared_data, lite0_gem, tmp_path):
    """--coattention index: one durable record per vid (same commit as the vectors), incremental, searchable;
    with K=1 the co-attention ranking of real images is the plain cosine ranking of their query vectors."""
    import os
    import shutil

    from glimr.extract.local import LocalConfig
    from glimr.index.build import build_index
    from glimr.index.store import IndexStore
    from glimr.rerank.coattention import query_features, search_store

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(8):
        shutil.copy(shared_data / "ukbench" / f"ukbench{i:05d}.jpg", imgs)
    cfg = LocalConfig(n_select=60, clusters=1, dim=8, proxy_dim=8, codebook_size=16, codebook_dim=8, max_words=8,
                      dtype="float32")
    kw = dict(model_name="gem-lite0", max_size=128, workers=0, chunk_size=3, progress=False, coattention=cfg,
              precision="fp32", ca_samples="database")
    build_index(imgs, tmp_path / "idx", lite0_gem, **kw)
    with IndexStore.open(tmp_path / "idx") as st:
        recs = st.coattention_records()
        assert len(recs) == st.n_vectors == 8 and recs.dtype.itemsize == cfg.codec().nbytes
        hits, res = search_store(st, lite0_gem, imgs / "ukbench00005.jpg", k=8, ivf=False, precision="fp32")
        assert hits[0][0] == "ukbench00005.jpg" and res.n_scored == 8
        # K = 1: co-attention = cosine between the query vector and each image's (single) cluster vector
        idx = __import__("glimr.rerank.coattention", fromlist=["x"]).CoAttentionIndex.from_store(st)
        q, _ = query_features(lite0_gem, imgs / "ukbench00005.jpg", idx.params, scales=(1.0,), max_size=128,
                              precision="fp32")
        vids, paths = st.live()
        units = idx.codec.decode_units(np.asarray(recs["codes"]))[:, 0]
        cos = units @ q
        assert [h[0] for h in hits] == [paths[list(vids).index(v)] for v in np.argsort(-cos, kind="stable")]
    # a killed build leaves an uncommitted record tail: the next writer truncates it
    with open(tmp_path / "idx" / "coattention.rec", "ab") as f:
        f.write(b"\0" * 100)
    (imgs / "ukbench00001.jpg").unlink()
    shutil.copy(shared_data / "ukbench" / "ukbench00100.jpg", imgs / "new.jpg")
    rep = build_index(imgs, tmp_path / "idx", lite0_gem, **kw)
    assert (rep.added, rep.removed, rep.total) == (1, 1, 8)
    with IndexStore.open(tmp_path / "idx") as st:
        assert os.path.getsize(tmp_path / "idx" / "coattention.rec") == 9 * cfg.codec().nbytes
        hits, _ = search_store(st, lite0_gem, imgs / "new.jpg", k=3, ivf=True, fallback="last", precision="fp32")
        assert hits[0][0] == "new.jpg" and "ukbench00001.jpg" not in [h[0] for h in hits]
    # an index built without co-attention cannot get it later
    with pytest.raises(Exception, match="co-attention"):
        build_index(imgs, tmp_path / "plain", lite0_gem, model_name="gem-lite0", max_size=128, workers=0,
                    progress=False)
        build_index(imgs, tmp_path / "plain", lite0_gem, **kw)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_cosines_and_proxy_equal_the_decoded_records_in_float32(dtype, monkeypatch):
    """The kernels (public torch ops only) compute, in float32, exactly what the stored records say: a_i against
    the decoded units and the proxy against int8 x per-row scale, both to 1e-5 of a float64 reference, also
    across the int8 conversion blocks (made small here) and on a gathered, non-contiguous set of rows."""
    import glimr.rerank.coattention as ca

    monkeypatch.setattr(ca, "_BLOCK", 7)
    u, n = _random_db(m=90, k=5, d=24, seed=8)
    idx = _index(u, n, dtype, proxy_dim=8)
    q = l2n_np(np.random.default_rng(9).standard_normal(24).astype(np.float32))
    rows = np.array([0, 3, 4, 17, 50, 89])
    ref = idx.codec.decode_units(idx.codes[rows]).astype(np.float64) @ q.astype(np.float64)
    got = idx.cosines(q, rows)
    assert got.dtype == np.float32 and got.shape == (6, 5)
    assert np.abs(got - ref).max() < 1e-5
    qp = q[:8].astype(np.float64) / np.linalg.norm(q[:8])
    ref_p = (idx.proxy.astype(np.float64) @ qp) * idx.proxy_scale
    assert np.abs(idx.proxy_scores(q) - ref_p).max() < 1e-5
