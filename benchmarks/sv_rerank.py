"""Spatial-verification re-ranking: inliers of each query's global top-k once, then mAP over a grid of score
settings (weight, min_inliers, cap) and the time per query. Prints JSON lines and a markdown table.

    python benchmarks/sv_rerank.py ../shared/data/real-dev bench-data/clutter-dev-hard ../shared/data/coil100 \
        --models cider-lite0-composites-pcaw gem-lite2 --cache runs/eval-cache

Global descriptors and local features are cached under --cache (features: CACHE/sv/), so a second run only
verifies. The default SVConfig is always in the grid; its row is marked.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("datasets", nargs="+")
    ap.add_argument("--models", nargs="+", default=["cider-lite0-composites-pcaw"])
    ap.add_argument("--cache", default="runs/eval-cache")
    ap.add_argument("--top", type=int, default=100)
    ap.add_argument("--weights", default="0.25,0.5,1")
    ap.add_argument("--min-inliers", default="0,10,15,20")
    ap.add_argument("--caps", default="25,40,60,100")
    ap.add_argument("--sv", default="", help="extra SVConfig fields, e.g. ratio=0.75,method=magsac or kind=deep "
                                              "(each model's own res4 features)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                    help="of the global descriptors (fp32: the cached ones of `glimr eval --precision fp32`)")
    args = ap.parse_args(argv)

    from glimr.eval.evaluate import evaluate, load_eval_set, parse_rerank
    from glimr.rerank import sv

    extra = parse_rerank("sv:" + args.sv)[1] if args.sv else {}
    base = sv.SVConfig.from_params(top=args.top, **extra)
    deep = base.features.kind == "deep"
    default = sv.SVConfig.from_params(**({"kind": "deep"} if deep else {}))
    for ds in args.datasets:
        ev = load_eval_set(ds)
        for model in args.models:
            net = None
            if deep:
                from glimr.models.registry import build_model

                net = build_model(model)
            fc = sv.FeatureCache(os.path.join(args.cache, "sv"), base.features, net)
            t0 = time.perf_counter()
            q_feats = fc.get_many([(p, None, b) for p, b in zip(ev.query_paths, ev.query_boxes or
                                                                 [None] * len(ev.query_paths))],
                                  base.n_workers, False)
            t_q = (time.perf_counter() - t0) / len(ev.query_paths)
            rep = evaluate(ev, model=model, cache_dir=args.cache, keep=True, progress=False,
                           precision=args.precision)
            g = rep.metrics["mAP"]
            ranks = rep.ranks
            k = min(args.top, ranks.shape[0])
            need = np.unique(ranks[:k].ravel())
            db_feats = dict(zip(need.tolist(), fc.get_many([(ev.db_paths[i], None, None) for i in need],
                                                           base.n_workers, False)))
            pairs = [(j, int(ranks[r, j])) for j in range(ranks.shape[1]) for r in range(k)]
            t0 = time.perf_counter()
            inl = sv.verify_shortlist(q_feats, db_feats, pairs, base, False).reshape(ranks.shape[1], k)
            t_v = (time.perf_counter() - t0) / ranks.shape[1]
            gs = np.stack([rep.descriptors.db[ranks[:k, j]] @ rep.descriptors.q[j] for j in range(ranks.shape[1])])
            rows = []
            grid = itertools.product([float(w) for w in args.weights.split(",")],
                                     [int(m) for m in args.min_inliers.split(",")],
                                     [int(c) for c in args.caps.split(",")])
            for w, m, c in sorted(set(grid) | {(default.weight, default.min_inliers, default.cap)}):
                if c <= m:
                    continue
                cfg = sv.SVConfig.from_params(weight=w, min_inliers=m, cap=c, top=k, **extra)
                out = ranks.copy()
                for j in range(ranks.shape[1]):
                    s = sv.combine_scores(gs[j], inl[j], cfg)
                    out[:k, j] = ranks[:k, j][np.argsort(-s, kind="stable")]
                mp = ev.score(out)[0]["mAP"]
                rows.append({"weight": w, "min_inliers": m, "cap": c, "mAP": round(mp, 2),
                             "default": (w, m, c) == (default.weight, default.min_inliers, default.cap)})
            rec = {"dataset": ev.name, "model": rep.meta["model"], "global_mAP": round(g, 2), "top": k,
                   "ms_query_features": round(t_q * 1000, 1), "ms_query_verify": round(t_v * 1000, 1),
                   "threads": base.n_workers, "sv": {k_: v for k_, v in extra.items()}, "grid": rows}
            print(json.dumps(rec))
            best = max(rows, key=lambda r: r["mAP"])
            dflt = next(r for r in rows if r["default"])
            print(f"| {ev.name} | {rep.meta['model']} | {g:.2f} | {dflt['mAP']:.2f} | {best['mAP']:.2f} "
                  f"(w={best['weight']}, min={best['min_inliers']}, cap={best['cap']}) | {t_v * 1000:.0f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
