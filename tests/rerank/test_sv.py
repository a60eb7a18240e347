"""Spatial verification (glimr/rerank/sv.py) on real images: UKBench views, real photos, a real model."""
from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
from PIL import Image

from glimr.cli import main
from glimr.eval import evaluate as E
from glimr.rerank import sv


@pytest.fixture(scope="module")
def uk(shared_data):
    return shared_data / "ukbench"


@pytest.fixture(scope="module")
def feats(uk):
    """Features of UKBench objects 0 (views 0-3) and 1 (views 4-7)."""
    return [sv.local_features(uk / f"ukbench{i:05d}.jpg") for i in range(8)]


def test_same_object_views_get_many_more_inliers_than_different_objects(feats):
    cfg = sv.SVConfig()
    same = [sv.verify_pair(feats[0], feats[j], cfg) for j in (1, 2, 3)]
    diff = [sv.verify_pair(feats[0], feats[j], cfg).inliers for j in (4, 5, 6, 7)]
    assert all(len(f) == cfg.features.max_keypoints for f in feats)  # 640x480 photos: the cap is reached
    assert min(r.inliers for r in same) >= 100, [r.inliers for r in same]
    assert max(diff) < cfg.min_inliers, diff  # unrelated objects: below the "verified" threshold
    r = same[0]
    assert r.model.shape == (3, 3) and r.pts_a.shape == r.pts_b.shape == (r.inliers, 2)
    assert r.matches >= r.inliers
    # the inlier coordinates obey the fitted homography (RANSAC threshold: 5 px)
    proj = cv2.perspectiveTransform(r.pts_a[None].astype(np.float64), r.model)[0]
    assert np.max(np.linalg.norm(proj - r.pts_b, axis=1)) <= cfg.threshold + 1e-6


def test_synthetic_homography_of_a_real_photo_is_recovered(uk):
    img = np.asarray(Image.open(uk / "ukbench00010.jpg").convert("RGB"))
    h, w = img.shape[:2]
    H = np.array([[0.9, 0.12, 30.0], [-0.08, 0.95, 20.0], [2e-4, -1e-4, 1.0]])
    warped = cv2.warpPerspective(img, H, (w, h), flags=cv2.INTER_LINEAR)
    fa = sv.local_features(img)
    fb = sv.local_features(warped)
    assert fa.scale == fb.scale == 1.0  # 640 px: neither down- nor upscaled, coordinates are the photo's
    for geometry in ("homography", "fundamental"):
        r = sv.verify_pair(fa, fb, geometry=geometry)
        assert r.inliers >= 200, (geometry, r.inliers)
        if geometry == "fundamental":  # x_b^T F x_a = 0 for the inliers (to a few pixels' epipolar distance)
            lines = cv2.computeCorrespondEpilines(r.pts_a.reshape(-1, 1, 2), 1, r.model).reshape(-1, 3)
            d = np.abs(np.sum(lines[:, :2] * r.pts_b, axis=1) + lines[:, 2])
            assert np.median(d) < 1.0
            continue
        corners = np.array([[[0, 0], [w, 0], [w, h], [0, h], [w / 2, h / 2]]], np.float64)
        err = np.linalg.norm(cv2.perspectiveTransform(corners, r.model)[0]
                             - cv2.perspectiveTransform(corners, H)[0], axis=1)
        assert err.max() < 2.0, err  # pixels, at the image corners
        assert np.allclose(r.model / r.model[2, 2], H, atol=0.02, rtol=0.02)


def test_score_formula_against_a_direct_computation():
    cfg = sv.SVConfig(weight=0.5, min_inliers=10, cap=40)
    g = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    inl = np.array([0, 10, 11, 25, 40, 500])
    direct = [gi + 0.5 * min(max(n - 10, 0), 30) / 30 for gi, n in zip(g, inl)]
    np.testing.assert_allclose(sv.combine_scores(g, inl, cfg), direct, rtol=0, atol=1e-12)
    np.testing.assert_allclose(sv.combine_scores(g, inl, weight=1.0, min_inliers=0, cap=20),
                               [gi + min(n, 20) / 20 for gi, n in zip(g, inl)], rtol=0, atol=1e-12)
    d = sv.SVConfig()  # the defaults: weight 1, min_inliers 8, cap 20
    np.testing.assert_allclose(sv.combine_scores(g, inl),
                               [gi + d.weight * min(max(n - d.min_inliers, 0), d.cap - d.min_inliers)
                                / (d.cap - d.min_inliers) for gi, n in zip(g, inl)], rtol=0, atol=1e-12)
    assert (d.weight, d.min_inliers, d.cap) == (1.0, 8, 20)
    with pytest.raises(ValueError, match="cap > min_inliers"):
        sv.SVConfig(min_inliers=20, cap=20)
    with pytest.raises(ValueError, match="unknown parameter.*bogus"):
        sv.SVConfig.from_params(bogus=1)


