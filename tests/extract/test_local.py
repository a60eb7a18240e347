"""Co-attention local features (Hu & Bors 2023, secs. 4.2 and 5): selection, seeding, clustering, GeM, PCA."""
import json

import numpy as np
import pytest
import torch

from glimr.extract.local import (PCA, CoAttentionParams, LocalConfig, RecordCodec, cluster_gem, extract_local,
                                 farthest_point_seeds, fit_params, image_local, kmeans_fps, l2n_np, load_locals,
                                 model_pooling, save_locals, select_top_n)


def _paper_seeding(x, k):
    """Sec. 4.2 steps 1-4 written out literally, one feature at a time (slow)."""
    norms = [float(v @ v) for v in x]
    centres = [int(np.argmax(norms))]                                   # step 1
    while len(centres) < k:
        best, best_d = None, -1.0
        for n, v in enumerate(x):
            if n in centres:
                continue
            d = min(float(np.linalg.norm(v - x[c])) for c in centres)   # step 2
            if d > best_d:                                              # step 3 (first max on ties)
                best, best_d = n, d
        centres.append(best)                                            # step 4: repeat
    return centres


def test_seeding_follows_the_paper_steps():
    rng = np.random.default_rng(0)
    for trial in range(5):
        x = rng.standard_normal((60, 7)) * rng.uniform(0.5, 2.0, size=(60, 1))
        assert farthest_point_seeds(x, 10).tolist() == _paper_seeding(x, 10)
    # a hand-made case: (10,0) has the largest norm; (0,3) is the farthest from it (10.4 > 10 from (0,0));
    # then (1,0): its nearest centre is 3.16 away, more than (0,0)'s 3 and (9,1)'s 1.41
    x = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [0.0, 3.0], [9.0, 1.0]])
    assert farthest_point_seeds(x, 3).tolist() == [2, 3, 1]
    # fewer distinct points than K: stops instead of repeating a centre
    assert farthest_point_seeds(np.array([[1.0, 1.0]] * 4 + [[0.0, 2.0]]), 3).tolist() == [4, 0]


def test_kmeans_is_deterministic_and_consistent():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(c, 0.3, size=(40, 5)) for c in (0.0, 3.0, 6.0)]).astype(np.float32)
    l1, c1 = kmeans_fps(x, 3)
    l2, c2 = kmeans_fps(x.copy(), 3)
    assert (l1 == l2).all() and np.allclose(c1, c2)
    assert sorted(np.bincount(l1).tolist()) == [40, 40, 40]                    # the three blobs
    d = ((x[:, None] - c1[None]) ** 2).sum(-1)
    assert (l1 == d.argmin(1)).all()                                           # labels = nearest centre


def test_selection_takes_the_largest_norms_over_all_scales():
    maps = [torch.rand(6, 3, 4), torch.rand(6, 5, 2) * 2]
    feats, pos = select_top_n(maps, 7)
    allf = [(float(m[:, y, x].norm()), s, y, x) for s, m in enumerate(maps)
            for y in range(m.shape[1]) for x in range(m.shape[2])]
    top = sorted(allf, key=lambda t: -t[0])[:7]
    assert [tuple(p) for p in pos.tolist()] == [(s, y, x) for _, s, y, x in top]
    assert np.allclose(feats[0], maps[pos[0][0]][:, pos[0][1], pos[0][2]].numpy())


def test_cluster_gem_matches_a_direct_computation():
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 2, size=(30, 4)).astype(np.float32)
    labels = rng.integers(0, 3, size=30)
    out, counts = cluster_gem(x, labels, 3, 3.0)
    for k in range(3):
        member = x[labels == k]
        assert counts[k] == len(member)
        assert np.allclose(out[k], np.mean(member ** 3, axis=0) ** (1 / 3), rtol=1e-5)   # eq. (1) per cluster


def test_pca_is_eqs_11_to_13():
    rng = np.random.default_rng(4)
    f = rng.standard_normal((200, 12)) @ rng.standard_normal((12, 12))
    pca = PCA.fit(f, 5)
    m = f.mean(0)                                                              # eq. (11)
    cov = (f - m).T @ (f - m) / len(f)                                         # eq. (12)
    vals, vecs = np.linalg.eigh(cov)
    P = vecs[:, ::-1][:, :5].T
    y = rng.standard_normal((3, 12))
    ref = (y - m) @ P.T                                                        # eq. (13)
    assert np.allclose(np.abs(pca.apply(y)), np.abs(ref), atol=1e-4)          # eigenvector signs are free
    assert np.allclose(pca.eigvals, vals[::-1][:5], rtol=1e-4)
    with pytest.raises(ValueError, match="samples"):
        PCA.fit(f[:4], 5)


def test_record_codec_roundtrip():
    rng = np.random.default_rng(5)
    u = l2n_np(rng.standard_normal((3, 16)).astype(np.float32))
    for dtype in ("float32", "float16", "int8"):
        scale = np.full(16, 1 / 127, np.float32) if dtype == "int8" else None
        c = RecordCodec(4, 16, dtype, 8, 6, 100, scale)
        r = c.encode(u, np.array([1.0, 2.0, 3.0]), np.ones(8), np.array([3, 7, 9]))
        assert c.nbytes == r.dtype.itemsize
        back = c.decode_units(r["codes"])
        assert np.allclose(back[:3], u, atol={"float32": 1e-7, "float16": 1e-3, "int8": 5e-3}[dtype])
        assert (back[3] == 0).all() and r["norms"][3] == 0 and r["words"].tolist()[:4] == [3, 7, 9, c.pad_word]
        g = np.zeros((4, 4))
        g[np.triu_indices(4, 1)] = r["gram"]
        assert np.allclose(g[0, 1], u[0] @ u[1], atol=1e-3)
    assert LocalConfig().codec().nbytes > LocalConfig(dim=256, dtype="int8").codec().nbytes


