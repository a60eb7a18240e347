"""The FAISS structure chosen by size (glimr.index.ann), exact re-ranking from the stored vectors, memory-mapped
loading, growth without retraining, and `glimr index optimize` on a real index folder (SQLite + FAISS)."""
from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from glimr import cli
from glimr.extract.multiscale import ExtractSettings
from glimr.index import ann
from glimr.index.build import optimize_index
from glimr.index.settings import IndexConfig, IndexSettings
from glimr.index.store import IndexStore, Row

DIM = 64
IVF = "IVF32_HNSW32,PQ16x4fs"


def clustered(n: int, seed: int, centres: np.ndarray | None = None) -> np.ndarray:
    """L2-normalised vectors around 150 random centres (descriptor-like: neighbours exist, margins are real)."""
    rng = np.random.default_rng(seed)
    if centres is None:
        centres = np.random.default_rng(123).standard_normal((150, DIM)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.standard_normal((n, DIM)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_top(db: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(q @ db.T), axis=1, kind="stable")[:, :k]


def recall_at(ids: np.ndarray, gt: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(ids, gt)]))


def test_size_rule_flat_while_small_then_ivf_hnsw_pq_fastscan():
    # the rule of glimr/index/ann.py's docstring, at the sizes that matter
    assert ann.FLAT_MAX == 200_000
    for n in (0, 1, 300, 100_000, 199_999):
        assert ann.auto_factory(n, 512) == "Flat"
    assert ann.auto_factory(200_000, 512) == "PCAR256,IVF2048_HNSW32,PQ128x4fs"    # 4*sqrt(2e5) = 1789 -> 2048
    assert ann.auto_factory(1_000_000, 512) == "PCAR256,IVF4096_HNSW32,PQ128x4fs"  # 4000 -> 4096
    assert ann.auto_factory(10_000_000, 512) == "PCAR256,IVF4096_HNSW32,PQ128x4fs"  # capped at NLIST_MAX
    assert ann.auto_factory(1_000_000, 1280) == "PCAR256,IVF4096_HNSW32,PQ128x4fs"  # PCA to at most 256
    assert ann.auto_factory(1_000_000, 64) == "PCAR32,IVF4096_HNSW32,PQ16x4fs"
    assert ann.auto_factory(1_000_000, 36) == "PCAR16,IVF4096_HNSW32,PQ8x4fs"  # m kept even
    assert ann.auto_factory(1_000_000, 7) == "IVF4096_HNSW32,SQ8"  # too small for PCA + PQ: scalar codes
    assert ann.resolve_factory("auto", 50, 512) == "Flat" and ann.resolve_factory("HNSW32", 50, 512) == "HNSW32"
    for n, d in ((200_000, 512), (3_000_000, 256), (10**7, 1280), (10**6, 7), (10**6, 6), (10**6, 36)):
        faiss.index_factory(d, ann.auto_factory(n, d), faiss.METRIC_INNER_PRODUCT)  # FAISS accepts each one
    # 4-bit codes: m / 2 bytes per image (64 B at 512-d), under the 100 B/image goal with the 8-byte id
    assert ann.pca_pq(512) == (256, 128) and 128 // 2 + 8 <= 100
    assert ann.train_count("PCAR256,IVF4096_HNSW32,PQ128x4fs", 10**7) == 40 * 4096
    assert ann.train_count("IVF4096_HNSW32,PQ128x4fs", 5000) == 5000 and ann.train_count("Flat", 10**7) == 65536


