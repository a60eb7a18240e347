"""`glimr audit`, stage 2: spatial verification of every (eval image, training candidate) pair.

Nothing is re-implemented here: the local features (SIFT, RootSIFT), the matching (ratio test, one-to-one) and
the RANSAC homography are glimr.rerank.sv's :func:`~glimr.rerank.sv.local_features`,
:func:`~glimr.rerank.sv.verify_pair` and :class:`~glimr.rerank.sv.FeatureCache`, with its SVConfig defaults.

- Training images' features are cached in the training index's ``INDEX/sv/`` folder, keyed by the index rows'
  content hashes (the same cache `glimr search --rerank sv` uses), so a second audit against other eval sets
  extracts only the training images it has not seen; eval images' features go to ``AUDIT_DIR/features/``.
- Work is committed per chunk of eval images (``work/.../<start>.json``, atomic): an interrupted audit resumes
  at the first chunk that is not on disk. A fresh FeatureCache per chunk keeps memory bounded.
- An unreadable image has no features: its pairs get 0 inliers and the audit goes on.
- The pair score is sv's :func:`~glimr.rerank.sv.combine_scores`: global + weight * f(inliers).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from glimr.audit.overlap import AuditSettings, _chunks, read_json
from glimr.io.atomic import atomic_write_bytes
from glimr.rerank.sv import FeatureCache, combine_scores, local_features, verify_pair, verify_shortlist

__all__ = ["match_lines", "verify_retrieved"]


def verify_retrieved(set_name: str, rows: list[dict], store, train, lookup: dict[str, int], work: Path,
                     feature_dir: Path, settings: AuditSettings, *, progress: bool = True) -> list[dict]:
    """Verify every retrieved pair of one eval set. ``rows``: glimr.audit.overlap.retrieve's; ``store``: the open
    training index; ``train``: the GLDv2Set; ``lookup``: index path -> training image index. Returns the rows of
    candidates.json: ``{"eval_set", "eval_image", "train_id", "landmark_id", "global_score", "inliers", "score"}``
    (hits that are not training images of the CSV are dropped)."""
    from tqdm.auto import tqdm

    cfg = settings.sv_config()
    index_rows = store.rows()
    id_index = {tid: i for i, tid in enumerate(train.ids)}
    out: list[dict] = []
    bar = tqdm(total=len(rows), desc=f"verify {set_name}", unit="img", disable=not progress, dynamic_ncols=True)
    for s, e in _chunks(len(rows), settings.chunk):
        f = work / f"{s:07d}.json"
        got = read_json(f)
        if got is None or got.get("n") != e - s:
            t0, c0 = time.perf_counter(), time.process_time()
            chunk = rows[s:e]
            q_cache = FeatureCache(feature_dir, cfg.features)
            t_cache = FeatureCache(store.dir / "sv", cfg.features)
            q_feats = q_cache.get_many([(Path(r["path"]), None, r["box"]) for r in chunk], cfg.n_workers)
            cand: list[tuple[int, int, float]] = []   # (row in chunk, training image, global score)
            for j, r in enumerate(chunk):
                for p, sc in r["hits"]:
                    t = lookup.get(p)
                    if t is not None:
                        cand.append((j, t, sc))
            need = sorted({t for _, t, _ in cand})
            root = train.root
            feats = t_cache.get_many([(train.paths[t], _hash(index_rows, train.paths[t], root), None) for t in need],
                                     cfg.n_workers)
            by_t = dict(zip(need, feats))
            inl = verify_shortlist(q_feats, by_t, [(j, t) for j, t, _ in cand], cfg) if cand else np.zeros(0, int)
            pairs = []
            for (j, t, sc), n in zip(cand, inl.tolist()):
                pairs.append([chunk[j]["eval_image"], train.ids[t], sc, int(n)])
            got = {"n": e - s, "pairs": pairs, "seconds": time.perf_counter() - t0,
                   "cpu_seconds": time.process_time() - c0,
                   "pairs_verified": len(cand),
                   "errors": {**q_cache.errors, **t_cache.errors}}
            atomic_write_bytes(f, json.dumps(got).encode())
        for name, tid, sc, n in got["pairs"]:
            t = id_index.get(tid)
            if t is None:   # no longer in the CSV
                continue
            out.append({"eval_set": set_name, "eval_image": name, "train_id": tid,
                        "landmark_id": train.landmarks[t], "global_score": sc, "inliers": n,
                        "score": round(float(combine_scores([sc], [n], cfg)[0]), 6)})
        bar.update(e - s)
    bar.close()
    return out


def _hash(index_rows, path: Path, root: Path):
    from glimr.index.store import db_path

    r = index_rows.get(db_path(path.relative_to(root).as_posix()))
    return r.hash if r is not None else None


def match_lines(eval_path, box, train_path, settings: AuditSettings, *, feature_dir=None, train_cache=None,
                train_hash: str | None = None) -> dict:
    """The inlier matches of one pair, for drawing: ``{"inliers", "a": [[x, y]...], "b": [[x, y]...]}`` with
    coordinates as fractions (0..1) of the eval image (cropped to ``box``) and of the training image; at most
    ``settings.lines`` matches, evenly taken. Same features and RANSAC as the verification (deterministic)."""
    cfg = settings.sv_config()
    fa = (FeatureCache(feature_dir, cfg.features).get(Path(eval_path), None, box) if feature_dir is not None
          else local_features(eval_path, box=box, cfg=cfg.features))
    fb = (FeatureCache(train_cache, cfg.features).get(Path(train_path), train_hash, None) if train_cache is not None
          else local_features(train_path, cfg=cfg.features))
    if fa is None or fb is None:
        return {"inliers": 0, "a": [], "b": []}
    r = verify_pair(fa, fb, cfg)
    n = r.inliers
    idx = np.linspace(0, n - 1, min(n, settings.lines)).round().astype(int) if n and settings.lines else []
    wa, ha = fa.size
    wb, hb = fb.size
    a = [[round(float(r.pts_a[i, 0]) / wa, 4), round(float(r.pts_a[i, 1]) / ha, 4)] for i in idx]
    b = [[round(float(r.pts_b[i, 0]) / wb, 4), round(float(r.pts_b[i, 1]) / hb, 4)] for i in idx]
    return {"inliers": int(n), "a": a, "b": b}