def test_extract_local_equals_direct_forward_passes(shared_data, lite0_gem, tmp_path):
    """The per-image features collected from extract(local_fn=...) == selection/clustering/GeM of per-image
    forward passes; and the model's GeM p is used; parameters save as .npy/.json and load back."""
    from glimr.extract.multiscale import resized_views
    from glimr.io.images import load_image

    paths = [shared_data / "ukbench" / f"ukbench{i:05d}.jpg" for i in range(4)]
    cfg = LocalConfig(n_select=80, clusters=5, dim=16, proxy_dim=8, codebook_size=32, codebook_dim=8,
                      max_words=16, ivf_features=80)
    scales = (0.7071, 1.0)
    res, locs = extract_local(lite0_gem, paths, cfg=cfg, scales=scales, max_size=192, batch_size=4, workers=0,
                              progress=False, precision="fp32", draft=False)
    assert sorted(locs) == list(range(4)) and not res.errors
    p, w, b = model_pooling(lite0_gem)
    assert p == pytest.approx(3.0) and w is None
    img = load_image(paths[2])
    views = resized_views(img, scales, 192)
    with torch.inference_mode():
        maps = [lite0_gem(v[None].float() / 255).local[0] for v in views]
    direct = image_local(maps, cfg, p)
    got = locs[2]
    assert (got.labels == direct.labels).all() and (got.pos == direct.pos).all()
    assert np.allclose(got.clusters, direct.clusters, rtol=1e-4, atol=1e-5)
    assert np.allclose(got.query, direct.query, rtol=1e-4, atol=1e-5)
    # query vector = GeM of the selected features
    assert np.allclose(direct.query, np.mean(np.maximum(direct.feats, 1e-6) ** 3, 0) ** (1 / 3), rtol=1e-4)
    n_loc = sum(m.shape[1] * m.shape[2] for m in maps)
    assert len(got.labels) == min(80, n_loc) and got.clusters.shape == (5, 1280)

    params = fit_params([locs[i] for i in range(4)], cfg)
    assert params.meta["pca_from"] == "global+clusters"      # 4 images < D'+1: clusters join the PCA sample
    q = params.query_vector(locs[0])
    assert q.shape == (16,) and np.isclose(np.linalg.norm(q), 1.0, atol=1e-5)
    rec = params.encode(locs[0])
    assert rec.dtype.itemsize == cfg.codec().nbytes
    params.save(tmp_path / "ca")
    assert json.loads((tmp_path / "ca" / "params.json").read_text())["config"]["clusters"] == 5
    again = CoAttentionParams.load(tmp_path / "ca")
    assert np.allclose(again.query_vector(locs[0]), q) and (again.encode(locs[0]) == rec)
    # cached ImageLocal round trip
    save_locals(tmp_path / "locs", [locs[0], None, locs[1]])
    back = load_locals(tmp_path / "locs")
    assert back[1] is None and np.allclose(back[2].clusters, locs[1].clusters)
    assert np.allclose(back[0].feats, locs[0].feats, rtol=1e-3, atol=1e-3)


def test_cached_locals_keep_the_feature_maps_width_when_the_head_projects(tmp_path):
    """A head with a whitening FC pools to fewer dims (query, clusters) than its local map has (feats)."""
    from glimr.extract.local import ImageLocal

    rng = np.random.default_rng(0)

    def loc(n):
        return ImageLocal(query=rng.random(8, dtype=np.float32), global_=rng.random(8, dtype=np.float32),
                          clusters=rng.random((3, 8), dtype=np.float32), counts=np.array([2, 2, n - 4], np.int32),
                          feats=rng.random((n, 20), dtype=np.float32), labels=np.arange(n) % 3,
                          pos=np.zeros((n, 3), np.int16), grids=[(4, 5, 128, 160)])

    a, b = loc(7), loc(5)
    save_locals(tmp_path / "locs", [a, b])
    back = load_locals(tmp_path / "locs")
    assert back[0].feats.shape == (7, 20) and back[1].feats.shape == (5, 20)
    np.testing.assert_allclose(back[1].feats, b.feats, atol=1e-3)
    np.testing.assert_allclose(back[0].clusters, a.clusters)


def test_dims_are_capped_at_the_local_features_width(shared_data):
    """DPLG hands co-attention its res4 map (112 channels on Lite0): the compact D' = 256 and D_cdb = 128
    cannot be reached by a PCA, so both are capped at 112 and the fit says so; records and query vectors then
    have 112 dimensions. (The fit used to fail: "PCA to 256 dimensions needs ... dimension >= 256".)"""
    from glimr.extract.local import fit_params
    from glimr.models.registry import build_model

    net = build_model("dplg-lite0", warn_untrained=False).eval()
    items = sorted((shared_data / "photos").glob("*.JPEG"))[:14]
    cfg = LocalConfig.named("compact", n_select=60, clusters=10, codebook_size=16, max_words=8)
    _, locs = extract_local(net, items, cfg=cfg, scales=(1.0,), max_size=160, workers=0, progress=False,
                            precision="fp32")
    locs = [locs[i] for i in range(len(items))]
    width = locs[0].global_.shape[0]
    assert width < cfg.codebook_dim < cfg.dim
    params = fit_params(locs, cfg)
    assert (params.cfg.dim, params.cfg.codebook_dim, params.cfg.proxy_dim) == (width, width, min(64, width))
    assert params.cfg.capped(width) == params.cfg and "capped" in params.meta
    assert params.query_vector(locs[0]).shape == (width,) and params.encode(locs[1]) is not None
    same = cfg.capped(10_000)                                       # wide features: nothing changes
    assert same == cfg