def test_ivf_pq_recall_after_exact_reranking(tmp_path):
    db = clustered(4000, 0)
    q = clustered(60, 1)
    gt = exact_top(db, q, 10)
    index, built_as = ann.build(db, np.arange(len(db)), IVF)
    assert built_as == IVF and index.ntotal == 4000 and not ann.is_exact(index)
    scores, ids = ann.search(index, q, 10, db, nprobe=16, shortlist=200)
    r = recall_at(ids, gt, 10)
    assert r >= 0.95, r  # 60 queries x 10: the bound tolerates 30 misses of 600
    # the HNSW over the centroids looks at twice as many as the lists it returns
    assert faiss.downcast_index(faiss.extract_index_ivf(index).quantizer).hnsw.efSearch == 32
    # re-ranked scores are the exact inner products (float32 dot products of 64 values: 1e-5)
    np.testing.assert_allclose(scores, np.take_along_axis(q @ db.T, ids, 1), atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first (1e-6: float32 ties)
    # without the stored vectors the same index gives approximate scores, and re-ranking helps recall here
    _, ids_pq = ann.search(index, q, 10, None, nprobe=16)
    assert recall_at(ids_pq, gt, 10) < r
    # re-ranking from a memory-mapped vectors file (read row by row with pread) gives the same answer
    db.tofile(tmp_path / "v.f32")
    mmv = np.memmap(tmp_path / "v.f32", dtype=np.float32, mode="r", shape=db.shape)
    for rows in (np.array([3, 17, 18, 3999]), np.r_[0:1500, 7, 2000:4000], np.array([5, 4])):  # runs, repeats
        np.testing.assert_array_equal(ann.read_rows(mmv, rows), db[rows])  # the same bytes: exact
    s_mm, i_mm = ann.search(index, q, 10, mmv, nprobe=16, shortlist=200)
    np.testing.assert_array_equal(i_mm, ids)
    np.testing.assert_array_equal(s_mm, scores)  # same rows, same arithmetic: bit-identical
    # a memory-mapped load answers exactly as the loaded one
    ann.save_index(index, tmp_path / "f.index")
    mm = ann.load_index(tmp_path / "f.index", mmap=True)
    s2, i2 = ann.search(mm, q, 10, db, nprobe=16, shortlist=200)
    np.testing.assert_array_equal(i2, ids)
    np.testing.assert_allclose(s2, scores, atol=0)  # same computation on the same rows: bit-identical


def _store(tmp_path, n: int, factory: str = "auto") -> tuple:
    cfg = IndexConfig(ExtractSettings(model="gem-lite0"), IndexSettings(dim=DIM, factory=factory), root="/x")
    vecs = clustered(n, 5)
    with IndexStore.create_or_open(tmp_path / "idx", cfg) as st:
        st.commit_chunk([Row(f"img{i:05d}.jpg", f"h{i}", 1, 1.0, "ok", None, None) for i in range(n)], vecs)
        st.rebuild_faiss()
    return tmp_path / "idx", vecs


def test_optimize_keeps_rows_and_results(tmp_path, capsys):
    d, vecs = _store(tmp_path, 3000)
    q = clustered(40, 9)
    gt = exact_top(vecs, q, 10)
    with IndexStore.open(d) as st:
        assert st.describe_faiss()["built_as"] == "Flat"  # small: flat, as before "auto" existed
        rows0 = st.rows()
        flat = st.search(q, 10)
    # flat = exact: the same names and scores as a direct computation (scores: float32 sums, 1e-5)
    sims = q @ vecs.T
    for i, res in enumerate(flat):
        assert [p for p, _ in res] == [f"img{j:05d}.jpg" for j in gt[i]]
        np.testing.assert_allclose([s for _, s in res], sims[i, gt[i]], atol=1e-5)
    vec_bytes = (d / "vectors.f32").read_bytes()

    assert cli.main(["index", "optimize", str(d), "--factory", IVF]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["built_as"] == IVF and info["ntotal"] == 3000 and info["nlist"] == 32
    assert info["bytes_per_image"] == pytest.approx((d / "faiss.index").stat().st_size / 3000, rel=1e-3)
    assert info["bytes_per_image"] < 4 * DIM  # smaller than the flat vectors it replaces
    assert json.loads((d / "index.json").read_text())["index"]["factory"] == IVF
    assert (d / "vectors.f32").read_bytes() == vec_bytes  # nothing re-embedded or rewritten
    with IndexStore.open(d) as st:
        assert st.rows() == rows0
        ivf = faiss.extract_index_ivf(st.faiss())
        assert ivf.nlist == 32 and st.faiss().ntotal == 3000
        approx = st.search(q, 10)
    hits = np.mean([len({p for p, _ in a} & {p for p, _ in b}) / 10 for a, b in zip(approx, flat)])
    assert hits >= 0.95, hits  # default nprobe/shortlist over 32 lists: nearly exact
    for a in approx:  # re-ranked from vectors.f32: each returned score is the exact one (1e-5)
        for p, s in a:
            assert s == pytest.approx(float(sims[approx.index(a), int(p[3:8])]), abs=1e-5)
    # index info reports the structure and its bytes per image
    assert cli.main(["index", "info", str(d)]) == 0
    st_info = json.loads(capsys.readouterr().out)["search_structure"]
    assert st_info["built_as"] == IVF and st_info["bytes_per_image"] == info["bytes_per_image"]
    # back to the size rule: flat again, the very same results as before
    assert optimize_index(d, "auto")["built_as"] == "Flat"
    with IndexStore.open(d) as st:
        assert st.search(q, 10) == flat


def test_grown_in_place_without_retraining(tmp_path):
    d, _vecs = _store(tmp_path, 2000, factory=IVF)
    with IndexStore.open(d) as st:
        cents0 = faiss.extract_index_ivf(st.faiss()).quantizer.reconstruct_n(0, 32)
    more = clustered(300, 11)
    cfg = IndexStore._read_config(d)
    with IndexStore.for_build(d, cfg) as st:
        st.save_config()
        st.commit_chunk([Row(f"new{i:05d}.jpg", f"n{i}", 1, 1.0, "ok", None, None) for i in range(300)], more)
        st.rebuild_faiss()
    with IndexStore.open(d) as st:
        ix = st.faiss()
        assert ix.ntotal == 2300
        # the same coarse centroids (not retrained): bit-identical
        np.testing.assert_array_equal(faiss.extract_index_ivf(ix).quantizer.reconstruct_n(0, 32), cents0)
        res = st.search(more[:20], 1)
    assert [r[0][0] for r in res] == [f"new{i:05d}.jpg" for i in range(20)]  # each new image finds itself


def test_bad_factory_is_a_clear_error(tmp_path, capsys):
    d, _ = _store(tmp_path, 50)
    before = (d / "index.json").read_text()
    assert cli.main(["index", "optimize", str(d), "--factory", "IVF,Nope"]) == 2
    err = capsys.readouterr().err
    assert "bad FAISS factory string 'IVF,Nope'" in err and "--factory" in err
    assert (d / "index.json").read_text() == before  # nothing changed
    assert cli.main(["index", "optimize", str(tmp_path / "missing")]) == 2
    assert "no index.json" in capsys.readouterr().err
    with pytest.raises(ValueError, match="bad FAISS factory string 'PQ7'"):
        ann.build(clustered(10, 0), np.arange(10), "PQ7")


def test_auto_index_switches_structure_when_it_grows(tmp_path, monkeypatch):
    # the rule's thresholds lowered so that a test-sized index crosses them (the rule itself is unchanged)
    monkeypatch.setattr(ann, "FLAT_MAX", 2000)
    monkeypatch.setattr(ann, "NLIST_MIN", 16)
    d, _vecs = _store(tmp_path, 1500)
    with IndexStore.open(d) as st:
        assert st.describe_faiss()["built_as"] == "Flat"
    more = clustered(1500, 12)
    with IndexStore.for_build(d, IndexStore._read_config(d)) as st:
        st.save_config()
        st.commit_chunk([Row(f"more{i:05d}.jpg", f"m{i}", 1, 1.0, "ok", None, None) for i in range(1500)], more)
        st.rebuild_faiss()
    with IndexStore.open(d) as st:
        info = st.describe_faiss()
        assert info["built_as"] == "PCAR32,IVF256_HNSW32,PQ16x4fs" and info["ntotal"] == 3000  # 4*sqrt(3000) -> 256
        assert info["bytes_per_image"] < 4 * DIM
        res = st.search(more[:20], 1)
    assert [r[0][0] for r in res] == [f"more{i:05d}.jpg" for i in range(20)]  # exact re-ranking: each finds itself