def _unit(angles):
    return np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)


def test_rerank_moves_the_verified_view_up_and_skips_a_corrupt_image(uk, tmp_path):
    """Global scores are set by hand (unit vectors at chosen angles); the images are real."""
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes((uk / "ukbench00001.jpg").read_bytes()[:3000])  # truncated JPEG
    db_paths = [bad, uk / "ukbench00004.jpg", uk / "ukbench00005.jpg", uk / "ukbench00001.jpg",
                uk / "ukbench00006.jpg"]
    cos = np.array([0.9, 0.8, 0.7, 0.6, 0.5])  # global ranking: corrupt, other, other, SAME object, other
    db = _unit(np.arccos(cos))
    q = _unit(np.zeros(1))
    ranks = E.rank_by_inner_product(q, db)
    assert ranks[:, 0].tolist() == [0, 1, 2, 3, 4]
    out = sv.rerank_sv(q, db, ranks, query_paths=[uk / "ukbench00000.jpg"], db_paths=db_paths, progress=False,
                       top=5)
    # the verified view (0.6 + 1 = 1.6) goes first; the unreadable image keeps its global score (0.9)
    assert out[:, 0].tolist() == [3, 0, 1, 2, 4]
    # a shortlist of 3 leaves the view where the global ranking put it
    out3 = sv.rerank_sv(q, db, ranks, query_paths=[uk / "ukbench00000.jpg"], db_paths=db_paths,
                        progress=False, top=3)
    assert out3[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_feature_cache_reuses_and_invalidates(uk, tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(4):
        shutil.copy(uk / f"ukbench{i:05d}.jpg", imgs / f"{i}.jpg")
    items = [(imgs / f"{i}.jpg", None, None) for i in range(4)] + [(imgs / "0.jpg", None, (100, 50, 500, 400))]
    cfg = sv.FeatureConfig()
    first = sv.FeatureCache(tmp_path / "sv", cfg)
    a = first.get_many(items, workers=2)
    assert first.extracted == 5 and first.loaded == 0
    assert len(list((tmp_path / "sv").rglob("*.npz"))) == 5
    assert not list((tmp_path / "sv").rglob("*.tmp"))  # atomic writes leave no temporary file
    again = sv.FeatureCache(tmp_path / "sv", cfg)  # a new process: everything from disk
    b = again.get_many(items, workers=2)
    assert again.extracted == 0 and again.loaded == 5
    for x, y in zip(a, b):
        assert np.array_equal(x.xy, y.xy) and np.array_equal(x.desc, y.desc) and x.desc.dtype == np.uint8
    assert a[4].size[0] < a[0].size[0] or a[4].size[1] < a[0].size[1]  # the crop box was applied
    shutil.copy(uk / "ukbench00100.jpg", imgs / "2.jpg")  # a changed image is extracted again
    third = sv.FeatureCache(tmp_path / "sv", cfg)
    c = third.get_many(items, workers=1)
    assert third.extracted == 1 and third.loaded == 4
    assert not np.array_equal(c[2].xy, a[2].xy)
    other = sv.FeatureCache(tmp_path / "sv", sv.FeatureConfig(max_keypoints=500))  # other settings: own folder
    assert len(other.get(imgs / "1.jpg")) == 500 and other.extracted == 1


@pytest.fixture(scope="module")
def cluttered(tmp_path_factory, shared_data):
    """A small Clutter-UKB-like gnd.json folder: query = view 0 of 8 UKBench objects; database = views 1-3 of
    each pasted small (30% of the width) into real photos, plus 16 crops of other photos pasted the same way."""
    root = tmp_path_factory.mktemp("clut") / "clutter-mini"
    (root / "query").mkdir(parents=True)
    (root / "db").mkdir()
    rng = np.random.default_rng(0)
    photos = sorted((shared_data / "photos").iterdir())
    uk = shared_data / "ukbench"

    def paste(obj: Image.Image, bg_path, name):
        bg = Image.open(bg_path).convert("RGB").resize((512, 384))
        w = int(0.30 * bg.width)
        o = obj.resize((w, int(w * obj.height / obj.width)))
        x, y = rng.integers(0, bg.width - o.width), rng.integers(0, bg.height - o.height)
        bg.paste(o, (int(x), int(y)))
        bg.save(root / "db" / name, quality=92)
        return name

    queries, db, positives = [], [], []
    k = 0
    for o in range(8):
        shutil.copy(uk / f"ukbench{4 * (10 + o):05d}.jpg", root / "query" / f"q{o}.jpg")
        queries.append(f"q{o}.jpg")
        positives.append([])
        for v in (1, 2, 3):
            positives[-1].append(len(db))
            db.append(paste(Image.open(uk / f"ukbench{4 * (10 + o) + v:05d}.jpg").convert("RGB"), photos[k],
                            f"p{o}_{v}.jpg"))
            k += 1
    for i in range(16):
        crop = Image.open(photos[500 + i]).convert("RGB")
        db.append(paste(crop, photos[k], f"n{i}.jpg"))
        k += 1
    (root / "gnd.json").write_text(json.dumps({"query": queries, "db": db, "positives": positives}))
    return root


def test_a_cache_folder_that_cannot_be_written_keeps_features_in_memory(uk, tmp_path):
    """A read-only index folder is still searched with sv: the features stay in memory (here the cache
    folder's parent is a file, so every write fails for real, also as root)."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    cache = sv.FeatureCache(blocker / "sv", sv.FeatureConfig())
    f = cache.get(uk / "ukbench00000.jpg")
    assert f is not None and len(f.xy) > 100 and cache.writable is False
    assert cache.get(uk / "ukbench00000.jpg") is f and cache.extracted == 1   # served from memory


def test_eval_rerank_sv_raises_map_and_reuses_the_cache(cluttered, lite0_gem, tmp_path):
    kw = {"net": lite0_gem, "max_size": 256, "workers": 0, "progress": False, "cache_dir": tmp_path / "cache"}
    base = E.evaluate(str(cluttered), keep=True, **kw)
    rer = E.evaluate(str(cluttered), rerank="sv:top=20", **kw)
    # small objects in clutter: the global descriptor misses views that the local features verify
    assert base.metrics["mAP"] < 80, base.metrics
    assert rer.metrics["mAP"] >= base.metrics["mAP"] + 10, (base.metrics, rer.metrics)
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "sv").rglob("*.npz")}
    # the queries and every database image in some query's global top 20 (and no other)
    assert len(files) == 8 + len(np.unique(base.ranks[:20]))
    again = E.evaluate(str(cluttered), rerank="sv:top=20", **kw)
    assert again.metrics == rer.metrics
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "sv").rglob("*.npz")} == files  # nothing new


def _ukbench_index(uk, tmp_path):
    """An index (gem-lite0, 256 px) of views 1-3 of UKBench object 0 and 12 images of objects 2-4."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in list(range(1, 4)) + list(range(8, 20)):
        shutil.copy(uk / f"ukbench{i:05d}.jpg", imgs / f"ukbench{i:05d}.jpg")
    assert main(["index", "build", str(imgs), "--index", str(tmp_path / "idx"), "--model", "gem-lite0",
                 "--max-size", "256", "--workers", "0"]) == 0


def test_cli_search_rerank_sv(uk, tmp_path, capsys):
    _ukbench_index(uk, tmp_path)
    capsys.readouterr()
    assert main(["search", str(tmp_path / "idx"), str(uk / "ukbench00000.jpg"), "--rerank", "sv", "--json",
                 "--top", "5"]) == 0
    res = json.loads(capsys.readouterr().out)
    names = [r["path"] for r in res["results"]]
    scores = [r["score"] for r in res["results"]]
    assert res["rerank"] == "sv" and len(names) == 5
    assert sorted(names[:3]) == ["ukbench00001.jpg", "ukbench00002.jpg", "ukbench00003.jpg"]
    assert scores[2] - scores[3] > 0.5  # the three verified views carry the full bonus (weight 1, >= cap inliers)
    cached = sorted((tmp_path / "idx" / "sv").rglob("*.npz"))
    assert len(cached) == 15  # every database image of the shortlist (15 < 100), extracted on first use
    stamps = [p.stat().st_mtime_ns for p in cached]
    assert main(["search", str(tmp_path / "idx"), str(uk / "ukbench00000.jpg"), "--rerank", "sv", "--json",
                 "--top", "5", "--shortlist", "4"]) == 0
    res2 = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in res2["results"]][:3] == names[:3]
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "idx" / "sv").rglob("*.npz"))] == stamps


