"""Where chance ends for ``--rerank sv:kind=deep``: RANSAC inliers between UNRELATED training photos.

Deep features (a model's res4 map, one feature per cell) give more chance inliers than SIFT: mutual nearest
neighbours of 400 cells always exist, and a homography with a one-cell threshold fits some of them by chance.
The score's ``min_inliers`` (no bonus at or below it) and ``cap`` must sit above that level, and are set
here on training photos (../shared/data/photos: every photo a different scene or object), never on an
evaluation set. Prints the distribution and writes it as JSON.

    PYTHONPATH=. python benchmarks/sv_deep_calibration.py --model gem-lite2-realw --photos 200 --pairs 2000
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    from glimr.io.images import list_images
    from glimr.models.registry import build_model
    from glimr.rerank import sv

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gem-lite2-realw")
    ap.add_argument("--images", default="../shared/data/photos")
    ap.add_argument("--photos", type=int, default=200, help="photos drawn (evenly) from --images")
    ap.add_argument("--pairs", type=int, default=2000, help="random unrelated pairs verified")
    ap.add_argument("--sv", default="", help="SVConfig overrides, e.g. threshold=24,max_keypoints=600")
    ap.add_argument("--json", default="benchmarks/results/sv_deep_calibration.json")
    args = ap.parse_args(argv)
    extra = dict(kv.split("=", 1) for kv in args.sv.split(",") if kv)
    cfg = sv.SVConfig.from_params(kind="deep", **extra)
    files = list_images(Path(args.images))
    files = [files[i] for i in np.linspace(0, len(files) - 1, min(args.photos, len(files))).astype(int)]
    net = build_model(args.model)
    t0 = time.perf_counter()
    feats = [sv.local_features(f, cfg=cfg.features, net=net) for f in files]
    t_feat = (time.perf_counter() - t0) / len(files)
    rng = np.random.default_rng(0)
    pairs = set()
    while len(pairs) < min(args.pairs, len(files) * (len(files) - 1) // 2):
        a, b = (int(v) for v in rng.integers(0, len(files), 2))
        if a != b:
            pairs.add((min(a, b), max(a, b)))
    pairs = sorted(pairs)
    t0 = time.perf_counter()
    inl = np.array([sv.verify_pair(feats[a], feats[b], cfg).inliers for a, b in pairs])
    t_pair = (time.perf_counter() - t0) / len(pairs)
    q = {f"p{p}": float(np.percentile(inl, p)) for p in (50, 90, 99, 99.9)}
    out = {"model": args.model, "images": args.images, "photos": len(files), "pairs": len(pairs),
           "settings": {"max_keypoints": cfg.features.max_keypoints, "max_side": cfg.features.max_side,
                        "threshold": cfg.threshold, "geometry": cfg.geometry},
           "inliers": {**q, "max": int(inl.max()), "mean": float(inl.mean())},
           "histogram": {int(k): int(v) for k, v in zip(*np.unique(inl, return_counts=True))},
           "seconds_per_image_features": round(t_feat, 4), "seconds_per_pair": round(t_pair, 4)}
    print(json.dumps(out, indent=1))
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