# ------------------------------------------------------------------------------------------ deep features
@pytest.fixture(scope="module")
def lite2():
    from glimr.models.registry import build_model

    return build_model("gem-lite2")


def test_deep_features_are_the_strongest_res4_cells(uk, lite2):
    """kind=deep: the res4 map of the image resized to 512, the 400 cells with the largest norm, keypoints at
    the cell centres, L2-normalised channel vectors (checked against a direct computation, fp32)."""
    import torch

    cfg = sv.SVConfig.from_params(kind="deep").features
    f = sv.local_features(uk / "ukbench00000.jpg", cfg=cfg, net=lite2)
    img = Image.open(uk / "ukbench00000.jpg").convert("RGB")
    assert f.size == (512, 384) and f.scale == pytest.approx(512 / 640)
    x = np.asarray(img.resize((512, 384), Image.Resampling.LANCZOS), np.float32) / 255.0
    with torch.no_grad():
        m = lite2.backbone.forward_res4(torch.from_numpy(x).permute(2, 0, 1)[None])[0].numpy()
    c, h, w = m.shape
    assert (h, w) == (24, 32)                                       # stride 16
    v = m.reshape(c, -1).T
    top = np.argsort(-np.linalg.norm(v, axis=1), kind="stable")[:400]
    assert f.desc.dtype == np.float16 and f.desc.shape == (400, c)
    assert np.allclose(f.desc.astype(np.float32), v[top] / np.linalg.norm(v[top], axis=1, keepdims=True),
                       atol=2e-3)                                   # float16 storage
    assert np.allclose(f.xy, np.stack([(top % w + 0.5) * 16, (top // w + 0.5) * 16], 1))
    with pytest.raises(ValueError, match="needs the model"):
        sv.local_features(uk / "ukbench00000.jpg", cfg=cfg)
    with pytest.raises(ValueError, match="kind must be one of"):
        sv.FeatureConfig(kind="orb")


def test_deep_matching_is_mutual_nearest_neighbours():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(30, 8)).astype(np.float32)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b = a[::-1] + 0.01 * rng.normal(size=a.shape).astype(np.float32)   # b[29 - i] is a[i]'s twin
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    xy_a = rng.uniform(0, 500, size=(30, 2)).astype(np.float32)
    xy_b = (xy_a * 0.8 + 20)[::-1].copy()                            # a similarity: a homography
    fa = sv.LocalFeatures(xy_a, a.astype(np.float16), (512, 512), 1.0)
    fb = sv.LocalFeatures(xy_b, b.astype(np.float16), (512, 512), 1.0)
    r = sv.verify_pair(fa, fb, sv.SVConfig.from_params(kind="deep"))
    assert r.matches == 30 and r.inliers == 30
    assert np.allclose(r.pts_b, r.pts_a * 0.8 + 20, atol=1e-3)
    with pytest.raises(ValueError, match="cannot be matched"):
        sv.verify_pair(fa, sv.LocalFeatures(xy_a, np.zeros((30, 128), np.uint8), (512, 512), 1.0))
    # ratio < 1: a match whose second-best candidate is as close (a duplicated feature) is dropped
    dup = sv.LocalFeatures(np.concatenate([xy_b, xy_b[:10] + 50]), np.concatenate([fb.desc, fb.desc[:10]]),
                           (512, 512), 1.0)
    r_all = sv.verify_pair(fa, dup, sv.SVConfig.from_params(kind="deep"))
    r_ratio = sv.verify_pair(fa, dup, sv.SVConfig.from_params(kind="deep", ratio=0.9))
    assert r_ratio.matches == 20 and r_all.matches >= 20


def test_deep_verification_separates_same_and_different_objects(uk, lite2):
    cfg = sv.SVConfig.from_params(kind="deep")
    f = [sv.local_features(uk / f"ukbench{i:05d}.jpg", cfg=cfg.features, net=lite2) for i in range(8)]
    same = [sv.verify_pair(f[0], f[j], cfg).inliers for j in (1, 2, 3)]
    diff = [sv.verify_pair(f[0], f[j], cfg).inliers for j in (4, 5, 6, 7)]
    assert min(same) > cfg.cap and max(diff) <= cfg.min_inliers, (same, diff)


def test_eval_rerank_sv_deep_uses_the_evaluated_model(cluttered, lite0_gem, tmp_path):
    kw = {"net": lite0_gem, "max_size": 256, "workers": 0, "progress": False, "cache_dir": tmp_path / "cache"}
    base = E.evaluate(str(cluttered), keep=True, **kw)
    rer = E.evaluate(str(cluttered), rerank="sv:top=20,kind=deep", **kw)
    assert rer.metrics["mAP"] >= base.metrics["mAP"] + 10, (base.metrics, rer.metrics)
    # deep features are cached per feature settings AND backbone weights
    folders = [p.name for p in (tmp_path / "cache" / "sv").iterdir()]
    feats = sv.SVConfig.from_params(kind="deep").features
    assert folders == [f"{feats.key()}-{sv.backbone_fingerprint(lite0_gem)}"]


def test_cli_search_rerank_sv_deep(uk, tmp_path, capsys):
    _ukbench_index(uk, tmp_path)
    capsys.readouterr()
    assert main(["search", str(tmp_path / "idx"), str(uk / "ukbench00000.jpg"), "--rerank", "sv-deep",
                 "--json", "--top", "5"]) == 0
    res = json.loads(capsys.readouterr().out)
    names = [r["path"] for r in res["results"]]
    assert res["rerank"] == "sv-deep"
    assert sorted(names[:3]) == ["ukbench00001.jpg", "ukbench00002.jpg", "ukbench00003.jpg"]
    assert len(list((tmp_path / "idx" / "sv").rglob("*.npz"))) == 15
